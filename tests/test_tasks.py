"""Every task through `hessfine measure` on tiny saved Hugging Face models, against dense float64
oracles of the model's own ``.loss`` (docs/inputs.md, "Tasks").

Each task's model (tests/oracles.py, :func:`tiny_task_hf`: a BERT token classifier, a one-output
BERT regressor, a multi-label BERT, BART) is saved with ``save_pretrained`` beside a reference
whose selected layers differ; the task is left for hessfine to choose from the config and class.
The oracles run each example alone through the model with ``labels`` and differentiate its
``.loss``; the Gauss–Newton oracle is JᵀΛJ with the task's Λ written out. Exact quantities agree
to 1e-6, stochastic ones within 4 of their reported standard errors.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError
from hessfine.analysis.tasks import choose_task
from torch.func import functional_call

from tests.oracles import (
    OWN_LOSS,
    TASK_MODELS,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_mean_hessian,
    diagonal_blocks,
    perturbed_reference,
    positive_part,
    task_curvature,
    tiny_task_batch,
    tiny_task_hf,
)
from tests.oracles import quadratic_forms as dense_forms
from tests.test_training_tools import assert_same_measurement

BOUNDED_LOSS = {
    "token-classification": "token error (mean over label positions)",
    "multi-label": "per-label error (mean over labels)",
    "seq2seq-lm": "token error (mean over label positions)",
}
SOURCES = {
    "token-classification": "model class",
    "regression": "config.num_labels",
    "multi-label": "config.problem_type",
    "seq2seq-lm": "model class",
}


def _batch(name, model, seeds):
    """The examples of ``seeds`` (5 each) as saved: no decoder inputs (hessfine makes them);
    float targets rounded to float32, as data files are read."""
    parts = [tiny_task_batch(name, model, seed=seed) for seed in seeds]
    x = {k: torch.cat([p[0][k] for p in parts]) for k in ("input_ids", "attention_mask")}
    y = torch.cat([p[1] for p in parts])
    return x, (y.float().double() if y.is_floating_point() else y)


@pytest.fixture(scope="module", params=list(TASK_MODELS))
def saved(request, tmp_path_factory):
    """(task, model, layers, directory): tuned/ and base/ model directories, train.pt (10
    examples), eval.pt (5), and the oracles' Hessians, computed once."""
    task = request.param
    name = TASK_MODELS[task]
    tmp = tmp_path_factory.mktemp(task)
    model, layers = tiny_task_hf(name)
    model.save_pretrained(tmp / "tuned")
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    reference = perturbed_reference(params, layers)
    with torch.no_grad():
        for layer in layers:
            model.get_parameter(layer).copy_(reference[layer])
        model.save_pretrained(tmp / "base")
        for layer in layers:
            model.get_parameter(layer).copy_(params[layer])
    x, y = _batch(name, model, (0, 1))
    torch.save({"x": x, "y": y}, tmp / "train.pt")
    xe, ye = _batch(name, model, (2,))
    torch.save({"x": xe, "y": ye}, tmp / "eval.pt")
    hessians = {
        layer: dense_block_hessians(model, params, layer, x, y, OWN_LOSS) for layer in layers
    }
    return task, model, params, reference, layers, tmp, (x, y), hessians


def run(saved, label, *extra):
    task, _, _, _, layers, tmp, _, _ = saved
    out = tmp / label
    argv = ["measure", str(tmp / "tuned"), "--reference", str(tmp / "base"), "--model", "hf"]
    argv += ["--data", str(tmp / "train.pt"), "--eval-data", str(tmp / "eval.pt")]
    argv += ["--out", str(out), "--dtype", "float64", "--quiet", "--batch-size", "4"]
    argv += ["--samples", "all", "--layers", *layers, *extra]
    assert main(argv) == 0
    result = json.loads((out / "measurement.json").read_text())
    assert result["settings"]["task"] == task
    assert result["settings"]["task_source"] == SOURCES[task]
    return result


def own_losses(model, x, y):
    """The model's .loss of every example alone."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return torch.stack(
            [
                functional_call(
                    model,
                    params,
                    (),
                    {**{k: v[n : n + 1] for k, v in x.items()}, "labels": y[n : n + 1]},
                ).loss
                for n in range(len(y))
            ]
        )


@pytest.mark.parametrize("estimator", ["block", "ggn", "positive", "auto", "reference-code"])
def test_every_estimator_matches_the_models_own_loss(saved, estimator):
    task, model, params, reference, layers, _, (x, y), hessians = saved
    extra = ["--estimator", estimator, "--lanczos-steps", "64", "--positive-rtol", "0"]
    result = run(saved, f"est-{estimator}", *extra)
    directions = {layer: params[layer] - reference[layer] for layer in layers}
    if estimator == "reference-code":
        flat = torch.cat([directions[layer].reshape(-1) for layer in layers])
        best = dict.fromkeys(layers, -math.inf)
        for start in range(0, len(y), 4):
            part = {k: v[start : start + 4] for k, v in x.items()}
            H = dense_mean_hessian(model, params, layers, part, y[start : start + 4], OWN_LOSS)
            hv, offset = H @ flat, 0
            for layer in layers:
                d = params[layer].numel()
                value = float(flat[offset : offset + d] @ hv[offset : offset + d])
                best[layer] = max(best[layer], value)
                offset += d
    for entry in result["layers"]:
        layer, form = entry["name"], entry["quadratic_form"]
        if estimator == "reference-code":
            assert form["max"] == pytest.approx(best[layer], rel=1e-6)
            continue
        if estimator == "ggn":
            blocks = dense_ggn_blocks(
                model,
                params,
                layer,
                _decoded(task, model, x, y),
                y,
                curvature=lambda z, yn: task_curvature(task, z, yn),
            )
        elif estimator == "block":
            blocks = hessians[layer]
        else:
            blocks = positive_part(hessians[layer])
        values = dense_forms(blocks, directions[layer])
        assert form["max"] == pytest.approx(float(values.max()), rel=1e-6, abs=1e-12)
        assert form["mean"] == pytest.approx(float(values.mean()), rel=1e-6, abs=1e-12)
        assert form["argmax"] == int(values.argmax())


def test_measure_model_chooses_the_task_and_agrees_with_the_cli(saved):
    """The model in memory, with the task left to hessfine, gives the command line's numbers."""
    from hessfine.analysis.python_api import measure_model

    task, model, _, _, layers, tmp, (x, y), _ = saved
    files = run(saved, "api-cli", "--estimator", "ggn")
    memory = measure_model(
        model, reference=tmp / "base", data=(x, y), estimator="ggn", samples="all",
        dtype="float64", batch_size=4, layers=layers,
    ).to_json()  # fmt: skip
    assert memory["settings"]["task"] == task
    # transformers' forward with labels records problem_type in the config of the model in memory
    assert memory["settings"]["task_source"] in (SOURCES[task], "config.problem_type")
    assert_same_measurement(memory, files)


def _decoded(task, model, x, y):
    """``x`` with the decoder inputs the model makes from the labels (seq2seq-lm): the logits
    whose Jacobian the Gauss–Newton oracle takes."""
    if task != "seq2seq-lm":
        return x
    return {**x, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=y)}


def _errors(task, model, x, y):
    """Per example the oracle's 0-1 error: the token error over the label positions, the
    per-label error; and its predictions right and made."""
    logits = model(**_decoded(task, model, x, y)).logits
    if task == "multi-label":
        right = ((logits > 0) == (y > 0.5)).double().sum(dim=1)
        made = torch.full_like(right, y.shape[1])
    else:
        valid = y != -100
        right = ((logits.argmax(-1) == y) & valid).double().sum(dim=1)
        made = valid.double().sum(dim=1)
    return right, made


def test_traces_eigenvalues_density_noise_certificate_accuracy_and_notes(saved):
    task, model, params, _, layers, _, (x, y), hessians = saved
    sigma = 1e-3
    extra = ["--trace", "--trace-probes", "200", "--eigen", "2", "--density"]
    extra += ["--noise-sigma", str(sigma)]
    extra += ["--noise-draws", "500"] + ([] if task == "regression" else ["--certificate"])
    result = run(saved, "everything", *extra)
    H = dense_mean_hessian(model, params, layers, x, y, OWN_LOSS)
    blocks = diagonal_blocks(H, params, layers)
    methods = set()
    for entry in result["layers"]:
        layer, trace = entry["name"], entry["trace"]
        exact = float(torch.trace(blocks[layer]))
        assert abs(trace["mean"] - exact) <= 4 * trace["stderr"] + 1e-9 * abs(exact)
        positive = torch.linalg.eigvalsh(hessians[layer]).clamp(min=0).sum(dim=1)
        methods.add(trace["positive_method"])
        assert trace["positive_max"] == pytest.approx(float(positive.max()), rel=1e-6)
        top = torch.linalg.eigvalsh(blocks[layer]).flip(0)[:2]
        for got, residual, want in zip(
            entry["top_eigenvalues"], entry["top_eigenvalue_residuals"], top.tolist(), strict=True
        ):
            assert abs(got - want) <= residual + 1e-9 * abs(want)
    whole = torch.linalg.eigvalsh(H).flip(0)[:2].tolist()
    assert result["top_eigenvalues_all_layers"]["values"] == pytest.approx(whole, rel=1e-6)
    spectrum = json.loads((saved[5] / "everything" / "spectrum.json").read_text())
    assert max(max(nodes) for nodes in spectrum["nodes"]) <= whole[0] * (1 + 1e-6)
    # the classifier heads are linear in their weights: Tr[H⁺] = Tr[G], from curvature_factors
    assert "exact-ggn" in methods or task == "seq2seq-lm"
    row = result["noise_stability"][0]
    predicted = 0.5 * sigma**2 * float(torch.trace(H))
    assert abs(row["mean"] - predicted) <= 4 * row["stderr"] + 1e-2 * abs(predicted)
    losses = own_losses(model, x, y)
    assert result["loss"]["train"] == pytest.approx(float(losses.mean()), rel=1e-9)
    assert result["loss"]["max"] == pytest.approx(float(losses.max()), rel=1e-9)
    assert result["bounds"]["C"] == result["loss"]["max"]
    unbounded = [note for note in result["notes"] if "unbounded" in note]
    accuracy = result["accuracy"]
    if task == "regression":
        assert accuracy["train"] is None and accuracy["eval"] is None
        assert result["generalization_gap"]["accuracy"] is None
        assert len(unbounded) == 1 and result["bounds"]["pac_bayes_certificate"] is None
        return
    assert not unbounded
    with torch.no_grad():
        right, made = _errors(task, model, x, y)
    assert accuracy["train"] == pytest.approx(float(right.sum() / made.sum()), rel=1e-12)
    assert ("train_exact_match" in accuracy) == (task == "multi-label")
    if task == "multi-label":
        exact = float((right == made).double().mean())
        assert accuracy["train_exact_match"] == pytest.approx(exact, rel=1e-12)
    certificate = result["bounds"]["pac_bayes_certificate"]
    assert certificate["bounded_loss"] == BOUNDED_LOSS[task]
    errors = float(((made - right) / made).mean())
    assert certificate["deterministic_error"] == pytest.approx(errors, rel=1e-12)
    assert 0.0 <= certificate["empirical_error"] <= certificate["bound"] <= 1.0


# --- how the task is chosen ---------------------------------------------------------------------


def _module(class_name, **config):
    """A module of class ``class_name`` with a config holding ``config`` (num_labels 2 unless
    given, as a Hugging Face config's default)."""
    from types import SimpleNamespace

    module = type(class_name, (torch.nn.Module,), {})()
    module.config = SimpleNamespace(**{"num_labels": 2, "problem_type": None, **config})
    return module


@pytest.mark.parametrize(
    "class_name, config, task, source",
    [
        (
            "BertForSequenceClassification",
            {"problem_type": "regression"},
            "regression",
            "config.problem_type",
        ),
        (
            "BertForSequenceClassification",
            {"problem_type": "single_label_classification"},
            "classification",
            "config.problem_type",
        ),
        (
            "BertForSequenceClassification",
            {"problem_type": "multi_label_classification", "num_labels": 1},
            "multi-label",
            "config.problem_type",
        ),
        ("BertForSequenceClassification", {"num_labels": 1}, "regression", "config.num_labels"),
        ("BertForTokenClassification", {}, "token-classification", "model class"),
        ("T5ForConditionalGeneration", {"is_encoder_decoder": True}, "seq2seq-lm", "model class"),
        (
            "LlavaForConditionalGeneration",
            {"is_encoder_decoder": False},
            "causal-lm",
            "model class",
        ),
        ("LlamaForCausalLM", {}, "causal-lm", "model class"),
        ("GPT2LMHeadModel", {}, "causal-lm", "model class"),
        ("BertForSequenceClassification", {}, "classification", "default"),
    ],
)
def test_the_task_of_a_hugging_face_model(class_name, config, task, source):
    module = _module(class_name, **config)
    chosen = choose_task(None, module, hugging_face=True)
    assert (chosen.task, chosen.source) == (task, source)
    assert choose_task("regression", module, hugging_face=True).source == "given"
    other = choose_task(None, module, hugging_face=False)  # --model other than hf
    assert (other.task, other.source) == ("classification", None)


def test_an_unknown_problem_type_is_one_line():
    with pytest.raises(InputError, match="problem_type 'ranking'.*pass --task"):
        choose_task(None, _module("BertModel", problem_type="ranking"), hugging_face=True)


# --- labels of each task from .pt files and datasets directories --------------------------------


def _dataset(path, **columns):
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(str(path))
    return str(path)


def test_labels_of_each_task_from_datasets_directories(tmp_path):
    ids = [[5, 6, 7], [8, 9], [4, 3, 2, 7]]
    read = {
        "token-classification": _dataset(
            tmp_path / "tok", input_ids=ids, labels=[[-100, 1, 2], [0, -100], [2, 2, 1, 0]]
        ),
        "regression": _dataset(tmp_path / "reg", input_ids=ids, label=[0.5, -1.0, 2.0]),
        "multi-label": _dataset(
            tmp_path / "ml", input_ids=ids, labels=[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
        ),
        "seq2seq-lm": _dataset(tmp_path / "s2s", input_ids=ids, labels=[[4, 5], [6], [7, 8, 9, 1]]),
    }
    data = {task: load_data(spec, task=task, pad_token_id=0) for task, spec in read.items()}
    assert data["token-classification"].y.tolist() == [
        [-100, 1, 2, -100],
        [0, -100, -100, -100],
        [2, 2, 1, 0],
    ]
    assert data["token-classification"].x["attention_mask"].tolist()[1] == [1, 1, 0, 0]
    assert data["regression"].y.dtype == torch.float32
    assert data["regression"].y.tolist() == [[0.5], [-1.0], [2.0]]
    assert data["multi-label"].y.shape == (3, 2)
    assert data["seq2seq-lm"].y.tolist()[1] == [6, -100, -100, -100]


@pytest.mark.parametrize(
    "task, y, needles",
    [
        (
            "classification",
            torch.zeros(3, 4, dtype=torch.long),
            ["1-D tensor of class labels (N,)", "(3, 4)", "--task token-classification"],
        ),
        (
            "token-classification",
            torch.zeros(3, dtype=torch.long),
            ["shaped like input_ids (3, 4)", "got (3,)"],
        ),
        ("token-classification", torch.full((3, 4), -2), ["ids ≥ 0 or -100"]),
        ("regression", torch.zeros(3, 4, 2), ["(N,), (N, 1) or (N, L) numbers", "(3, 4, 2)"]),
        ("multi-label", torch.zeros(3), ["(N, L) of 0/1", "(3,)"]),
        ("multi-label", torch.full((3, 2), 2.0), ["labels 0 or 1"]),
        ("seq2seq-lm", torch.zeros(3, 2), ["integer labels y (N, T_dec)"]),
    ],
)
def test_wrong_labels_are_one_line(tmp_path, task, y, needles):
    x = {"input_ids": torch.ones(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4)}
    torch.save({"x": x, "y": y}, tmp_path / "bad.pt")
    with pytest.raises(InputError) as err:
        load_data(str(tmp_path / "bad.pt"), task=task, label="--eval-data")
    message = str(err.value)
    assert "\n" not in message and "--eval-data" in message
    for needle in needles:
        assert needle in message


# --- what does not apply exits 2 with one line --------------------------------------------------


@pytest.fixture(scope="module")
def regressor(tmp_path_factory):
    """The one-output BERT regressor saved as tuned/ and base/, with 10 examples."""
    tmp = tmp_path_factory.mktemp("regressor")
    model, _ = tiny_task_hf("bert-regression")
    model.float().save_pretrained(tmp / "tuned")
    model.save_pretrained(tmp / "base")
    x, y = _batch("bert-regression", model, (0, 1))
    torch.save({"x": x, "y": y.float()}, tmp / "train.pt")
    token = torch.zeros(x["input_ids"].shape, dtype=torch.long)
    torch.save({"x": x, "y": token}, tmp / "tokens.pt")
    return tmp


def _refused(capsys, tmp, *extra, data="train.pt"):
    argv = ["measure", str(tmp / "tuned"), "--reference", str(tmp / "base"), "--quiet"]
    argv += ["--data", str(tmp / data), "--out", str(tmp / "out"), "--samples", "2", *extra]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "warn" not in line.lower()]
    assert len(lines) == 1 and not (tmp / "out" / "measurement.json").exists()
    return lines[0]


def test_what_does_not_apply_is_refused_with_one_line(regressor, capsys):
    line = _refused(capsys, regressor, "--certificate")  # the task chosen: regression
    assert "a regression predicts no classes" in line
    assert "a regression predicts no classes" in _refused(
        capsys, regressor, "--certificate", "--task", "regression"
    )
    line = _refused(capsys, regressor, data="tokens.pt")
    assert "for the model's L = 1 outputs, got (10, 6)" in line
    line = _refused(capsys, regressor, "--task", "classification", data="tokens.pt")
    assert "--task token-classification" in line
    line = _refused(capsys, regressor, "--task", "token-classification")
    assert "shaped like input_ids (10, 6)" in line
    (regressor / "tuned" / "hessfine.json").write_text(
        json.dumps({"label_noise": {"kind": "symmetric", "rate": 0.2}, "labels": "labels.csv"})
    )
    try:
        line = _refused(capsys, regressor)
    finally:
        (regressor / "tuned" / "hessfine.json").unlink()
    assert "records label noise" in line and "classification only" in line
