"""The import direction of the package (data flows one way, SPEC §2).

Every ``hessfine`` import in the source tree, including imports inside functions, is checked
against the layers: ``bounds`` (pure math) and, beside it, ``analysis.schema`` (the result files'
names, which imports nothing of the package and which everything but ``bounds`` may use) <
``figures`` (tables and plots) and, beside it, the
*loading* layer of ``analysis`` (errors, sources, checkpoints, data, models, results) <
``finetune`` and ``analysis``' pipelines (measure, compare, ...), which do not import each other,
< orchestration (the command lines and the demo), which may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bounds", "analysis", "figures", "finetune")
LOADING = {
    "hessfine.analysis",
    "hessfine.analysis.errors",
    "hessfine.analysis.checkpoints",
    "hessfine.analysis.data",
    "hessfine.analysis.digit_sets",
    "hessfine.analysis.model_specs",
    "hessfine.analysis.results",
}
SCHEMA = "hessfine.analysis.schema"
ORCHESTRATION = {
    "hessfine.analysis.cli",
    "hessfine.analysis.cli_reference",
    "hessfine.analysis.demo",
    "hessfine.finetune.cli",
}


def _layer(module: str) -> int:
    """0 bounds, 1 figures, 2 loading, 3 finetune and analysis pipelines, 4 orchestration."""
    if module in ORCHESTRATION:
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
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found["hessfine." + ".".join(parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("hessfine.")}


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


MODULES = _modules()


def test_the_layers_are_found() -> None:
    assert "hessfine.analysis.sources.files" in MODULES
    assert {m for m in ORCHESTRATION | LOADING} <= MODULES.keys()
    assert not _allowed("hessfine.analysis.data", "hessfine.finetune.run_directory")
    assert not _allowed("hessfine.finetune.run_directory", "hessfine.analysis.measure")
    assert not _allowed("hessfine.analysis.data", "hessfine.figures.tables")
    assert _allowed("hessfine.analysis.demo", "hessfine.finetune.run_directory")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module: str) -> None:
    known = [m for m in _imports(MODULES[module]) if m in MODULES]
    wrong = [m for m in known if not _allowed(module, m)]
    assert not wrong, f"{module} imports {wrong} against the layering in this file's docstring"
