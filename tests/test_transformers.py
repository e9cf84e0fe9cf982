"""Hugging Face models with padded batches under every estimator, against dense float64 oracles.

The oracles run each example alone through transformers' own mask code (default attention
implementation); the estimators run the padded batch with the masks expanded by
:class:`~hessfine.bounds.functional.FunctionalModel`, vmapped over examples.
"""

import json

import pytest
import torch
from hessfine.analysis.cli import main
from hessfine.bounds.estimators.noise_stability import noise_stability
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.estimators.spectra import spectral_density, top_eigenvalues
from hessfine.bounds.estimators.traces import layer_traces, positive_trace_max
from hessfine.bounds.functional import CausalLMLoss, FunctionalModel, Seq2SeqLMLoss
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces
from hessfine.bounds.pac_bayes import pac_bayes_certificate

from tests.oracles import (
    OWN_LOSS,
    assert_matches,
    causal_lm_loss,
    cross_entropy,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_mean_hessian,
    perturbed_reference,
    positive_part,
    task_curvature,
    tiny_hf,
    tiny_task_batch,
    tiny_task_hf,
    tiny_text_inputs,
)
from tests.oracles import quadratic_forms as dense_forms

MODELS = ["bert", "roberta", "distilbert", "gpt2", "vit", "gpt2-lm"]


def setup(name):
    module, x, y, layers = tiny_hf(name)
    lm = name == "gpt2-lm"
    fm, params = FunctionalModel.from_module(module, loss=CausalLMLoss() if lm else None)
    reference = perturbed_reference(params, layers)
    v = {layer: params[layer] - reference[layer] for layer in layers}
    return module, fm, params, v, x, y, causal_lm_loss if lm else cross_entropy


def batches(x, y):
    """Two batches (3 + 2 examples), so that the running reductions cross a boundary."""
    if isinstance(x, dict):
        return [
            ({k: t[:3] for k, t in x.items()}, y[:3]),
            ({k: t[3:] for k, t in x.items()}, y[3:]),
        ]
    return [(x[:3], y[:3]), (x[3:], y[3:])]


@pytest.mark.parametrize("name", MODELS)
def test_every_estimator_matches_dense_oracle_with_padding(name):
    module, fm, params, v, x, y, loss = setup(name)
    hessians = {layer: dense_block_hessians(module, params, layer, x, y, loss) for layer in v}
    ggn = {layer: dense_ggn_blocks(module, params, layer, x, y, loss) for layer in v}
    steps = max(t.numel() for t in v.values())
    for estimator in ("block", "ggn", "positive", "auto"):
        # Lanczos is the cost: positive (auto's route on smooth layers) on one layer, and the
        # Lanczos estimators on one batch (block and ggn cross a batch boundary)
        lanczos = estimator in ("positive", "auto")
        chosen = dict(list(v.items())[:1]) if estimator == "positive" else v
        data = [(x, y)] if lanczos else batches(x, y)
        forms = quadratic_forms(
            fm, params, chosen, data, estimator=estimator, lanczos_steps=steps, positive_rtol=0
        )
        for layer, direction in chosen.items():
            blocks = {"block": hessians[layer], "ggn": ggn[layer]}.get(
                estimator, positive_part(hessians[layer])
            )
            assert_matches(forms[layer], dense_forms(blocks, direction))
    reference = quadratic_forms(fm, params, v, batches(x, y), estimator="reference-code")
    for start, count in ((0, 4), (4, 1)):
        part = (
            {k: t[start : start + count] for k, t in x.items()}
            if isinstance(x, dict)
            else x[start : start + count]
        )
        H = dense_mean_hessian(module, params, list(v), part, y[start : start + count], loss)
        flat = torch.cat([d.reshape(-1) for d in v.values()])
        hv = H @ flat
        offset = 0
        for layer, direction in v.items():
            size = direction.numel()
            value = float(hv[offset : offset + size] @ flat[offset : offset + size])
            offset += size
            if start == 0:
                assert reference[layer].max >= value - 1e-9 * abs(value)
    assert all(form.count == 2 for form in reference.values())


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt2-lm"])
def test_traces_eigenvalues_and_noise_run_and_match_where_exact(name):
    module, fm, params, v, x, y, loss = setup(name)
    layers = list(v)
    head = layers[-1]
    exact = gauss_newton_traces(fm, params, [head], x, y)[head]
    G = dense_ggn_blocks(module, params, head, x, y, loss)
    torch.testing.assert_close(exact, torch.diagonal(G, dim1=1, dim2=2).sum(-1))
    mean_hessian = dense_mean_hessian(module, params, [layers[0]], x, y, loss)
    traces = layer_traces(fm, params, layers, batches(x, y), probes=64)
    truth = float(torch.trace(mean_hessian))
    assert abs(traces[layers[0]].mean - truth) <= 5 * traces[layers[0]].stderr + 1e-9
    positive = positive_trace_max(
        fm,
        params,
        layers,
        batches(x, y),
        certified={head: name != "gpt2-lm"},
        probes=2,
        lanczos_steps=4,
    )
    assert all(p.max >= 0 for p in positive.values())
    dim = params[layers[0]].numel()
    eigen = top_eigenvalues(fm, params, [layers[0]], batches(x, y), k=2, steps=dim)
    expected = torch.linalg.eigvalsh(mean_hessian).flip(0)[:2]
    assert eigen[layers[0]].values == pytest.approx(expected.tolist(), rel=1e-6, abs=1e-10)
    density = spectral_density(fm, params, [layers[0]], batches(x, y), runs=1, steps=dim)
    assert max(density.nodes[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert sum(density.weights[0]) == pytest.approx(1.0, rel=1e-9)
    sigma = 1e-3
    noise = noise_stability(
        fm, params, [layers[0]], batches(x, y), sigma=sigma, draws=8, generator=torch.Generator()
    )
    predicted = sigma**2 / 2 * truth  # second order, antithetic draws: odd orders cancel
    assert abs(noise.mean - predicted) <= 5 * noise.stderr + 1e-3 * abs(predicted)


@pytest.mark.parametrize("name", ["distilbert", "gpt2", "vit", "gpt2-lm"])
def test_certificate_runs_on_padded_batches(name):
    """The certificate vmaps over groups of examples: masks must expand inside that vmap too.
    A language model's 0-1 error of a sequence is its token error over the label positions."""
    module, fm, params, v, x, y, _ = setup(name)
    twice = (
        {k: torch.cat([t, t]) for k, t in x.items()} if isinstance(x, dict) else torch.cat([x, x])
    )
    reference = {layer: params[layer] - v[layer] for layer in v}
    certificate = pac_bayes_certificate(
        fm,
        params,
        reference,
        list(v),
        [(twice, torch.cat([y, y]))],
        n=2 * len(y),
        curvature=dict.fromkeys(v, 1.0),
        draws=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert 0.0 <= certificate.empirical_error <= certificate.bound <= 1.0
    with torch.no_grad():
        logits = module(**x).logits if isinstance(x, dict) else module(x).logits
    if name == "gpt2-lm":
        valid = y[:, 1:] != -100
        wrong = (logits[:, :-1].argmax(-1) != y[:, 1:]) & valid
        errors = wrong.sum(dim=1) / valid.sum(dim=1)
    else:
        errors = (logits.argmax(-1) != y).double()
    assert certificate.deterministic_error == pytest.approx(float(errors.mean()), rel=1e-12)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_models_match_their_own_loss_with_padding(name):
    """Padded encoder inputs and labels, decoder inputs made from the labels: the losses and the
    block and Gauss–Newton forms equal those of each example run alone through the model with
    ``labels``. T5 computes its RMS norm's variance in float32 even in float64, so its
    derivatives agree to float32 precision only."""
    module, layers = tiny_task_hf(name)
    x, y = tiny_task_batch(name, module)
    fm, params = FunctionalModel.from_module(module, loss=Seq2SeqLMLoss())
    assert fm.mask_kind == "encoder-decoder"
    own = [
        module(
            **{k: v[n : n + 1] for k, v in x.items() if k != "decoder_input_ids"},
            labels=y[n : n + 1],
        ).loss
        for n in range(len(y))
    ]
    torch.testing.assert_close(fm.losses(params, x, y), torch.stack(own).detach())
    reference = perturbed_reference(params, layers)
    v = {layer: params[layer] - reference[layer] for layer in layers}
    rel = 1e-5 if name == "t5" else 1e-9
    for estimator in ("block", "ggn"):
        forms = quadratic_forms(fm, params, v, batches(x, y), estimator=estimator)
        for layer in layers:
            if estimator == "block":
                blocks = dense_block_hessians(module, params, layer, x, y, OWN_LOSS)
            else:
                curvature = lambda z, yn: task_curvature("seq2seq-lm", z, yn)  # noqa: E731
                blocks = dense_ggn_blocks(module, params, layer, x, y, curvature=curvature)
            values = dense_forms(blocks, v[layer])
            assert forms[layer].max == pytest.approx(float(values.max()), rel=rel)
            assert forms[layer].mean == pytest.approx(float(values.mean()), rel=rel)


def test_expanded_mask_leaves_the_logits_of_real_tokens_unchanged():
    module, x, _, _ = tiny_hf("gpt2-lm")
    fm, params = FunctionalModel.from_module(module)
    assert fm.mask_kind == "causal"
    ours = fm.logits(params, x)
    theirs = module(**x).logits
    real = x["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real])
    bert, xb, _, _ = tiny_hf("bert")
    fb, pb = FunctionalModel.from_module(bert)
    assert fb.mask_kind == "bidirectional"
    torch.testing.assert_close(fb.logits(pb, xb), bert(**xb).logits)
    bart, _ = tiny_task_hf("bart")
    xs, _ = tiny_task_batch("bart", bart)
    fs, ps = FunctionalModel.from_module(bart)
    assert fs.mask_kind == "encoder-decoder"
    torch.testing.assert_close(fs.logits(ps, xs), bart(**xs).logits)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_measure_command_line_on_a_saved_hf_model(tiny_bert, tmp_path, task):
    """As a user would: save_pretrained dirs, a .pt of padded ids, hessfine measure --model hf."""
    if task == "classification":
        _, directory, _ = tiny_bert
        base = directory
        first, second = tiny_text_inputs(50, 0), tiny_text_inputs(50, 0, seed=1)
        inputs = {k: torch.cat([first[k], second[k]]) for k in first}  # the certificate needs n ≥ 8
        labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 1])
        data = {"x": inputs, "y": labels}
        extra = ["--certificate"]
    else:
        module, _, _, _ = tiny_hf("gpt2-lm")
        base = tmp_path / "base"
        module.float().save_pretrained(base)
        first, second = tiny_text_inputs(20, 0), tiny_text_inputs(20, 0, seed=1)
        inputs = {k: torch.cat([first[k], second[k]]) for k in first}
        data = {"x": inputs}  # labels default to input_ids masked by attention_mask
        extra = ["--task", "causal-lm", "--trace", "--trace-probes", "2", "--lanczos-steps", "4"]
        extra += ["--certificate"]
    tuned = tmp_path / "tuned"
    torch.manual_seed(3)
    model = FunctionalModel.from_module(
        __import__("hessfine.analysis.model_specs", fromlist=["build_model"]).build_model(
            "hf", hf_directory=base
        )
    )[0].module
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tuned)
    torch.save(data, tmp_path / "train.pt")
    out = tmp_path / "out"
    code = main(
        [
            "measure",
            str(tuned),
            "--reference",
            str(base),
            "--model",
            "hf",
            "--data",
            str(tmp_path / "train.pt"),
            "--out",
            str(out),
            "--estimator",
            "block",
            "--samples",
            "5",
            "--noise-sigma",
            "1e-3",
            "--noise-draws",
            "4",
            "--quiet",
            *extra,
        ]
    )
    assert code == 0
    result = json.loads((out / "measurement.json").read_text())
    assert result["settings"]["task"] == task
    assert result["settings"]["attn_implementation"] == "sdpa"
    assert result["data"]["n_train"] == len(inputs["input_ids"])
    assert all(layer["quadratic_form"]["max"] > 0 for layer in result["layers"])
    assert 0.0 <= result["accuracy"]["train"] <= 1.0
    assert result["bounds"]["theorem_2_1"] is not None
    certificate = result["bounds"]["pac_bayes_certificate"]
    bounded = {
        "classification": "0-1 error",
        "causal-lm": "next-token error (mean over label positions)",
    }
    assert certificate["bounded_loss"] == bounded[task]
    assert certificate["n"] == len(inputs["input_ids"])  # n counts sequences
    assert certificate["empirical_error"] <= certificate["bound"] <= 1.0


def test_causal_lm_data_labels_default_and_checks(tmp_path):
    from hessfine.analysis.data import load_data
    from hessfine.analysis.errors import InputError

    x = tiny_text_inputs(20, 0)
    torch.save({"x": x}, tmp_path / "ids.pt")
    data = load_data(str(tmp_path / "ids.pt"), task="causal-lm")
    expected = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    assert torch.equal(data.y, expected)
    torch.save({"x": x, "y": torch.zeros(5, dtype=torch.long)}, tmp_path / "flat.pt")
    with pytest.raises(InputError, match="shaped like input_ids"):
        load_data(str(tmp_path / "flat.pt"), task="causal-lm")
    with pytest.raises(InputError, match="'y'"):
        load_data(str(tmp_path / "ids.pt"))  # classification still needs labels
