"""``--max-memory`` bounds a measurement's peak resident set, whatever the number of examples.

Each run is a ``hessfine measure`` child process on one layer (``h.0.attn.c_attn``) of a small
GPT-2-shaped causal language model with random weights (2 blocks, 256 wide, vocabulary 8192,
16 sequences of 64 tokens, the first 4 labels −100), measured with ``block`` (vmapped
per-example Hessian-vector products, whose memory grows with the examples per call) and
``auto`` (Lanczos runs, whose bases grow with them). Its peak is the kernel's high-water mark of
its resident set (``ru_maxrss``), read by the child once the command has returned: after the
result is written, before the interpreter's teardown, where the destructors of torch's shared
libraries page in some 100 MiB of their code (file-backed pages of the page cache, not memory
the measurement holds; a parent's ``os.wait4`` counts them). The baseline is the memory in use
once the model and data are loaded (``provenance.memory.after_load_bytes`` of a run without a
budget on all 16 examples). Two budgets, 100 and 180 MiB above it, each for 2 and 16 examples
at ``--batch-size 16``: every peak stays within its budget plus ``ALLOWANCE``, while the 16
examples without a budget take more than the larger budget (so the budget is what kept them
in), and the maximum and its example are those of the run without a budget. The noise stability
and the certificate (``ggn`` forms, every example in one batch) run once without a budget and once
100 MiB above the baseline: the peak stays within it, the noise and certificate calls were split,
and the values are those of the run without a budget. Marked ``memory`` (deselected by default;
run in CI by ``.ci/run`` after the unit tests; about two and a half minutes on two cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.memory

MIB = 2**20
ALLOWANCE = 32 * MIB
"""How far a peak may exceed its budget: the error of the memory model (measured: ≤ 20 MiB)."""
LAYER = "transformer.h.0.attn.c_attn.weight"
COUNTS = (2, 16)
"""The example counts measured (the larger is every example of the data, in one batch)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=8192, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    weight = base.transformer.h[0].attn.c_attn.weight
    with torch.no_grad():
        weight.add_(0.02 * torch.randn_like(weight))
    base.save_pretrained(root / "tuned")
    ids = torch.randint(0, 8192, (COUNTS[-1], 64), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    torch.save({"x": {"input_ids": ids}, "y": labels}, root / "lm.pt")
    return root


def _peaks(root: Path, runs: dict[str, list[str]]) -> dict[str, tuple[int, dict]]:
    """Each run's peak resident set (bytes) and measurement, two child processes at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out: dict[str, tuple[int, dict]] = {}
    names = list(runs)
    for first in range(0, len(names), 2):
        started = {}
        for name in names[first : first + 2]:
            peak = root / f"{name}.peak"
            code = (
                "import resource, sys; from pathlib import Path; "
                "from hessfine.analysis.cli import main; code = main(); "
                f"Path({str(peak)!r}).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
                "sys.exit(code)"
            )
            argv = [sys.executable, "-c", code, "measure", str(root / "tuned")]
            argv += ["--reference", str(root / "base"), "--task", "causal-lm", "--data"]
            argv += [str(root / "lm.pt"), "--layers", LAYER, "--out", str(root / name)]
            argv += ["--batch-size", str(COUNTS[-1]), "--quiet", *runs[name]]
            started[name] = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        for name, child in started.items():
            error = child.communicate()[1]
            assert child.returncode == 0, error
            result = json.loads((root / name / "measurement.json").read_text())
            out[name] = (int((root / f"{name}.peak").read_text()) * 1024, result)
    return out


ESTIMATORS = {
    "block": ["--estimator", "block"],
    "auto": ["--estimator", "auto", "--lanczos-steps", "16", "--positive-rtol", "0"],
}
"""``auto`` with every example run for 16 steps: values that do not depend on the chunks."""


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_peak_memory_stays_within_the_budget_for_any_number_of_examples(model, estimator):
    options = ESTIMATORS[estimator]
    everything = ["--samples", str(COUNTS[-1]), "--max-memory", "1", *options]
    free = _peaks(model, {"unbounded": everything})
    peak, result = free["unbounded"]
    loaded = result["provenance"]["memory"]["after_load_bytes"]
    budgets = {"small": loaded + 100 * MIB, "large": loaded + 180 * MIB}
    assert peak > budgets["large"] + ALLOWANCE  # the examples need more than the budgets
    runs = {
        f"{size}-{n}": ["--samples", str(n), "--max-memory", str(budget), *options]
        for size, budget in budgets.items()
        for n in COUNTS
    }
    peaks = _peaks(model, runs)
    report = {name: round(peak / MIB) for name, (peak, _) in {**free, **peaks}.items()}
    report["loaded"] = round(loaded / MIB)
    for size, budget in budgets.items():
        for n in COUNTS:
            peak, result = peaks[f"{size}-{n}"]
            assert peak <= budget + ALLOWANCE, (size, n, report)
            assert result["settings"]["max_memory_bytes"] == budget
    # the same examples' values under any budget, to round-off
    unbounded = free["unbounded"][1]["layers"][0]["quadratic_form"]
    for size in budgets:
        found = peaks[f"{size}-{COUNTS[-1]}"][1]["layers"][0]["quadratic_form"]
        assert found["max"] == pytest.approx(unbounded["max"], rel=1e-4)
        assert found["argmax"] == unbounded["argmax"]


NOISE_AND_CERTIFICATE = ["--estimator", "ggn", "--trace-probes", "2", "--certificate"]
NOISE_AND_CERTIFICATE += ["--noise-sigma", "0.01", "--noise-draws", "8"]
"""Noise stability (8 antithetic pairs: 16 perturbed forward passes per example) and the
certificate (4 repetitions at 7 scales), every example in one batch."""


def test_noise_stability_and_the_certificate_stay_within_the_budget(model):
    everything = ["--samples", str(COUNTS[-1]), *NOISE_AND_CERTIFICATE]
    free = _peaks(model, {"unbounded": [*everything, "--max-memory", "1"]})
    peak, unbounded = free["unbounded"]
    budget = unbounded["provenance"]["memory"]["after_load_bytes"] + 100 * MIB
    assert peak > budget + ALLOWANCE  # the noise draws of the whole batch need more
    peak, result = _peaks(model, {"small": [*everything, "--max-memory", str(budget)]})["small"]
    assert peak <= budget + ALLOWANCE, (round(peak / MIB), round(budget / MIB))
    chunks = result["settings"]["chunks"]
    assert chunks["noise"]["noise"] < COUNTS[-1] and "certificate" in chunks["certificate"]
    # the same draws under any budget: the same values, to round-off
    found, expected = result["noise_stability"][0], unbounded["noise_stability"][0]
    assert found["mean"] == pytest.approx(expected["mean"], rel=1e-4, abs=1e-9)
    certificate = result["bounds"]["pac_bayes_certificate"]
    expected = unbounded["bounds"]["pac_bayes_certificate"]
    for key in ("bound", "empirical_error", "deterministic_error", "kl"):
        assert certificate[key] == pytest.approx(expected[key], rel=1e-6), key
