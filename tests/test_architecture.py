"""The layout docs/ARCHITECTURE.md describes, held by the code: each layer imports only the
layers before it, no import cycle among taps/ modules, a short composition root, and short
functions. Read from the source (ast), so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "taps"
# Layer of each part of taps/: a module may import modules of its own layer or lower ones.
LAYERS = {
    "taps.paths": 0, "taps.config": 0, "taps.memory": 0, "taps.settings": 0,
    "taps.data": 1,
    "taps.models": 2,
    "taps.training": 3,
    "taps.engine": 4,
    "taps.combine": 5,
    "taps.eval": 6,
    "taps.report": 7,
    "taps.tracking": 8,
    "taps.study": 9,
    "taps.run": 10, "taps.export": 10,
}  # fmt: skip
MAX_FUNCTION_LINES = 60
MAX_RUN_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """taps modules `name` imports anywhere (a function-level import is still a dependency)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from taps.x import y` depends on taps.x.y when y is a module, else on taps.x
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                       else node.module for a in node.names]  # fmt: skip
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, tree, known) for name, tree in mods.items()}


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in graph() if m != "taps")


def test_layers_import_only_earlier_layers():
    bad = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        if m != "taps"
        for d in sorted(deps)
        if d != "taps" and layer(d) > layer(m)
    ]
    assert not bad, "\n".join(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(g):
        if start in state:
            continue
        stack = [(start, iter(sorted(g[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(g.get(nxt, ())))))
                path.append(nxt)
    return None


def test_no_import_cycle():
    g = {m: {d for d in deps if d != "taps"} for m, deps in graph().items()}
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_function_over_60_lines():
    long = [
        f"{name}.{n.name}: {n.end_lineno - n.lineno + 1} lines"
        for name, tree in modules().items()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_the_entry_point_is_a_short_composition_root():
    lines = (PKG / "run.py").read_text().splitlines()
    assert len(lines) < MAX_RUN_LINES, f"taps/run.py has {len(lines)} lines"


def test_experiment_scripts_use_the_library_not_the_entry_point():
    for script in sorted((ROOT / "experiments").rglob("*.py")):
        tree = ast.parse(script.read_text())
        used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        assert "taps.run" not in used, f"{script.name} imports taps.run"
