"""caption-pipeline: batch image captioning over streaming vision-LLM APIs."""

from .settings import Settings

__version__ = "0.1.0"
__all__ = ["Settings", "__version__"]
