"""Tests of `python -m pipeline export` (a package: see conftest.py)."""
