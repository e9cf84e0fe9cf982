"""The training callbacks of ``hessfine.integrations`` in real training runs, and the package's
lazy exports.

A transformers ``Trainer`` (tiny BERT, a few CPU steps) and a Lightning fit run with
``HessianMeasureCallback``: the measure is logged once per evaluation (``log_history``, the
callbacks after it, ``callback_metrics``), the files it writes are what ``hessfine compare``
reads, and under two gloo processes the measurement equals the single process's.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hessfine.analysis.cli import main
from torch import nn

from tests.test_distributed import assert_same, run_two_processes
from tests.test_training_tools import CLASSES, VOCAB, bert_config


def _rows(directory: Path) -> list[dict[str, str]]:
    with open(directory / "comparison.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _bert():
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config())


def _token_dataset(n: int, seed: int):
    """Ragged token rows (lengths 5 and 8) with a ``label`` and a text column."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 8), generator=g)
    rows = [ids[i, : 8 if i % 2 else 5].tolist() for i in range(n)]
    labels = torch.randint(0, CLASSES, (n,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": rows, "label": labels, "text": ["t"] * n})


def _pad(features: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(f["input_ids"]) for f in features)
    ids = [f["input_ids"] + [0] * (length - len(f["input_ids"])) for f in features]
    mask = [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
    labels = [f["labels"] if "labels" in f else f["label"] for f in features]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def test_trainer_logs_the_measure_at_each_evaluation(tmp_path: Path) -> None:
    from hessfine.integrations.transformers import HessianMeasureCallback
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class After(TrainerCallback):
        """A report_to integration placed after the measure: what it is sent."""

        sent: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.sent.append(dict(logs))

    train, val = _token_dataset(24, 0), _token_dataset(10, 1)
    torch.manual_seed(0)
    model = _bert()
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8,
                             learning_rate=0.05, max_steps=4, eval_strategy="steps", eval_steps=2,
                             logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True, save_strategy="no")  # fmt: skip
    measure = HessianMeasureCallback(data=train, samples=8)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=_pad, callbacks=[measure, After()])  # fmt: skip
    trainer.train()

    history = trainer.state.log_history
    evaluations = [e for e in history if "eval_loss" in e]
    measured = [e for e in history if "hessfine_theorem_2_1" in e]
    assert [e["step"] for e in evaluations] == [2, 4]
    assert measured == evaluations  # once per evaluation, in the evaluation's own entry
    for entry in measured:
        for name in ("hessian_distance_measure", "generalization_gap_loss", "sum_distance",
                     "sum_hessian_quadratic_form", "train_loss", "eval_loss"):  # fmt: skip
            assert isinstance(entry[f"hessfine_{name}"], float), name
    assert [e["hessfine_theorem_2_1"] for e in After.sent if "hessfine_theorem_2_1" in e] == [
        e["hessfine_theorem_2_1"] for e in measured
    ]

    root = tmp_path / "out" / "hessfine"
    found = sorted(p.parent.name for p in root.rglob("measurement.json"))
    assert found == ["step-2", "step-4"]
    first = json.loads((root / "step-2" / "measurement.json").read_text())
    assert (first["step"], first["epoch"]) == (2, history[1]["epoch"])
    assert first["training"]["sample"] == {
        "examples": 8,
        "of": 24,
        "order": "stratified",
        "seed": 0,
    }
    assert first["bounds"]["n"] == 24 and first["data"]["n_eval"] == 8
    assert first["settings"]["estimator"] == "ggn"
    assert first["bounds"]["theorem_2_1"] == pytest.approx(measured[0]["hessfine_theorem_2_1"])

    assert main(["compare", str(root), "--out", str(tmp_path / "cmp"), "--no-figures"]) == 0
    rows = sorted(_rows(tmp_path / "cmp"), key=lambda r: int(r["step"]))
    assert [r["step"] for r in rows] == ["2", "4"]
    for row, entry in zip(rows, evaluations, strict=True):
        assert float(row["trainer_eval_loss"]) == pytest.approx(entry["eval_loss"])
        assert float(row["theorem_2_1"]) == pytest.approx(entry["hessfine_theorem_2_1"])


def test_trainer_every_n_steps(tmp_path: Path) -> None:
    from hessfine.integrations.transformers import HessianMeasureCallback
    from transformers import Trainer, TrainingArguments

    train = _token_dataset(16, 0)
    torch.manual_seed(0)
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4,
                             logging_steps=100, report_to="none", use_cpu=True,
                             disable_tqdm=True, save_strategy="no")  # fmt: skip
    callback = HessianMeasureCallback(data=train, samples=4, every=2, estimator="block")
    trainer = Trainer(model=_bert(), args=args, train_dataset=train, data_collator=_pad,
                      callbacks=[callback])  # fmt: skip
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "hessfine_theorem_2_1" in e]
    assert steps == [2, 4]
    with pytest.raises(ValueError, match="every must be a positive number of steps"):
        HessianMeasureCallback(data=train, every=0)
    with pytest.raises(TypeError, match="unknown setting 'trace_probe'"):
        HessianMeasureCallback(data=train, trace_probe=3)


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, CLASSES))

    def forward(self, x):
        return self.net(x)


def _lightning_module():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, CLASSES))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, index):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Module()


def test_lightning_logs_the_measure_at_each_validation(tmp_path: Path) -> None:
    import lightning as L
    from hessfine.integrations.lightning import HessianMeasureCallback

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, CLASSES, (32,), generator=g)
    train = torch.utils.data.TensorDataset(x[:24], y[:24])
    loader = torch.utils.data.DataLoader(train, batch_size=8)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[24:], y[24:]), batch_size=4)
    torch.manual_seed(0)
    module = _lightning_module()
    reference = {k: v.clone() for k, v in module.net.state_dict().items()}  # of the network
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="logs"),
                        callbacks=[HessianMeasureCallback(reference, data=train, samples=12)])  # fmt: skip
    trainer.fit(module, loader, val)
    metrics = trainer.callback_metrics
    for name in ("hessian_distance_measure", "theorem_2_1", "generalization_gap_loss",
                 "sum_hessian_quadratic_form", "sum_distance"):  # fmt: skip
        assert f"hessfine/{name}" in metrics, name
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("hessfine/theorem_2_1")]
    assert [r["epoch"] for r in logged] == ["0", "1"]  # once per validation, not the sanity check
    root = Path(trainer.log_dir) / "hessfine"
    assert sorted(p.parent.name for p in root.rglob("measurement.json")) == ["step-3", "step-6"]
    last = json.loads((root / "step-6" / "measurement.json").read_text())
    assert (last["step"], last["epoch"]) == (6, 1)
    assert last["data"]["n_eval"] == 8 and last["training"]["sample"]["of"] == 24
    assert float(metrics["hessfine/theorem_2_1"]) == pytest.approx(last["bounds"]["theorem_2_1"])
    assert main(["compare", str(root), "--out", str(tmp_path / "cmp"), "--no-figures"]) == 0
    assert sorted(r["step"] for r in _rows(tmp_path / "cmp")) == ["3", "6"]

    bare = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=str(tmp_path / "bare"),
                     callbacks=[HessianMeasureCallback(data=train, samples=12)])  # fmt: skip
    bare.fit(_lightning_module(), loader, val)
    assert [p.parent.name for p in (tmp_path / "bare" / "hessfine").rglob("measurement.json")] == [
        "step-3"
    ]


def _measure_twice(argv: list[str]) -> int:
    """One rank of a 2-process gloo group measuring a fixed model with the training callbacks'
    machinery (the group already joined, as in distributed training); rank 0 writes."""
    import torch.distributed as dist
    from hessfine.integrations.measuring import TrainingMeasure

    torch.set_num_threads(1)
    if argv[1] == "group":
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    reference = _Classifier()
    tuned = _Classifier()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(12, 4, generator=g), torch.arange(12) % CLASSES)
    measuring = TrainingMeasure(
        reference, data, data, 8, {"estimator": "block", "dtype": "float64", "batch_size": 2}
    )
    measuring.measure(tuned, training={"step": 1}, directory=Path(argv[0]))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def test_callbacks_share_the_work_of_a_process_group(tmp_path: Path) -> None:
    assert _measure_twice([str(tmp_path / "one"), "alone"]) == 0
    run_two_processes([str(tmp_path / "two"), "group"], target=_measure_twice)
    one = json.loads((tmp_path / "one" / "measurement.json").read_text())
    two = json.loads((tmp_path / "two" / "measurement.json").read_text())
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert_same(one, two)


def test_the_package_exports_load_lazily() -> None:
    script = (
        "import sys\n"
        "import hessfine.bounds\n"
        "from hessfine.analysis.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ['transformers', 'lightning', 'pytorch_lightning', 'peft', 'datasets']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "import hessfine\n"
        "print(sorted(hessfine.__all__) == sorted(n for n in dir(hessfine) if n in hessfine.__all__))\n"
        "print(hessfine.measure_model.__module__, 'transformers' in sys.modules)\n"
        "try:\n"
        "    hessfine.measure_models\n"
        "except AttributeError as err:\n"
        "    print(err)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[-4:] == [
        "[]",
        "True",
        "hessfine.analysis.python_api False",
        "module 'hessfine' has no attribute 'measure_models'",
    ]
    import hessfine

    assert set(hessfine.__all__) == {"measure_model", "measure", "MeasureSettings", "Measurement",
                                     "MeasuredLayer", "compare"}  # fmt: skip
    assert hessfine.Measurement.__module__ == "hessfine.analysis.measurement"
