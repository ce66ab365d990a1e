"""The package's modules import one another without a circle: every import statement (at the top or inside a
function, where heavy parts load lazily) is read from the source, and the graph must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import histoboost

PACKAGE = Path(histoboost.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name imported from a package counts as its submodule when it
    is one, else as the package itself)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] when there is none (depth-first search, colouring)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_lazy_imports_inside_functions():
    graph = import_graph()
    assert "histoboost.features" in graph["histoboost.inference"]  # imported inside Predictor's methods only
    assert "histoboost.slides.run" in graph["histoboost.bundle"]  # Bundle.predict_slides
    assert "histoboost.engine.dask" in graph["histoboost.engine"]  # open_engine, for --engine dask only


def test_no_import_circle_among_the_package_modules():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_slides_never_import_the_bundle():
    """Whole slides are scored by the Predictor: the slide code knows nothing of the bundle's file format."""
    graph = import_graph()
    for name in graph:
        if name.startswith("histoboost.slides"):
            assert not graph[name] & {"histoboost.bundle", "histoboost.container", "histoboost.training"}, name
