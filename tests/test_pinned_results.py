"""Pinned results: fixed measurements and fine-tuning runs give the numbers recorded in tests/pinned/.

A restructuring of the code must not change a number. Each scenario below runs the command line
or the Python API on seeded inputs and compares every value of its result with the JSON file
recorded before the restructuring (``python -m tests.test_pinned_results`` rewrites the files;
do that only for a deliberate change of the numbers, and say why in the commit):

* ``measurement_attention.json`` and ``measurement_cnn.json`` — ``hessfine measure`` in float64
  on the smooth attention block (Lanczos positive parts, SLQ and dense positive traces) and on
  the ReLU CNN (certified Gauss–Newton routes, exact GGN traces), with traces, eigenvalues, the
  spectral density, noise stability and the certificate (16 Lanczos steps, so that the larger
  attention weight's positive trace is estimated by SLQ);
* ``measurement_noisy_run.json`` — ``hessfine finetune`` with the robust method under symmetric
  label noise, then ``hessfine measure`` of the run directory (clean/noisy labels, the consistent
  loss's forms, relative noise stability);
* ``finetune_methods.json`` — one short run of every fine-tuning method: per-epoch metrics and
  the squared norm of every final parameter.

Paths, timings, timestamps, versions, the fine-tuned checkpoints' hashes and the memory budget's
bytes, chunks and use (which depend on the machine) are left out of the comparison; floats agree to a
relative 1e-6 (float64 measurements) or 1e-4 (float32 training, whose sums may be reordered).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.finetune.confusion import symmetric_confusion
from hessfine.finetune.digit_networks import digits_cnn
from hessfine.finetune.methods import METHODS, FinetuneConfig, finetune
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from tests.oracles import TINY_LAYERS, TINY_NETWORKS, perturbed_reference, tiny_data

PINNED = Path(__file__).parent / "pinned"
SPECS = {"attention": "tests.oracles:tiny_attention", "cnn": "tests.oracles:tiny_cnn"}
VOLATILE = {"timestamp", "timings", "hessfine_version", "torch_version", "python_version"}
VOLATILE |= {"checkpoint_sha256"}  # float32 training is reproducible to round-off, not bitwise
VOLATILE |= {"memory", "max_memory_bytes", "chunks"}  # the memory of the machine and the moment


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))


def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _strip(value: Any, tmp: str) -> Any:
    """The result without volatile entries, with the temporary directory's path replaced."""
    if isinstance(value, dict):
        return {k: _strip(v, tmp) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "TMP")
    return value


def measure_network(network: str, tmp: Path) -> dict[str, Any]:
    """``hessfine measure`` of a tiny float64 network with every optional quantity on."""
    module = TINY_NETWORKS[network]()
    params = {k: p.detach() for k, p in module.named_parameters()}
    reference = perturbed_reference(params, TINY_LAYERS[network])
    _save(module.state_dict(), tmp / "ft.safetensors")
    _save({**module.state_dict(), **reference}, tmp / "ref.safetensors")
    x, y = tiny_data(network, 12)
    torch.save({"x": x, "y": y}, tmp / "train.pt")
    xe, ye = tiny_data(network, 8, seed=5)
    torch.save({"x": xe, "y": ye}, tmp / "eval.pt")
    out = tmp / "m"
    argv = [
        *("measure", str(tmp / "ft.safetensors"), "--reference", str(tmp / "ref.safetensors")),
        *("--model", SPECS[network], "--out", str(out)),
        *("--data", str(tmp / "train.pt"), "--eval-data", str(tmp / "eval.pt")),
        *[
            "--dtype",
            "float64",
            "--quiet",
            "--batch-size",
            "4",
            "--samples",
            "6",
            "--lanczos-steps",
            "16",
        ],
        *[
            "--trace",
            "--trace-probes",
            "8",
            "--positive-trace-probes",
            "4",
            "--eigen",
            "2",
            "--density",
        ],
        *["--noise-sigma", "1e-3", "1e-2", "--noise-draws", "6", "--certificate"],
    ]
    threads = _one_thread()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    document = json.loads((out / "measurement.json").read_text())
    document["spectrum"] = json.loads((out / "spectrum.json").read_text())
    return _strip(document, str(tmp))


def _digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    x = torch.tensor(bunch.data[:count], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target[:count], dtype=torch.long)


def measure_noisy_run(tmp: Path) -> dict[str, Any]:
    """``hessfine finetune`` (robust, 30% symmetric noise), then ``measure`` of the run."""
    x, y = _digits(160)
    torch.save({"x": x[:120], "y": y[:120]}, tmp / "train.pt")
    torch.save({"x": x[120:], "y": y[120:]}, tmp / "eval.pt")
    torch.manual_seed(0)
    _save(digits_cnn(width=4).state_dict(), tmp / "pre.safetensors")
    spec = "hessfine.finetune.models:digits_cnn"  # the name earlier manifests wrote
    kwargs = '{"width": 4}'
    threads = _one_thread()
    try:
        finetune_argv = ["finetune", "--reference", str(tmp / "pre.safetensors")]
        finetune_argv += ["--model", spec, "--model-kwargs", kwargs]
        finetune_argv += ["--data", str(tmp / "train.pt"), "--eval-data", str(tmp / "eval.pt")]
        finetune_argv += ["--out", str(tmp / "run"), "--method", "robust", "--epochs", "2"]
        finetune_argv += ["--label-noise", "symmetric", "--noise-rate", "0.3"]
        assert main(finetune_argv) == 0
        measure_argv = ["measure", str(tmp / "run"), "--out", str(tmp / "m"), "--quiet"]
        measure_argv += ["--samples", "32", "--trace", "--trace-probes", "6", "--eigen", "1"]
        measure_argv += ["--noise-sigma", "1e-2", "--noise-draws", "4", "--noise-relative"]
        assert main(measure_argv) == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted((tmp / "m").rglob("measurement.json"))
    return _strip({f.parent.name: json.loads(f.read_text()) for f in files}, str(tmp))


def finetune_methods() -> dict[str, Any]:
    """Two epochs of every method on 96 digits: metrics and final squared parameter norms."""
    x, y = _digits(144)
    confusion = tuple(tuple(row) for row in symmetric_confusion(10, 0.2).tolist())
    threads = _one_thread()
    results = {}
    try:
        for method in METHODS:
            variants = {method: {}}
            if method in ("consistent", "robust"):
                variants = {method: {"confusion": confusion}}
                variants[f"{method} (dual-t)"] = {"estimate_confusion": True}
            for label, options in variants.items():
                torch.manual_seed(0)
                net = digits_cnn(width=4)
                reference = {k: v.clone() for k, v in net.state_dict().items()}
                torch.manual_seed(1)
                net = digits_cnn(width=4)
                config = FinetuneConfig(method, epochs=2, lr=0.05, batch_size=16, **options)
                result = finetune(
                    net,
                    reference,
                    train_x=x[:96],
                    train_y=y[:96],
                    eval_x=x[96:],
                    eval_y=y[96:],
                    config=config,
                )
                results[label] = {
                    "metrics": result.metrics,
                    "best_epoch": result.best_epoch,
                    "radii": result.radii,
                    "confusion": result.confusion,
                    "confusion_source": result.confusion_source,
                    "confusion_rule": result.confusion_rule,
                    "norms": {
                        k: float(v.double().pow(2).sum()) for k, v in net.state_dict().items()
                    },
                }
    finally:
        torch.set_num_threads(threads)
    return results


def assert_same(actual: Any, expected: Any, rtol: float, where: str = "") -> None:
    """Equal structure and values; floats to ``rtol`` (relative) or 1e-12 (absolute)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)}"
        for key in expected:
            assert_same(actual[key], expected[key], rtol, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, rtol, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert isinstance(actual, int | float), f"{where}: {actual!r} is not a number"
        assert (math.isnan(actual) and math.isnan(expected)) or math.isclose(
            actual, expected, rel_tol=rtol, abs_tol=1e-12
        ), f"{where}: {actual!r} != pinned {expected!r}"
    else:
        assert actual == expected, f"{where}: {actual!r} != pinned {expected!r}"


SCENARIOS = {
    "measurement_attention": (lambda tmp: measure_network("attention", tmp), 1e-6),
    "measurement_cnn": (lambda tmp: measure_network("cnn", tmp), 1e-6),
    "measurement_noisy_run": (measure_noisy_run, 1e-4),
    "finetune_methods": (lambda tmp: finetune_methods(), 1e-4),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_results_equal_the_pinned_ones(name: str, tmp_path: Path) -> None:
    compute, rtol = SCENARIOS[name]
    expected = json.loads((PINNED / f"{name}.json").read_text(encoding="utf-8"))
    actual = json.loads(json.dumps(compute(tmp_path)))
    assert_same(actual, expected, rtol, name)


def regenerate(names: list[str]) -> None:
    """Rewrite the pinned files of ``names`` (all when empty) from the current code."""
    import tempfile

    PINNED.mkdir(exist_ok=True)
    for name in names or sorted(SCENARIOS):
        with tempfile.TemporaryDirectory() as tmp:
            result = SCENARIOS[name][0](Path(tmp))
        text = json.dumps(result, indent=1, sort_keys=True, allow_nan=True) + "\n"
        (PINNED / f"{name}.json").write_text(text, encoding="utf-8")
        print(f"wrote {PINNED / name}.json")


if __name__ == "__main__":
    regenerate(sys.argv[1:])
