"""`hessfine measure` on 2 gloo processes equals the single-process result to round-off."""

import json
import math
import multiprocessing
import os
import socket

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.distributed import Context
from hessfine.analysis.measure import MeasureSettings, measure_path
from hessfine.bounds.estimates import QuadraticForm, merge_diagnostics, merge_layers
from safetensors.torch import save_file

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_data, tiny_mlp
from tests.test_measure import tiny_args

EXECUTION = {"provenance", "world_size", "max_memory_bytes", "chunks"}
"""How a run was executed: its processes, and its memory budget and chunks (per process)."""


def _state(tensors):
    return {k: v.detach().clone().contiguous() for k, v in tensors.items()}


@pytest.fixture
def files(tmp_path):
    module = tiny_mlp("gelu")
    params = dict(module.named_parameters())
    save_file(_state(module.state_dict()), str(tmp_path / "ft.safetensors"))
    reference = {
        **_state(module.state_dict()),
        **_state(perturbed_reference(params, TINY_LAYERS["mlp_gelu"])),
    }
    save_file(reference, str(tmp_path / "ref.safetensors"))
    x, y = tiny_data("mlp_gelu", 10)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    x, y = tiny_data("mlp_gelu", 7, seed=3)
    torch.save({"x": x, "y": y}, tmp_path / "eval.pt")
    return tmp_path


def _args(tmp, out, *extra):
    """test_measure's command line on the smooth MLP (Lanczos and SLQ routes), batches of 2."""
    model = ["--model", "tests.oracles:tiny_mlp", "--batch-size", "2", "--threads", "1"]
    return tiny_args(tmp, tmp / out, *model, *extra)


def _rank(rank: int, port: int, target, argv: list[str], codes) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    codes[rank] = target(argv)


def run_two_processes(argv: list[str], target=main) -> None:
    """Run ``target(argv)`` (by default the command line) as ranks 0 and 1 of a torchrun-style
    job (env:// on 127.0.0.1); each must return 0.

    The processes are forked so that they share the already imported torch (seconds each).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    codes = context.Array("i", [-1, -1])
    procs = [context.Process(target=_rank, args=(r, port, target, argv, codes)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert list(codes) == [0, 0]


def assert_same(single, multi, path=""):
    """Equal JSON up to round-off, except how the run was executed."""
    if isinstance(single, dict):
        assert set(single) == set(multi), path
        for key in set(single) - EXECUTION:
            assert_same(single[key], multi[key], f"{path}.{key}")
    elif isinstance(single, list):
        assert len(single) == len(multi), path
        for i, (a, b) in enumerate(zip(single, multi, strict=True)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(single, float):
        assert math.isclose(single, multi, rel_tol=1e-9, abs_tol=1e-12), (path, single, multi)
    else:
        assert single == multi, path


@pytest.mark.parametrize(
    "options",
    [
        [
            "--samples", "5", "--lanczos-steps", "4",
            "--trace", "--trace-probes", "2", "--eigen", "1", "--density",
            "--noise-sigma", "0.01", "--noise-draws", "3", "--certificate",
        ],
        ["--samples", "7", "--estimator", "reference-code"],
    ],
    ids=["auto-everything", "reference-code"],
)  # fmt: skip
def test_two_gloo_processes_equal_one(files, options):
    assert main(_args(files, "single", *options)) == 0
    run_two_processes(_args(files, "multi", *options))
    for name in ("measurement.json", "spectrum.json"):
        if not (files / "single" / name).exists():
            continue
        single = json.loads((files / "single" / name).read_text())
        multi = json.loads((files / "multi" / name).read_text())
        assert_same(single, multi)
    result = json.loads((files / "multi" / "measurement.json").read_text())
    assert result["settings"]["world_size"] == 2
    assert result["settings"]["draws"] == "keyed-v1"


def test_merge_takes_global_max_and_first_index_on_ties():
    parts = [
        QuadraticForm("w", 2.0, 1.0, 6, 4, "lanczos", {"krylov_exhausted_fraction": 0.5}),
        QuadraticForm("w", 2.0, 0.5, 3, 2, "lanczos", {"krylov_exhausted_fraction": 1.0}),
        QuadraticForm("w", float("-inf"), 0.0, -1, 0, "auto", {}),
    ]
    one = Context().gather({"w": parts[0]})
    assert merge_layers(one) == {"w": parts[0]}  # one process: unchanged
    merged = merge_layers([{"w": p} for p in parts])["w"]
    assert merged == QuadraticForm.merge(parts)
    assert (merged.max, merged.argmax, merged.count) == (2.0, 3, 6)
    assert merged.mean == pytest.approx((1.0 * 4 + 0.5 * 2) / 6)
    assert merged.route == "lanczos"
    assert merged.diagnostics["krylov_exhausted_fraction"] == pytest.approx((0.5 * 4 + 2) / 6)
    assert merge_diagnostics([{"r": 1e-3, "ok": True}, {"r": 2e-3, "ok": True}], [1, 1]) == {
        "r": 2e-3,
        "ok": True,
    }


def test_checkpoints_spread_over_ranks_each_written_by_its_rank(files):
    for run in ("a", "b", "c"):
        (files / "runs" / run).mkdir(parents=True)
        (files / "runs" / run / "ft.safetensors").write_bytes(
            (files / "ft.safetensors").read_bytes()
        )
    rank1 = Context(rank=1, world_size=2)  # its share is measured alone: no collective calls
    written = measure_path(
        files / "runs",
        out=files / "out",
        context=rank1,
        distribute="checkpoints",
        settings=MeasureSettings(samples=2, dtype="float64"),
        reference=str(files / "ref.safetensors"),
        data=str(files / "train.pt"),
        model="tests.oracles:tiny_mlp",
    )
    assert written == [files / "out" / "b" / "ft" / "measurement.json"]
    assert sorted(p.parent.parent.name for p in (files / "out").rglob("measurement.json")) == ["b"]
    assert json.loads(written[0].read_text())["settings"]["world_size"] == 1
