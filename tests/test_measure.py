"""`hessfine measure` end to end: schema, values against the dense oracle, runs, resumability."""

import json
import math

import pytest
import torch
import torchvision
from hessfine.analysis.cli import main
from hessfine.analysis.measure import MeasureSettings, measure, measure_path
from safetensors.torch import save_file

from tests.oracles import (
    TINY_LAYERS,
    dense_block_hessians,
    perturbed_reference,
    positive_part,
    tiny_cnn,
    tiny_data,
    tiny_mlp,
)
from tests.oracles import quadratic_forms as dense_forms

LAYER_KEYS = {"name", "numel", "distance", "method", "quadratic_form", "trace", "top_eigenvalues"}


def assert_schema(result):
    """docs/schema.md, schema_version 1: every fixed key with its type."""
    assert result["schema_version"] == 1
    for key in ("checkpoint", "reference", "model"):
        assert isinstance(result[key], str)
    settings = result["settings"]
    for key, kind in [
        ("estimator", str),
        ("samples", (int, str)),
        ("batch_size", int),
        ("hessian_split", str),
        ("device", str),
        ("dtype", str),
        ("seed", int),
        ("epsilon", float),
    ]:
        assert isinstance(settings[key], kind), key
    data = result["data"]
    assert isinstance(data["n_train"], int) and isinstance(data["n_hessian_samples"], int)
    assert data["n_eval"] is None or isinstance(data["n_eval"], int)
    for layer in result["layers"]:
        assert set(layer) >= LAYER_KEYS
        assert isinstance(layer["numel"], int) and layer["distance"] >= 0
        qf = layer["quadratic_form"]
        assert isinstance(qf["max"], float) and isinstance(qf["mean"], float)
        assert isinstance(qf["argmax"], int) and qf["max"] >= qf["mean"]
        if layer["trace"] is not None:
            assert {"mean", "stderr", "positive_max"} <= set(layer["trace"])
    assert {"train", "eval", "max"} <= set(result["loss"])
    assert {"train", "eval"} <= set(result["accuracy"])
    assert {"loss", "accuracy"} <= set(result["generalization_gap"])
    bounds = result["bounds"]
    for key in (
        "C",
        "n",
        "epsilon",
        "hessian_distance_measure",
        "theorem_2_1",
        "trace_corollary",
        "distance_measures",
        "pac_bayes_certificate",
    ):
        assert key in bounds, key
    for row in result["noise_stability"]:
        assert {"sigma", "mean", "stderr", "draws", "trace_prediction"} <= set(row)
    prov = result["provenance"]
    for key in (
        "hessfine_version",
        "torch_version",
        "timestamp",
        "checkpoint_sha256",
        "reference_sha256",
    ):
        assert isinstance(prov[key], str), key
    assert set(prov["timings"]) >= {
        "load_s",
        "quadratic_forms_s",
        "trace_s",
        "eigen_s",
        "noise_s",
        "total_s",
    }


def save_state(module, path, params=None):
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    if params is not None:
        state.update({k: v.detach().clone().contiguous() for k, v in params.items()})
    save_file(state, str(path))
    return path


@pytest.fixture
def tiny_pair(tmp_path, monkeypatch):
    """A float64 tiny CNN, a perturbed reference, and train/eval .pt files."""
    monkeypatch.chdir(tmp_path.parent)
    module = tiny_cnn()
    params = dict(module.named_parameters())
    reference = perturbed_reference(params, TINY_LAYERS["cnn"])
    save_state(module, tmp_path / "ft.safetensors")
    save_state(module, tmp_path / "ref.safetensors", reference)
    x, y = tiny_data("cnn", 12)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    xe, ye = tiny_data("cnn", 8, seed=5)
    torch.save({"x": xe, "y": ye}, tmp_path / "eval.pt")
    return module, params, reference, tmp_path


def tiny_args(tmp, out, *extra):
    return [
        "measure",
        str(tmp / "ft.safetensors"),
        "--reference",
        str(tmp / "ref.safetensors"),
        "--model",
        "tests.oracles:tiny_cnn",
        "--data",
        str(tmp / "train.pt"),
        "--eval-data",
        str(tmp / "eval.pt"),
        "--out",
        str(out),
        "--dtype",
        "float64",
        "--quiet",
        "--batch-size",
        "5",
        *extra,
    ]


@pytest.mark.parametrize("estimator", ["block", "auto"])
def test_cli_values_match_dense_hessian(tiny_pair, estimator):
    module, params, reference, tmp = tiny_pair
    out = tmp / f"out-{estimator}"
    assert main(tiny_args(tmp, out, "--estimator", estimator, "--samples", "10")) == 0
    result = json.loads((out / "measurement.json").read_text())
    assert_schema(result)
    x, y = tiny_data("cnn", 12)
    sample = result["data"]["hessian_sample"]
    index = torch.tensor(sample["indices"])
    assert sample["order"] == "stratified" and len(set(sample["indices"])) == 10
    for layer in result["layers"]:
        name = layer["name"]
        v = params[name] - reference[name]
        H = dense_block_hessians(module, params, name, x[index], y[index])
        dense = dense_forms(positive_part(H) if estimator == "auto" else H, v)
        assert layer["quadratic_form"]["max"] == pytest.approx(float(dense.max()), rel=1e-6)
        assert layer["quadratic_form"]["mean"] == pytest.approx(float(dense.mean()), rel=1e-6)
        assert layer["quadratic_form"]["argmax"] == int(dense.argmax())
        assert layer["quadratic_form"]["argmax_index"] == int(index[dense.argmax()])
        assert layer["distance"] == pytest.approx(float(v.norm()), rel=1e-9)
    bounds = result["bounds"]
    n, C = 12, result["loss"]["max"]
    hdm = sum(
        math.sqrt(C * max(layer["quadratic_form"]["max"], 0) / n) for layer in result["layers"]
    )
    assert bounds["hessian_distance_measure"] == pytest.approx(hdm, rel=1e-9)
    assert bounds["theorem_2_1"] == pytest.approx(result["loss"]["train"] + hdm, rel=1e-9)
    assert result["generalization_gap"]["loss"] == pytest.approx(
        result["loss"]["eval"] - result["loss"]["train"]
    )


def test_python_api_with_traces_eigen_noise_and_certificate(tiny_pair):
    _, _, _, tmp = tiny_pair
    settings = MeasureSettings(
        samples=8,
        batch_size=4,
        trace=True,
        trace_probes=20,
        eigen=2,
        density=True,
        noise_sigma=(1e-3, 1e-2),
        noise_draws=8,
        certificate=True,
        dtype="float64",
    )
    result = measure(
        tmp / "ft.safetensors",
        reference=str(tmp / "ref.safetensors"),
        data=str(tmp / "train.pt"),
        eval_data=str(tmp / "eval.pt"),
        out=tmp / "api",
        model="tests.oracles:tiny_cnn",
        settings=settings,
    )
    assert_schema(result)
    assert json.loads((tmp / "api" / "measurement.json").read_text())["bounds"] == json.loads(
        json.dumps(result["bounds"])
    )
    assert (tmp / "api" / "spectrum.json").is_file()
    for layer in result["layers"]:
        assert layer["trace"]["positive_max"] >= 0
        assert len(layer["top_eigenvalues"]) == 2
    assert result["bounds"]["trace_corollary"] is not None
    assert 0 <= result["bounds"]["pac_bayes_certificate"]["bound"] <= 1
    assert [row["sigma"] for row in result["noise_stability"]] == [1e-3, 1e-2]
    assert all(row["trace_prediction"] is not None for row in result["noise_stability"])
    assert result["provenance"]["timings"]["trace_s"] > 0


def test_resnet18_pair_writes_schema_valid_measurement(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    save_state(model, tmp_path / "ref.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_state(model, tmp_path / "ft.safetensors")
    g = torch.Generator().manual_seed(0)
    torch.save(
        {"x": torch.randn(6, 3, 32, 32, generator=g), "y": torch.arange(6)}, tmp_path / "d.pt"
    )
    argv = [
        "measure",
        str(tmp_path / "ft.safetensors"),
        "--reference",
        str(tmp_path / "ref.safetensors"),
        "--model",
        "torchvision:resnet18",
        "--model-kwargs",
        '{"num_classes": 10}',
        "--data",
        str(tmp_path / "d.pt"),
        "--out",
        str(tmp_path / "out"),
        "--samples",
        "2",
        "--quiet",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "measurement.json").read_text())
    assert_schema(result)
    assert len(result["layers"]) == 21
    assert all(layer["method"] == "ggn-certified" for layer in result["layers"])
    assert result["data"]["n_hessian_samples"] == 2 and result["loss"]["eval"] is None
    assert len(result["provenance"]["checkpoint_sha256"]) == 64


def test_directory_of_runs_is_measured_and_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    module = tiny_mlp("tanh")
    params = dict(module.named_parameters())
    save_state(
        module, tmp_path / "ref.safetensors", perturbed_reference(params, TINY_LAYERS["mlp_tanh"])
    )
    runs = tmp_path / "runs"
    for run, scale in (("a", 0.1), ("b", 0.2)):
        (runs / run).mkdir(parents=True)
        for epoch in (1, 2):
            moved = {k: v + scale * epoch for k, v in params.items()}
            save_state(module, runs / run / f"epoch_{epoch:03d}.safetensors", moved)
    x, y = tiny_data("mlp_tanh", 6)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    settings = MeasureSettings(samples=4, dtype="float64")
    kwargs = dict(
        reference=str(tmp_path / "ref.safetensors"),
        data=str(tmp_path / "train.pt"),
        model="tests.oracles:tiny_mlp",
        settings=settings,
    )
    written = measure_path(runs, out=tmp_path / "out", **kwargs)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "a/epoch_001/measurement.json",
        "a/epoch_002/measurement.json",
        "b/epoch_001/measurement.json",
        "b/epoch_002/measurement.json",
    ]
    stamps = {p: p.stat().st_mtime_ns for p in written}
    measure_path(runs, out=tmp_path / "out", quiet=False, **kwargs)
    assert "skipping" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written} == stamps
    budget = MeasureSettings(samples=4, dtype="float64", max_memory="8GiB")  # how, not what
    measure_path(runs, out=tmp_path / "out", quiet=False, **{**kwargs, "settings": budget})
    assert "skipping" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in written} == stamps
    measure_path(
        runs,
        out=tmp_path / "out",
        **{**kwargs, "settings": MeasureSettings(samples=3, dtype="float64")},
    )
    assert all(p.stat().st_mtime_ns != stamps[p] for p in written)


def test_reference_code_estimator_recorded(tiny_pair):
    _, _, _, tmp = tiny_pair
    out = tmp / "ref-code"
    assert (
        main(
            tiny_args(
                tmp, out, "--estimator", "reference-code", "--samples", "8", "--batch-size", "4"
            )
        )
        == 0
    )
    result = json.loads((out / "measurement.json").read_text())
    assert result["settings"]["batch_size"] == 4
    assert all(layer["method"] == "reference-code" for layer in result["layers"])
