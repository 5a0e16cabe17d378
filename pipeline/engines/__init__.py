"""Engines turn a run session's pending rows into result rows; the session does the rest.

``local`` (this process: a worker pool on one event loop), ``ray`` (caption actors
on a Ray cluster) and ``batch`` (``--lane batch``: the provider's batch API). Each is
imported when chosen: Ray is an optional extra.
"""

from __future__ import annotations

from ..run.session import Engine

__all__ = ["ENGINES", "get_engine"]

ENGINES = ("local", "ray", "batch")  # "batch": --lane batch (the provider's batch API)


def get_engine(name: str) -> Engine:
    if name == "local":
        from .local import LocalEngine

        return LocalEngine()
    if name == "ray":
        from .ray_driver import RayEngine

        return RayEngine()
    if name == "batch":
        from .batch import BatchEngine

        return BatchEngine()
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
