"""`measure` under label noise: the gap against the run's clean labels, and the noisy-label bound."""

import argparse
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from hessfine.analysis.compare import collect, write_comparison
from hessfine.analysis.errors import InputError
from hessfine.analysis.measure import MeasureSettings, measure
from hessfine.analysis.noisy_labels import noise_matrix
from hessfine.bounds.generalization import consistent_loss_factor
from hessfine.finetune import cli
from hessfine.finetune.label_noise import symmetric_confusion
from hessfine.finetune.models import digits_cnn
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

SPEC = "hessfine.finetune.models:digits_cnn"
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
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "ref.safetensors"))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--model", SPEC, "--model-kwargs", '{"width": 4}', "--reference", str(root / "ref.safetensors")]
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


def test_data_that_matches_neither_label_set_is_refused(noisy_run, tmp_path):
    root, x, clean, noisy, _, _ = noisy_run
    other = (clean + 1) % 10
    torch.save({"x": x, "y": other}, root / "train_other.pt")
    with pytest.raises(InputError, match="neither the clean nor the noisy"):
        measure(
            root / "run" / "epoch_002.safetensors",
            data=str(root / "train_other.pt"),
            out=tmp_path,
            settings=SETTINGS,
        )
    torch.save({"x": x[:30], "y": clean[:30]}, root / "train_short.pt")
    with pytest.raises(InputError, match="records 60 training labels"):
        measure(
            root / "run" / "epoch_002.safetensors",
            data=str(root / "train_short.pt"),
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
