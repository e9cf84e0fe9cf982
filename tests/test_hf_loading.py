"""Hugging Face model directories loaded through transformers' own loader
(:mod:`hessfine.analysis.hf_loading`).

The oracle is transformers itself: every architecture of a list of popular ones is saved with
``save_pretrained`` (tiny configs, one layer), and the names and tensors hessfine loads must be
those of ``from_pretrained`` in this process; the command line's distances on ViT, GPT-NeoX and
Mixtral must be those between the two directories as ``from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hessfine.analysis.checkpoints import load_checkpoint
from hessfine.analysis.cli import main
from hessfine.analysis.errors import InputError
from hessfine.analysis.fused_experts import fused_experts
from hessfine.analysis.hf_loading import load_pretrained
from hessfine.analysis.sources.hf import model_directory
from hessfine.bounds.functional import split_parameters

TEXT = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "vocab_size": 40,
    "max_position_embeddings": 32,
    "num_labels": 3,
}
IMAGE = {**{k: TEXT[k] for k in list(TEXT)[:4]}, "image_size": 8, "patch_size": 4, "num_labels": 3}
DECODER = {**TEXT, "num_key_value_heads": 1}
MOE = {"num_experts_per_tok": 2}


def _architecture(name: str):
    """The transformers class and tiny config of architecture ``name``."""
    import transformers as tf

    table = {
        "vit": (tf.ViTForImageClassification, lambda: tf.ViTConfig(**IMAGE)),
        "deit": (tf.DeiTForImageClassification, lambda: tf.DeiTConfig(**IMAGE)),
        "swin": (
            tf.SwinForImageClassification,
            lambda: tf.SwinConfig(
                image_size=8, patch_size=2, embed_dim=8, depths=[1], num_heads=[2], window_size=2
            ),
        ),
        "dinov2": (tf.Dinov2ForImageClassification, lambda: tf.Dinov2Config(**IMAGE)),
        "beit": (tf.BeitForImageClassification, lambda: tf.BeitConfig(**IMAGE)),
        "vit-mae": (tf.ViTMAEModel, lambda: tf.ViTMAEConfig(**IMAGE)),
        "bert": (tf.BertForSequenceClassification, lambda: tf.BertConfig(**TEXT)),
        "roberta": (tf.RobertaForSequenceClassification, lambda: tf.RobertaConfig(**TEXT)),
        "deberta-v2": (tf.DebertaV2ForSequenceClassification, lambda: tf.DebertaV2Config(**TEXT)),
        "gpt2": (
            tf.GPT2LMHeadModel,
            lambda: tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=32),
        ),
        "gpt-neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(**TEXT)),
        "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**DECODER)),
        "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**DECODER)),
        "mixtral": (
            tf.MixtralForCausalLM,
            lambda: tf.MixtralConfig(**DECODER, **MOE, num_local_experts=3),
        ),
        "qwen2-moe": (
            tf.Qwen2MoeForCausalLM,
            lambda: tf.Qwen2MoeConfig(
                **DECODER,
                **MOE,
                num_experts=3,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=8,
            ),  # fmt: skip
        ),
        "t5": (
            tf.T5ForSequenceClassification,
            lambda: tf.T5Config(
                d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=40, num_labels=3
            ),
        ),
    }
    model_class, config = table[name]
    return model_class, config()


ARCHITECTURES = [
    "vit", "deit", "swin", "dinov2", "beit", "vit-mae", "bert", "roberta", "deberta-v2", "gpt2",
    "gpt-neox", "llama", "qwen2", "mixtral", "qwen2-moe", "t5",
]  # fmt: skip


def _save_pair(root: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """``root/base`` and ``root/tuned`` (every tensor moved by 0.01·N(0, 1)) of ``name``."""
    model_class, config = _architecture(name)
    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(root / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def _theirs(directory: Path) -> dict[str, torch.Tensor]:
    """The parameters of ``directory`` as ``from_pretrained`` loads them (fused experts split)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(directory, dtype=torch.float32)
    return split_parameters(model, fused_experts(model))


def _load(tuned: Path, reference: Path | str, **options) -> object:
    checkpoint = load_checkpoint(tuned, tensors=False)
    options.setdefault("model_kwargs", {})
    return load_pretrained(checkpoint, str(reference), spec="hf", dtype=torch.float32, **options)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_names_and_tensors_are_those_of_from_pretrained(tmp_path: Path, name: str) -> None:
    base, tuned = _save_pair(tmp_path, name)
    loaded = _load(tuned, base)
    ours = split_parameters(loaded.module, loaded.fused)
    theirs, start = _theirs(tuned), _theirs(base)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    assert loaded.layers and set(loaded.layers) <= set(theirs)
    for row in loaded.alignment.rows:
        assert row.source == "reference"
        direction = theirs[row.name] - start[row.name]
        assert torch.equal(loaded.alignment.directions[row.name], direction), row.name
    assert any(".experts.gate_proj." in n for n in loaded.layers) == (
        "mix" in name or "moe" in name
    )


def _token_data(path: Path, vocab: int = 40) -> Path:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (6, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    torch.save({"x": {"input_ids": ids * mask, "attention_mask": mask}}, path)
    return path


def _image_data(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.rand(6, 3, 8, 8, generator=g), "y": torch.arange(6) % 3}, path)
    return path


@pytest.mark.parametrize("name", ["vit", "gpt-neox", "mixtral"])
def test_measure_command_line_distances_are_transformers(tmp_path: Path, name: str) -> None:
    """The ViT case exits 2 before hessfine loads through from_pretrained: the checkpoint's
    legacy names are not the model's."""
    base, tuned = _save_pair(tmp_path, name)
    lm = name != "vit"
    data = _token_data(tmp_path / "x.pt") if lm else _image_data(tmp_path / "x.pt")
    task = ["--task", "causal-lm"] if lm else []
    args = ["measure", tuned, "--reference", base, "--model", "hf", "--data", data, *task,
            "--out", tmp_path / "m", "--estimator", "block", "--samples", 2, "--quiet"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    result = json.loads((tmp_path / "m" / "measurement.json").read_text())
    theirs, start = _theirs(tuned), _theirs(base)
    names = [layer["name"] for layer in result["layers"]]
    expected = {
        "vit": "vit.layers.0.attention.q_proj.weight",
        "gpt-neox": "lm_head.weight",  # embed_out.weight on disk
        "mixtral": "model.layers.0.mlp.experts.down_proj.2",
    }
    assert expected[name] in names
    for layer in result["layers"]:
        distance = float(torch.linalg.vector_norm(theirs[layer["name"]] - start[layer["name"]]))
        assert layer["distance"] == pytest.approx(distance, rel=1e-5), layer["name"]
        assert layer["quadratic_form"]["max"] == layer["quadratic_form"]["max"]  # not NaN
    assert any("in memory" in note for note in result["notes"])
    experts = result["settings"].get("experts_implementation")
    assert experts == ("batched_mm" if name == "mixtral" else None)


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _save_pair(tmp_path_factory.mktemp("vit"), "vit")


def test_reference_heads_files_and_base_models(vit_pair, tmp_path: Path) -> None:
    """Another number of labels, a base model without the head, and a weights file under the
    checkpoint's names: the head is new, every other layer comes from the reference."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    base, tuned = vit_pair
    torch.manual_seed(5)
    ViTForImageClassification(ViTConfig(**{**IMAGE, "num_labels": 5})).save_pretrained(
        tmp_path / "five"
    )
    ViTModel(ViTConfig(**IMAGE)).save_pretrained(tmp_path / "bare")
    shutil.copy(base / "model.safetensors", tmp_path / "legacy.safetensors")
    for reference in ("five", "bare"):
        loaded = _load(tuned, tmp_path / reference)
        sources = {row.name: row.source for row in loaded.alignment.rows}
        assert sources.pop("classifier.weight") == "head-zero"
        assert set(sources.values()) == {"reference"}
    head = {"classifier.weight": torch.full((3, 16), 0.5)}
    save_file(head, str(tmp_path / "head.safetensors"))
    loaded = _load(tuned, tmp_path / "five", head_reference=head)
    assert loaded.alignment.rows[-1].source == "head-file"
    from_file, from_directory = _load(tuned, tmp_path / "legacy.safetensors"), _load(tuned, base)
    assert model_directory(tmp_path / "legacy.safetensors") is None
    for row, same in zip(from_file.alignment.rows, from_directory.alignment.rows, strict=True):
        assert (row.name, row.source, row.distance) == (same.name, same.source, same.distance)


def test_a_checkpoint_that_does_not_fit_is_one_line(vit_pair) -> None:
    base, tuned = vit_pair
    with pytest.raises(
        InputError, match=r"lacks 16 of the model's parameters \(first: 'vit.layers.1"
    ):
        _load(tuned, base, model_kwargs={"num_hidden_layers": 2})
    with pytest.raises(
        InputError, match=r"'classifier.bias' has shape \(3,\) but the model's is \(5,\)"
    ):
        _load(tuned, base, model_kwargs={"num_labels": 5})


def test_model_directories(vit_pair, tmp_path: Path) -> None:
    base, _ = vit_pair
    assert model_directory(base) == model_directory(base / "model.safetensors") == base
    shutil.copytree(base, tmp_path / "run")
    (tmp_path / "run" / "hessfine.json").write_text(json.dumps({"checkpoint": "model.safetensors"}))
    assert model_directory(tmp_path / "run") is None
    (tmp_path / "run" / "config.json").unlink()
    assert model_directory(tmp_path) is None


@pytest.fixture(scope="module")
def legacy_adapter(vit_lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA adapter of ``vit_lora`` (conftest.py) under transformers 4's module names
    (``query``/``value``)."""
    from safetensors.torch import load_file, save_file

    legacy = tmp_path_factory.mktemp("vit_lora_legacy") / "legacy"
    shutil.copytree(vit_lora / "adapter", legacy)
    tensors = load_file(legacy / "adapter_model.safetensors")
    names = {"layers.0.attention.q_proj": "encoder.layer.0.attention.attention.query",
             "layers.0.attention.v_proj": "encoder.layer.0.attention.attention.value"}  # fmt: skip
    renamed = {}
    for key, tensor in tensors.items():
        for new, old in names.items():
            key = key.replace(new, old)
        renamed[key] = tensor
    save_file(renamed, str(legacy / "adapter_model.safetensors"))
    return legacy


def test_lora_adapter_applies_by_module_names_in_memory(vit_lora) -> None:
    base = vit_lora / "base"
    checkpoint = load_checkpoint(vit_lora / "adapter")
    adapter = load_pretrained(
        checkpoint, str(base), spec="hf", model_kwargs={}, dtype=torch.float64
    )
    assert adapter.layers == [
        "vit.layers.0.attention.q_proj.weight",
        "vit.layers.0.attention.v_proj.weight",
    ]
    merged = _load(vit_lora / "merged", base, layers=adapter.layers)
    for ours, theirs in zip(adapter.alignment.rows, merged.alignment.rows, strict=True):
        assert ours.distance == pytest.approx(theirs.distance, rel=1e-6)
    ours = split_parameters(adapter.module)
    for key, tensor in _theirs(vit_lora / "merged").items():
        torch.testing.assert_close(ours[key].float(), tensor)


def test_adapters_under_legacy_names_are_refused(
    vit_pair, vit_lora, legacy_adapter, tmp_path, capsys
) -> None:
    args = ["measure", legacy_adapter, "--reference", vit_lora / "base",
            "--data", _image_data(tmp_path / "x.pt"), "--out", tmp_path / "m"]  # fmt: skip
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "transformers 4" in err and "merge_and_unload" in err
    assert "'vit.encoder.layer.0.attention.attention.query.weight'" in err
    with pytest.raises(InputError, match="is a PEFT adapter, not a model"):
        _load(vit_pair[1], vit_lora / "adapter")
