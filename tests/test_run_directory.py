"""Run directories written by finetune_run, and the ``hessfine finetune`` command."""

import argparse
import csv
import json
import shutil

import pytest
import torch
from hessfine.analysis.errors import InputError
from hessfine.bounds.generalization import consistent_loss_factor
from hessfine.finetune import cli
from hessfine.finetune.confusion import corrupt_labels, symmetric_confusion
from hessfine.finetune.digit_networks import digits_cnn
from hessfine.finetune.methods import METRIC_COLUMNS, FinetuneConfig
from hessfine.finetune.run_directory import (
    FORMAT,
    MANIFEST,
    checkpoint_name,
    finetune_run,
    read_run,
)
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits

SPEC = "hessfine.finetune.digit_networks:digits_cnn"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(uci_digits):
    x, y = uci_digits
    return x[:160], y[:160], x[160:240], y[160:240]


def reference_file(tmp_path, num_classes=10):
    torch.manual_seed(0)
    net = digits_cnn(num_classes=num_classes, width=4)
    path = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def run_once(tmp_path, digits, name="run", *, config, seed=100, label_noise=None, **options):
    x, y, ex, ey = digits
    ref_path = reference_file(tmp_path)
    reference = load_file(str(ref_path))
    reference = {k: v for k, v in reference.items() if not k.startswith("head.")}
    torch.manual_seed(seed)
    model = digits_cnn(width=4)
    noisy = y
    if label_noise is not None:
        matrix = symmetric_confusion(10, label_noise)
        noisy = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(0))
        options["label_noise"] = {
            "kind": "symmetric",
            "rate": label_noise,
            "confusion_matrix": matrix,
        }
    return finetune_run(
        model,
        reference,
        train_x=x,
        train_y_noisy=noisy,
        train_y_clean=y,
        eval_x=ex,
        eval_y=ey,
        config=config,
        out_dir=tmp_path / name,
        model_spec=SPEC,
        model_kwargs={"width": 4},
        reference_path=str(ref_path),
        data={"train": "digits[:160]", "eval": "digits[160:240]"},
        **options,
    )


def test_run_directory_layout_and_manifest(tmp_path, digits):
    config = FinetuneConfig("distance-constraint", epochs=3, save_every=2, lr=0.05, radius=0.3)
    run = run_once(tmp_path, digits, config=config, label_noise=0.2)
    directory = tmp_path / "run"
    assert run.directory == directory
    names = sorted(p.name for p in directory.iterdir())
    assert names == [
        "epoch_002.safetensors",
        "epoch_003.safetensors",
        "hessfine.json",
        "labels.csv",
        "metrics.csv",
    ]
    assert [p.name for p in run.checkpoints] == ["epoch_002.safetensors", "epoch_003.safetensors"]

    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest == run.manifest
    assert manifest["format"] == FORMAT == "hessfine-run/1"
    assert manifest["model"] == SPEC and manifest["model_kwargs"] == {"width": 4}
    assert manifest["reference"] == "../pretrained.safetensors"
    assert (directory / manifest["reference"]).is_file()
    assert manifest["head_reference"] is None
    assert manifest["method"] == "distance-constraint" and manifest["seed"] == 0
    assert manifest["config"] == config.to_dict()
    assert manifest["data"]["train"] == "digits[:160]"
    assert manifest["data"]["n_train"] == 160 and manifest["data"]["n_eval"] == 80
    assert manifest["label_noise"]["kind"] == "symmetric" and manifest["label_noise"]["rate"] == 0.2
    assert manifest["label_noise"]["confusion_matrix"] == symmetric_confusion(10, 0.2).tolist()
    assert set(manifest["radii"]) == {"conv1.weight", "conv2.weight", "conv3.weight", "head.weight"}
    assert manifest["radii"]["head.weight"] == config.head_radius
    assert manifest["checkpoints"] == [
        {"file": "epoch_002.safetensors", "epoch": 2},
        {"file": "epoch_003.safetensors", "epoch": 3},
    ]
    assert manifest["best_epoch"] is None and manifest["complete"] is True
    assert manifest["epochs_run"] == 3 and manifest["confusion_used"] is None
    assert "checkpoint" not in manifest  # so the analysis sees a directory of epochs

    with (directory / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert tuple(METRIC_COLUMNS[:7]) == (
        "epoch",
        "train_loss_noisy",
        "train_acc_noisy",
        "train_loss_clean",
        "train_acc_clean",
        "eval_loss",
        "eval_acc",
    )
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["val_loss"] == "" for r in rows)
    assert float(rows[-1]["train_acc_noisy"]) == pytest.approx(run.metrics[-1]["train_acc_noisy"])
    # Noisy and clean accuracies differ because 20% of the labels were flipped.
    assert rows[-1]["train_acc_noisy"] != rows[-1]["train_acc_clean"]

    with (directory / "labels.csv").open() as file:
        labels = list(csv.DictReader(file))
    _, y, _, _ = digits
    assert [int(r["clean"]) for r in labels] == y.tolist()
    flipped = sum(r["clean"] != r["noisy"] for r in labels) / len(labels)
    assert 0.1 < flipped < 0.3

    state = load_file(str(run.checkpoints[-1]))
    assert set(state) >= {"conv1.weight", "bn1.running_mean", "head.weight", "head.bias"}
    reference = load_file(str(tmp_path / "pretrained.safetensors"))
    for layer, radius in manifest["radii"].items():
        centre = reference[layer] if layer != "head.weight" else torch.zeros(())
        assert torch.linalg.vector_norm(state[layer] - centre) <= radius * (1 + 1e-5)

    again = read_run(directory)
    assert again.manifest == manifest and again.checkpoints == run.checkpoints
    assert len(again.metrics) == len(run.metrics)
    for read, written in zip(again.metrics, run.metrics, strict=True):
        assert read.keys() == written.keys()
        for key, value in written.items():
            assert read[key] == (None if value is None else pytest.approx(value, rel=1e-12)), key


def test_the_analysis_reads_a_checkpoint_with_its_manifest(tmp_path, digits):
    from hessfine.analysis.checkpoints import find_checkpoints, is_run_collection, load_checkpoint

    run = run_once(tmp_path, digits, config=FinetuneConfig("plain", epochs=2))
    loaded = load_checkpoint(run.checkpoints[0])
    assert loaded.manifest["format"] == FORMAT and loaded.directory == run.directory
    assert is_run_collection(run.directory)
    assert find_checkpoints(run.directory) == run.checkpoints


def test_early_stopping_records_and_saves_the_best_epoch(tmp_path, digits):
    config = FinetuneConfig("early-stopping", epochs=12, patience=2, save_every=50, lr=0.1)
    run = run_once(tmp_path, digits, config=config, label_noise=0.5)
    best = run.manifest["best_epoch"]
    assert best is not None
    val = [row["val_loss"] for row in run.metrics]
    assert best == 1 + val.index(min(val))
    assert (run.directory / checkpoint_name(best)).is_file()
    assert {"file": checkpoint_name(best), "epoch": best} in run.manifest["checkpoints"]
    assert len(run.manifest["data"]["validation_indices"]) == round(0.2 * 160)


def test_same_seed_gives_identical_checkpoints(tmp_path, digits):
    config = FinetuneConfig("mixup", epochs=2, seed=3)
    first = run_once(tmp_path, digits, "a", config=config)
    second = run_once(tmp_path, digits, "b", config=config)
    third = run_once(tmp_path, digits, "c", config=FinetuneConfig("mixup", epochs=2, seed=4))
    for a, b in zip(first.checkpoints, second.checkpoints, strict=True):
        sa, sb = load_file(str(a)), load_file(str(b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    last_a, last_c = load_file(str(first.checkpoints[-1])), load_file(str(third.checkpoints[-1]))
    assert not torch.equal(last_a["conv1.weight"], last_c["conv1.weight"])


def test_an_existing_run_is_not_overwritten_silently(tmp_path, digits):
    config = FinetuneConfig("plain", epochs=1)
    run_once(tmp_path, digits, config=config)
    with pytest.raises(InputError, match="--overwrite"):
        run_once(tmp_path, digits, config=config)
    run = run_once(
        tmp_path, digits, config=FinetuneConfig("plain", epochs=2, save_every=2), overwrite=True
    )
    assert [p.name for p in run.checkpoints] == ["epoch_002.safetensors"]
    assert sorted(p.name for p in run.directory.glob("*.safetensors")) == ["epoch_002.safetensors"]


def parse(*argv):
    parser = argparse.ArgumentParser(prog="hessfine finetune")
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_end_to_end_on_digits(tmp_path, capsys):
    ref = reference_file(tmp_path, num_classes=5)  # pretrained for another task: a new head
    out = tmp_path / "robust"
    args = parse(
        "--model",
        SPEC,
        "--model-kwargs",
        '{"width": 4}',
        "--reference",
        str(ref),
        "--data",
        "digits:test",
        "--method",
        "robust",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--label-noise",
        "pair",
        "--noise-rate",
        "0.2",
        "--radius",
        "0.5",
        "--device",
        "cpu",
    )
    assert cli.run(args) == 0
    assert "wrote 2 checkpoints" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "robust" and manifest["data"]["train"] == "digits:test"
    assert manifest["label_noise"]["kind"] == "pair" and manifest["label_noise"]["seed"] == 0
    assert manifest["confusion_used"]["source"] == "given"
    assert manifest["radii"]["head.weight"] == 10.0  # the 10-class head is new
    state = load_file(str(out / "epoch_002.safetensors"))
    assert state["head.weight"].shape == (10, 8)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "plain", "--noise-rate", "0.3"], "--noise-rate needs --label-noise"),
        (["--method", "consistent"], "needs the noise matrix"),
        (["--method", "plain", "--label-noise", "symmetric"], "needs --noise-rate"),
        (["--method", "plain", "--estimate-confusion"], "consistent or robust only"),
        (["--method", "plain", "--label-noise", "matrix"], "needs --noise-matrix"),
        (["--method", "plain", "--noise-matrix", "F.csv"], "needs --label-noise matrix"),
        (
            ["--method", "plain", "--label-noise", "matrix", "--noise-rate", "0.1"],
            "--noise-rate needs",
        ),
        (["--method", "sam", "--sam-rho", "0"], "--sam-rho 0.0 is out of range"),
        (["--method", "nso", "--nso-draws", "0"], "--nso-draws 0 is out of range"),
        (["--method", "plain", "--lr-gamma", "2"], "--lr-gamma 2.0 is out of range"),
        (
            [
                "--method",
                "robust",
                "--label-noise",
                "pair",
                "--noise-rate",
                "0.3",
                "--radius",
                "-1",
            ],
            "--radius -1.0 is out of range",
        ),
        (["--method", "plain", "--model-kwargs", '{"num_classes": 3}'], "labels range over"),
    ],
)
def test_cli_bad_input_is_one_input_error(tmp_path, argv, message):
    ref = reference_file(tmp_path)
    args = parse(
        "--model",
        SPEC,
        "--reference",
        str(ref),
        "--data",
        "digits:test",
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        *argv,
    )
    with pytest.raises(InputError, match=message) as info:
        cli.run(args)
    assert "\n" not in str(info.value)


def test_cli_refuses_a_reference_that_does_not_fit(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))
    args = parse(
        "--model",
        SPEC,
        "--reference",
        str(path),
        "--data",
        "digits:test",
        "--method",
        "plain",
        "--out",
        str(tmp_path / "o"),
    )
    with pytest.raises(InputError, match="no tensor matches"):
        cli.run(args)


def test_cli_reference_may_be_a_peft_adapter_or_a_hf_directory(tmp_path, vit_lora):
    """--reference ADAPTER is merged into its local base on load (peft's own merge is the
    oracle): at a learning rate too small to move a float32 weight, the saved epoch holds the
    merged weights, and hessfine measure of the run, reading the adapter from the manifest,
    finds every distance 0. A model directory for a --model hf with another number of labels
    is loaded by from_pretrained (names in memory): everything but the new head comes from it."""
    from hessfine.analysis.cli import main
    from transformers import ViTForImageClassification

    def finetune(reference, out, *extra):
        args = parse("--model", f"hf:{vit_lora / 'base'}", "--reference", str(reference),
                     "--data", str(vit_lora / "images.pt"), "--method", "plain", "--epochs", "1",
                     "--lr", "1e-12", "--out", str(tmp_path / out), "--quiet", *extra)  # fmt: skip
        assert cli.run(args) == 0
        return load_file(str(tmp_path / out / checkpoint_name(1)))

    def weights(name):
        model = ViTForImageClassification.from_pretrained(vit_lora / name, dtype=torch.float32)
        return model.state_dict()

    saved, merged, base = finetune(vit_lora / "adapter", "lora"), weights("merged"), weights("base")
    assert set(saved) == set(merged)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, merged[name], rtol=1e-6, atol=1e-7)
    assert not torch.equal(merged["vit.layers.0.attention.q_proj.weight"],
                           base["vit.layers.0.attention.q_proj.weight"])  # fmt: skip
    argv = ["measure", tmp_path / "lora", "--data", vit_lora / "images.pt", "--samples", "4"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "m", "--quiet"]]) == 0
    result = json.loads((tmp_path / "m" / "measurement.json").read_text())
    assert result["reference"].endswith("adapter/adapter_model.safetensors")
    assert len(result["layers"]) == 8
    assert all(layer["distance"] == 0.0 for layer in result["layers"])

    five = finetune(vit_lora / "base", "five", "--model-kwargs", '{"num_labels": 5}')
    for name, tensor in five.items():
        if name.startswith("classifier."):
            assert tensor.shape[0] == 5
        else:
            torch.testing.assert_close(tensor, base[name], rtol=1e-6, atol=1e-7)


def test_cli_adapter_without_a_local_base_is_one_line(tmp_path, vit_lora):
    adapter = tmp_path / "adapter"
    shutil.copytree(vit_lora / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/vit-tiny"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    args = parse("--model", f"hf:{vit_lora / 'base'}", "--reference", str(adapter), "--data",
                 str(vit_lora / "images.pt"), "--method", "plain", "--out", str(tmp_path / "o"))  # fmt: skip
    with pytest.raises(InputError, match="'some-org/vit-tiny' is not a local directory") as info:
        cli.run(args)
    assert "base_model_name_or_path" in str(info.value) and "\n" not in str(info.value)


def test_cli_help_has_an_example():
    parser = argparse.ArgumentParser(prog="hessfine finetune")
    cli.add_arguments(parser)
    text = parser.format_help()
    assert "hessfine finetune --model hessfine.finetune.digit_networks:digits_cnn" in text
    assert "--estimate-confusion" in text and "--head-radius" in text


# ------------------------------------------- every method-specific and optimiser flag, by CLI
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """48 digits as a .pt file, and a pretrained reference (another 5-class task)."""
    root = tmp_path_factory.mktemp("cli")
    bunch = load_digits()
    x = torch.tensor(bunch.data[:48], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target[:48], dtype=torch.long)
    torch.save({"x": x, "y": y}, root / "train.pt")
    return root / "train.pt", reference_file(root, num_classes=5)


def run_cli(tmp_path, small_data, *argv):
    data, ref = small_data
    out = tmp_path / "run"
    out.mkdir()
    (out / "hessfine.json").write_text("{}")  # a previous run: replaced thanks to --overwrite
    args = parse(
        "--model",
        SPEC,
        "--model-kwargs",
        '{"width": 4}',
        "--reference",
        str(ref),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--overwrite",
        *argv,
    )
    assert cli.run(args) == 0
    return read_run(out)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "sam", "--sam-rho", "0.2"], {"method": "sam", "sam_rho": 0.2}),
        (
            ["--method", "nso", "--nso-sigma", "0.03", "--nso-draws", "2"],
            {"method": "nso", "nso_sigma": 0.03, "nso_draws": 2},
        ),
        (
            ["--method", "plain", "--optimizer", "adamw", "--adam-beta1", "0.8"]
            + ["--adam-beta2", "0.99", "--adam-eps", "1e-6", "--weight-decay", "0.05"],
            {"optimizer": "adamw", "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_eps": 1e-6}
            | {"weight_decay": 0.05},
        ),
        (
            ["--method", "plain", "--lr", "0.2", "--momentum", "0.5", "--schedule", "step"]
            + ["--lr-step-size", "1", "--lr-gamma", "0.5"],
            {"lr": 0.2, "momentum": 0.5, "schedule": "step", "lr_step_size": 1, "lr_gamma": 0.5},
        ),
        (
            ["--method", "plain", "--schedule", "cosine", "--lr", "0.1", "--lr-min", "0.02"],
            {"schedule": "cosine", "lr_min": 0.02},
        ),
        (["--method", "l2-sp", "--l2sp-alpha", "0.5"], {"method": "l2-sp", "l2sp_alpha": 0.5}),
        (
            ["--method", "distance-constraint", "--radius", "0.3", "--head-radius", "2"]
            + ["--depth-scaling", "4"],
            {"radius": 0.3, "head_radius": 2.0, "depth_scaling": 4.0},
        ),
        (["--method", "label-smoothing", "--label-smoothing", "0.2"], {"label_smoothing": 0.2}),
        (["--method", "mixup", "--mixup-alpha", "0.4"], {"mixup_alpha": 0.4}),
        (
            ["--method", "early-stopping", "--validation-fraction", "0.25", "--patience", "1"]
            + ["--seed", "3", "--save-every", "2"],
            {"validation_fraction": 0.25, "patience": 1, "seed": 3, "save_every": 2},
        ),
        (
            ["--method", "consistent", "--label-noise", "symmetric", "--noise-rate", "0.2"]
            + ["--noise-seed", "5"],
            {"method": "consistent"},
        ),
    ],
)
def test_cli_flags_reach_the_config_manifest_and_metrics(tmp_path, small_data, argv, expected):
    run = run_cli(tmp_path, small_data, *argv)
    config = run.manifest["config"]
    for key, value in expected.items():
        assert config[key] == value, key
    assert run.manifest["complete"] is True
    config_object = FinetuneConfig(
        **{k: v for k, v in config.items() if k != "confusion"},
        confusion=None if config["confusion"] is None else tuple(map(tuple, config["confusion"])),
    )
    from hessfine.finetune.methods import learning_rate

    for row in run.metrics:
        assert row["lr"] == pytest.approx(learning_rate(config_object, row["epoch"]))
    if config["method"] == "early-stopping":
        assert len(run.manifest["data"]["validation_indices"]) == 12
    if config["method"] == "distance-constraint":
        assert run.manifest["radii"]["conv3.weight"] == pytest.approx(1.2)  # 0.3·4
    if config["method"] == "consistent":
        assert run.manifest["label_noise"]["seed"] == 5
        assert run.manifest["confusion_used"]["source"] == "given"


def test_cli_estimate_confusion_uses_dual_t(tmp_path, capsys):
    ref = reference_file(tmp_path, num_classes=5)
    args = parse(
        *("--model", SPEC, "--model-kwargs", '{"width": 4}', "--reference", str(ref)),
        *("--data", "digits:test", "--method", "robust", "--estimate-confusion"),
        *("--label-noise", "pair", "--noise-rate", "0.2", "--epochs", "3", "--lr", "0.1"),
        *("--device", "cpu", "--out", str(tmp_path / "run")),
    )
    assert cli.run(args) == 0
    manifest = read_run(tmp_path / "run").manifest
    assert manifest["config"]["estimate_confusion"] is True
    used = torch.tensor(manifest["confusion_used"]["matrix"], dtype=torch.float64)
    assert manifest["confusion_used"]["source"] == "dual-t"
    rule = manifest["confusion_used"]["rule"]
    assert rule["kappa"] <= rule["kappa_limit"] == 10 and 0 <= rule["shrinkage"] <= 1
    assert consistent_loss_factor(used) == pytest.approx(rule["kappa"])
    torch.testing.assert_close(used.sum(dim=1), torch.ones(10, dtype=torch.float64))
    applied = torch.tensor(manifest["label_noise"]["confusion_matrix"], dtype=torch.float64)
    assert not torch.allclose(used, applied)


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".pt"])
def test_cli_label_noise_from_a_matrix_file(tmp_path, small_data, suffix):
    import numpy as np

    F = 0.6 * np.eye(10) + 0.4 * np.roll(np.eye(10), 3, axis=1)  # y → y+3 with prob. 0.4
    path = tmp_path / f"F{suffix}"
    if suffix == ".npy":
        np.save(path, F)
    elif suffix == ".csv":
        np.savetxt(path, F, delimiter=",")
    else:
        torch.save(torch.from_numpy(F), path)
    run = run_cli(
        tmp_path,
        small_data,
        "--method",
        "robust",
        "--label-noise",
        "matrix",
        "--noise-matrix",
        str(path),
    )
    noise = run.manifest["label_noise"]
    assert noise["kind"] == "matrix" and noise["rate"] is None
    assert noise["matrix_file"] == str(path) and len(noise["matrix_sha256"]) == 64
    np.testing.assert_allclose(noise["confusion_matrix"], F, atol=1e-12)
    np.testing.assert_allclose(run.manifest["confusion_used"]["matrix"], F, atol=1e-12)
    with (run.directory / "labels.csv").open() as file:
        rows = list(csv.DictReader(file))
    for row in rows:  # each label is kept or moved by exactly 3
        assert (int(row["noisy"]) - int(row["clean"])) % 10 in (0, 3)
    assert any(row["noisy"] != row["clean"] for row in rows)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([[0.5, 0.5], [0.5, 0.5]], "expected 10×10"),
        ("eye_minus", "non-negative"),
        ("rows_off", "rows must sum to 1"),
        ("text", "cannot read a matrix"),
    ],
)
def test_cli_bad_noise_matrix_is_one_input_error(tmp_path, small_data, content, message):
    import numpy as np

    path = tmp_path / "F.csv"
    if content == "eye_minus":
        F = np.eye(10) * 1.5 - 0.5 / 9 * (1 - np.eye(10))
        np.savetxt(path, F, delimiter=",")
    elif content == "rows_off":
        np.savetxt(path, np.eye(10) * 0.9, delimiter=",")
    elif content == "text":
        path.write_text("not,a,matrix\n")
    else:
        np.savetxt(path, np.array(content), delimiter=",")
    data, ref = small_data
    args = parse(
        "--model",
        SPEC,
        "--reference",
        str(ref),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
        "--method",
        "plain",
        "--label-noise",
        "matrix",
        "--noise-matrix",
        str(path),
    )
    with pytest.raises(InputError, match=message) as info:
        cli.run(args)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
