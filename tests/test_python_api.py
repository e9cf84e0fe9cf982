"""``hessfine.measure_model``: modules and data in memory give the numbers files give.

The same tiny float64 BERT is measured three ways — in memory with a DataLoader of dict batches,
through the command line on the same models saved to disk, and as a PeftModel object against
its saved adapter directory — and every per-layer value agrees to 1e-9. The model comes back as
it was (modes, flags, dtype, weights); every data form gives the same examples; settings are
checked by name; the result is a frozen object whose JSON is the file's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.measure import MeasureSettings, measure
from hessfine.analysis.measurement import MeasuredLayer, Measurement
from hessfine.analysis.python_api import measure_model
from hessfine.bounds.generalization import Bounds
from safetensors.torch import save_file
from torch import nn

from tests.test_training_tools import VOCAB, assert_same_measurement, bert_config, tokens

N = 12
FLOAT64 = {"dtype": "float64", "estimator": "block", "samples": "all"}


def _bert():
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config()).double()


def _cli(*args: object) -> dict:
    out = Path(str(args[args.index("--out") + 1]))
    assert main([str(a) for a in args] + ["--quiet"]) == 0
    return json.loads((out / "measurement.json").read_text())


def _assert_same_layers(memory: dict, files: dict) -> None:
    """The same per-layer values (1e-9) and worst examples, in memory and from files."""
    assert_same_measurement(memory, files)
    for a, b in zip(memory["layers"], files["layers"], strict=True):
        assert a["quadratic_form"]["argmax_index"] == b["quadratic_form"]["argmax_index"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base BERT, a fine-tuned copy and a LoRA adapter on the base, saved; the token data."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    base = _bert()
    base.save_pretrained(root / "base")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(root / "tuned")
    x, y = tokens(N)
    torch.save({"x": x, "y": y}, root / "train.pt")
    lora = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    adapted = get_peft_model(_bert_from(root / "base"), lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1 * torch.randn_like(p))
    adapted.save_pretrained(root / "adapter")
    torch.save(adapted, root / "peft_model.pt")
    return root


def _bert_from(directory: Path):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(directory), dtype=torch.float64)


def test_in_memory_cli_and_peft_object_give_the_same_layers(saved: Path) -> None:
    """The three ways of issue 17: a DataLoader of dict batches against the command line on the
    saved models, and a PeftModel object against its adapter directory."""
    x, y = tokens(N)
    items = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i],
              "labels": y[i]} for i in range(N)]  # fmt: skip
    loader = torch.utils.data.DataLoader(items, batch_size=5)
    base, tuned = _bert_from(saved / "base"), _bert_from(saved / "tuned")
    memory = measure_model(tuned, reference=base, data=loader, **FLOAT64).to_json()
    files = _cli("measure", saved / "tuned", "--reference", saved / "base", "--data",
                 saved / "train.pt", "--out", saved / "m_tuned", "--dtype", "float64",
                 "--estimator", "block", "--samples", "all")  # fmt: skip
    _assert_same_layers(memory, files)
    assert memory["data"]["hessian_sample"]["order"] == "iteration"
    assert memory["checkpoint"] == memory["reference"] == memory["data"]["train"] == "<in-memory>"
    assert memory["model"].endswith("BertForSequenceClassification")
    assert any("iteration order" in note for note in memory["notes"])

    peft_model = torch.load(saved / "peft_model.pt", weights_only=False)
    adapter = measure_model(peft_model, data=(x, y), **FLOAT64).to_json()
    directory = _cli("measure", saved / "adapter", "--reference", saved / "base", "--data",
                     saved / "train.pt", "--out", saved / "m_adapter", "--dtype", "float64",
                     "--estimator", "block", "--samples", "all")  # fmt: skip
    _assert_same_layers(adapter, directory)
    assert [layer["name"] for layer in adapter["layers"]] == [
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.0.attention.self.value.weight",
        "classifier.weight",
    ]
    assert adapter["provenance"]["checkpoint_sha256"] != memory["provenance"]["checkpoint_sha256"]


def test_the_model_is_left_as_it_was(saved: Path) -> None:
    torch.manual_seed(1)
    model = _bert_from(saved / "tuned").float().train()
    model.bert.embeddings.eval()
    model.bert.pooler.dense.weight.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = tokens(N)
    first = measure_model(model, reference=saved / "base", data=(x, y), dtype="float64")
    assert modes == {name: m.training for name, m in model.named_modules()}
    assert flags == {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(
        v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point()
    )
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    again = measure_model(model, reference=saved / "base", data=(x, y), dtype="float64")
    assert first.to_json()["layers"] == again.to_json()["layers"]
    # the reference as a path (a model directory), a module and a state dict with a prefix
    base = _bert_from(saved / "base")
    prefixed = {f"module.{k}": v for k, v in base.state_dict().items()}
    for reference in (base, prefixed):
        other = measure_model(model, reference=reference, data=(x, y), dtype="float64")
        assert [a.distance for a in other.layers] == pytest.approx(
            [a.distance for a in first.layers]
        )


MLP = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module, nn.Module]:
    root = tmp_path_factory.mktemp("mlp")
    (root / "mlp.py").write_text(MLP)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(MLP, namespace)
    pretrained, tuned = namespace["build"]().double(), namespace["build"]().double()
    for name, module in (("pre", pretrained), ("ft", tuned)):
        save_file(
            {k: v.contiguous() for k, v in module.state_dict().items()},
            root / f"{name}.safetensors",
        )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g).double()  # float32 values: datasets store float32
    y = torch.tensor([0] * 12 + [1] * 6 + [2] * 2)
    torch.save({"x": x, "y": y}, root / "train.pt")
    return root, pretrained, tuned


def test_every_data_form_gives_the_files_examples(mlp) -> None:
    """(x, y), a TensorDataset, a list of examples, a datasets.Dataset and a path draw the same
    seeded stratified sample as the command line; a DataLoader takes its first N in order."""
    from datasets import Dataset

    root, pretrained, tuned = mlp
    x, y = torch.load(root / "train.pt").values()
    options = {"estimator": "block", "samples": 8, "dtype": "float64"}
    files = measure(root / "ft.safetensors", reference=str(root / "pre.safetensors"),
                    data=str(root / "train.pt"), model=f"{root / 'mlp.py'}:build", out=root / "m",
                    settings=MeasureSettings(**options))  # fmt: skip
    forms = {
        "pair": (x, y),
        "dataset": torch.utils.data.TensorDataset(x, y),
        "list": [{"x": x[i], "labels": y[i]} for i in range(len(y))],
        "datasets": Dataset.from_dict({"x": x.tolist(), "label": y.tolist()}),
        "path": root / "train.pt",
    }
    sample = files["data"]["hessian_sample"]
    for name, data in forms.items():
        got = measure_model(tuned, reference=pretrained, data=data, **options).to_json()
        assert got["data"]["hessian_sample"] == sample, name
        _assert_same_layers(got, files)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    first = measure_model(tuned, reference=pretrained, data=loader, **options).to_json()
    assert first["data"]["hessian_sample"]["order"] == "iteration"
    assert first["data"]["hessian_sample"]["indices"] == list(range(8))
    state = torch.random.get_rng_state()  # a shuffling loader leaves the global RNG as it was
    shuffled = torch.utils.data.DataLoader(loader.dataset, batch_size=3, shuffle=True)
    measure_model(tuned, reference=pretrained, data=shuffled, **options)
    assert torch.equal(state, torch.random.get_rng_state())


def test_settings_are_checked_by_name(mlp) -> None:
    _, pretrained, tuned = mlp
    data = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    with pytest.raises(TypeError, match="unknown setting 'sample'.*samples"):
        measure_model(tuned, reference=pretrained, data=data, sample=4)
    with pytest.raises(
        ValueError,
        match="^estimator must be one of auto, block, positive, ggn, reference-code, got .exact.$",
    ):
        measure_model(tuned, reference=pretrained, data=data, estimator="exact")
    with pytest.raises(TypeError, match="trace: expected bool"):
        measure_model(tuned, reference=pretrained, data=data, trace="yes")
    with pytest.raises(ValueError, match="^samples must be a positive integer or 'all', got 0$"):
        measure_model(tuned, reference=pretrained, data=data, samples=0)
    with pytest.raises(ValueError, match="reference is required"):
        measure_model(tuned, data=data)
    with pytest.raises(ValueError, match="^data <in-memory>: labels range over 0..5"):
        measure_model(tuned, reference=pretrained, data=(data[0], torch.arange(6)))
    with pytest.raises(ValueError, match="^max_memory 'banana' is not a memory size"):
        measure_model(tuned, reference=pretrained, data=data, max_memory="banana")
    with pytest.raises(ValueError, match="^max_memory 1KiB .* take once loaded; raise max_memory$"):
        measure_model(tuned, reference=pretrained, data=data, max_memory="1KiB")
    settings = measure_model(tuned, reference=pretrained, data=data, max_memory="6GiB").to_json()[
        "settings"
    ]
    assert settings["max_memory"] == "6GiB" and settings["max_memory_bytes"] == 6 * 2**30
    result = measure_model(tuned, reference=pretrained, data=data, noise_sigma=1e-3,
                           noise_draws=2, layers="2.*", samples="all")  # fmt: skip
    assert result.to_json()["settings"]["noise_sigma"] == [1e-3]
    assert [layer.name for layer in result.layers] == ["2.weight", "2.bias"]


def test_the_result_is_the_files_document(mlp, tmp_path) -> None:
    _, pretrained, tuned = mlp
    data = (torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 3)
    result = measure_model(tuned, reference=pretrained, data=data, eval_data=data, trace=True,
                           trace_probes=4, density=True)  # fmt: skip
    path = result.save(tmp_path / "out")
    assert json.loads(path.read_text()) == result.to_json()
    assert (
        json.loads((tmp_path / "out" / "spectrum.json").read_text())["checkpoint"] == "<in-memory>"
    )
    assert isinstance(result.layers[0], MeasuredLayer) and isinstance(result.bounds, Bounds)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.bounds = None  # type: ignore[misc]
    document = result.to_json()
    document["bounds"]["theorem_2_1"] = 0.0
    assert result.to_json()["bounds"]["theorem_2_1"] == result.bounds.theorem_2_1 > 0
    assert result.generalization_gap == pytest.approx(0.0, abs=1e-12)
    assert result.layers[0].trace_mean == document["layers"][0]["trace"]["mean"]
    scalars = result.scalars()
    assert scalars["theorem_2_1"] == result.bounds.theorem_2_1
    assert scalars["sum_distance"] == pytest.approx(sum(layer.distance for layer in result.layers))
    frame = result.to_frame()
    assert list(frame.index) == ["0.weight", "2.weight"]
    assert frame.loc["2.weight", "quadratic_form_max"] == result.layers[1].quadratic_form
    assert Measurement.from_record(document).bounds.theorem_2_1 == 0.0


def test_to_frame_says_pandas_is_missing(mlp) -> None:
    script = (
        "import sys, torch\n"
        "sys.modules['pandas'] = None\n"
        "from hessfine.analysis.python_api import measure_model\n"
        "net = torch.nn.Sequential(torch.nn.Linear(2, 2))\n"
        "result = measure_model(net, reference=net.state_dict(), data=(torch.randn(4, 2), "
        "torch.tensor([0, 1, 0, 1])))\n"
        "try:\n"
        "    result.to_frame()\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "Measurement.to_frame needs pandas; pip install 'hessfine[pandas]'"


def test_causal_lm_batches_with_ignored_labels(tmp_path) -> None:
    """A DataLoader of dict batches with −100 labels equals the command line on a .pt file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=16)
    base = GPT2LMHeadModel(config).double()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[0].mlp.c_fc.weight.add_(0.05)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    ids = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    torch.save({"x": {"input_ids": ids}, "y": labels}, tmp_path / "lm.pt")
    batches = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in (0, 2, 4)]
    memory = measure_model(tuned, reference=base, data=iter(batches), task="causal-lm",
                           layers="*.mlp.c_fc.weight", **FLOAT64).to_json()  # fmt: skip
    files = _cli("measure", tmp_path / "tuned", "--reference", tmp_path / "base", "--task",
                 "causal-lm", "--data", tmp_path / "lm.pt", "--out", tmp_path / "m", "--layers",
                 "*.mlp.c_fc.weight", "--dtype", "float64", "--estimator", "block",
                 "--samples", "all")  # fmt: skip
    _assert_same_layers(memory, files)
