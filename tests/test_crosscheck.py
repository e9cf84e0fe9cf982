"""Cross-check of traces and top eigenvalues: ours, PyHessian's and the dense oracle's; the
models it loads (a Hugging Face directory, a PEFT adapter merged into its base)."""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil

import pytest
import torch
from hessfine.analysis.checkpoints import select_layers
from hessfine.analysis.crosscheck import (
    CrosscheckRow,
    add_arguments,
    crosscheck,
    format_table,
    load_model,
    pyhessian_estimates,
    relative_difference,
    run,
)
from hessfine.analysis.errors import InputError
from torch import nn

from tests.oracles import TINY_LAYERS, dense_mean_hessian, tiny_cnn, tiny_data

LAYERS = TINY_LAYERS["cnn"]


@pytest.fixture(scope="module")
def tiny():
    module = tiny_cnn()
    x, y = tiny_data("cnn", 16)
    params = {k: p.detach() for k, p in module.named_parameters()}
    H = dense_mean_hessian(module, params, LAYERS, x, y)
    return module, x, y, H


def _dominant(H: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(H)
    return float(eig[eig.abs().argmax()])


class SmallCNN(nn.Module):
    """A float32 ReLU CNN on 3×8×8 inputs (332 selected weights; the tiny oracle CNN has 117)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.max_pool2d(torch.relu(self.conv2(torch.max_pool2d(h, 2))), 2)
        return self.fc(h.flatten(1))


def test_pyhessian_matches_dense_oracle_and_leaves_model_clean(tiny):
    module, x, y, H = tiny
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    samples, values = pyhessian_estimates(
        module, x, y, layers=LAYERS, probes=100, seed=3, power_iterations=1000, power_tol=1e-8
    )
    assert len(samples) == 100  # exactly `probes` probes: no early stopping
    mean = sum(samples) / len(samples)
    stderr = math.sqrt(sum((s - mean) ** 2 for s in samples) / 99 / 100)
    exact = float(torch.trace(H))
    assert abs(mean - exact) < 4 * stderr
    assert relative_difference(values[0], _dominant(H)) < 1e-5
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert all(p.grad is None for p in module.parameters())
    again, _ = pyhessian_estimates(module, x, y, layers=LAYERS, probes=100, seed=3, top_k=1)
    assert again == samples  # seeded


def test_pyhessian_hessian_is_restricted_to_the_selected_layers(tiny):
    module, x, y, _ = tiny
    params = {k: p.detach() for k, p in module.named_parameters()}
    head = dense_mean_hessian(module, params, ["head.weight"], x, y)
    samples, _ = pyhessian_estimates(module, x, y, layers=["head.weight"], probes=200, seed=0)
    mean = sum(samples) / len(samples)
    stderr = math.sqrt(sum((s - mean) ** 2 for s in samples) / 199 / 200)
    assert abs(mean - float(torch.trace(head))) < 4 * stderr
    assert float(torch.trace(head)) < 0.8 * float(torch.trace(tiny[3]))


def _check_rows(rows: list[CrosscheckRow], top_k: int) -> None:
    assert [r.quantity for r in rows] == ["trace"] + [
        f"eigenvalue_{j}" for j in range(1, top_k + 1)
    ]
    trace = rows[0]
    combined = math.hypot(trace.ours_stderr, trace.pyhessian_stderr)
    assert abs(trace.ours - trace.pyhessian) < 4 * combined
    for row in rows[1:]:
        assert row.ours_stderr is None and row.pyhessian_stderr is None
        assert row.relative_difference < 3e-3


def test_crosscheck_tiny_cnn_against_pyhessian_and_dense(tiny):
    module, x, y, H = tiny
    rows = crosscheck(module, x, y, layers=LAYERS, probes=200, top_k=1, seed=0)
    _check_rows(rows, top_k=1)
    exact_trace = float(torch.trace(H))
    # certified layers: our trace is the exact Gauss–Newton trace (standard error 0)
    assert abs(rows[0].ours - exact_trace) <= 4 * rows[0].ours_stderr + 1e-9 * abs(exact_trace)
    assert abs(rows[0].pyhessian - exact_trace) < 4 * rows[0].pyhessian_stderr
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert _dominant(H) == pytest.approx(top)  # power iteration finds the same eigenvalue
    assert relative_difference(rows[1].ours, top) < 1e-6
    assert relative_difference(rows[1].pyhessian, top) < 3e-3


def test_crosscheck_float32_cnn_batch():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (32,), generator=g)
    layers = select_layers(model, None)
    assert layers == ["conv1.weight", "conv2.weight", "fc.weight"]
    rows = crosscheck(model, x, y, layers=layers, probes=100, top_k=1, seed=0)
    _check_rows(rows, top_k=1)
    assert all(p.requires_grad for p in model.parameters())
    exact = copy.deepcopy(model).double()
    params = {k: p.detach() for k, p in exact.named_parameters()}
    H = dense_mean_hessian(exact, params, layers, x.double(), y)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert _dominant(H) == pytest.approx(top)
    assert relative_difference(rows[1].ours, top) < 1e-4  # float32 rounding only
    trace = float(torch.trace(H))  # exact Gauss–Newton trace on certified layers: float32 only
    assert abs(rows[0].ours - trace) <= 4 * rows[0].ours_stderr + 1e-5 * abs(trace)


def test_crosscheck_rejects_unknown_layers():
    model = SmallCNN()
    with pytest.raises(InputError, match="not parameters"):
        crosscheck(model, torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), layers=["x"])


def test_relative_difference_and_table():
    assert relative_difference(1.1, 1.0) == pytest.approx(0.1)
    assert relative_difference(-2.0, -1.0) == pytest.approx(1.0)
    assert relative_difference(0.0, 0.0) == 0.0
    assert relative_difference(1.0, 0.0) == math.inf
    table = format_table(
        [
            CrosscheckRow("trace", 2.0, 0.1, 2.05, 0.2, 0.0244),
            CrosscheckRow("eigenvalue_1", 1.0, None, 1.001, None, 1e-3),
        ]
    )
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| trace | 2 ± 0.1 | 2.05 ± 0.2 |")
    assert lines[3] == "| eigenvalue_1 | 1 | 1.001 | 1.00e-03 |"


def test_cli_on_a_data_file(tmp_path, capsys):
    x, y = tiny_data("cnn", 12)
    torch.save({"x": x, "y": y}, tmp_path / "batch.pt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            "tests.oracles:tiny_cnn",
            "--model-kwargs",
            "{}",
            "--data",
            str(tmp_path / "batch.pt"),
            "--samples",
            "12",
            "--probes",
            "20",
            "--top-k",
            "2",
            "--dtype",
            "float64",
            "--device",
            "cpu",
        ]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "| trace |" in out and "| eigenvalue_2 |" in out and "12 examples" in out
    args.model_kwargs = "{not json"
    with pytest.raises(InputError, match="--model-kwargs"):
        run(args)


def test_top_k_beyond_the_krylov_space_compares_what_lanczos_found():
    """One example, the head only: the Hessian (diag p − ppᵀ) ⊗ hhᵀ has ≤ 3 distinct
    eigenvalues, so Lanczos stops early; the rows it found still match the dense oracle."""
    module = tiny_cnn()
    x, y = tiny_data("cnn", 1)
    params = {k: p.detach() for k, p in module.named_parameters()}
    dense = torch.linalg.eigvalsh(dense_mean_hessian(module, params, ["head.weight"], x, y))
    rows = crosscheck(module, x, y, layers=["head.weight"], probes=4, top_k=6)
    eigen = [row for row in rows if row.quantity.startswith("eigenvalue")]
    assert 1 <= len(eigen) < 6
    assert eigen[0].ours == pytest.approx(float(dense[-1]), rel=1e-8)
    with pytest.raises(InputError, match="--top-k 82"):
        crosscheck(module, x, y, layers=["head.weight"], probes=4, top_k=82)


def test_cli_leaves_out_layers_unused_in_eval_mode(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(6, 5, generator=g), "y": torch.arange(6) % 3}, tmp_path / "d.pt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--model", "tests.test_cli_grid:grid_net", "--model-kwargs", '{"aux": true}']
        + ["--data", str(tmp_path / "d.pt"), "--samples", "6", "--probes", "4", "--device", "cpu"]
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "not used in eval mode (zero Hessian): aux.weight" in out and "| trace |" in out
    args.layers = ["aux.*"]
    with pytest.raises(InputError, match="--layers"):
        run(args)


def _cli(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_cli_merges_a_peft_adapter_on_load(vit_lora, capsys):
    """--model hf --checkpoint ADAPTER: the adapter merged into the local base its config names
    (peft's own merge is the oracle), its two adapted layers selected; the same table as the
    merged model's directory with those layers."""
    from transformers import ViTForImageClassification

    common = ["--model", "hf", "--data", vit_lora / "images.pt", "--samples", "12"]
    common += ["--probes", "10", "--dtype", "float64", "--device", "cpu", "--quiet"]
    args = _cli("--checkpoint", vit_lora / "adapter", *common)
    model, layers = load_model(args, torch.float64)
    assert layers == [
        "vit.layers.0.attention.q_proj.weight",
        "vit.layers.0.attention.v_proj.weight",
    ]
    theirs = ViTForImageClassification.from_pretrained(vit_lora / "merged", dtype=torch.float64)
    merged = dict(theirs.named_parameters())
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-12, atol=1e-12)
    assert run(args) == 0
    from_adapter = capsys.readouterr().out
    assert run(_cli("--checkpoint", vit_lora / "merged", "--layers", *layers, *common)) == 0
    assert capsys.readouterr().out == from_adapter
    assert "| eigenvalue_1 |" in from_adapter


def test_cli_adapter_base_from_reference_or_one_line(vit_lora, tmp_path, capsys):
    """A base that is not a local directory needs --reference; --reference without an adapter
    is refused; both in one line with exit 2."""
    from hessfine.analysis.cli import main

    adapter = tmp_path / "adapter"
    shutil.copytree(vit_lora / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/vit-tiny"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    common = ["--model", "hf", "--data", vit_lora / "images.pt", "--samples", "6"]
    common += ["--probes", "2", "--device", "cpu", "--quiet"]
    for argv, needles in (
        (
            ["--checkpoint", adapter],
            ["'some-org/vit-tiny' is not a local directory", "--reference"],
        ),
        (
            ["--checkpoint", vit_lora / "merged", "--reference", vit_lora / "base"],
            ["drop --reference"],
        ),
    ):
        assert main(["crosscheck", *(str(a) for a in [*argv, *common])]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and all(needle in err for needle in needles), err
    args = _cli("--checkpoint", adapter, "--reference", vit_lora / "base", *common)
    assert run(args) == 0 and "| trace |" in capsys.readouterr().out


def test_cli_merges_an_adapter_of_any_model_into_its_reference(tmp_path, capsys):
    """A LoRA adapter peft made for a plain module (no base recorded): --reference is its base
    weights file, and the table is that of peft's merged weights."""
    from hessfine.analysis.cli import main
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = tiny_cnn()
    save_file(dict(module.state_dict()), str(tmp_path / "base.safetensors"))
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["conv1", "head"], init_lora_weights=False)
    adapted = get_peft_model(module, lora)
    adapted.save_pretrained(tmp_path / "adapter")
    merged = {k: v.contiguous() for k, v in adapted.merge_and_unload().state_dict().items()}
    save_file(merged, str(tmp_path / "merged.safetensors"))
    x, y = tiny_data("cnn", 12)
    torch.save({"x": x, "y": y}, tmp_path / "batch.pt")
    common = ["--model", "tests.oracles:tiny_cnn", "--model-kwargs", "{}", "--data"]
    common += [tmp_path / "batch.pt", "--samples", "12", "--probes", "10", "--dtype", "float64"]
    common += ["--device", "cpu", "--quiet"]
    assert main(["crosscheck", "--checkpoint", str(tmp_path / "adapter"), *map(str, common)]) == 2
    err = capsys.readouterr().err.strip()
    assert "names no base model" in err and "pass --reference" in err and "\n" not in err
    base = tmp_path / "base.safetensors"
    assert run(_cli("--checkpoint", tmp_path / "adapter", "--reference", base, *common)) == 0
    from_adapter = capsys.readouterr().out
    layers = ["conv1.weight", "head.weight"]
    assert (
        run(_cli("--checkpoint", tmp_path / "merged.safetensors", "--layers", *layers, *common))
        == 0
    )
    assert capsys.readouterr().out == from_adapter
