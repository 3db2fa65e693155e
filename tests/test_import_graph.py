"""The project's modules import each other without cycles, counting every import statement in a file
(those inside functions too, where a cycle would otherwise hide), read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("easygen", "data_modules", "callbacks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (`from pkg import name` counts `pkg.name` when that is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            # the deepest project module the name points at
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imported(path, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the walk saw the project's imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_plain_models_do_not_import_the_lightning_layer():
    """Nothing under easygen/ outside easygen.lit, easygen.stages and easygen.serve imports them or the
    callbacks (the plain models never reach up into the layer that trains them; that they import neither
    Lightning nor Hydra is tests/test_layering.py)."""
    modules = project_modules()
    upper = ("easygen.lit", "easygen.stages", "easygen.serve", "callbacks")
    plain = [m for m in modules if m.startswith("easygen") and not m.startswith(upper[:3])]
    bad = {m: sorted(d for d in imported(modules[m], modules) if d.startswith(upper)) for m in plain}
    assert not {m: d for m, d in bad.items() if d}, bad
