"""What a row's work raises when the run stops under it."""

from __future__ import annotations

__all__ = ["Interrupted"]


class Interrupted(Exception):
    """The run is stopping: leave the row unwritten (pending) instead of retrying it."""
