"""Chained prompts: a named prompt may use another's caption of the same image.

``{caption.tags}`` in a prompt template stands for the caption the prompt named
``tags`` gave this image (docs/protocol.md §20). The planner renders a template's
manifest columns at once and leaves each caption reference as a marker
(``marker("tags")``); the engine replaces the marker with the upstream caption when
the row's turn comes (``run/chain.py``), after the upstream row has finished, in this
run or an earlier one.

``order`` puts the prompts in dependency order (otherwise as given), so the rows of
one image come out upstream first; a reference to an unknown prompt, or a cycle, is a
config error (exit 2) naming it.
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import RunFatal

if TYPE_CHECKING:
    from .plan import NamedPrompt

__all__ = ["CAPTION_FIELD", "Later", "marker", "order", "refs"]

CAPTION_FIELD = "caption"
_MARK = "\x1f"  # a unit separator: no manifest value or template contains one


def marker(name: str) -> str:
    """What stands for prompt ``name``'s caption until it is known."""
    return f"{_MARK}caption.{name}{_MARK}"


class Later:
    """``{caption.X}`` while rendering a template: the marker of X's caption. A plain
    ``{caption}`` is still the manifest's own ``caption`` column, if it has one."""

    def __init__(self, column: object = None) -> None:
        self._column = column

    def __getattr__(self, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return marker(name)

    def __format__(self, spec: str) -> str:
        return format("" if self._column is None else self._column, spec)


def refs(template: str) -> tuple[str, ...]:
    """The prompt names ``template`` uses the captions of, in order, once each."""
    out: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return ()  # an unparsable template is reported by template_fields
    for _, field, _, _ in parsed:
        if field and field.startswith(CAPTION_FIELD + "."):
            name = field[len(CAPTION_FIELD) + 1:]
            if name not in out:
                out.append(name)
    return tuple(out)


def _plain(p: NamedPrompt) -> None:
    """Exit 2 for ``{caption.X!r}`` or ``{caption.X:.200}``: the planner formats the
    marker, not the caption, so a conversion or format spec would mangle the marker and
    the model would get it instead of the caption."""
    try:
        parsed = list(string.Formatter().parse(p.template))
    except ValueError:
        return
    for _, field, spec, conversion in parsed:
        if field and field.startswith(CAPTION_FIELD + ".") and (spec or conversion):
            raise RunFatal(f"prompt {p.name!r} uses {{{field}"
                           f"{'!' + conversion if conversion else ''}"
                           f"{':' + spec if spec else ''}}}: a caption reference takes no "
                           f"conversion or format spec; write {{{field}}}", "config",
                           exit_code=2)


def order(prompts: Sequence[NamedPrompt]) -> tuple[NamedPrompt, ...]:
    """``prompts`` in dependency order, stable otherwise; exit 2 on a bad reference."""
    by_name = {p.name: p for p in prompts}
    for p in prompts:
        _plain(p)
        for name in refs(p.template):
            if name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=1)
                hint = f"; did you mean {{caption.{close[0]}}}?" if close else \
                    f" (prompts: {', '.join(by_name)})"
                raise RunFatal(f"prompt {p.name!r} uses {{caption.{name}}}, but there is "
                               f"no prompt named {name!r}{hint}", "config", exit_code=2)
    done: dict[str, NamedPrompt] = {}
    visiting: list[str] = []

    def visit(p: NamedPrompt) -> None:
        if p.name in done:
            return
        if p.name in visiting:
            cycle = visiting[visiting.index(p.name):] + [p.name]
            raise RunFatal(f"prompts use each other's captions in a cycle: "
                           f"{' -> '.join(cycle)}", "config", exit_code=2)
        visiting.append(p.name)
        for name in refs(p.template):
            visit(by_name[name])
        visiting.pop()
        done[p.name] = p

    for p in prompts:
        visit(p)
    return tuple(done.values())


def chained(prompts: Sequence[NamedPrompt]) -> bool:
    return any(refs(p.template) for p in prompts)
