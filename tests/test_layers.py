"""The import graph of the package: data flows one way (docs/architecture.md), without cycles or old
paths.

Every ``hessfine`` import in the source tree, including imports inside functions, is an edge of
the graph: ``import hessfine.x.y`` and ``from hessfine.x import y`` lead to the module
``hessfine.x.y`` where there is one, else (``y`` a name of ``hessfine.x``) to ``hessfine.x``.
Four rules hold on it:

1. The layers: ``bounds`` (pure math) and, beside it, ``analysis.schema`` (the result files'
   names, which imports nothing of the package and which everything but ``bounds`` may use) <
   ``figures`` (tables and plots) and, beside it, the *loading* layer of ``analysis`` (errors,
   sources, checkpoints, data, labeled_data, digit_sets, model_specs, fused_experts,
   hf_loading, results, tasks) < ``finetune`` and ``analysis``' pipelines (measure, compare, ...),
   which do not import each other, < orchestration (the command lines, the demo, the
   generated docs pages, the top-level package ``hessfine`` with its exports and the training
   integrations ``hessfine.integrations``), which may import anything.
2. The rooms of ``bounds`` (docs/architecture.md): ``operators`` import only ``functional``,
   ``safe_autodiff``, ``linalg`` and other operators; ``linalg`` only ``functional`` and other
   linalg; an estimator (``bounds.estimators``) never imports another estimator.
3. No cycle, at any depth (A → B → C → A): every strongly connected component is one module.
4. No module imports a deprecated old path: the modules left at the old paths of renamed modules
   (those that call ``alias_module`` or ``warn_moved`` of :mod:`hessfine.bounds.moved`).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bounds", "analysis", "figures", "finetune")
TOP = "hessfine"  # the folder of the top-level package and its integrations
LOADING = {
    "hessfine.analysis",
    "hessfine.analysis.errors",
    "hessfine.analysis.checkpoints",
    "hessfine.analysis.data",
    "hessfine.analysis.labeled_data",
    "hessfine.analysis.digit_sets",
    "hessfine.analysis.model_specs",
    "hessfine.analysis.fused_experts",
    "hessfine.analysis.hf_loading",
    "hessfine.analysis.results",
    "hessfine.analysis.tasks",
}
SCHEMA = "hessfine.analysis.schema"
ORCHESTRATION = {
    "hessfine.analysis.cli",
    "hessfine.analysis.cli_reference",
    "hessfine.analysis.demo",
    "hessfine.analysis.demo_work",
    "hessfine.analysis.doc_pages",
    "hessfine.finetune.cli",
}
_MOVED = "hessfine.bounds.moved"


def _layer(module: str) -> int:
    """0 bounds, 1 figures, 2 loading, 3 finetune and analysis pipelines, 4 orchestration."""
    if module in ORCHESTRATION or module == TOP or module.startswith(f"{TOP}.integrations"):
        return 4
    if module == SCHEMA:
        return 0
    if module.startswith("hessfine.bounds"):
        return 0
    if module.startswith("hessfine.figures"):
        return 1
    if module in LOADING or module.startswith("hessfine.analysis.sources"):
        return 2
    return 3


def _modules() -> dict[str, Path]:
    found = {}
    for folder in (*FOLDERS, TOP):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join(parts if folder == TOP else ("hessfine", *parts))] = path
    return found


MODULES = _modules()
TREES = {module: ast.parse(path.read_text(encoding="utf-8")) for module, path in MODULES.items()}


def _imports(module: str) -> set[str]:
    """The modules of the package that ``module`` imports (the edges in the module docs)."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                names.add(name if name in MODULES else base)
    return names & MODULES.keys()


GRAPH = {module: _imports(module) for module in MODULES}


def _allowed(importer: str, imported: str) -> bool:
    if imported == SCHEMA:
        return not importer.startswith("hessfine.bounds")
    if importer == SCHEMA:
        return False
    low, high = _layer(importer), _layer(imported)
    if low == 3 and high == 3:
        # finetune and the analysis pipelines do not import each other
        return importer.split(".")[1] == imported.split(".")[1]
    if low in (1, 2):  # figures and the loading layer: themselves and bounds only
        return high in (0, low)
    return high <= low


ROOMS = {
    "hessfine.bounds.operators": (
        "hessfine.bounds.functional",
        "hessfine.bounds.safe_autodiff",
        "hessfine.bounds.linalg",
        "hessfine.bounds.operators",
    ),
    "hessfine.bounds.linalg": ("hessfine.bounds.functional", "hessfine.bounds.linalg"),
}
ESTIMATORS = "hessfine.bounds.estimators"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _room_allows(importer: str, imported: str) -> bool:
    """The rooms of bounds (rule 2 of the module docstring)."""
    for room, allowed in ROOMS.items():
        if _in(importer, room):
            return any(_in(imported, place) for place in allowed)
    if _in(importer, ESTIMATORS) and importer != ESTIMATORS:
        return not _in(imported, ESTIMATORS) or imported == ESTIMATORS
    return True


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            at = stack.index(node)
            component, stack[at:] = stack[at:], []
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(component: tuple[str, ...]) -> str:
    edges = [f"{a} → {b}" for a in component for b in sorted(GRAPH[a] & set(component))]
    return f"{' ⇄ '.join(component)} ({', '.join(edges)})"


def _is_old_path(module: str) -> bool:
    """Whether ``module`` calls a function of :mod:`hessfine.bounds.moved` that it imports."""
    imported, called = set(), set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.ImportFrom) and node.module == _MOVED:
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called.add(node.func.id)
    return bool(imported & called & {"alias_module", "warn_moved"})


OLD_PATHS = {module for module in MODULES if _is_old_path(module)}
CYCLES = _cycles(GRAPH)


def test_the_layers_are_found() -> None:
    assert "hessfine.analysis.sources.files" in MODULES
    assert {"hessfine", "hessfine.integrations.transformers"} <= MODULES.keys()
    assert _layer("hessfine") == _layer("hessfine.integrations.lightning") == 4
    assert _layer("hessfine.analysis.python_api") == 3
    assert {m for m in ORCHESTRATION | LOADING} <= MODULES.keys()
    assert not _allowed("hessfine.analysis.data", "hessfine.finetune.run_directory")
    assert not _allowed("hessfine.finetune.run_directory", "hessfine.analysis.measure")
    assert not _allowed("hessfine.analysis.data", "hessfine.figures.tables")
    assert _allowed("hessfine.analysis.demo", "hessfine.finetune.run_directory")


def test_the_edges_are_found() -> None:
    # function-level imports count; `from package import module` leads to the module
    assert "hessfine.analysis.crosscheck" in GRAPH["hessfine.analysis.cli"]
    assert "hessfine.analysis" not in GRAPH["hessfine.analysis.cli"]
    assert "hessfine.analysis.errors" in GRAPH["hessfine.analysis.data"]  # a name of a module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module: str) -> None:
    wrong = sorted(m for m in GRAPH[module] if not _allowed(module, m))
    assert not wrong, f"{module} imports {wrong} against the layering in this file's docstring"


def test_the_rooms_are_found() -> None:
    assert {"hessfine.bounds.operators.per_example", "hessfine.bounds.linalg.lanczos"} <= set(
        MODULES
    )
    assert not _room_allows("hessfine.bounds.operators.retained", "hessfine.bounds.estimates")
    assert not _room_allows("hessfine.bounds.linalg.lanczos", "hessfine.bounds.operators.layer_io")
    assert not _room_allows(
        "hessfine.bounds.estimators.traces", "hessfine.bounds.estimators.quadratic_forms"
    )
    assert _room_allows("hessfine.bounds.estimators.traces", "hessfine.bounds.operators.retained")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "hessfine.bounds")))
def test_bounds_rooms(module: str) -> None:
    wrong = sorted(m for m in GRAPH[module] if not _room_allows(module, m))
    assert not wrong, f"{module} imports {wrong} against the rooms in this file's docstring"


def test_the_cycle_finder_finds_cycles_at_any_depth() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert _cycles(graph) == [("d", "e"), ("a", "b", "c")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert not CYCLES, "import cycles: " + "; ".join(_describe(c) for c in CYCLES)


def test_the_old_paths_are_found() -> None:
    assert {"hessfine.finetune.models", "hessfine.analysis.sources.runs"} <= OLD_PATHS
    assert _MOVED not in OLD_PATHS


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_an_old_path(module: str) -> None:
    old = sorted(GRAPH[module] & OLD_PATHS)
    assert not old, f"{module} imports the deprecated {old}; import the modules they point to"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "hessfine.bounds")))
def test_bounds_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{module} has {lines} lines; split it by what it computes"
