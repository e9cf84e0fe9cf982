"""Tests of hessfine.analysis.demo: its pieces (fast) and the quick demo end to end."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hessfine.analysis import demo
from hessfine.analysis.data import load_data
from hessfine.finetune.runs import RunResult

TINY = dataclasses.replace(demo.QUICK, width=4, pretrain_epochs=1, epochs=2, n_train=40, samples=16)


def test_subset_keeps_file_order_and_relabels() -> None:
    x = torch.arange(8.0).reshape(8, 1)
    y = torch.tensor([5, 0, 9, 7, 5, 1, 6, 8])
    sx, sy = demo._subset(x, y, demo.TARGET_CLASSES)
    assert sx.squeeze(1).tolist() == [0.0, 2.0, 3.0, 4.0, 6.0, 7.0]
    assert sy.tolist() == [0, 4, 2, 0, 1, 3]


def test_target_data_files_are_readable_measure_inputs(tmp_path: Path) -> None:
    data = demo.target_data(tmp_path, demo.QUICK, seed=0)
    train, test = load_data(str(data.train_file)), load_data(str(data.test_file))
    assert tuple(train.x.shape) == (demo.QUICK.n_train, 1, 8, 8)
    assert torch.equal(train.y, data.train_y_noisy)
    assert set(train.y.tolist()) <= set(range(5)) and set(test.y.tolist()) <= set(range(5))
    clean = load_data(str(tmp_path / "data" / "train_clean.pt"))
    assert torch.equal(clean.x, train.x)
    flipped = (clean.y != train.y).double().mean().item()
    assert abs(flipped - demo.QUICK.noise_rate) < 0.08
    # the test set is every test image of digits 5-9, relabelled
    digits = load_data("digits:test")
    assert len(test) == int((digits.y >= 5).sum())
    assert torch.equal(test.y, digits.y[digits.y >= 5] - 5)
    again = demo.target_data(tmp_path / "again", demo.QUICK, seed=0)
    assert torch.equal(again.train_y_noisy, data.train_y_noisy)  # seeded


def test_pretrained_reference_has_no_head(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path, reference = demo.pretrain(tmp_path, TINY, seed=0)
    stored = load_file(str(path))
    assert set(stored) == set(reference)
    assert not any(k.startswith("head.") for k in stored)
    assert "conv1.weight" in stored and "bn1.running_mean" in stored


def test_method_configs() -> None:
    robust = demo.method_config("robust", demo.FULL, seed=3)
    assert robust.confusion is not None and robust.lr == demo.CONSISTENT_LR["robust"]
    assert robust.confusion[0][0] == pytest.approx(1 - demo.FULL.noise_rate)
    plain = demo.method_config("plain", demo.FULL, seed=3)
    assert plain.confusion is None and plain.lr == demo.FULL.lr and plain.seed == 3
    assert plain.save_every == demo.FULL.measure_every
    assert demo.method_config("plain", demo.QUICK, seed=0).save_every == demo.QUICK.epochs


def _run(tmp_path: Path, epochs: list[int], best: int | None) -> RunResult:
    checkpoints = [tmp_path / f"epoch_{e:03d}.safetensors" for e in epochs]
    manifest = {
        "checkpoints": [
            {"file": p.name, "epoch": e} for p, e in zip(checkpoints, epochs, strict=True)
        ]
    }
    return RunResult(tmp_path, checkpoints, [], {**manifest, "best_epoch": best})


def test_checkpoints_to_measure(tmp_path: Path) -> None:
    run = _run(tmp_path, [10, 20, 30], None)
    assert [p.name for p in demo.checkpoints_to_measure(run, demo.QUICK)] == [
        "epoch_030.safetensors"
    ]
    assert len(demo.checkpoints_to_measure(run, demo.FULL)) == 3
    stopped = _run(tmp_path, [7, 10], 7)
    assert [p.name for p in demo.checkpoints_to_measure(stopped, demo.QUICK)] == [
        "epoch_007.safetensors"
    ]


def test_measure_argv_follows_the_measure_command() -> None:
    data = demo.TargetData(*([torch.zeros(1)] * 5), Path("d/train.pt"), Path("d/test.pt"))
    argv = demo.measure_argv(
        Path("r/epoch_040.safetensors"), Path("p.safetensors"), data, Path("m"), demo.FULL, 0
    )
    assert argv[:2] == ["measure", "r/epoch_040.safetensors"]

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert option("--reference") == "p.safetensors" and option("--data") == "d/train.pt"
    assert option("--eval-data") == "d/test.pt" and option("--model") == demo.MODEL_SPEC
    assert json.loads(option("--model-kwargs")) == {"num_classes": 5, "width": demo.FULL.width}
    assert option("--samples") == "all" and "--trace" in argv and "--noise-sigma" in argv
    quick = demo.measure_argv(Path("c"), Path("p"), data, Path("m"), demo.QUICK, 0)
    assert "--trace" not in quick and quick[quick.index("--samples") + 1] == "all"


def test_summary_table_uses_final_checkpoints() -> None:
    rows = [
        {"method": "early-stopping", "epoch": 8, "final_checkpoint": 1, "eval_accuracy": 0.8},
        {"method": "early-stopping", "epoch": 10, "final_checkpoint": 0, "eval_accuracy": 0.5},
        {
            "method": "plain",
            "epoch": 40,
            "final_checkpoint": 1,
            "eval_accuracy": 0.7,
            "theorem_2_1": 1.25,
        },
    ]
    lines = demo.summary_table(rows).splitlines()
    assert lines[2].split()[0] == "plain" and "1.250" in lines[2]  # the demo's method order
    assert lines[3].split()[:4] == ["early-stopping", "8", "-", "0.800"]


def test_add_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.out == Path("hessfine-demo") and not args.quick and args.seed == 0
    assert parser.parse_args(["--quick", "--out", "x"]).quick


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, quick=True)
    rows = _read(result.comparison)
    assert sorted(r["method"] for r in rows) == sorted(demo.QUICK_METHODS)
    for row in rows:
        assert row["n"] == str(demo.QUICK.n_train)
        assert float(row["hessian_distance_measure"]) > 0
        assert float(row["theorem_2_1"]) >= float(row["train_loss"])
    assert result.figure is not None and result.figure.stat().st_size > 10_000
    assert (tmp_path / "comparison" / "correlations.csv").is_file()
    assert all(m in result.table for m in demo.QUICK_METHODS)
