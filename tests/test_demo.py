"""Tests of hessfine.analysis.demo: its pieces with tiny settings, and one tiny run end to end."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch
from hessfine.analysis import cli, demo
from hessfine.analysis import measure as measure_module
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError
from hessfine.finetune.methods import CONSISTENT_METHODS, METHODS
from hessfine.finetune.run_directory import RunResult

TINY = dataclasses.replace(
    demo.QUICK,
    name="tiny",
    width=2,
    pretrain_images=64,
    pretrain_epochs=1,
    n_train=40,
    epochs=2,
    checkpoints=2,
    radii=(0.1, 1.0),
    radius=1.0,
    methods=("plain", "distance-constraint"),
    noise_methods=("plain", "robust"),
    bootstrap=20,
)


def test_plan_covers_the_three_studies_once() -> None:
    jobs = demo.plan(demo.DEFAULT)
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    sweep = [j for j in jobs if j.method == demo.SWEPT_METHOD and j.noise is None]
    assert {j.radius for j in sweep} == set(demo.DEFAULT.radii)
    assert len(sweep) == len(demo.DEFAULT.radii) * demo.DEFAULT.sweep_seeds
    # the methods study shares the sweep's runs at its radius and measures all their epochs
    measured_all = {j.radius for j in sweep if j.all_checkpoints}
    assert measured_all == {demo.DEFAULT.radius}
    clean = {j.method for j in jobs if j.noise is None}
    assert clean == set(METHODS) - CONSISTENT_METHODS  # F = I: consistent ≡ plain
    for noise in demo.DEFAULT.noise:
        noisy = [j for j in jobs if j.noise == noise]
        assert {j.method for j in noisy} == set(METHODS)
        assert {j.method for j in noisy if j.dual_t} == {demo.DUAL_T}
        assert len(noisy) == (len(METHODS) + 1) * demo.DEFAULT.seeds
        assert not any(j.all_checkpoints for j in noisy)
    assert len(demo.plan(demo.FULL)) > len(jobs)
    assert all(j.seed >= 5 for j in demo.plan(demo.DEFAULT, seed=5))


def test_method_config_scales_the_head_radius_and_passes_f() -> None:
    noise = demo.Noise("pair", 0.2)
    f = torch.eye(10, dtype=torch.float64) * 0.8 + torch.roll(torch.eye(10), 1, 1) * 0.2
    job = demo.Job("robust", 3, 0.3, noise)
    config = demo.method_config(job, demo.DEFAULT, f)
    assert config.head_radius == pytest.approx(demo.DEFAULT.head_ratio * 0.3)
    assert config.radius == 0.3 and config.seed == 3 and config.lr == demo.DEFAULT.lr
    assert torch.allclose(config.confusion_matrix(), f.double())
    assert config.save_every == demo.DEFAULT.epochs  # final checkpoint only
    dual = demo.method_config(dataclasses.replace(job, dual_t=True), demo.DEFAULT, f)
    assert dual.estimate_confusion and dual.confusion is None
    traced = demo.method_config(demo.Job("plain", 0, 1.0, all_checkpoints=True), demo.DEFAULT, None)
    assert traced.save_every == demo.DEFAULT.epochs // demo.DEFAULT.checkpoints


def test_target_data_is_seeded_per_seed(tmp_path: Path) -> None:
    a, b = demo.target_data(tmp_path, TINY, 0), demo.target_data(tmp_path, TINY, 1)
    assert tuple(a.x.shape) == (TINY.n_train, 1, 28, 28)
    assert not torch.equal(a.x, b.x)
    again = demo.target_data(tmp_path / "again", TINY, 0)
    assert torch.equal(again.x, a.x) and torch.equal(again.y, a.y)
    stored = load_data(str(a.file))
    assert torch.equal(stored.y, a.y)


def test_noisy_labels_follow_the_setting() -> None:
    y = torch.arange(10).repeat(500)
    symmetric, f = demo.noisy_labels(y, demo.Noise("symmetric", 0.4), seed=0)
    assert abs((symmetric != y).double().mean().item() - 0.4) < 0.03
    assert f[0, 0] == pytest.approx(0.6)
    pair, _ = demo.noisy_labels(y, demo.Noise("pair", 0.2), seed=0)
    flipped = pair != y
    assert torch.equal(pair[flipped], (y[flipped] + 1) % 10)
    assert torch.equal(demo.noisy_labels(y, demo.Noise("pair", 0.2), seed=0)[0], pair)


def test_pretraining_is_cached_and_redone_for_other_settings(tmp_path: Path) -> None:
    path, reference, record = demo.pretrain(tmp_path, TINY, seed=0)
    assert not any(k.startswith("head.") for k in reference)
    assert "stem.weight" in reference and "block3.bn2.running_var" in reference
    assert 0.0 <= record["digits28_test_accuracy_zero_shot"] <= 1.0
    stamp = path.stat().st_mtime_ns
    _, cached, again = demo.pretrain(tmp_path, TINY, seed=0)
    assert path.stat().st_mtime_ns == stamp and again == record
    assert all(torch.equal(cached[k], reference[k]) for k in reference)
    _, other, _ = demo.pretrain(tmp_path, dataclasses.replace(TINY, pretrain_epochs=2), seed=0)
    assert not torch.equal(other["stem.weight"], reference["stem.weight"])


def test_checkpoints_to_measure(tmp_path: Path) -> None:
    def run(epochs: list[int], best: int | None) -> RunResult:
        files = [tmp_path / f"epoch_{e:03d}.safetensors" for e in epochs]
        entries = [{"file": p.name, "epoch": e} for p, e in zip(files, epochs, strict=True)]
        return RunResult(tmp_path, files, [], {"checkpoints": entries, "best_epoch": best})

    final_only = demo.Job("plain", 0, 1.0)
    every = demo.Job("plain", 0, 1.0, all_checkpoints=True)
    assert [p.name for p in demo.checkpoints_to_measure(final_only, run([5, 10], None))] == [
        "epoch_010.safetensors"
    ]
    assert len(demo.checkpoints_to_measure(every, run([5, 10, 15], None))) == 3
    stopped = demo.checkpoints_to_measure(final_only, run([5, 7, 10], 7))
    assert [p.name for p in stopped] == ["epoch_007.safetensors"]


def _one_run(tmp_path: Path) -> tuple[demo.Job, RunResult]:
    checkpoint = tmp_path / "run" / "epoch_002.safetensors"
    manifest = {"checkpoints": [{"file": checkpoint.name, "epoch": 2}], "best_epoch": None}
    return demo.Job("plain", 3, 1.0), RunResult(checkpoint.parent, [checkpoint], [], manifest)


def _defaults(function) -> dict:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def test_checkpoints_are_measured_as_hessfine_measure_would(tmp_path: Path, monkeypatch) -> None:
    """The demo calls the measurement with the settings and inputs that ``hessfine measure``
    with the demo's options (every example, batches of 100, CPU, the run's seed) passes."""
    defaults = {**_defaults(measure_module.measure), **_defaults(measure_module.measure_path)}
    calls = []

    def record(checkpoint, **options):
        calls.append({"checkpoint": checkpoint, **options})
        return [Path(options["out"]) / "measurement.json"]

    monkeypatch.setattr(demo, "measure_path", record)
    monkeypatch.setattr(measure_module, "measure_path", record)
    job, run = _one_run(tmp_path)
    train, reference = tmp_path / "train.pt", tmp_path / "pretrained.safetensors"
    written = demo.measure_all(tmp_path, {job: run}, {job: train}, reference, 2, quiet=True)
    directory = tmp_path / "measurements" / job.key / "epoch_002"
    assert written == [directory / "measurement.json"]
    argv = ["measure", str(run.checkpoints[0]), "--reference", str(reference), "--data"]
    argv += [str(train), "--eval-data", demo.TARGET_TEST, "--out", str(directory)]
    argv += ["--model", demo.MODEL_SPEC, "--model-kwargs", '{"num_classes": 10, "width": 2}']
    argv += ["--samples", "all", "--batch-size", "100", "--device", "cpu", "--seed", "3"]
    assert cli.main([*argv, "--quiet"]) == 0
    ours, command = calls
    assert ours["settings"] == command["settings"] == demo.measure_settings(3)
    command.pop("context")  # one process: what detect() gives is measure's default context
    for key, value in command.items():
        assert str(ours.get(key, defaults.get(key))) == str(value), key


def test_a_failed_measurement_names_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    def refuse(checkpoint, **options):
        raise InputError("--data: no such file")

    monkeypatch.setattr(demo, "measure_path", refuse)
    job, run = _one_run(tmp_path)
    with pytest.raises(RuntimeError, match="epoch_002.safetensors failed: --data: no such"):
        demo.measure_all(tmp_path, {job: run}, {job: tmp_path}, tmp_path, 2, quiet=True)


def test_add_arguments() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.out == Path("hessfine-demo") and args.study == "default" and not args.quick
    assert parser.parse_args(["--study", "full"]).study == "full"


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_tiny_demo_end_to_end(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, settings=TINY)
    rows = _read(result.comparison)
    jobs = demo.plan(TINY)
    assert len(result.runs) + len(result.failures) == len(jobs)
    for row in rows:
        assert row["n"] == str(TINY.n_train)
        gap = float(row["eval_loss"]) - float(row["train_loss"])
        assert float(row["generalization_gap_loss"]) == pytest.approx(gap, abs=1e-9)
        constrained = row["method"] in ("distance-constraint", "robust")
        assert (row["radius"] != "") == constrained
        if constrained:
            assert float(row["head_radius"]) == pytest.approx(
                TINY.head_ratio * float(row["radius"])
            )
        assert (row["noise_kind"] == "symmetric") == (row["noise_rate"] not in ("", "0", "0.0"))
    dual = [r for r in rows if r["confusion_source"] == "dual-t"]
    assert {r["method"] for r in dual} <= {"robust"}
    assert {r["confusion_source"] for r in rows if r["method"] == "robust"} >= {"given"}
    # the distance constraint holds in the measured checkpoints: every layer inside its ball
    radii = {r["measurement"]: r for r in rows if r["radius"]}
    for layer in _read(tmp_path / "comparison" / "layers.csv"):
        row = radii.get(layer["measurement"])
        if row is not None:
            limit = row["head_radius"] if layer["layer"].startswith("head") else row["radius"]
            assert float(layer["distance"]) <= float(limit) * (1 + 1e-5)
    for stem in ("fig1_radius", "measure_vs_gap", "noise_study", "overview"):
        assert (tmp_path / "comparison" / f"{stem}.png").stat().st_size > 10_000
    report = result.report.read_text(encoding="utf-8")
    assert "](comparison/fig1_radius.png)" in report
    verdicts = [
        line.rsplit("|", 2)[-2].strip() for line in report.splitlines() if line.startswith("| 1.")
    ]
    assert verdicts and all(
        v.strip("*") in ("holds", "does not hold", "not tested") for v in verdicts
    )
    record = json.loads((tmp_path / "pretrained.json").read_text(encoding="utf-8"))
    assert f"{record['mnist_test_accuracy']:.3f}" in report
