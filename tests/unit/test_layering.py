"""The file list is the architecture: the package's imports are checked, not described.

Data flows one way, stage by stage (docs/protocol.md for the wire; README "How it is
built" for the packages):

* the stages (``sources``, ``images``, ``wire``, ``pacing``, ``store``, ``export``,
  ``batch``) and
  the shared nouns at the top (``records``, ``errors``, ``settings``, ...) never import
  the orchestration (``run``, ``engines``, ``commands``, ``cli``);
* ``run`` never imports ``engines`` or ``commands``; ``engines`` never ``commands``;
* on the client side only ``wire/transport.py`` and ``images/download.py`` import
  aiohttp;
* only ``sources/location.py`` imports fsspec (every remote read goes through it), and
  only ``images/decoders.py`` imports the extra decoders (pillow-heif, tifffile);
* the simulator imports nothing of the client, and the client nothing of the simulator
  (only the entry points that start it: ``cli.py`` and ``commands/demo.py``);
* there are no import cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pipeline"
STAGES = {"sources", "images", "wire", "pacing", "store", "export", "batch", "quality"}
TOP = {"records", "errors", "settings", "validate", "redact", "logs", "keys", "__init__"}
ORCHESTRATION = {"run", "engines", "commands", "cli", "__main__"}
AIOHTTP_CLIENT = {"wire/transport.py", "images/download.py"}
STARTS_SIMULATOR = {"cli.py", "commands/demo.py"}
ONLY_IMPORTED_BY = {"fsspec": {"sources/location.py"}, "s3fs": {"sources/location.py"},
                    "pillow_heif": {"images/decoders.py"}, "tifffile": {"images/decoders.py"}}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["pipeline", *parts])


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    me = module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                   for n in ast.walk(block)}  # annotations only: no import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            for a in node.names:  # "from . import status": the name is a module
                found.add(f"{mod}.{a.name}")
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports(path) if m in modules and m != name}
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rel(module: str) -> str:
    path = Path(*module.split(".")[1:])
    return str(path) + ".py" if (PKG / (str(path) + ".py")).exists() else str(path)


EDGES = graph()
PAIRS = sorted((a, b) for a, bs in EDGES.items() for b in bs)


def _is_forbidden(src: str, dst: str) -> str | None:
    a, b = layer(src), layer(dst)
    if a == "simulator" and b != "simulator":
        return "the simulator imports nothing of the client"
    if b == "simulator" and a != "simulator" and rel(src) not in STARTS_SIMULATOR:
        return "the client imports nothing of the simulator"
    if (a in STAGES or a in TOP) and b in ORCHESTRATION:
        return f"a stage ({a}) never imports the orchestration ({b})"
    if a == "run" and b in {"engines", "commands", "cli"}:
        return "run/ never imports engines/ or commands/"
    if a == "engines" and b in {"commands", "cli"}:
        return "engines/ never import commands/"
    return None


def test_no_module_imports_a_layer_it_must_not() -> None:
    bad = [f"{s} -> {d}: {why}" for s, d in PAIRS if (why := _is_forbidden(s, d))]
    assert bad == []


def test_only_the_transport_and_the_downloader_import_aiohttp_on_the_client_side() -> None:
    users = {rel(m) for m, path in ((module_name(p), p) for p in PKG.rglob("*.py"))
             if layer(m) != "simulator" and any(i.split(".")[0] == "aiohttp"
                                                for i in imports(path))}
    assert users <= AIOHTTP_CLIENT, sorted(users - AIOHTTP_CLIENT)


@pytest.mark.parametrize("package", sorted(ONLY_IMPORTED_BY))
def test_remote_storage_and_extra_decoders_have_one_importer_each(package: str) -> None:
    users = {rel(module_name(p)) for p in PKG.rglob("*.py")
             if any(i.split(".")[0] == package for i in imports(p))}
    assert users <= ONLY_IMPORTED_BY[package], sorted(users - ONLY_IMPORTED_BY[package])


def test_there_are_no_import_cycles() -> None:
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for n in sorted(EDGES[m]):
            if seen.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in seen:
                visit(n)
        stack.pop()
        seen[m] = 2

    for m in sorted(EDGES):
        if m not in seen:
            visit(m)


def test_the_rule_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: a stage importing the session is reported."""
    assert _is_forbidden("pipeline.store.sink", "pipeline.run.session")
    assert _is_forbidden("pipeline.simulator.app", "pipeline.wire.sse")
    assert _is_forbidden("pipeline.wire.sse", "pipeline.simulator.app")
    assert _is_forbidden("pipeline.run.worker", "pipeline.engines.local")
    assert _is_forbidden("pipeline.batch.build", "pipeline.engines.batch")
    assert not _is_forbidden("pipeline.run.worker", "pipeline.wire.sse")
    assert not _is_forbidden("pipeline.cli", "pipeline.simulator.app")
