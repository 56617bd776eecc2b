"""The layers point down only and no project modules import each other in a circle.

Every module's imports are read with ``ast`` (top-level and function-local alike), so an upward import cannot
hide inside a function. Layers, bottom to top: ``studio`` (core), ``pipelines``, ``trainers``, the front doors
(``frontends``, ``app``, ``bench``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"studio": 0, "pipelines": 1, "trainers": 2, "frontends": 3, "app": 3, "bench": 3}
LAYER_NAMES = {0: "the studio core", 1: "pipelines", 2: "trainers", 3: "the front doors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "app.py"]
    for package in ("studio", "pipelines", "trainers", "frontends", "bench"):
        files += sorted((ROOT / package).rglob("*.py"))
    return {_module_name(path): path for path in files}


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, function-local?) for every import statement in ``tree``."""
    local_nodes = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in LAYERS:
                found.append((target, node.lineno, id(node) in local_nodes))
    return found


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = project_modules()
    known = set(modules)
    return {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_the_walk_sees_every_package_and_resolves_imports():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(LAYERS)
    assert "pipelines.composition" in {target for target, _, _ in graph["pipelines.loading"]}
    assert any(target.startswith("studio.") for target, _, _ in graph["trainers.loop"])


def test_layers_point_down_only():
    upward = [f"{module}:{line} imports {target} ({LAYER_NAMES[_layer(module)]} → {LAYER_NAMES[_layer(target)]})"
              for module, imports in import_graph().items() for target, line, _ in imports
              if _layer(target) > _layer(module)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_project_imports_are_at_module_top():
    local = [f"{module}:{line} imports {target} inside a function"
             for module, imports in import_graph().items() for target, line, is_local in imports if is_local]
    assert not local, "function-local project imports hide cycles:\n" + "\n".join(local)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles():
    graph = {module: {target for target, _, _ in imports if target != module}
             for module, imports in import_graph().items()}
    cycles = [component for component in strongly_connected(graph) if len(component) > 1]
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": {"c"}}, False),
                                           ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)])
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert any(len(c) > 1 for c in strongly_connected(graph)) is cyclic


def test_the_composition_methods_are_listed_once():
    """Front doors and benchmarks read ``pipelines.methods.METHODS``; none types the list out again."""
    from pipelines.methods import METHODS

    names = list(METHODS)
    literal = ", ".join(f'"{name}"' for name in names[:2])
    copies = [str(path.relative_to(ROOT)) for name, path in project_modules().items()
              if name != "pipelines.methods" and literal in path.read_text()]
    assert not copies, f"{literal}… typed out again in: {', '.join(copies)}"
