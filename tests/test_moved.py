"""Renamed and split modules: the old import paths give the new modules (or their former public
names), with a deprecation warning."""

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bounds", "analysis", "figures", "finetune")
_ALIAS = re.compile(r'alias_module\(__name__, "([\w.]+)"\)')


def _moved() -> dict[str, str]:
    """Old module path → new module path, read from the files left at the old paths."""
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            match = _ALIAS.search(path.read_text(encoding="utf-8"))
            if match:
                parts = path.relative_to(ROOT).with_suffix("").parts
                found["hessfine." + ".".join(parts)] = match.group(1)
    return found


MOVED = _moved()


def test_the_renamed_modules_are_found() -> None:
    assert MOVED["hessfine.finetune.models"] == "hessfine.finetune.digit_networks"
    assert MOVED["hessfine.analysis.sources.runs"] == "hessfine.analysis.sources.run_collections"


def fresh_import(old: str) -> tuple[ModuleType, list[str]]:
    """The module an import of ``old`` gives when ``old`` was not imported yet, and the messages
    of the deprecation warnings it raised."""
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    return module, [str(w.message) for w in caught if w.category is DeprecationWarning]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_old_path_gives_the_new_module_and_warns(old: str) -> None:
    module, messages = fresh_import(old)
    assert module is importlib.import_module(MOVED[old])
    assert any(old in m and MOVED[old] in m for m in messages), messages


# The public names of the modules that were split (hessfine 0.1: names defined in them or
# imported there from other hessfine modules, not starting with "_").
SPLIT: dict[str, list[str]] = {
    "hessfine.bounds.quadratic_forms": [
        "Estimator", "ESTIMATORS", "QuadraticForm", "RunningReduction", "ggn_forms",
        "per_example_hvp", "block_forms_hvp", "positive_forms", "layers_hvp", "RetainedLayersHVP",
        "RetainedTail", "retained_fits", "positive_forms_layers", "certify_piecewise_linear",
        "certification_tolerance", "quadratic_forms", "Batch", "FunctionalModel", "Inputs",
        "batch_size", "index_inputs", "slice_inputs", "unsqueeze_inputs", "ghost_ggn_forms",
        "joint_certification", "PositiveQuadrature", "positive_quadrature",
        "positive_quadrature_many", "differentiable", "LOCAL", "Shard",
    ],
    "hessfine.bounds.traces": [
        "TraceMethod", "TraceEstimate", "PositiveTrace", "rademacher", "layer_traces",
        "gauss_newton_traces", "positive_trace_max", "dense_example_blocks", "Batch",
        "FunctionalModel", "Inputs", "batch_size", "index_inputs", "slice_inputs",
        "unsqueeze_inputs", "ghost_modules", "record_layer_calls", "flat_operator",
        "mean_loss_hvp", "positive_quadrature", "RetainedTail", "RunningReduction",
        "certification_tolerance", "certify_piecewise_linear", "per_example_hvp",
        "retained_fits", "differentiable", "LOCAL", "Shard", "base_key", "keyed_generator",
    ],
    "hessfine.bounds.spectra": [
        "Eigenvalues", "SpectralDensity", "top_eigenvalues", "whole_top_eigenvalues",
        "spectral_density", "Batch", "FunctionalModel", "block_diagonal_hvp", "flat_operator",
        "mean_loss_hvp", "LanczosResult", "lanczos", "lanczos_many", "ritz_values",
        "differentiable", "LOCAL", "Shard", "rademacher",
    ],
    "hessfine.bounds.noise_stability": [
        "NoiseStability", "noise_stability", "trace_prediction", "relative_noise_traces", "Batch",
        "FunctionalModel", "differentiable", "LOCAL", "Shard", "base_key", "keyed_generator",
        "TraceEstimate", "layer_traces",
    ],
    "hessfine.bounds.lanczos": [
        "LanczosResult", "lanczos", "lanczos_many", "quadrature", "ritz_values", "gauss_radau",
        "PositiveQuadrature", "positive_quadrature", "positive_quadrature_many",
    ],
    "hessfine.bounds.sharding": [
        "DRAWS_VERSION", "keyed_generator", "base_key", "Shard", "LOCAL", "Batch",
    ],
    "hessfine.bounds.hessian_products": [
        "ProbeMap", "mean_loss_hvp", "block_diagonal_hvp", "flatten", "unflatten",
        "flat_operator", "Batch", "FunctionalModel", "LOCAL", "Shard",
    ],
    "hessfine.bounds.ghost": [
        "ghost_modules", "LayerCalls", "record_layer_calls", "layer_with_weight",
        "ghost_ggn_forms", "joint_certification", "FunctionalModel", "Inputs",
    ],
}  # fmt: skip

RENAMED = {
    ("hessfine.bounds.ghost", "ghost_modules"): "linear_conv_modules",
    ("hessfine.bounds.traces", "ghost_modules"): "linear_conv_modules",
    ("hessfine.bounds.ghost", "ghost_ggn_forms"): "layer_io_ggn_forms",
    ("hessfine.bounds.quadratic_forms", "ghost_ggn_forms"): "layer_io_ggn_forms",
    ("hessfine.bounds.traces", "TraceMethod"): "TraceRoute",
}


@pytest.mark.parametrize("old", sorted(SPLIT))
def test_the_old_bounds_paths_warn_and_keep_every_public_name(old: str) -> None:
    module, messages = fresh_import(old)
    assert any(m.startswith(f"{old} is deprecated: import hessfine.bounds.") for m in messages)
    missing = [name for name in SPLIT[old] if not hasattr(module, name)]
    assert not missing, missing
    for name in SPLIT[old]:
        value = getattr(module, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__name__ in (name, RENAMED.get((old, name))), (name, value)
            assert value.__module__.startswith("hessfine.bounds."), (name, value.__module__)


def test_no_module_imports_an_old_bounds_path() -> None:
    stems = "|".join(name.rsplit(".", 1)[1] for name in SPLIT)
    old = re.compile(rf"hessfine\.bounds(\.| import )({stems})\b")
    offenders = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for folder in (*FOLDERS, "bench", "tests")
        for path in (ROOT / folder).rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.lstrip().startswith(("from ", "import ")) and old.search(line)
    ]
    assert not offenders, offenders
