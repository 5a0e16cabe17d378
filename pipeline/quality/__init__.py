"""The quality gate: is a caption that arrived one worth training on (docs/protocol.md §19)."""

from .config import QualitySettings, load_schema
from .gate import Gate, Verdict
from .repeats import RepeatCounter

__all__ = ["Gate", "QualitySettings", "RepeatCounter", "Verdict", "load_schema"]
