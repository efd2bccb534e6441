"""The packages of src/mvptr import each other without a cycle, and the evaluation not the trainer's internals.

Why: a cycle between packages means neither can be understood, tested or replaced alone (the evaluation used
to import the trainer, which imported the evaluation for its zero-shot check). The graph is read from the
source with `ast`, lazy imports inside functions included (they are dependencies too), imports under
`if TYPE_CHECKING:` left out (annotations only). A node is a package (`mvptr.train`) or a top-level module
(`mvptr.config`).

Run: `.venv/bin/pytest tests/test_imports.py` (under a second).
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "src" / "mvptr"


def _node(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "mvptr" and len(parts) > 1 else None


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for stmt in ast.walk(tree):
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            for child in stmt.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """{node: the nodes it imports}."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("mvptr", *path.relative_to(PACKAGE).with_suffix("").parts))
        source = _node(module.removesuffix(".__init__")) if module != "mvptr.__init__" else None
        if source is None:
            continue
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        for stmt in ast.walk(tree):
            if getattr(stmt, "lineno", None) in skip:
                continue
            names = []
            if isinstance(stmt, ast.Import):
                names = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                names = [stmt.module]
            for name in names:
                target = _node(name)
                if target is not None and target != source:
                    graph.setdefault(source, set()).add(target)
        graph.setdefault(source, set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert {"mvptr.train", "mvptr.evaluate", "mvptr.models", "mvptr.objectives", "mvptr.config"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_evaluation_and_the_trainer_do_not_import_each_other():
    graph = import_graph()
    assert "mvptr.evaluate" not in graph["mvptr.train"]
    # The evaluation uses the optimiser recipe only (mvptr.train.optim), never the loop or its checkpoints.
    uses = {stmt.module for path in (PACKAGE / "evaluate").rglob("*.py")
            for stmt in ast.walk(ast.parse(path.read_text()))
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith("mvptr.train")}
    assert uses <= {"mvptr.train.optim"}, uses


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
