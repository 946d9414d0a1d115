"""The import graph of ``readout/``: the library wing points down only, no CLI is imported, no cycles.

The wings (README, "Layout"): the library is what ``import readout`` needs; ``readout.training``,
``readout.evaluation`` and ``readout.tools`` sit above it, and the design card's entry points
(``python -m readout.fit`` ...) are launchers above those. Imports under ``if TYPE_CHECKING:`` are
annotations only and are not counted; imports inside functions are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "readout"
WINGS = ("readout.training", "readout.evaluation", "readout.tools")
#: The entry points of the design card (``python -m readout.<name>``): launchers, above every wing.
LAUNCHERS = {"readout.fit", "readout.export", "readout.evaluate", "readout.bench", "readout.explain"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def is_main_guard(node: ast.stmt) -> bool:
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    sides = [node.test.left, *node.test.comparators]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def imported(tree: ast.Module, module: str, modules: set[str]) -> set[str]:
    """The ``readout`` modules that ``module`` imports (a ``from package import name`` counts the
    submodule ``package.name`` where there is one, else the package)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "readout")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package[module] else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "readout":
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {name for name in found if name in modules}


FILES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
is_package = {name: path.name == "__init__.py" for name, path in FILES.items()}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in FILES.items()}
GRAPH = {name: imported(tree, name, set(FILES)) for name, tree in TREES.items()}


def wing(module: str) -> str:
    if module in LAUNCHERS:
        return "launcher"
    for prefix in WINGS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "library"


def test_the_graph_is_read() -> None:
    """The parser finds the arrows it is meant to check (else every test below passes vacuously)."""
    assert "readout.training.module" in GRAPH["readout.training.fit"]
    assert "readout.bottleneck" in GRAPH["readout.per_sample"]
    assert wing("readout.tools.demo") == "readout.tools" and wing("readout.taps") == "library"


def test_the_library_imports_no_wing_above_it() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if wing(module) == "library"
        for target in targets
        if wing(target) != "library"
    )
    assert not upward, "the library wing imports training, evaluation, tools or a launcher:\n" + "\n".join(
        upward
    )


@pytest.mark.parametrize(
    ("lower", "upper"),
    [("readout.training", "readout.tools"), ("readout.evaluation", "readout.tools")],
)
def test_training_and_evaluation_do_not_import_the_tools(lower: str, upper: str) -> None:
    arrows = sorted(
        f"{m} -> {t}" for m, ts in GRAPH.items() if wing(m) == lower for t in ts if wing(t) == upper
    )
    assert not arrows, "\n".join(arrows)


def test_no_module_imports_a_command_line_module() -> None:
    clis = {name for name, tree in TREES.items() if any(is_main_guard(node) for node in tree.body)}
    assert {"readout.fit", "readout.tools.demo"} <= clis
    arrows = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts if t in clis)
    assert not arrows, "modules import a `__main__` CLI:\n" + "\n".join(arrows)


def test_there_are_no_cycles() -> None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    # A package's __init__ that re-exports its own submodules is not a cycle of ideas; every other one is.
    real = [
        c
        for c in cycles
        if not any(is_package[m] and all(n.startswith(m + ".") or n == m for n in c) for m in c)
    ]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_only_the_training_wing_imports_lightning() -> None:
    """``import readout`` and a loaded bundle need no Lightning (the README's layout says so)."""
    lightning = sorted(
        name
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for imported_name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
        if imported_name.split(".")[0] in {"pytorch_lightning", "lightning"}
    )
    assert "readout.training.module" in lightning
    assert all(wing(name) == "readout.training" for name in lightning), lightning
