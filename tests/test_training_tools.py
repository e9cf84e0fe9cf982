"""What training tools write, measured and compared through the command line
(docs/inputs.md, "What training tools write").

Each artefact is made once per module with the real library: transformers' ``Trainer`` (tiny
BERT classifier, padded inputs), peft's ``get_peft_model`` + ``save_pretrained`` (LoRA adapters;
the merged model from ``merge_and_unload`` is the oracle), and a Lightning ``Trainer`` with
``ModelCheckpoint``. Everything is random-initialised and local; a few CPU steps each.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.peft import LoraFactor, read_adapter
from hessfine.analysis.sources.trainer import logged_near
from torch import nn

VOCAB, SEQ, CLASSES = 50, 8, 3


def bert_config():
    from transformers import BertConfig

    return BertConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        num_labels=CLASSES,
        pad_token_id=0,
    )


def tokens(n: int) -> tuple[dict, torch.Tensor]:
    """Token ids 1..VOCAB-1 with every other row cut short and right-padded with 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[::2, 5:] = 0
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return {"input_ids": ids * mask, "attention_mask": mask}, y


def _cli(*args: object) -> None:
    assert main([str(a) for a in args]) == 0


def _rows(directory: Path) -> list[dict[str, str]]:
    with open(directory / "comparison.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _measurement(path: Path) -> dict:
    return json.loads(path.read_text())


# --- Hugging Face Trainer --------------------------------------------------------------------


def _train(model, x: dict, y: torch.Tensor, out: Path, *, steps: int, eval_steps: int):
    """A transformers ``Trainer`` after ``steps`` CPU steps on (x, y): batches of 8, a
    checkpoint per step in ``out``, evaluated on the same data in one batch every
    ``eval_steps``."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    dataset = Dataset.from_dict({k: v.tolist() for k, v in x.items()} | {"labels": y.tolist()})
    args = TrainingArguments(
        str(out),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=len(y),
        learning_rate=0.05,
        max_steps=steps,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=eval_steps,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config())
    model.save_pretrained(root / "base")
    x, y = tokens(16)
    torch.save({"x": x, "y": y}, root / "train.pt")
    _train(model, x, y, root / "out", steps=3, eval_steps=2).save_model(str(root / "out"))
    return root


def test_trainer_output_dir_is_measured_and_compared(trainer_run: Path) -> None:
    root = trainer_run
    assert (root / "out" / "model.safetensors").is_file()
    assert (root / "out" / "checkpoint-1" / "optimizer.pt").is_file()
    _cli("measure", root / "out", "--reference", root / "base", "--data", root / "train.pt",
         "--out", root / "m", "--estimator", "block", "--samples", 4, "--quiet")  # fmt: skip
    found = sorted(p.parent.name for p in (root / "m").rglob("measurement.json"))
    assert found == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for step in (1, 2, 3):
        m = _measurement(root / "m" / f"checkpoint-{step}" / "measurement.json")
        state = json.loads((root / "out" / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert m["step"] == step == state["global_step"]
        assert m["epoch"] == state["epoch"] and isinstance(m["epoch"], float)
        assert m["training"]["tool"] == "transformers.Trainer"

    first = (root / "m" / "checkpoint-1" / "measurement.json").stat().st_mtime_ns
    _cli("measure", root / "out", "--reference", root / "base", "--data", root / "train.pt",
         "--out", root / "m", "--estimator", "block", "--samples", 4, "--quiet")  # fmt: skip
    assert (root / "m" / "checkpoint-1" / "measurement.json").stat().st_mtime_ns == first

    _cli("compare", root / "m", "--out", root / "cmp", "--no-figures")
    rows = sorted(_rows(root / "cmp"), key=lambda r: int(r["step"]))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert len({r["epoch"] for r in rows}) == 3
    assert [r["trainer_loss_step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["trainer_eval_loss"] == ""  # the first evaluation is at step 2
    for row in rows[1:]:
        # the Trainer evaluated on the training data: its eval loss is hessfine's train loss
        assert row["trainer_eval_step"] == row["step"]
        assert float(row["trainer_eval_loss"]) == pytest.approx(float(row["train_loss"]), rel=1e-5)
        assert float(row["trainer_loss"]) > 0


def test_logged_losses_are_taken_at_or_nearest_the_step() -> None:
    history = [
        {"loss": 2.0, "step": 10},
        {"loss": 1.0, "step": 20},
        {"eval_loss": 1.5, "eval_accuracy": 0.5, "eval_runtime": 3.0, "step": 10},
        {"train_loss": 1.2, "train_runtime": 9.0, "step": 20},
    ]
    assert logged_near(history, 15) == {
        "loss": 2.0,
        "loss_step": 10,
        "eval_loss": 1.5,
        "eval_accuracy": 0.5,
        "eval_step": 10,
    }
    assert logged_near(history, 19)["loss"] == 1.0
    assert logged_near([], 3) == {}


# --- Trainer runs of other tasks: a token classifier, a T5 fine-tune --------------------------


def _task_model(task: str):
    """A tiny random BertForTokenClassification, or T5ForConditionalGeneration."""
    from transformers import BertForTokenClassification, T5Config, T5ForConditionalGeneration

    if task == "token-classification":
        return BertForTokenClassification(bert_config())
    config = T5Config(
        vocab_size=VOCAB,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def _task_labels(task: str, x: dict) -> torch.Tensor:
    """Token labels (−100 at padding and at the first token), or decoder labels of 2 to 4
    tokens: the sequences have different numbers of label positions."""
    g = torch.Generator().manual_seed(1)
    if task == "token-classification":
        y = torch.randint(0, CLASSES, x["input_ids"].shape, generator=g)
        y = y.masked_fill(x["attention_mask"] == 0, -100)
        y[:, 0] = -100
        return y
    y = torch.randint(2, VOCAB, (len(x["input_ids"]), 4), generator=g)
    return y.masked_fill(torch.arange(4) >= 2 + torch.arange(len(y))[:, None] % 3, -100)


@pytest.fixture(scope="module", params=["token-classification", "seq2seq-lm"])
def task_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(task, root): two Trainer steps of the task's model on 16 padded sequences."""
    task = request.param
    root = tmp_path_factory.mktemp(task)
    torch.manual_seed(0)
    model = _task_model(task)
    model.save_pretrained(root / "base")
    x, _ = tokens(16)
    y = _task_labels(task, x)
    torch.save({"x": x, "y": y}, root / "train.pt")
    _train(model, x, y, root / "out", steps=2, eval_steps=1)
    return task, root


def test_trainer_runs_of_other_tasks_are_measured_and_compared(task_run) -> None:
    """The task is chosen from the saved model's class; hessfine's train loss is the mean over
    sequences of each one's mean token loss, the Trainer's (evaluated on the same data, one
    batch) the token-weighted mean: they differ as the docs say (trainer_{name})."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForTokenClassification

    task, root = task_run
    measured = root / "m" / "checkpoint-1" / "measurement.json"
    times = []
    for _ in range(2):  # the second run skips what the first measured (the task chosen alike)
        _cli("measure", root / "out", "--reference", root / "base", "--data", root / "train.pt",
             "--out", root / "m", "--estimator", "ggn", "--samples", 4, "--quiet")  # fmt: skip
        times.append(measured.stat().st_mtime_ns)
    assert times[0] == times[1]
    _cli("compare", root / "m", "--out", root / "cmp", "--no-figures")
    rows = sorted(_rows(root / "cmp"), key=lambda r: int(r["step"]))
    assert [r["step"] for r in rows] == ["1", "2"]
    data = torch.load(root / "train.pt")
    x, y = data["x"], data["y"]
    loader = (
        AutoModelForTokenClassification if task == "token-classification" else AutoModelForSeq2SeqLM
    )
    for row in rows:
        assert row["task"] == task
        m = _measurement(root / "m" / f"checkpoint-{row['step']}" / "measurement.json")
        assert m["settings"]["task_source"] == "model class"
        model = loader.from_pretrained(root / "out" / f"checkpoint-{row['step']}").eval()
        with torch.no_grad():
            losses = torch.stack(
                [
                    model(**{k: v[n : n + 1] for k, v in x.items()}, labels=y[n : n + 1]).loss
                    for n in range(len(y))
                ]
            )
        positions = (y != -100).sum(dim=1).float()
        weighted = float((losses * positions).sum() / positions.sum())
        assert float(row["train_loss"]) == pytest.approx(float(losses.mean()), rel=1e-5)
        assert float(row["trainer_eval_loss"]) == pytest.approx(weighted, rel=1e-5)
        assert abs(weighted - float(losses.mean())) > 1e-4
        assert 0.0 <= float(row["train_accuracy"]) <= 1.0


# --- PEFT LoRA adapters ----------------------------------------------------------------------

CONV_NET = """
import torch
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3)
    )
"""


def _randomise_saved_copies(peft_model, scale: float = 0.1) -> None:
    """A trained ``modules_to_save`` copy differs from the base: perturb it."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _adapter_and_merged(base_model, config, root: Path, name: str) -> None:
    """Save ``base_model`` + LoRA ``config`` as ``root/adapters/name`` and the merged model
    (peft's merge_and_unload) as ``root/merged/name``."""
    from peft import get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(base_model, config)
    _randomise_saved_copies(peft_model)
    peft_model.save_pretrained(root / "adapters" / name)
    merged = peft_model.merge_and_unload()
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(root / "merged" / name)
    else:
        from safetensors.torch import save_file

        (root / "merged" / name).mkdir(parents=True)
        state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        save_file(state, str(root / "merged" / name / "model.safetensors"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig
    from transformers import (
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    BertForSequenceClassification(bert_config()).double().save_pretrained(root / "bert")
    x, y = tokens(12)
    torch.save({"x": x, "y": y}, root / "tokens.pt")

    def bert():
        return BertForSequenceClassification.from_pretrained(str(root / "bert")).double()

    lora = {"init_lora_weights": False}
    _adapter_and_merged(
        bert(),
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["query", "value", "word_embeddings"],
            rank_pattern={"value": 3},
            alpha_pattern={"layer.0.attention.self.query": 5},
            modules_to_save=["classifier"],
            **lora,
        ),
        root,
        "patterns",
    )
    _adapter_and_merged(
        bert(),
        LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["key", "dense"], **lora),
        root,
        "rslora",
    )
    _adapter_and_merged(
        bert(), LoraConfig(r=2, target_modules=["query"], use_dora=True, **lora), root, "dora"
    )

    torch.manual_seed(1)
    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(
            n_embd=16,
            n_layer=1,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=32,
            num_labels=CLASSES,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )  # fmt: skip
    ).double()
    gpt2.save_pretrained(root / "gpt2")
    _adapter_and_merged(
        gpt2,
        LoraConfig(
            r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, **lora
        ),  # fmt: skip
        root,
        "gpt2",
    )

    (root / "conv_net.py").write_text(CONV_NET)
    torch.manual_seed(2)
    from safetensors.torch import save_file

    namespace: dict = {}
    exec(CONV_NET, namespace)
    conv = namespace["build"]().double()
    save_file(
        {k: v.contiguous() for k, v in conv.state_dict().items()}, str(root / "conv.safetensors")
    )
    _adapter_and_merged(
        conv, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "3"], **lora), root, "conv"
    )
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"x": images, "y": torch.arange(10) % CLASSES}, root / "images.pt")
    return root


def _measure_pair(root: Path, name: str, base: str, *extra: object) -> tuple[dict, dict]:
    """Measure adapter ``name`` and its merged model (against ``base``) on the adapter's
    default layers; the adapter's base comes from its config when ``base`` is the directory
    named there."""
    common = ("--estimator", "block", "--dtype", "float64", "--samples", 6, "--quiet", *extra)
    given = [] if base == "bert" and name == "patterns" else ["--reference", root / base]
    _cli("measure", root / "adapters" / name, "--out", root / "m" / name, *given, *common)
    adapter = _measurement(root / "m" / name / "measurement.json")
    layers = [layer["name"] for layer in adapter["layers"]]
    _cli("measure", root / "merged" / name, "--out", root / "mm" / name, "--layers", *layers,
         "--reference", root / base, *common)  # fmt: skip
    return adapter, _measurement(root / "mm" / name / "measurement.json")


def assert_same_measurement(adapter: dict, merged: dict) -> None:
    assert [a["name"] for a in adapter["layers"]] == [b["name"] for b in merged["layers"]]
    for a, b in zip(adapter["layers"], merged["layers"], strict=True):
        assert a["distance"] > 0
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-12, abs=1e-14), a["name"]
        for key in ("max", "mean"):
            assert a["quadratic_form"][key] == pytest.approx(
                b["quadratic_form"][key], rel=1e-9, abs=1e-15
            ), (a["name"], key)
        assert a["quadratic_form"]["argmax"] == b["quadratic_form"]["argmax"]
    assert adapter["loss"]["train"] == pytest.approx(merged["loss"]["train"], rel=1e-12)


@pytest.mark.parametrize(
    ("name", "data", "reference", "expected"),
    [
        (
            "patterns",
            "tokens.pt",
            "bert",  # not passed: the adapter's base_model_name_or_path is the base directory
            [
                "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.self.value.weight",
                "classifier.weight",
            ],  # fmt: skip
        ),
        (
            "rslora",
            "tokens.pt",
            "bert",
            [
                "bert.encoder.layer.0.attention.self.key.weight",
                "bert.encoder.layer.0.attention.output.dense.weight",
                "bert.encoder.layer.0.intermediate.dense.weight",
                "bert.encoder.layer.0.output.dense.weight",
                "bert.pooler.dense.weight",
            ],  # fmt: skip
        ),
        (
            "gpt2",
            "tokens.pt",
            "gpt2",
            [
                "transformer.h.0.attn.c_attn.weight",
                "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_proj.weight",
            ],  # fmt: skip
        ),
        ("conv", "images.pt", "conv.safetensors", ["0.weight", "3.weight"]),
    ],
)
def test_lora_adapter_equals_the_merged_model(adapters, name, data, reference, expected) -> None:
    extra: list[object] = ["--data", adapters / data]
    if name == "conv":
        extra += ["--model", f"{adapters / 'conv_net.py'}:build"]
    adapter, merged = _measure_pair(adapters, name, reference, *extra)
    assert [layer["name"] for layer in adapter["layers"]] == expected
    assert_same_measurement(adapter, merged)


def test_adapter_distances_come_from_the_factors(adapters) -> None:
    adapter, _ = read_adapter(adapters / "adapters" / "patterns", trust=False, label="checkpoint")
    kinds = {f.module.rsplit(".", 1)[-1]: f for f in adapter.factors}
    assert kinds["word_embeddings"].kind == "embedding"
    assert (kinds["query"].scale, kinds["value"].scale) == (5 / 2, 4 / 3)  # alpha/r patterns
    for factor in adapter.factors:
        dense = factor.delta((factor.B.shape[0], factor.A.shape[1]))
        assert factor.norm() == pytest.approx(float(dense.norm()), rel=1e-12)
    rs, _ = read_adapter(adapters / "adapters" / "rslora", trust=False, label="checkpoint")
    assert {f.scale for f in rs.factors} == {3 / 2}  # lora_alpha / sqrt(r)
    # a square weight follows fan_in_fan_out; otherwise the base weight's shape decides
    a, b = torch.arange(3.0).reshape(1, 3), torch.arange(1.0, 3.0).reshape(2, 1)
    for transpose in (False, True):
        f = LoraFactor("m", "linear", a, b, scale=1.0, transpose=transpose)
        assert torch.equal(f.delta((2, 3)), b @ a) and torch.equal(f.delta((3, 2)), (b @ a).T)
    square = LoraFactor("m", "linear", a[:, :2], b, scale=1.0, transpose=True)
    assert torch.equal(square.delta((2, 2)), (b @ a[:, :2]).T)


def test_an_unmerged_adapter_is_not_aligned(adapters) -> None:
    from hessfine.analysis.checkpoints import align, load_checkpoint

    checkpoint = load_checkpoint(adapters / "adapters" / "rslora")
    with pytest.raises(InputError, match="PEFT adapter without its base"):
        align(nn.Linear(2, 2), checkpoint, {}, layers=["weight"])


def test_unsupported_peft_variant_is_one_line(adapters, capsys) -> None:
    args = ["measure", adapters / "adapters" / "dora", "--data", adapters / "tokens.pt",
            "--out", adapters / "m" / "dora"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "DoRA" in err


@pytest.mark.parametrize("kind", ["IA3", "LOHA", "PROMPT_TUNING"])
def test_other_peft_types_are_refused_by_name(adapters, tmp_path, capsys, kind) -> None:
    shutil.copytree(adapters / "adapters" / "rslora", tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["peft_type"] = kind
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    args = ["measure", tmp_path / "adapter", "--reference", adapters / "bert",
            "--data", adapters / "tokens.pt", "--out", tmp_path / "m"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"PEFT type {kind}" in err
    assert not (tmp_path / "m").exists()


def test_trainer_checkpoints_holding_adapters(adapters, tmp_path) -> None:
    """A Trainer that trained a PeftModel writes an adapter into every checkpoint-N/."""
    for step in (2, 4):
        target = tmp_path / "out" / f"checkpoint-{step}"
        shutil.copytree(adapters / "adapters" / "patterns", target)
        state = {"global_step": step, "epoch": step / 4, "log_history": []}
        (target / "trainer_state.json").write_text(json.dumps(state))
    _cli("measure", tmp_path / "out", "--reference", adapters / "bert", "--data",
         adapters / "tokens.pt", "--out", tmp_path / "m", "--estimator", "ggn", "--samples", 2,
         "--quiet")  # fmt: skip
    found = sorted((tmp_path / "m").rglob("measurement.json"))
    assert [(m["step"], m["epoch"]) for m in map(_measurement, found)] == [(2, 0.5), (4, 1.0)]


def test_adapter_comparison_carries_the_layers(adapters) -> None:
    _cli("compare", adapters / "m" / "patterns", adapters / "mm" / "patterns",
         "--out", adapters / "cmp", "--no-figures")  # fmt: skip
    rows = _rows(adapters / "cmp")
    assert len(rows) == 2
    assert rows[0]["hessian_distance_measure"] != ""
    assert float(rows[0]["sum_distance"]) == pytest.approx(float(rows[1]["sum_distance"]))


# --- Lightning -------------------------------------------------------------------------------

MLP = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
"""


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import lightning as L

    root = tmp_path_factory.mktemp("lightning")
    (root / "mlp.py").write_text(MLP)
    namespace: dict = {}
    exec(MLP, namespace)

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.5, hidden: int = 8):
            super().__init__()
            self.save_hyperparameters()
            self.net = namespace["build"]()

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    torch.save({"x": x, "y": y}, root / "train.pt")
    torch.manual_seed(0)
    module = Module()
    torch.save(module.net.state_dict(), root / "pretrained.pt")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1, save_last=True)],
        logger=L.pytorch.loggers.CSVLogger(str(root), name="lightning_logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader)
    return root


def test_lightning_run_is_measured_and_compared(lightning_run: Path) -> None:
    root = lightning_run
    saved = sorted(p.name for p in (root / "lightning_logs").rglob("*.ckpt"))
    assert saved == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    _cli("measure", root / "lightning_logs", "--reference", root / "pretrained.pt",
         "--model", f"{root / 'mlp.py'}:build", "--data", root / "train.pt", "--out", root / "m",
         "--samples", 8, "--quiet")  # fmt: skip
    found = sorted((root / "m").rglob("measurement.json"))
    assert len(found) == 2  # last.ckpt repeats epoch=1-step=4.ckpt
    for path, (epoch, step) in zip(found, [(0, 2), (1, 4)], strict=True):
        m = _measurement(path)
        assert (m["epoch"], m["step"]) == (epoch, step)
        assert m["training"]["hyper_parameters"] == {"lr": 0.5, "hidden": 8}
        assert all(layer["distance"] > 0 for layer in m["layers"])
    _cli("compare", root / "m", "--out", root / "cmp", "--no-figures")
    rows = _rows(root / "cmp")
    assert sorted((r["epoch"], r["step"]) for r in rows) == [("0", "2"), ("1", "4")]
