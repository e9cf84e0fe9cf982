"""timm's train.py output directories, measured and compared through the command line
(docs/inputs.md, "timm").

The run is written by timm's own ``CheckpointSaver`` (with an EMA model, an AMP scaler on the
CPU and an ``argparse.Namespace`` of options as train.py passes them) and ``update_summary``,
around a few SGD steps of a tiny ``resnet10t``. The eval metric ranking the checkpoints is
chosen so that, with ``max_history=1``, ``checkpoint-1`` and ``model_best`` are one file,
``last`` (epoch 2) has no numbered copy, and the ``milestone-1`` of epoch 0 outlives its
``checkpoint-0``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from pathlib import Path, PurePosixPath

import pytest
import torch
from hessfine.analysis.checkpoints import find_checkpoints, load_checkpoint
from hessfine.analysis.cli import main
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.timm_runs import summary_row, timm_record
from torch import nn

KWARGS = {"num_classes": 3, "channels": [4, 8, 8, 8], "stem_width": 4}
METRICS = (50.0, 90.0, 40.0)


class Options:
    """A pickled custom class: never loaded without --trust-checkpoint."""

    def __init__(self, lr: float):
        self.lr = lr


def _args(root: Path) -> argparse.Namespace:
    """Options as train.py's parser leaves them (a subset, with its kinds of values)."""
    return argparse.Namespace(
        data_dir=str(root / "data"),
        dataset="",
        model="resnet10t",
        model_kwargs={"channels": (4, 8, 8, 8), "stem_width": 4},
        num_classes=3,
        input_size=[3, 16, 16],
        mean=None,
        batch_size=8,
        opt="sgd",
        lr=0.05,
        momentum=0.9,
        scale=[0.08, 1.0],
        epochs=3,
        model_ema=True,
        model_ema_decay=0.5,
        checkpoint_hist=1,
        amp=True,
        device="cpu",
        distributed=False,
        world_size=1,
        output=str(root),
    )


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, update_summary

    root = tmp_path_factory.mktemp("timm")
    out = root / "runs" / "20260101-resnet10t"
    out.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", **KWARGS)
    torch.save(model.state_dict(), root / "pretrained.pt")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 3, (16,), generator=g)
    xe, ye = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    torch.save({"x": x, "y": y}, root / "train.pt")
    torch.save({"x": xe, "y": ye}, root / "eval.pt")
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, momentum=0.9)
    scaler = NativeScaler(device="cpu")
    saver = CheckpointSaver(model, optimizer, args=_args(root), model_ema=ema, amp_scaler=scaler,
                            checkpoint_dir=str(out), recovery_dir=str(out), max_history=1)  # fmt: skip
    for epoch, metric in enumerate(METRICS):
        model.train()
        for batch in range(2):
            loss = nn.functional.cross_entropy(model(x[batch::2]), y[batch::2])
            optimizer.zero_grad()
            scaler(loss, optimizer)
            ema.update(model, step=2 * epoch + batch)
            saver.save_recovery(epoch, batch_idx=batch)
        model.eval()
        with torch.no_grad():
            eval_loss = nn.functional.cross_entropy(model(xe), ye).item()
        train_metrics = {"loss": loss.item()}
        eval_metrics = {"loss": eval_loss, "top1": metric, "top5": 100.0}
        update_summary(epoch, train_metrics, eval_metrics, filename=str(out / "summary.csv"),
                       lr=0.05, write_header=saver.best_metric is None)  # fmt: skip
        saver.save_checkpoint(epoch, metric=metric)
        if epoch == 0:
            saver.save_milestone(1)
    torch.save(model.state_dict(), root / "raw.pt")
    torch.save(ema.module.state_dict(), root / "ema.pt")
    return root


def _cli(*args: object) -> None:
    assert main([str(a) for a in args]) == 0


def _measure(root: Path, checkpoint: Path, out: Path, *extra: object) -> None:
    _cli("measure", checkpoint, "--reference", root / "pretrained.pt", "--model", "timm:resnet10t",
         "--model-kwargs", json.dumps(KWARGS), "--data", root / "train.pt",
         "--eval-data", root / "eval.pt", "--out", out, "--image-size", 16, "--samples", 4,
         "--dtype", "float64", "--quiet", *extra)  # fmt: skip


def _measurement(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_run_has_timm_layout(timm_run: Path) -> None:
    out = timm_run / "runs" / "20260101-resnet10t"
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-1.pth.tar", "last.pth.tar", "milestone-1.pth.tar",
                     "model_best.pth.tar", "recovery-2-0.pth.tar", "recovery-2-1.pth.tar",
                     "summary.csv"]  # fmt: skip
    assert os.path.samefile(out / "checkpoint-1.pth.tar", out / "model_best.pth.tar")
    found = find_checkpoints(timm_run / "runs")
    assert [p.name for p in found] == [
        "checkpoint-1.pth.tar",
        "last.pth.tar",
        "milestone-1.pth.tar",
    ]


def test_copies_count_once_like_hard_links(timm_run: Path, tmp_path: Path) -> None:
    copied = tmp_path / "copied"
    shutil.copytree(timm_run / "runs" / "20260101-resnet10t", copied)  # copies, not links
    assert not os.path.samefile(copied / "checkpoint-1.pth.tar", copied / "model_best.pth.tar")
    names = [p.name for p in find_checkpoints(copied)]
    assert names == ["checkpoint-1.pth.tar", "last.pth.tar", "milestone-1.pth.tar"]
    (copied / "checkpoint-1.pth.tar").rename(copied / "finetuned.pth.tar")  # not timm's name
    names = [p.name for p in find_checkpoints(copied)]
    assert names == ["finetuned.pth.tar", "last.pth.tar", "milestone-1.pth.tar"]
    (copied / "finetuned.pth.tar").unlink()  # a best without its numbered copy is measured
    names = [p.name for p in find_checkpoints(copied)]
    assert names == ["last.pth.tar", "milestone-1.pth.tar", "model_best.pth.tar"]


def test_timm_run_is_measured_and_compared(timm_run: Path) -> None:
    root = timm_run
    _measure(root, root / "runs", root / "m")
    found = sorted((root / "m").rglob("measurement.json"))
    names = [p.parent.name for p in found]
    assert names == ["checkpoint-1", "last", "milestone-1"]
    for path, epoch in zip(found, [1, 2, 0], strict=True):
        m = _measurement(path)
        assert m["epoch"] == epoch and m["step"] is None
        training = m["training"]
        assert (training["tool"], training["arch"], training["weights"]) == (
            "timm",
            "resnet10t",
            "raw",
        )
        assert training["metric"] == METRICS[epoch]
        assert training["args"]["model_kwargs"] == {"channels": [4, 8, 8, 8], "stem_width": 4}
        assert m["settings"]["timm_weights"] == "raw"
        # timm evaluated the raw model on the eval data: its eval loss is hessfine's
        assert training["summary"]["eval_loss"] == pytest.approx(m["loss"]["eval"], rel=1e-5)

    first = found[0].stat().st_mtime_ns
    _measure(root, root / "runs", root / "m")
    assert found[0].stat().st_mtime_ns == first  # resumed: same settings, same file

    _cli("compare", root / "m", "--out", root / "cmp", "--no-figures")
    with open(root / "cmp" / "comparison.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["epoch"]))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    with open(root / "runs" / "20260101-resnet10t" / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    for row, logged in zip(rows, summary, strict=True):
        for column in ("train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"):
            assert float(row[f"timm_{column}"]) == pytest.approx(float(logged[column])), column


def _assert_same(result: dict, expected: dict) -> None:
    for a, b in zip(result["layers"], expected["layers"], strict=True):
        assert a["name"] == b["name"]
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-12)
        assert a["quadratic_form"]["max"] == pytest.approx(b["quadratic_form"]["max"], rel=1e-9)
    assert result["loss"]["train"] == pytest.approx(expected["loss"]["train"], rel=1e-12)


def test_raw_and_ema_weights(timm_run: Path) -> None:
    root = timm_run
    last = root / "runs" / "20260101-resnet10t" / "last.pth.tar"
    raw, ema = load_checkpoint(last), load_checkpoint(last, timm_weights="ema")
    assert not torch.equal(raw.state["fc.weight"], ema.state["fc.weight"])
    for weights, plain in (("raw", "raw.pt"), ("ema", "ema.pt")):
        _measure(root, last, root / "w" / weights, "--timm-weights", weights)
        _measure(root, root / plain, root / "w" / plain)
        result = _measurement(root / "w" / weights / "measurement.json")
        assert result["settings"]["timm_weights"] == result["training"]["weights"] == weights
        _assert_same(result, _measurement(root / "w" / plain / "measurement.json"))
        assert (
            "timm_weights" not in _measurement(root / "w" / plain / "measurement.json")["settings"]
        )
    # the weights measured are part of a resumed run's identity
    before = (root / "w" / "ema" / "measurement.json").stat().st_mtime_ns
    _measure(root, last, root / "w" / "ema", "--timm-weights", "raw")
    assert (root / "w" / "ema" / "measurement.json").stat().st_mtime_ns != before


def _error(capsys, *args: object) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_ema_requested_but_absent_is_one_line(timm_run: Path, tmp_path: Path, capsys) -> None:
    root = timm_run
    checkpoint = torch.load(
        root / "runs" / "20260101-resnet10t" / "last.pth.tar", weights_only=False
    )
    del checkpoint["state_dict_ema"]
    torch.save(checkpoint, tmp_path / "last.pth.tar")
    common = ("--reference", root / "pretrained.pt", "--model", "timm:resnet10t", "--model-kwargs",
              json.dumps(KWARGS), "--data", root / "train.pt", "--timm-weights", "ema")  # fmt: skip
    err = _error(capsys, "measure", tmp_path / "last.pth.tar", "--out", tmp_path / "m", *common)
    assert "holds no EMA weights" in err and "--timm-weights ema" in err
    err = _error(capsys, "measure", root / "raw.pt", "--out", tmp_path / "m", *common)
    assert "not written by timm's train.py" in err and "--timm-weights ema" in err
    assert not (tmp_path / "m").exists()


def test_options_load_without_trust_but_other_objects_do_not(timm_run: Path, tmp_path) -> None:
    checkpoint = torch.load(
        timm_run / "runs" / "20260101-resnet10t" / "last.pth.tar", weights_only=False
    )
    assert isinstance(checkpoint["args"], argparse.Namespace)
    for name, args in [
        ("custom", Options(0.1)),
        ("path", argparse.Namespace(p=PurePosixPath("a"))),
    ]:
        path = tmp_path / f"{name}.pth.tar"
        torch.save({**checkpoint, "args": args}, path)
        with pytest.raises(InputError, match="pickled Python objects.*--trust-checkpoint") as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value)
        trusted = load_checkpoint(path, trust=True)
        assert trusted.training["tool"] == "timm"
    assert trusted.training["args"] == {"p": "a"}


def test_summary_rows_and_old_epoch_numbering(tmp_path: Path) -> None:
    summary = tmp_path / "summary.csv"
    summary.write_text(
        "epoch,train_loss,eval_loss\n0,2.0,2.5\n1,1.5,nan\n"
        "epoch,train_loss,eval_loss,lr\n1,1.4,1.9,0.1\n"  # resumed: header again, epoch 1 again
    )
    assert summary_row(summary, 0) == {"train_loss": 2.0, "eval_loss": 2.5}
    assert summary_row(summary, 1) == {"train_loss": 1.4, "eval_loss": 1.9, "lr": 0.1}
    assert summary_row(summary, 5) == {} and summary_row(summary, None) == {}
    old = {"state_dict": {}, "epoch": 2, "arch": "resnet50"}  # before version 2: the next epoch
    record = timm_record(old, "raw", summary)
    assert (record["epoch"], record["summary"]["lr"], record["args"]) == (1, 0.1, None)
