"""Tests of hessfine.finetune.selection and ``hessfine finetune --select``: the grid, the choice
(the argmax of the recorded scores), the held-out validation split and the manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hessfine.analysis import cli as main_cli
from hessfine.finetune import cli
from hessfine.finetune import selection as selection_module
from hessfine.finetune.confusion import corrupt_labels, symmetric_confusion
from hessfine.finetune.digit_networks import digits_cnn
from hessfine.finetune.methods import FinetuneConfig
from hessfine.finetune.run_directory import MANIFEST
from hessfine.finetune.selection import (
    RULE,
    Score,
    Selection,
    SelectionGrid,
    choose,
    method_options,
    select,
    validation_split,
)
from safetensors.torch import save_file

SPEC = "hessfine.finetune.digit_networks:digits_cnn"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(uci_digits):
    x, y = uci_digits
    return x[:200], y[:200]


def _network() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    reference = {k: v.clone() for k, v in digits_cnn(width=4).state_dict().items()}
    reference = {k: v for k, v in reference.items() if not k.startswith("head.")}
    torch.manual_seed(1)
    return digits_cnn(width=4), reference


def test_grid_from_text_and_mapping() -> None:
    grid = SelectionGrid.parse(["lr=0.01,0.05;radius=0.3, 1", "nso-draws=1,2"])
    assert grid.names() == ("lr", "radius", "nso_draws")
    assert grid.points()[:3] == [
        {"lr": 0.01, "radius": 0.3, "nso_draws": 1},
        {"lr": 0.01, "radius": 0.3, "nso_draws": 2},
        {"lr": 0.01, "radius": 1.0, "nso_draws": 1},
    ]
    assert len(grid.points()) == 8 and isinstance(grid.points()[1]["nso_draws"], int)
    assert SelectionGrid.from_mapping({"lr": [0.01, 0.05], "radius": 1}).to_json() == {
        "lr": [0.01, 0.05],
        "radius": [1.0],
    }
    # a shared grid: each method takes the learning rate and its own options
    assert grid.for_method("plain").names() == ("lr",)
    assert grid.for_method("robust").names() == ("lr", "radius")
    assert grid.for_method("nso").names() == ("lr", "nso_draws")
    assert SelectionGrid.parse(["radius=1"]).for_method("sam") is None
    assert "l2sp_alpha" in method_options("l2-sp") and "sam_rho" not in method_options("l2-sp")
    assert "lr" in method_options("sam") and "weight_decay" in method_options("plain")


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (["lr"], "is not NAME=V1,V2"),
        (["lr="], "give values separated by commas"),
        (["lr=0.1,,0.2"], "give values separated by commas"),
        (["lr=a"], "lr=a is not a number"),
        (["lr=inf"], "not a finite number"),
        (["nso-draws=1.5"], "must be a whole number"),
        (["momentum-x=1"], "momentum-x cannot be selected"),
        (["seed=1,2"], "seed cannot be selected"),
        (["lr=0.1", "lr=0.2"], "lr is named twice"),
        (["lr=0.1,0.1"], "lr repeats a value"),
        ([";"], "the grid is empty"),
    ],
)
def test_bad_grids_are_one_line_errors(texts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectionGrid.parse(texts)


def test_a_grid_must_fit_the_method() -> None:
    grid = SelectionGrid.parse(["lr=0.1", "radius=1", "sam-rho=0.1"])
    with pytest.raises(ValueError, match="method plain does not use radius, sam-rho"):
        grid.check_method("plain")
    SelectionGrid.parse(["lr=0.1", "radius=1"]).check_method("robust")


def test_the_choice_rule() -> None:
    scores = [
        Score({"lr": 0.1}, 0.80, 0.70),
        Score({"lr": 0.2}, 0.85, 0.90),
        Score({"lr": 0.3}, 0.85, 0.60),  # same accuracy, lower loss
        Score({"lr": 0.4}, 0.85, 0.60),  # a full tie: the first in grid order
        Score({"lr": 0.5}, None, None, "diverged"),
    ]
    assert choose(scores) == 2
    with pytest.raises(ValueError, match="no point of the grid could be trained \\(diverged\\)"):
        choose([scores[-1]])


def test_validation_split_is_seeded_and_its_own_stream() -> None:
    kept, held = validation_split(50, 0.2, seed=3)
    assert len(held) == 10 and set(kept.tolist()).isdisjoint(held.tolist())
    assert torch.equal(held, validation_split(50, 0.2, seed=3)[1])
    assert not torch.equal(held, validation_split(50, 0.2, seed=4)[1])
    # not the first indices of the batch order that the same seed draws in training
    batches = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(held, batches[:10].sort().values)
    with pytest.raises(ValueError, match="at least 3"):
        validation_split(2, 0.5, seed=0)


def test_selection_on_digits_chooses_the_argmax_of_its_recorded_scores(digits) -> None:
    x, y = digits
    noisy = corrupt_labels(
        y, symmetric_confusion(10, 0.3), generator=torch.Generator().manual_seed(0)
    )
    model, reference = _network()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = SelectionGrid.parse(["lr=0.01,0.1", "radius=0.3,3"])
    calls = []
    selection = select(
        model,
        reference,
        train_x=x[:150],
        train_y=noisy[:150],
        val_x=x[150:],
        val_y=noisy[150:],
        config=FinetuneConfig("distance-constraint", epochs=2, batch_size=16),
        grid=grid,
        labels="noisy",
        train_y_clean=y[:150],
        adjust=lambda p: {**p, "head_radius": 4 * p["radius"]},
        validation={"source": "digits[150:200]"},
        on_point=lambda i, s: calls.append(i),
    )
    assert calls == [0, 1, 2, 3]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    scores = selection.scores
    assert [s.options for s in scores] == [
        {**p, "head_radius": 4 * p["radius"]} for p in grid.points()
    ]
    assert all(s.error is None and 0 <= s.validation_accuracy <= 1 for s in scores)
    best = max(s.validation_accuracy for s in scores)
    tied = [s for s in scores if s.validation_accuracy == best]
    assert selection.choice == min(tied, key=lambda s: s.validation_loss).options
    # the scores are the validation accuracy of the model trained at that point, on noisy labels
    record = selection.to_json()
    assert set(record) == {"rule", "grid", "validation", "scores", "choice", "taken_from"}
    assert record["rule"] == RULE and record["taken_from"] is None
    assert record["validation"] == {"n": 50, "labels": "noisy", "source": "digits[150:200]"}
    assert record["grid"] == {"lr": [0.01, 0.1], "radius": [0.3, 3.0]}
    chosen = max(
        record["scores"],
        key=lambda s: (s["validation_accuracy"], -s["validation_loss"]),
    )
    assert record["choice"] == chosen["options"]
    json.dumps(record)
    config = selection.config(FinetuneConfig("distance-constraint", epochs=2))
    assert config.lr == selection.choice["lr"] and config.radius == selection.choice["radius"]
    reused = selection.reused("runs/clean/dc/seed0")
    assert reused["taken_from"] == "runs/clean/dc/seed0" and reused["scores"] is None
    assert reused["choice"] == record["choice"]


def test_a_diverging_point_is_recorded_and_never_chosen(digits, monkeypatch) -> None:
    x, y = digits
    model, reference = _network()
    real = selection_module.finetune

    def diverge_at_high_rates(net, ref, *, config, **options):
        if config.lr > 1:
            raise FloatingPointError("plain fine-tuning diverged in epoch 1 (non-finite loss)")
        return real(net, ref, config=config, **options)

    monkeypatch.setattr(selection_module, "finetune", diverge_at_high_rates)
    selection = select(
        model,
        reference,
        train_x=x[:100],
        train_y=y[:100],
        val_x=x[100:150],
        val_y=y[100:150],
        config=FinetuneConfig("plain", epochs=1, batch_size=16),
        grid=SelectionGrid.parse(["lr=10,0.05"]),
    )
    failed, trained = selection.scores
    assert failed.validation_accuracy is None and "diverged" in failed.error
    assert selection.choice == {"lr": 0.05} and trained.error is None
    for text, message in (
        ("radius=1", "method plain does not use radius"),
        ("lr=-1", "at lr=-1: lr = -1.0 is out of range"),
    ):
        with pytest.raises(ValueError, match=message):  # before anything is trained
            select(
                model,
                reference,
                train_x=x,
                train_y=y,
                val_x=x,
                val_y=y,
                config=FinetuneConfig("plain"),
                grid=SelectionGrid.parse([text]),
            )
    with pytest.raises(ValueError, match="2 scores for 1 points"):
        Selection.from_scores("plain", SelectionGrid.parse(["lr=1"]), [failed, trained], {})


def _reference(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in digits_cnn(width=4).state_dict().items()}, str(path))
    return path


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        SPEC,
        "--model-kwargs",
        '{"width": 4}',
        "--reference",
        str(_reference(tmp_path)),
        "--data",
        "digits:test",
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def test_cli_select_holds_out_noisy_validation_examples_and_records_it(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    seen = {}
    real = cli.select

    def spy(*args, **options):
        seen.update(options)
        return real(*args, **options)

    monkeypatch.setattr(cli, "select", spy)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"radius": [0.3, 1]}), encoding="utf-8")
    argv = _argv(tmp_path, "--method", "robust", "--label-noise", "symmetric", "--noise-rate")
    argv += ["0.3", "--select", "lr=0.01,0.05", "--select-file", str(grid), "--seed", "2"]
    assert main_cli.main([*argv, "--select-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("select ") == 4 and "selected on 125 held-out examples" in printed
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text(encoding="utf-8"))
    record, data = manifest["selection"], manifest["data"]
    assert record["grid"] == {"radius": [0.3, 1.0], "lr": [0.01, 0.05]}
    assert len(record["scores"]) == 4 and record["taken_from"] is None
    best = choose(
        [
            Score(s["options"], s["validation_accuracy"], s["validation_loss"])
            for s in record["scores"]
        ]
    )
    assert record["choice"] == record["scores"][best]["options"]
    assert manifest["config"]["lr"] == record["choice"]["lr"]
    assert manifest["config"]["radius"] == record["choice"]["radius"]
    # 125 of the 500 examples held out: not trained on, not in n
    held = data["held_out_indices"]
    assert (
        len(held) == 125 == record["validation"]["n"] and record["validation"]["labels"] == "noisy"
    )
    assert record["validation"]["indices"] == held and record["validation"]["fraction"] == 0.25
    assert data["n_train"] == 375
    assert sum(1 for _ in (tmp_path / "run" / "labels.csv").open()) == 376
    # the validation labels are the noisy labels of the held-out examples
    from hessfine.analysis.data import load_data

    clean = load_data("digits:test").y
    noisy = corrupt_labels(
        clean, symmetric_confusion(10, 0.3), generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(seen["val_y"], noisy[held]) and not torch.equal(noisy[held], clean[held])
    assert len(seen["train_x"]) == 375
    # hessfine measure leaves the held-out examples out of n
    out = tmp_path / "m"
    assert (
        main_cli.main(
            ["measure", str(tmp_path / "run"), "--out", str(out), "--samples", "8", "--quiet"]
        )
        == 0
    )
    measured = json.loads(next(out.rglob("measurement.json")).read_text(encoding="utf-8"))
    assert measured["bounds"]["n"] == 375 and measured["data"]["n_train"] == 375
    assert math.isfinite(measured["bounds"]["hessian_distance_measure"])


def test_cli_without_select_records_none(tmp_path: Path) -> None:
    assert main_cli.main([*_argv(tmp_path, "--method", "plain"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["selection"] is None and "held_out_indices" not in manifest["data"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "plain", "--select", "lr"], "--select: 'lr' is not NAME=V1,V2"),
        (["--method", "plain", "--select", "radius=0.3,1"], "method plain does not use radius"),
        (["--method", "plain", "--select", "lr=x"], "--select: lr=x is not a number"),
        (["--method", "sam", "--select", "lr=0.1", "--select", "lr=0.2"], "lr is named twice"),
        (["--method", "plain", "--select", "lr=0"], "--select: at lr=0: lr = 0.0 is out of range"),
        (["--method", "plain", "--select-fraction", "0.3"], "--select-fraction needs --select"),
        (
            ["--method", "plain", "--select", "lr=0.1", "--select-fraction", "1.5"],
            "--select-fraction 1.5: give a share in",
        ),
        (["--method", "plain", "--select-file", "missing.json"], "not a readable JSON file"),
        (["--method", "plain", "--select-file", "{list}"], "holds a list, not an object"),
        (
            ["--method", "plain", "--select-file", "{lr}", "--select", "lr=0.1"],
            "lr is named twice",
        ),
    ],
)
def test_cli_bad_selection_exits_2_with_one_line(
    tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    files = {"{list}": "[0.1]", "{lr}": '{"lr": [0.1]}'}
    for i, value in enumerate(extra):
        if value in files:
            extra[i] = str(tmp_path / "grid.json")
            (tmp_path / "grid.json").write_text(files[value], encoding="utf-8")
    assert main_cli.main(_argv(tmp_path, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and "Traceback" not in error
