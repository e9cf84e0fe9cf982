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
from hessfine.analysis import cli, demo, demo_work
from hessfine.analysis import measure as measure_module
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError
from hessfine.finetune.methods import CONSISTENT_METHODS, CONSTRAINED_METHODS, METHODS
from hessfine.finetune.run_directory import RunResult
from hessfine.finetune.selection import Score, Selection, SelectionGrid

TINY = dataclasses.replace(
    demo.QUICK,
    name="tiny",
    width=2,
    pretrain_images=64,
    pretrain_epochs=1,
    n_train=40,
    n_validation=20,
    epochs=2,
    checkpoints=2,
    grid=(("lr", (0.01, 0.04)), ("radius", (0.1, 1.0))),
    radii=(0.1, 1.0),
    methods=("plain", "distance-constraint"),
    noise_methods=("plain", "robust"),
    bootstrap=20,
)


def _choices(settings: demo.DemoSettings, radius: float = 1.0) -> dict:
    """A choice for every group: lr 0.01, and ``radius`` for the constrained methods."""
    return {
        g: {
            "lr": 0.01,
            **(demo.constraint(settings, radius) if g.method in CONSTRAINED_METHODS else {}),
        }
        for g in demo.groups(settings)
    }


def test_plan_covers_the_three_studies_once() -> None:
    jobs = demo.plan(demo.DEFAULT, _choices(demo.DEFAULT))
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    sweep = [j for j in jobs if j.method == demo.SWEPT_METHOD and j.noise is None]
    assert {j.radius for j in sweep} == set(demo.DEFAULT.radii)
    assert len(sweep) == len(demo.DEFAULT.radii) * demo.DEFAULT.sweep_seeds
    assert all(dict(j.options)["lr"] == 0.01 for j in sweep)
    # the methods study shares the sweep's runs at its chosen radius, measuring all their epochs
    measured_all = {j.radius for j in sweep if j.all_checkpoints}
    assert measured_all == {1.0}
    clean = {j.method for j in jobs if j.noise is None}
    assert clean == set(METHODS) - CONSISTENT_METHODS  # F = I: consistent ≡ plain
    for noise in demo.DEFAULT.noise:
        noisy = [j for j in jobs if j.noise == noise]
        assert {j.method for j in noisy} == set(METHODS)
        assert {j.method for j in noisy if j.dual_t} == {demo.DUAL_T}
        assert len(noisy) == (len(METHODS) + 1) * demo.DEFAULT.seeds
        assert not any(j.all_checkpoints for j in noisy)
    assert len(demo.plan(demo.FULL, _choices(demo.FULL))) > len(jobs)
    assert all(j.seed >= 5 for j in demo.plan(demo.DEFAULT, _choices(demo.DEFAULT), seed=5))
    # a chosen radius off the sweep's: a run of its own; a group without a choice: no runs
    other = demo.plan(demo.DEFAULT, _choices(demo.DEFAULT, radius=0.5))
    assert len(other) == len(jobs) + demo.DEFAULT.seeds
    choices = _choices(demo.DEFAULT)
    del choices[demo.Group("sam")]
    assert not any(j.method == "sam" and j.noise is None for j in demo.plan(demo.DEFAULT, choices))


def test_groups_select_every_method_and_setting_once() -> None:
    found = demo.groups(demo.DEFAULT)
    assert len({g.key for g in found}) == len(found)
    clean = {g.method for g in found if g.noise is None}
    assert clean == set(METHODS) - CONSISTENT_METHODS
    assert sum(g.dual_t for g in found) == len(demo.DEFAULT.noise)
    # the sweep's learning rate is distance-constraint's, selected even when the methods study
    # leaves it out
    only = dataclasses.replace(demo.DEFAULT, methods=("plain",), noise=())
    assert [g.key for g in demo.groups(only)] == ["clean/plain", "clean/distance-constraint"]
    for group in found:  # every method has at most six points, each with the learning rate
        grid = demo.DEFAULT.selection_grid().for_method(group.method)
        assert grid.names()[0] == "lr" and len(grid.points()) <= 6


def test_method_config_scales_the_head_radius_and_passes_f() -> None:
    noise = demo.Noise("pair", 0.2)
    f = torch.eye(10, dtype=torch.float64) * 0.8 + torch.roll(torch.eye(10), 1, 1) * 0.2
    options = demo._options({"lr": 0.003, **demo.constraint(demo.DEFAULT, 0.3)})
    job = demo.Job("robust", 3, options, noise)
    config = demo.method_config(job, demo.DEFAULT, f)
    assert config.head_radius == pytest.approx(demo.DEFAULT.head_ratio * 0.3)
    assert config.radius == 0.3 and config.seed == 3 and config.lr == 0.003
    assert torch.allclose(config.confusion_matrix(), f.double())
    assert config.save_every == demo.DEFAULT.epochs  # final checkpoint only
    dual = demo.method_config(dataclasses.replace(job, dual_t=True), demo.DEFAULT, f)
    assert dual.estimate_confusion and dual.confusion is None
    traced = demo.method_config(demo.Job("plain", 0, (), all_checkpoints=True), demo.DEFAULT, None)
    assert traced.save_every == demo.DEFAULT.epochs // demo.DEFAULT.checkpoints


def test_target_data_is_seeded_per_seed(tmp_path: Path) -> None:
    a, b = demo.target_data(tmp_path, TINY, 0), demo.target_data(tmp_path, TINY, 1)
    assert tuple(a.x.shape) == (TINY.n_train, 1, 28, 28)
    assert not torch.equal(a.x, b.x)
    again = demo.target_data(tmp_path / "again", TINY, 0)
    assert torch.equal(again.x, a.x) and torch.equal(again.y, a.y)
    stored = load_data(str(a.file))
    assert torch.equal(stored.y, a.y)


def _images(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.flatten(1)}


def test_the_validation_split_is_held_out_and_noisy_under_noise(tmp_path: Path) -> None:
    settings = dataclasses.replace(TINY, n_train=300, n_validation=400)
    data = demo.target_data(tmp_path, settings, 0)
    assert len(data.val_y) == 400 and torch.equal(load_data(str(data.val_file)).x, data.val_x)
    # no validation image is a training image: the split is held out of n, for every seed
    held = _images(data.val_x)
    assert not held & _images(data.x)
    other = demo.target_data(tmp_path / "seed1", settings, 1, validation_seed=0)
    assert torch.equal(other.val_x, data.val_x) and len(other.y) == 300
    assert not held & _images(other.x) and _images(other.x) != _images(data.x)
    # the training set is the one drawn before the validation split existed
    plain = demo.target_data(tmp_path / "b", dataclasses.replace(settings, n_validation=0), 0)
    assert torch.equal(plain.x, data.x)
    clean = demo.label_files(data, None, 0)
    assert clean.train == clean.clean == data.file and clean.validation == data.val_file
    noisy = demo.label_files(data, demo.Noise("symmetric", 0.4), 0)
    val = load_data(str(noisy.validation)).y
    flipped = (val != data.val_y).double().mean().item()
    assert abs(flipped - 0.4) < 0.08  # drawn from the same noise as the training labels ...
    train_noisy = load_data(str(noisy.train)).y
    assert not torch.equal(val[:300], train_noisy)  # ... with a stream of its own
    assert noisy.label_noise["rate"] == 0.4 and noisy.clean == data.file


def _selection(method: str, choice: dict) -> Selection:
    grid = SelectionGrid.parse(["lr=0.01,0.03"])
    scores = [Score({"lr": 0.01}, 0.5, 1.0), Score({"lr": 0.03}, 0.7, 1.0)]
    chosen = Selection.from_scores(method, grid, scores, {"n": 10, "labels": "clean"})
    return dataclasses.replace(chosen, choice=choice)


def test_a_choice_is_made_on_the_first_seed_and_reused_by_the_others() -> None:
    dc = demo.constraint(demo.DEFAULT, 1.0)
    selections = {
        demo.Group("plain"): _selection("plain", {"lr": 0.03}),
        demo.Group(demo.SWEPT_METHOD): _selection(demo.SWEPT_METHOD, {"lr": 0.03, **dc}),
    }
    choices = {g: s.choice for g, s in selections.items()}
    settings = dataclasses.replace(demo.DEFAULT, methods=("plain",), noise=())
    jobs = {j.key: j for j in demo.plan(settings, choices, seed=4)}
    made = demo.selection_record(jobs["clean/plain/seed4"], selections, 4)
    assert (
        made["taken_from"] is None and len(made["scores"]) == 2 and made["choice"] == {"lr": 0.03}
    )
    for seed in (5, 6):
        reused = demo.selection_record(jobs[f"clean/plain/seed{seed}"], selections, 4)
        assert reused["taken_from"] == "runs/clean/plain/seed4" and reused["scores"] is None
        assert reused["choice"] == made["choice"]
    sweep = demo.selection_record(jobs["clean/distance-constraint-r0.1/seed5"], selections, 4)
    assert sweep["choice"] == {"lr": 0.03}
    assert sweep["taken_from"].startswith("runs/clean/distance-constraint-r1/seed4 (the learning")
    at_choice = demo.selection_record(jobs["clean/distance-constraint-r1/seed4"], selections, 4)
    assert at_choice["taken_from"] is None
    assert demo.selection_record(demo.Job("sam", 4, ()), selections, 4) is None


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

    final_only = demo.Job("plain", 0, ())
    every = demo.Job("plain", 0, (), all_checkpoints=True)
    assert [p.name for p in demo.checkpoints_to_measure(final_only, run([5, 10], None))] == [
        "epoch_010.safetensors"
    ]
    assert len(demo.checkpoints_to_measure(every, run([5, 10, 15], None))) == 3
    stopped = demo.checkpoints_to_measure(final_only, run([5, 7, 10], 7))
    assert [p.name for p in stopped] == ["epoch_007.safetensors"]


def _one_run(tmp_path: Path) -> tuple[demo.Job, RunResult]:
    checkpoint = tmp_path / "run" / "epoch_002.safetensors"
    manifest = {"checkpoints": [{"file": checkpoint.name, "epoch": 2}], "best_epoch": None}
    job = demo.Job("plain", 3, (), all_checkpoints=True)
    return job, RunResult(checkpoint.parent, [checkpoint], [], manifest)


def _defaults(function) -> dict:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def test_checkpoints_are_measured_as_hessfine_measure_would(tmp_path: Path, monkeypatch) -> None:
    """The demo calls the measurement with the settings and inputs that ``hessfine measure``
    with the demo's options (every example, batches of 100, CPU, the run's seed) passes; a
    methods-study checkpoint also with ``--hessian-split eval --samples n_train``."""
    defaults = {**_defaults(measure_module.measure), **_defaults(measure_module.measure_path)}
    calls = []

    def record(checkpoint, **options):
        calls.append({"checkpoint": checkpoint, **options})
        return [Path(options["out"]) / "measurement.json"]

    monkeypatch.setattr(demo_work, "measure_path", record)
    monkeypatch.setattr(measure_module, "measure_path", record)
    job, run = _one_run(tmp_path)
    train, reference = tmp_path / "train.pt", tmp_path / "pretrained.safetensors"
    settings = dataclasses.replace(TINY, width=2)
    with demo_work.Pool(1) as pool:
        written = demo.measure_all(
            tmp_path, {job: run}, {job: train}, reference, settings, pool, True
        )
    directory = tmp_path / "measurements" / job.key / "epoch_002"
    heldout = directory.with_name("epoch_002_heldout")
    assert written == [directory / "measurement.json", heldout / "measurement.json"]
    for out, extra in (
        (directory, ["--samples", "all"]),
        (heldout, ["--samples", str(TINY.n_train), "--hessian-split", "eval"]),
    ):
        argv = ["measure", str(run.checkpoints[0]), "--reference", str(reference), "--data"]
        argv += [str(train), "--eval-data", demo.TARGET_TEST, "--out", str(out)]
        argv += ["--model", demo.MODEL_SPEC, "--model-kwargs", '{"num_classes": 10, "width": 2}']
        argv += [*extra, "--batch-size", "100", "--device", "cpu", "--seed", "3"]
        assert cli.main([*argv, "--quiet"]) == 0
    ours, held, command, held_command = calls
    assert ours["settings"] == command["settings"] == demo.measure_settings(3)
    assert held["settings"] == held_command["settings"]
    assert held["settings"] == demo.measure_settings(3, heldout=TINY.n_train)
    for mine, theirs in ((ours, command), (held, held_command)):
        theirs.pop("context")  # one process: what detect() gives is measure's default context
        for key, value in theirs.items():
            assert str(mine.get(key, defaults.get(key))) == str(value), key


def test_a_failed_measurement_names_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    def refuse(checkpoint, **options):
        raise InputError("--data: no such file")

    monkeypatch.setattr(demo_work, "measure_path", refuse)
    job, run = _one_run(tmp_path)
    with (
        pytest.raises(RuntimeError, match="epoch_002.safetensors failed: --data: no such"),
        demo_work.Pool(1) as pool,
    ):
        demo.measure_all(tmp_path, {job: run}, {job: tmp_path}, tmp_path, TINY, pool, True)


def test_add_arguments() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.out == Path("hessfine-demo") and args.study == "default" and not args.quick
    assert parser.parse_args(["--study", "full"]).study == "full"
    assert args.jobs is None and 1 <= demo.default_jobs() <= 4
    assert parser.parse_args(["--jobs", "2"]).jobs == 2
    with pytest.raises(InputError, match="--jobs 0"):
        demo_work.Pool(0)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_pool_gives_the_same_results_on_two_processes(tmp_path: Path) -> None:
    reference, _, _ = demo.pretrain(tmp_path, TINY, seed=0)
    data = demo.target_data(tmp_path, TINY, 0)
    source = demo_work.ModelSource(1_000, TINY.width, reference)
    units = [
        demo_work.ScorePoint(
            source,
            demo.method_config(demo.Job("plain", 0, (("lr", lr),)), TINY, None),
            (("lr", lr),),
            data.file,
            data.file,
            data.val_file,
        )
        for lr in (0.01, 0.04)
    ]
    with demo_work.Pool(1) as one, demo_work.Pool(2) as two:
        here, there = one.run(units, "", True), two.run(units, "", True)
        assert two.worker_cpu > 0 and one.worker_cpu == 0
    assert here == there and [s.options for s in here] == [{"lr": 0.01}, {"lr": 0.04}]


def test_tiny_demo_end_to_end(tmp_path: Path) -> None:
    result = demo.run_demo(tmp_path, settings=TINY, jobs=2)
    rows = _read(result.comparison)
    selections = json.loads((tmp_path / "selection.json").read_text(encoding="utf-8"))
    assert set(selections) == {g.key for g in demo.groups(TINY)}
    choices = {g: selections[g.key]["choice"] for g in demo.groups(TINY)}
    jobs = demo.plan(TINY, choices)
    assert len(result.runs) + len(result.failures) == len(jobs)
    for job in jobs:
        manifest = json.loads((tmp_path / "runs" / job.key / "hessfine.json").read_text("utf-8"))
        record = manifest["selection"]
        assert record["choice"].items() <= dict(job.options).items()
        assert manifest["data"]["n_train"] == TINY.n_train
    for row in rows:
        assert row["n"] == str(TINY.n_train) and row["hessian_split"] == "train"
        assert row["selected"]
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
    # the methods study's checkpoints were also measured on held-out examples, joined to them
    traced = [r for r in rows if r["heldout_measurement"]]
    assert len(traced) == len(TINY.methods) * TINY.seeds * TINY.checkpoints
    assert all(float(r["hessian_distance_measure_heldout"]) >= 0 for r in traced)
    report = result.report.read_text(encoding="utf-8")
    assert "](comparison/fig1_radius.png)" in report
    assert "## Selected hyperparameters" in report and "| 4b. measure (𝓗_i from held-out" in report
    verdicts = [
        line.rsplit("|", 2)[-2].strip() for line in report.splitlines() if line.startswith("| 1.")
    ]
    assert verdicts and all(
        v.strip("*") in ("holds", "does not hold", "not tested") for v in verdicts
    )
    record = json.loads((tmp_path / "pretrained.json").read_text(encoding="utf-8"))
    assert f"{record['mnist_test_accuracy']:.3f}" in report
