"""Fixtures of the batch lane's tests (the helpers live in ``helpers.py``)."""

from .helpers import sim  # noqa: F401  (the fixture)
