"""The CUDA path gives the CPU's numbers (run with `pytest -m gpu` on a machine with a GPU)."""

import json

import pytest
import torch
from hessfine.analysis.cli import main
from safetensors.torch import save_file

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_attention, tiny_data

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_measure_on_cuda_matches_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    module = tiny_attention()
    params = dict(module.named_parameters())
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp_path / "ft.safetensors"))
    reference = perturbed_reference(params, TINY_LAYERS["attention"])
    save_file(
        {**state, **{k: v.contiguous() for k, v in reference.items()}},
        str(tmp_path / "ref.safetensors"),
    )
    x, y = tiny_data("attention", 12)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        argv = [
            "measure",
            str(tmp_path / "ft.safetensors"),
            "--reference",
            str(tmp_path / "ref.safetensors"),
            "--model",
            "tests.oracles:tiny_attention",
            "--data",
            str(tmp_path / "train.pt"),
            "--out",
            str(out),
            "--dtype",
            "float64",
            "--device",
            device,
            "--quiet",
            "--lanczos-steps",
            "108",
            "--trace",
            "--eigen",
            "2",
            "--noise-sigma",
            "1e-3",
            "--noise-draws",
            "20",
            "--density",
            "--certificate",
        ]
        assert main(argv) == 0
        results[device] = json.loads((out / "measurement.json").read_text())
    assert results["cuda"]["settings"]["device"].startswith("cuda")
    assert results["cuda"]["settings"]["tf32"] is False
    for cpu, gpu in zip(results["cpu"]["layers"], results["cuda"]["layers"], strict=True):
        assert gpu["quadratic_form"]["max"] == pytest.approx(cpu["quadratic_form"]["max"], rel=1e-8)
        assert gpu["method"] == cpu["method"]
        assert gpu["top_eigenvalues"] == pytest.approx(cpu["top_eigenvalues"], rel=1e-6)
    assert results["cuda"]["bounds"]["theorem_2_1"] == pytest.approx(
        results["cpu"]["bounds"]["theorem_2_1"], rel=1e-8
    )
