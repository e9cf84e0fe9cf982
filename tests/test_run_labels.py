"""`measure` under label noise: the gap against the run's clean labels, and the noisy-label bound."""

import argparse
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hessfine.analysis.compare import collect, write_comparison
from hessfine.analysis.errors import InputError
from hessfine.analysis.measure import MeasureSettings, measure
from hessfine.analysis.run_labels import noise_matrix
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.functional import ConsistentCrossEntropy, FunctionalModel
from hessfine.bounds.generalization import consistent_loss_factor
from hessfine.finetune import cli
from hessfine.finetune.confusion import corrupt_labels, symmetric_confusion
from hessfine.finetune.digit_networks import digits_cnn
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_block_hessians,
    perturbed_reference,
    positive_part,
    tiny_data,
)
from tests.oracles import consistent_loss as oracle_consistent
from tests.oracles import quadratic_forms as dense_forms

SPEC = "hessfine.finetune.digit_networks:digits_cnn"
SETTINGS = MeasureSettings(samples=8, batch_size=8)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A 2-epoch robust run with 40% symmetric noise on 60 digits (labels corrupted by the CLI)."""
    root = tmp_path_factory.mktemp("noisy")
    bunch = load_digits()
    x = torch.tensor(bunch.data[:90], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target[:90], dtype=torch.long)
    torch.save({"x": x[:60], "y": y[:60]}, root / "train.pt")
    torch.save({"x": x[60:], "y": y[60:]}, root / "test.pt")
    torch.manual_seed(0)
    net = digits_cnn(width=4)
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "ref.safetensors")
    )
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            SPEC,
            "--model-kwargs",
            '{"width": 4}',
            "--reference",
            str(root / "ref.safetensors"),
        ]
        + ["--data", str(root / "train.pt"), "--eval-data", str(root / "test.pt")]
        + ["--method", "robust", "--label-noise", "symmetric", "--noise-rate", "0.4"]
        + ["--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--device", "cpu"]
        + ["--out", str(root / "run")]
    )
    assert cli.run(args) == 0
    with (root / "run" / "labels.csv").open() as file:
        rows = list(csv.DictReader(file))
    noisy = torch.tensor([int(r["noisy"]) for r in rows])
    return root, x[:60], y[:60], noisy, x[60:], y[60:]


def trained(root):
    net = digits_cnn(width=4).eval()
    net.load_state_dict(load_file(str(root / "run" / "epoch_002.safetensors")))
    return net


def test_gap_against_clean_labels_and_the_noisy_label_bound(noisy_run, tmp_path):
    root, x, clean, noisy, ex, ey = noisy_run
    assert (noisy != clean).any()
    result = measure(root / "run" / "epoch_002.safetensors", out=tmp_path, settings=SETTINGS)
    with torch.no_grad():
        logits = trained(root)(x).double()
        eval_loss = F.cross_entropy(trained(root)(ex).double(), ey).item()
    clean_loss = F.cross_entropy(logits, clean).item()
    noisy_loss = F.cross_entropy(logits, noisy).item()
    matrix = symmetric_confusion(10, 0.4)
    inverse = torch.linalg.inv(matrix)
    consistent = -(inverse[noisy] * torch.log_softmax(logits, -1)).sum(-1).mean().item()

    assert result["labels"]["train"] == "clean" and result["labels"]["data_file_holds"] == "clean"
    assert result["labels"]["noisy_fraction"] == pytest.approx((noisy != clean).double().mean())
    assert result["loss"]["train"] == pytest.approx(clean_loss, rel=1e-5)
    assert result["loss"]["train_noisy"] == pytest.approx(noisy_loss, rel=1e-5)
    assert result["loss"]["train_consistent"] == pytest.approx(consistent, rel=1e-5)
    gap = result["generalization_gap"]
    assert gap["against"] == "clean training labels"
    assert gap["loss"] == pytest.approx(eval_loss - clean_loss, rel=1e-4)
    bounds = result["bounds"]
    assert bounds["noise_matrix_source"] == "known"
    assert bounds["noisy_label_factor"] == pytest.approx(consistent_loss_factor(matrix))
    assert bounds["theorem_2_1_noisy_labels"] == pytest.approx(
        consistent + bounds["hessian_distance_measure_noisy_labels"], rel=1e-6
    )
    assert math.isfinite(bounds["hessian_distance_measure_noisy_labels"])

    # The same run measured on a data file that holds the noisy labels gives the same numbers.
    torch.save({"x": x, "y": noisy}, root / "train_noisy.pt")
    again = measure(
        root / "run" / "epoch_002.safetensors",
        data=str(root / "train_noisy.pt"),
        out=tmp_path / "again",
        settings=SETTINGS,
    )
    assert again["labels"]["data_file_holds"] == "noisy"
    for key in ("train", "train_noisy", "train_consistent"):
        assert again["loss"][key] == pytest.approx(result["loss"][key], rel=1e-12)

    # comparison.csv says which F the noisy-label bound used.
    rows = collect([tmp_path])
    path = write_comparison(rows, tmp_path / "cmp")
    with path.open() as file:
        table = list(csv.DictReader(file))
    assert {row["noise_matrix_source"] for row in table} == {"known"}
    first = next(row for row in table if row["measurement"] == str(tmp_path / "measurement.json"))
    assert first["gap_against"] == "clean training labels"
    assert float(first["train_loss_noisy"]) == pytest.approx(noisy_loss, rel=1e-5)
    assert float(first["train_loss_consistent"]) == pytest.approx(consistent, rel=1e-5)


def test_data_that_matches_neither_label_set_is_refused(noisy_run, tmp_path):
    root, x, clean, noisy, _, _ = noisy_run
    for name, count, labels, message in [
        ("other", 60, (clean + 1) % 10, "neither the clean nor the noisy"),
        ("short", 30, clean[:30], "records 60 training labels"),
    ]:
        torch.save({"x": x[:count], "y": labels}, root / f"train_{name}.pt")
        with pytest.raises(InputError, match=message):
            measure(
                root / "run" / "epoch_002.safetensors",
                data=str(root / f"train_{name}.pt"),
                out=tmp_path,
                settings=SETTINGS,
            )


def test_noise_matrix_source_from_the_manifest():
    F_ = [[0.8, 0.2], [0.3, 0.7]]
    assert noise_matrix({}) is None
    assert noise_matrix({"label_noise": {"confusion_matrix": F_}}).source == "known"
    given = noise_matrix({"confusion_used": {"source": "given", "matrix": F_}})
    assert given.source == "known" and given.matrix == F_
    estimated = {"label_noise": {"confusion_matrix": F_}, "confusion_used": {"source": "dual-t"}}
    estimated["confusion_used"]["matrix"] = [[0.7, 0.3], [0.3, 0.7]]
    assert noise_matrix(estimated).source == "dual-t"
    assert noise_matrix(estimated).matrix == [[0.7, 0.3], [0.3, 0.7]]


# ------------------------------------------------- 𝓗_i of the consistent loss, dense oracle
def smooth_noisy_run(tmp_path, network="mlp_gelu"):
    """A run directory around a float64 tiny network with 30% symmetric noise recorded."""
    module = TINY_NETWORKS[network]()
    params = dict(module.named_parameters())
    reference = perturbed_reference(params, TINY_LAYERS[network])
    kind = "mlp" if network.startswith("mlp") else network
    x, clean = tiny_data(kind, 8)
    matrix = symmetric_confusion(3, 0.3)
    noisy = corrupt_labels(clean, matrix, generator=torch.Generator().manual_seed(2))
    xe, ye = tiny_data(kind, 6, seed=5)
    torch.save({"x": x, "y": noisy}, tmp_path / "train.pt")
    torch.save({"x": xe, "y": ye}, tmp_path / "eval.pt")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    ref_state = {**state, **{k: reference[k].detach().contiguous() for k in reference}}
    save_file(ref_state, str(tmp_path / "ref.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    save_file(state, str(run / "epoch_001.safetensors"))
    spec = {"mlp_gelu": "tests.oracles:tiny_mlp", "cnn": "tests.oracles:tiny_cnn"}[network]
    manifest = {
        "format": "hessfine-run/1",
        "model": spec,
        "model_kwargs": {},
        "reference": "../ref.safetensors",
        "head_reference": None,
        "method": "robust",
        "data": {"train": "../train.pt", "eval": "../eval.pt"},
        "label_noise": {"kind": "symmetric", "rate": 0.3, "confusion_matrix": matrix.tolist()},
        "confusion_used": {"source": "given", "matrix": matrix.tolist()},
        "labels": "labels.csv",
        "checkpoints": [{"file": "epoch_001.safetensors", "epoch": 1}],
    }
    (run / "hessfine.json").write_text(json.dumps(manifest))
    lines = ["index,clean,noisy"] + [
        f"{i},{c},{z}" for i, (c, z) in enumerate(zip(clean.tolist(), noisy.tolist(), strict=True))
    ]
    (run / "labels.csv").write_text("\n".join(lines) + "\n")
    return module, params, reference, x, clean, noisy, torch.linalg.inv(matrix)


@pytest.mark.parametrize("network", ["mlp_gelu", "cnn"])
def test_measure_gives_the_consistent_loss_forms_of_the_dense_oracle(tmp_path, network):
    module, params, reference, x, clean, noisy, inverse = smooth_noisy_run(tmp_path, network)
    settings = MeasureSettings(
        samples=None,
        dtype="float64",
        batch_size=8,
        estimator="auto",
        trace=True,
        trace_probes=2,
        positive_rtol=0.0,
    )
    result = measure(
        tmp_path / "run" / "epoch_001.safetensors", out=tmp_path / "m", settings=settings
    )
    assert result["labels"]["data_file_holds"] == "noisy"
    differs = []
    for layer in result["layers"]:
        name = layer["name"]
        v = params[name] - reference[name]
        H_bar = dense_block_hessians(module, params, name, x, noisy, oracle_consistent(inverse))
        H = dense_block_hessians(module, params, name, x, clean)
        bar = dense_forms(positive_part(H_bar), v)
        plain = dense_forms(positive_part(H), v)
        got = layer["quadratic_form_noisy_labels"]
        assert got["max"] == pytest.approx(float(bar.max()), rel=1e-6)
        assert got["mean"] == pytest.approx(float(bar.mean()), rel=1e-6)
        assert layer["quadratic_form"]["max"] == pytest.approx(float(plain.max()), rel=1e-6)
        differs.append(abs(float(bar.max()) - float(plain.max())) > 1e-3 * float(plain.max()))
        if network == "cnn":  # piecewise linear: ℓ̄'s Hessian is cross-entropy's
            assert got["method"].startswith("same as clean")
    assert any(differs) == (network == "mlp_gelu")
    bounds = result["bounds"]
    # ℓ̄'s traces equal cross-entropy's only on a piecewise-linear network.
    assert (bounds["trace_corollary_noisy_labels"] is None) == (network == "mlp_gelu")
    kappa, C, n = bounds["noisy_label_factor"], result["loss"]["max"], 8
    hdm = sum(
        math.sqrt(kappa * C * max(layer["quadratic_form_noisy_labels"]["max"], 0) / n)
        for layer in result["layers"]
    )
    assert bounds["hessian_distance_measure_noisy_labels"] == pytest.approx(hdm, rel=1e-9)
    assert bounds["theorem_2_1_noisy_labels"] == pytest.approx(
        result["loss"]["train_consistent"] + hdm, rel=1e-9
    )


def test_consistent_loss_block_forms_match_the_dense_oracle_without_truncation():
    module = TINY_NETWORKS["mlp_gelu"]()
    fmodel, params = FunctionalModel.from_module(
        module, loss=ConsistentCrossEntropy(torch.linalg.inv(symmetric_confusion(3, 0.4)))
    )
    reference = perturbed_reference(params, ["fc2.weight"])
    v = params["fc2.weight"] - reference["fc2.weight"]
    x, y = tiny_data("mlp", 7)
    forms = quadratic_forms(fmodel, params, {"fc2.weight": v}, [(x, y)], estimator="block")
    inverse = torch.linalg.inv(symmetric_confusion(3, 0.4))
    dense = dense_forms(
        dense_block_hessians(module, params, "fc2.weight", x, y, oracle_consistent(inverse)), v
    )
    assert forms["fc2.weight"].max == pytest.approx(float(dense.max()), rel=1e-6)
    assert forms["fc2.weight"].mean == pytest.approx(float(dense.mean()), rel=1e-6)
