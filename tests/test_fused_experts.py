"""Fused mixture-of-experts parameters measured as one layer per expert matrix: the names and
layouts of :mod:`hessfine.analysis.fused_experts`, and every estimator's per-expert form equal to
the fused parameter's form with the direction zero outside that expert (tiny Mixtral, float64,
transformers' ``batched_mm`` experts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hessfine.analysis.checkpoints import select_layers
from hessfine.analysis.cli import main
from hessfine.analysis.fused_experts import fused_experts, fused_parts
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.functional import CausalLMLoss, FunctionalModel, FusedParameter

EXPERTS, HIDDEN, INTERMEDIATE = 3, 8, 4


def _mixtral(seed: int = 0):
    """A float64 one-layer Mixtral causal LM with 3 experts, and a padded batch of 4 sequences."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        vocab_size=16,
        max_position_embeddings=16,
        experts_implementation="batched_mm",
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 16, (4, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    x = {"input_ids": ids * mask, "attention_mask": mask}
    return model, x, (ids * mask).masked_fill(mask == 0, -100)


def test_split_and_join_are_inverse_in_every_layout() -> None:
    w = torch.randn(2, 4, 6, dtype=torch.float64)
    parts = (("g.0", "u.0"), ("g.1", "u.1"))
    layouts = {
        (0, False): lambda e: (w[e, :2], w[e, 2:]),
        (1, False): lambda e: (w[e, :, :3], w[e, :, 3:]),
        (1, True): lambda e: (w[e, :, 0::2], w[e, :, 1::2]),  # GPT-OSS: transposed, interleaved
    }
    for (dim, interleaved), expected in layouts.items():
        fused = FusedParameter("w", parts, dim=dim, interleaved=interleaved)
        split = fused.split(w)
        assert list(split) == fused.names == ["g.0", "u.0", "g.1", "u.1"]
        for e in range(2):
            gate, up = expected(e)
            assert torch.equal(split[f"g.{e}"], gate) and torch.equal(split[f"u.{e}"], up)
        assert torch.equal(fused.join(split), w)


def test_mixtral_experts_are_named_per_expert_and_selected_by_default() -> None:
    model, _, _ = _mixtral()
    fused = fused_experts(model)
    prefix = "model.layers.0.mlp.experts."
    assert [f.name for f in fused] == [prefix + "gate_up_proj", prefix + "down_proj"]
    layers = select_layers(model, None, fused_parts(fused))
    experts = [name for name in layers if ".experts." in name]
    assert experts[:2] == [prefix + "gate_proj.0", prefix + "up_proj.0"]
    assert experts[-EXPERTS:] == [f"{prefix}down_proj.{e}" for e in range(EXPERTS)]
    assert len(experts) == 3 * EXPERTS and prefix + "gate_up_proj" not in layers
    down = select_layers(model, ["*experts.down_proj.*"], fused_parts(fused))
    assert down == [f"{prefix}down_proj.{e}" for e in range(EXPERTS)]
    _, params = FunctionalModel.from_module(model, fused=fused)
    assert tuple(params[prefix + "up_proj.1"].shape) == (INTERMEDIATE, HIDDEN)
    assert tuple(params[prefix + "down_proj.2"].shape) == (HIDDEN, INTERMEDIATE)


@pytest.mark.parametrize("estimator", ["block", "ggn"])
def test_per_expert_forms_equal_the_fused_forms(estimator: str) -> None:
    """v_eᵀ H_e v_e of each expert layer = the fused block's form with v zero outside expert e."""
    model, x, y = _mixtral()
    fused = fused_experts(model)
    split_model, split = FunctionalModel.from_module(model, loss=CausalLMLoss(), fused=fused)
    whole_model, whole = FunctionalModel.from_module(model, loss=CausalLMLoss())
    torch.testing.assert_close(split_model.logits(split, x), model(**x).logits)
    g = torch.Generator().manual_seed(1)
    prefix = "model.layers.0.mlp.experts."
    moved = {
        k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in whole.items()
    }
    sliced = {k: v for f in fused for k, v in f.split(moved[f.name]).items()}
    unfused = {k: v for k, v in moved.items() if k in split}
    torch.testing.assert_close(  # slices changed: the fused tensors are rebuilt from them
        split_model.logits({**unfused, **sliced}, x), whole_model.logits(moved, x)
    )
    where = {
        "gate_proj": ("gate_up_proj", slice(0, INTERMEDIATE)),
        "up_proj": ("gate_up_proj", slice(INTERMEDIATE, None)),
        "down_proj": ("down_proj", slice(None)),
    }
    for stem, (parent, rows) in where.items():
        for e in range(EXPERTS):
            layer, fused_name = f"{prefix}{stem}.{e}", prefix + parent
            v = torch.randn(split[layer].shape, generator=g, dtype=torch.float64)
            padded = torch.zeros_like(whole[fused_name])
            padded[e, rows] = v
            ours = quadratic_forms(split_model, split, {layer: v}, [(x, y)], estimator=estimator)
            theirs = quadratic_forms(
                whole_model, whole, {fused_name: padded}, [(x, y)], estimator=estimator
            )
            form, oracle = ours[layer], theirs[fused_name]
            assert form.max == pytest.approx(oracle.max, rel=1e-10, abs=1e-14)
            assert form.mean == pytest.approx(oracle.mean, rel=1e-10, abs=1e-14)
            assert form.argmax == oracle.argmax


def test_checkpoint_files_by_name_measure_each_expert(tmp_path: Path) -> None:
    """A state dict under the names in memory (not a model directory), measured with
    ``--model hf:DIR``: the fused tensors are aligned whole, then split per expert."""
    from safetensors.torch import save_file

    model, x, _ = _mixtral()
    model.float().config.architectures = ["MixtralForCausalLM"]
    model.config.save_pretrained(tmp_path / "config")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "base.safetensors"),
    )
    fused = fused_experts(model)
    start = {f.name: model.get_parameter(f.name).detach().clone() for f in fused}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "tuned.safetensors"),
    )
    torch.save({"x": x}, tmp_path / "x.pt")
    args = ["measure", tmp_path / "tuned.safetensors", "--reference", tmp_path / "base.safetensors",
            "--model", f"hf:{tmp_path / 'config'}", "--data", tmp_path / "x.pt",
            "--task", "causal-lm", "--out", tmp_path / "m", "--estimator", "block",
            "--samples", 2, "--quiet"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    result = json.loads((tmp_path / "m" / "measurement.json").read_text())
    assert result["settings"]["experts_implementation"] == "batched_mm"
    layers = {layer["name"]: layer["distance"] for layer in result["layers"]}
    for f in fused:
        for name, direction in f.split(
            model.get_parameter(f.name).detach() - start[f.name]
        ).items():
            assert layers[name] == pytest.approx(float(direction.norm()), rel=1e-5), name
