"""analysis/gpu.py on the CPU: TF32 switched off and restored, and the out-of-memory retry
exercised by raising torch.cuda.OutOfMemoryError on purpose."""

import dataclasses
import json

import pytest
import torch
from hessfine.analysis import measure as measure_module
from hessfine.analysis.errors import InputError
from hessfine.analysis.gpu import full_precision, halving_batches
from hessfine.analysis.measure import MeasureSettings, measure
from safetensors.torch import save_file

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_cnn, tiny_data


def test_full_precision_turns_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _needs(limit):
    """A stage that runs out of memory above ``limit`` examples per batch."""
    calls = []

    def run(size):
        calls.append(size)
        if size > limit:
            raise torch.cuda.OutOfMemoryError("simulated")
        return size * 10

    return run, calls


def test_halving_retries_until_the_batch_fits():
    run, calls = _needs(5)
    retries = []
    assert halving_batches(run, 32, allowed=True, on_retry=retries.append) == (40, 4)
    assert calls == [32, 16, 8, 4] and retries == [16, 8, 4]
    run, calls = _needs(100)
    assert halving_batches(run, 7, allowed=True) == (70, 7) and calls == [7]


@pytest.mark.parametrize(
    ("allowed", "size", "message"),
    [(False, 8, "not reduced automatically"), (True, 1, "even at batch size 1")],
)
def test_halving_gives_up_with_one_line(allowed, size, message):
    run, calls = _needs(0)
    with pytest.raises(InputError, match=message):
        halving_batches(run, size, allowed=allowed)
    assert calls == [size] if not allowed else calls == [1]


@pytest.fixture
def files(tmp_path):
    module = tiny_cnn()
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp_path / "ft.safetensors"))
    reference = perturbed_reference(dict(module.named_parameters()), TINY_LAYERS["cnn"])
    save_file(
        {**state, **{k: v.contiguous() for k, v in reference.items()}},
        str(tmp_path / "ref.safetensors"),
    )
    x, y = tiny_data("cnn", 8)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    return tmp_path


def _with_quadratic_forms(monkeypatch, estimator):
    """The measurement's table with ``estimator`` computing the quadratic forms."""
    table = tuple(
        dataclasses.replace(q, estimator=estimator) if q.name == "quadratic forms" else q
        for q in measure_module.QUANTITIES
    )
    monkeypatch.setattr(measure_module, "QUANTITIES", table)


def _measure(files, out, settings):
    return measure(
        files / "ft.safetensors",
        reference=str(files / "ref.safetensors"),
        data=str(files / "train.pt"),
        model="tests.oracles:tiny_cnn",
        out=files / out,
        settings=settings,
    )


def test_measure_halves_the_batch_on_out_of_memory_and_records_it(files, monkeypatch):
    settings = MeasureSettings(samples=8, batch_size=8, dtype="float64", trace=True, trace_probes=4)
    plain = _measure(files, "plain", settings)
    real = next(q for q in measure_module.QUANTITIES if q.name == "quadratic forms").estimator

    def small_batches_only(fmodel, params, directions, batches, **options):
        batches = list(batches)
        if max(int(y.shape[0]) for _, y in batches) > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(fmodel, params, directions, batches, **options)

    _with_quadratic_forms(monkeypatch, small_batches_only)
    retried = _measure(files, "retried", settings)
    assert plain["settings"]["batch_size_used"] == 8
    assert retried["settings"]["batch_size_used"] == 2
    assert retried["settings"]["batch_size"] == 8 and retried["settings"]["tf32"] is False
    for a, b in zip(plain["layers"], retried["layers"], strict=True):
        assert b["quadratic_form"]["max"] == pytest.approx(a["quadratic_form"]["max"], rel=1e-9)
        assert b["quadratic_form"]["argmax"] == a["quadratic_form"]["argmax"]
        assert b["trace"]["mean"] == pytest.approx(a["trace"]["mean"], rel=1e-9)
    written = json.loads((files / "retried" / "measurement.json").read_text())
    assert written["settings"]["batch_size_used"] == 2


def test_reference_code_is_never_rebatched(files, monkeypatch):
    def out_of_memory(*args, **options):
        raise torch.cuda.OutOfMemoryError("simulated")

    _with_quadratic_forms(monkeypatch, out_of_memory)
    with pytest.raises(InputError, match="--batch-size 4 \\(not reduced automatically"):
        _measure(files, "ref", MeasureSettings(samples=8, estimator="reference-code"))
