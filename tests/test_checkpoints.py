"""Tests for hessfine.analysis.checkpoints: formats, directories, layer selection and alignment."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from hessfine.analysis.checkpoints import (
    align,
    find_checkpoints,
    is_run_collection,
    load_checkpoint,
    load_head_reference,
    read_manifest,
    select_layers,
)
from hessfine.analysis.errors import InputError
from hessfine.analysis.model_specs import build_model
from torch import nn


def _assert_one_line(err: pytest.ExceptionInfo[InputError], *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def _assert_same_state(loaded: dict, expected: dict) -> None:
    expected = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)
    ).eval()


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".safetensors"])
def test_every_file_format(resnet, tmp_path, suffix: str) -> None:
    path = _save(resnet.state_dict(), tmp_path / f"weights{suffix}")
    ckpt = load_checkpoint(path)
    _assert_same_state(ckpt.state, resnet.state_dict())
    assert ckpt.path == path
    assert ckpt.sha256 == _sha256(path)
    assert ckpt.manifest == {}
    assert ckpt.directory is None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_round_trip_through_align(tmp_path, suffix: str) -> None:
    torch.manual_seed(2)
    source = timm.create_model("resnet10t", num_classes=10).eval()
    path = _save(source.state_dict(), tmp_path / f"timm{suffix}")
    model = build_model("timm:resnet10t", {"num_classes": 10})
    alignment = align(
        model, load_checkpoint(path), source.state_dict(), layers=select_layers(model)
    )
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert all(r.distance == 0.0 and r.source == "reference" for r in alignment.rows)


def test_nested_and_prefixed_state_dicts(small, tmp_path) -> None:
    sd = small.state_dict()
    layouts = {
        "a.pt": {"state_dict": sd},
        "b.pth": {"model": sd, "epoch": 3},
        "c.pt": {"model_state_dict": sd, "optimizer_state_dict": {"lr": 0.1}, "epoch": 2},
        "d.pt": {f"module.{k}": v for k, v in sd.items()},
        "e.ckpt": {
            "epoch": 4,
            "global_step": 100,
            "pytorch-lightning_version": "2.4.0",
            "hyper_parameters": {"lr": 0.01, "name": "run"},
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}],
        },
        "f.pt": {"model": {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}}},
        "g.pt": {"note": "extra", "steps": 7, **sd},
        "h.pt": {"weights": sd, "epoch": 1},
    }
    for name, content in layouts.items():
        _assert_same_state(load_checkpoint(_save(content, tmp_path / name)).state, sd)


def test_partial_prefix_is_kept(tmp_path) -> None:
    state = {"model.weight": torch.ones(2, 2), "head.weight": torch.zeros(2, 2)}
    assert load_checkpoint(_save(state, tmp_path / "p.pt")).state.keys() == state.keys()


def test_pickled_module_needs_trust(small, tmp_path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(small, path)
    with pytest.raises(InputError) as err:
        load_checkpoint(path)
    _assert_one_line(err, str(path), "--trust-checkpoint", "Sequential")
    _assert_same_state(load_checkpoint(path, trust=True).state, small.state_dict())
    nested = tmp_path / "nested.pt"
    torch.save({"model": small, "args": argparse.Namespace(lr=0.1)}, nested)
    with pytest.raises(InputError) as err:
        load_checkpoint(nested)
    _assert_one_line(err, "--trust-checkpoint")
    _assert_same_state(load_checkpoint(nested, trust=True).state, small.state_dict())


def test_corrupt_files(small, tmp_path) -> None:
    good = _save({"w": torch.randn(64, 64)}, tmp_path / "good.safetensors").read_bytes()
    cases = {
        "truncated.safetensors": good[: len(good) // 2],
        "tiny.safetensors": b"xy",
        "garbage.pt": b"not a checkpoint" * 20,
        "empty.pth": b"",
    }
    torch.save(small.state_dict(), tmp_path / "full.pt")
    full = (tmp_path / "full.pt").read_bytes()
    cases["truncated.pt"] = full[: len(full) // 3]
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError) as err:
            load_checkpoint(path)
        _assert_one_line(err, str(path), "corrupt")


def test_unusable_contents(tmp_path) -> None:
    with pytest.raises(InputError) as err:
        load_checkpoint(_save([torch.zeros(2)], tmp_path / "list.pt"))
    _assert_one_line(err, "list", "state dict")
    with pytest.raises(InputError) as err:
        load_checkpoint(_save({"epoch": 3, "lr": 0.1}, tmp_path / "scalars.pt"))
    _assert_one_line(err, "no tensors", "epoch")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(InputError) as err:
        load_checkpoint(tmp_path / "weights.txt")
    _assert_one_line(err, "unsupported file type")
    with pytest.raises(InputError) as err:
        load_checkpoint(tmp_path / "absent.pt", label="--reference")
    _assert_one_line(err, "--reference", "absent.pt", "no such file")


# --- Hugging Face layouts --------------------------------------------------------------------


def test_hf_single_file(tiny_bert) -> None:
    model, single, _ = tiny_bert
    ckpt = load_checkpoint(single)
    assert ckpt.path == single / "model.safetensors"
    assert ckpt.directory == single
    assert ckpt.sha256 == _sha256(single / "model.safetensors")
    _assert_same_state(ckpt.state, model.state_dict())
    built = build_model(f"hf:{ckpt.directory}")
    align(built, ckpt, model.state_dict(), layers=select_layers(built))
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        assert torch.allclose(built(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    file_ckpt = load_checkpoint(single / "model.safetensors")
    assert file_ckpt.directory == single


def test_hf_sharded(tiny_bert, tmp_path) -> None:
    model, _, sharded = tiny_bert
    index = sharded / "model.safetensors.index.json"
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    ckpt = load_checkpoint(sharded)
    assert ckpt.path == index
    assert ckpt.sha256 == _sha256(*shards)
    _assert_same_state(ckpt.state, model.state_dict())
    assert find_checkpoints(sharded) == [sharded]
    assert not is_run_collection(sharded)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / index.name).write_bytes(index.read_bytes())
    (broken / shards[0].name).write_bytes(shards[0].read_bytes())
    with pytest.raises(InputError) as err:
        load_checkpoint(broken)
    _assert_one_line(err, shards[1].name, "missing")


def test_pytorch_model_bin_layout(tiny_bert, tmp_path) -> None:
    model, _, _ = tiny_bert
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save({"step": torch.tensor(1)}, tmp_path / "optimizer.pt")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == tmp_path / "pytorch_model.bin"
    _assert_same_state(ckpt.state, model.state_dict())


def test_reference_without_base_prefix(tiny_bert) -> None:
    model, single, _ = tiny_bert
    base_state = model.bert.state_dict()
    built = build_model(f"hf:{single}")
    alignment = align(built, load_checkpoint(single), base_state, layers=select_layers(built))
    sources = {r.name: r.source for r in alignment.rows}
    assert sources["classifier.weight"] == "head-zero"
    assert {s for n, s in sources.items() if n != "classifier.weight"} == {"reference"}
    assert all(r.distance == 0.0 for r in alignment.rows if r.source == "reference")


# --- directories -----------------------------------------------------------------------------


def test_directory_resolution(tmp_path) -> None:
    state = {"w": torch.ones(3, 3)}
    single = tmp_path / "single"
    single.mkdir()
    _save(state, single / "final.safetensors")
    assert load_checkpoint(single).path == single / "final.safetensors"
    assert not is_run_collection(single)

    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 10):
        _save({"w": torch.full((3, 3), float(epoch))}, run / f"epoch_{epoch}.safetensors")
    with pytest.raises(InputError) as err:
        load_checkpoint(run)
    _assert_one_line(err, "directory of runs", "3 checkpoints", "hessfine.json")
    assert is_run_collection(run)

    manifest = {"checkpoint": "epoch_2.safetensors", "model": "torchvision:resnet18", "seed": 0}
    (run / "hessfine.json").write_text(json.dumps(manifest))
    ckpt = load_checkpoint(run)
    assert ckpt.path == run / "epoch_2.safetensors"
    assert torch.equal(ckpt.state["w"], torch.full((3, 3), 2.0))
    assert ckpt.manifest == manifest and ckpt.directory == run
    assert not is_run_collection(run)
    in_run = load_checkpoint(run / "epoch_10.safetensors")
    assert in_run.manifest == manifest and in_run.directory == run

    (run / "hessfine.json").write_text(json.dumps({"checkpoint": "epoch_3.safetensors"}))
    with pytest.raises(InputError) as err:
        load_checkpoint(run)
    _assert_one_line(err, "epoch_3.safetensors", "hessfine.json")
    (run / "hessfine.json").write_text("{broken")
    with pytest.raises(InputError) as err:
        read_manifest(run)
    _assert_one_line(err, "hessfine.json", "JSON")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as err:
        load_checkpoint(empty)
    _assert_one_line(err, "no checkpoint")
    assert not is_run_collection(empty)

    nested = tmp_path / "nested"
    (nested / "seed0").mkdir(parents=True)
    _save(state, nested / "seed0" / "last.pt")
    with pytest.raises(InputError) as err:
        load_checkpoint(nested)
    _assert_one_line(err, "directory of runs", "seed0/last.pt")
    assert is_run_collection(nested)
    assert not is_run_collection(nested / "seed0" / "last.pt")


def test_find_checkpoints_order_and_skips(tiny_bert, tmp_path) -> None:
    _, _, sharded = tiny_bert
    state = {"w": torch.zeros(2, 2)}
    (tmp_path / "run_a").mkdir()
    for epoch in (10, 2, 1):
        _save(state, tmp_path / "run_a" / f"epoch_{epoch}.safetensors")
    (tmp_path / "run_b").mkdir()
    _save(state, tmp_path / "run_b" / "best.pt")
    _save(state, tmp_path / "run_b" / "optimizer.pt")
    _save(state, tmp_path / "run_b" / "rng_state_0.pth")
    (tmp_path / ".cache").mkdir()
    _save(state, tmp_path / ".cache" / "tmp.pt")
    (tmp_path / "run_b" / "metrics.csv").write_text("epoch\n1\n")
    hf = tmp_path / "run_c"
    hf.mkdir()
    for file in sharded.iterdir():
        (hf / file.name).write_bytes(file.read_bytes())
    expected = [
        tmp_path / "run_a" / "epoch_1.safetensors",
        tmp_path / "run_a" / "epoch_2.safetensors",
        tmp_path / "run_a" / "epoch_10.safetensors",
        tmp_path / "run_b" / "best.pt",
        hf,
    ]
    assert find_checkpoints(tmp_path) == expected
    assert is_run_collection(tmp_path)
    assert [load_checkpoint(p).path.name for p in expected[-2:]] == [
        "best.pt",
        "model.safetensors.index.json",
    ]
    with pytest.raises(InputError):
        find_checkpoints(tmp_path / "run_b" / "best.pt")


# --- layer selection -------------------------------------------------------------------------


def test_select_layers_resnet18(resnet) -> None:
    layers = select_layers(resnet)
    convs = [n for n, p in resnet.named_parameters() if p.ndim == 4]
    assert layers == [*convs, "fc.weight"]
    assert len(layers) == 21 and len(convs) == 20
    assert sum("downsample" in n for n in layers) == 3
    assert not any("bn" in n or n.endswith("bias") for n in layers)


def test_select_layers_attention_and_embeddings() -> None:
    mha = nn.MultiheadAttention(8, 2)
    assert select_layers(mha) == ["in_proj_weight", "out_proj.weight"]
    cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert select_layers(cross) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.conv = nn.Conv1d(8, 8, 3)
            self.vol = nn.Conv3d(1, 2, 1)
            self.head = nn.Linear(8, 4)
            self.decoder = nn.Linear(8, 20, bias=False)
            self.decoder.weight = self.embed.weight

    names = select_layers(Text())
    assert names == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "conv.weight",
        "vol.weight",
        "head.weight",
    ]


def test_select_layers_transformers(tiny_bert) -> None:
    from transformers.pytorch_utils import Conv1D

    model, _, _ = tiny_bert
    names = select_layers(model)
    assert len(names) == 8
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)
    assert names[-1] == "classifier.weight"
    gpt_style = nn.Sequential(Conv1D(6, 4), nn.GELU(), Conv1D(2, 6))
    assert select_layers(gpt_style) == ["0.weight", "2.weight"]


def test_select_layers_globs(resnet) -> None:
    names = select_layers(resnet, ["fc.*", "layer1.*.conv1.weight"])
    assert names == ["layer1.0.conv1.weight", "layer1.1.conv1.weight", "fc.weight", "fc.bias"]
    with pytest.raises(InputError) as err:
        select_layers(resnet, ["fc.*", "head.*"])
    _assert_one_line(err, "--layers", "'head.*'", "conv1.weight")
    with pytest.raises(InputError) as err:
        select_layers(nn.Sequential(nn.LayerNorm(4)))
    _assert_one_line(err, "--layers")


# --- alignment -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transfer():
    """A 1000-class "pretrained" resnet18 and a 10-class fine-tuned one near it."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    pretrained = torchvision.models.resnet18(num_classes=1000).eval()
    finetuned = torchvision.models.resnet18(num_classes=10).eval()
    ref_state = pretrained.state_dict()
    ft_state = {}
    for key, value in finetuned.state_dict().items():
        if key.startswith("fc."):
            ft_state[key] = value.clone()
        elif value.is_floating_point():
            ft_state[key] = ref_state[key] + 0.01 * torch.randn(value.shape, generator=generator)
        else:
            ft_state[key] = ref_state[key].clone()
    return ref_state, ft_state


def test_align_new_head_zero(transfer) -> None:
    ref_state, ft_state = transfer
    model = torchvision.models.resnet18(num_classes=10)
    layers = select_layers(model)
    alignment = align(model, ft_state, ref_state, layers=layers)
    assert alignment.layers == layers == [r.name for r in alignment.rows]
    for row in alignment.rows:
        start = torch.zeros(10, 512) if row.name == "fc.weight" else ref_state[row.name]
        expected = ft_state[row.name] - start
        assert torch.equal(alignment.directions[row.name], expected)
        assert torch.equal(alignment.reference[row.name], start)
        assert row.source == ("head-zero" if row.name == "fc.weight" else "reference")
        assert row.shape == tuple(ft_state[row.name].shape)
        assert row.numel == ft_state[row.name].numel()
        assert row.distance == pytest.approx(float(expected.double().norm()), rel=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ft_state[key].to(value.dtype)), key
    assert torch.equal(alignment.buffers["bn1.running_var"], ft_state["bn1.running_var"])
    assert alignment.params.keys() == dict(model.named_parameters()).keys()
    table = alignment.format_table()
    assert "fc.weight" in table and "10x512" in table and "head-zero" in table
    assert "21 layers (1 heads)" in table
    rows = json.loads(json.dumps(alignment.to_json()))
    assert rows[-1] == {
        "name": "fc.weight",
        "shape": [10, 512],
        "numel": 5120,
        "source": "head-zero",
        "distance": pytest.approx(float(ft_state["fc.weight"].double().norm()), rel=1e-6),
    }


def test_align_head_reference_file(transfer, tmp_path) -> None:
    ref_state, ft_state = transfer
    init = torch.randn(10, 512, generator=torch.Generator().manual_seed(5))
    path = _save({"fc.weight": init, "fc.bias": torch.zeros(10)}, tmp_path / "init.safetensors")
    assert load_head_reference("zero") is None
    heads = load_head_reference(str(path))
    model = torchvision.models.resnet18(num_classes=10)
    alignment = align(model, ft_state, ref_state, layers=select_layers(model), head_reference=heads)
    row = alignment.rows[-1]
    assert row.source == "head-file"
    assert torch.allclose(alignment.directions["fc.weight"], ft_state["fc.weight"] - init)
    assert row.distance == pytest.approx(float((ft_state["fc.weight"] - init).double().norm()))
    with pytest.raises(InputError) as err:
        align(model, ft_state, ref_state, layers=["fc.weight"], head_reference={})
    _assert_one_line(err, "--head-reference", "fc.weight")
    with pytest.raises(InputError) as err:
        align(
            model,
            ft_state,
            ref_state,
            layers=["conv1.weight", "fc.weight"],
            head_reference={"fc.weight": torch.zeros(5, 512)},
        )
    _assert_one_line(err, "--head-reference", "(5, 512)", "(10, 512)")
    with pytest.raises(InputError) as err:
        load_head_reference(str(tmp_path / "nope.pt"))
    _assert_one_line(err, "--head-reference", "nope.pt")


def test_align_errors(transfer) -> None:
    ref_state, ft_state = transfer
    model = torchvision.models.resnet18(num_classes=10)
    layers = select_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    bad_shape = dict(ft_state, **{"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(InputError) as err:
        align(model, bad_shape, ref_state, layers=layers)
    _assert_one_line(err, "'layer1.0.conv1.weight'", "(64, 64, 1, 1)", "(64, 64, 3, 3)")

    missing = {k: v for k, v in ft_state.items() if k != "layer3.1.conv2.weight"}
    with pytest.raises(InputError) as err:
        align(model, missing, ref_state, layers=layers)
    _assert_one_line(err, "'layer3.1.conv2.weight'", "--model")

    nan = dict(ft_state)
    nan["layer2.0.conv1.weight"] = ft_state["layer2.0.conv1.weight"].clone()
    nan["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError) as err:
        align(model, nan, ref_state, layers=layers)
    _assert_one_line(err, "'layer2.0.conv1.weight'", "NaN")

    inf_ref = dict(ref_state)
    inf_ref["conv1.weight"] = ref_state["conv1.weight"].clone()
    inf_ref["conv1.weight"][0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError) as err:
        align(model, ft_state, inf_ref, layers=layers)
    _assert_one_line(err, "reference", "'conv1.weight'", "Inf")

    with pytest.raises(InputError) as err:
        align(model, ft_state, {"other.weight": torch.zeros(3)}, layers=layers)
    _assert_one_line(err, "reference", "shares none")
    with pytest.raises(InputError) as err:
        align(model, ft_state, ref_state, layers=["conv9.weight"])
    _assert_one_line(err, "'conv9.weight'", "--layers")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"a failed alignment modified {key}"


def test_align_missing_buffer_keeps_model_value_and_prefixes(transfer) -> None:
    ref_state, ft_state = transfer
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.25)
    partial = {f"module.{k}": v for k, v in ft_state.items() if k != "bn1.running_mean"}
    alignment = align(model, partial, ref_state, layers=["conv1.weight", "fc.weight"])
    assert torch.equal(alignment.buffers["bn1.running_mean"], torch.full((64,), 0.25))
    assert torch.equal(alignment.params["conv1.weight"], ft_state["conv1.weight"])
