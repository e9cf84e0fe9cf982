"""`hessfine measure` values against the dense float64 oracle on the smooth tiny networks.

The GELU MLP and the attention block are not piecewise linear, so ``auto``, ``block``,
``positive`` and ``ggn`` differ there (on the ReLU CNN of test_measure.py they coincide). Every
measured number is compared with :mod:`tests.oracles`: exact quantities to 1e-6, stochastic ones
within 4.5 of their reported standard errors. The Hessian examples are the first ones of the file
(``--sample-order file``), so that the oracle sees the same examples.
"""

import functools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from hessfine.analysis.cli import main
from hessfine.analysis.data import load_data
from safetensors.torch import save_file
from torch import nn

from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_mean_hessian,
    diagonal_blocks,
    perturbed_reference,
    positive_part,
    tiny_data,
)
from tests.oracles import quadratic_forms as dense_forms

SPECS = {"mlp_gelu": "tests.oracles:tiny_mlp", "attention": "tests.oracles:tiny_attention"}
N_TRAIN, N_EVAL, SAMPLES = 12, 8, 6


@functools.cache
def blocks_of(network, name, split="train", count=SAMPLES):
    """Per-example dense H_i(x) of the first ``count`` examples of a split (cached)."""
    x, y = data(network, split)
    module = TINY_NETWORKS[network]()
    params = {k: p.detach() for k, p in module.named_parameters()}
    return dense_block_hessians(module, params, name, x[:count], y[:count])


def save_state(state, path):
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))


@pytest.fixture(scope="module", params=list(SPECS))
def pair(request, tmp_path_factory):
    """(network, module, params, reference, directory with ft/ref checkpoints and data)."""
    network = request.param
    tmp = tmp_path_factory.mktemp(network)
    module = TINY_NETWORKS[network]()
    params = {k: p.detach() for k, p in module.named_parameters()}
    reference = perturbed_reference(params, TINY_LAYERS[network])
    save_state(module.state_dict(), tmp / "ft.safetensors")
    save_state({**module.state_dict(), **reference}, tmp / "ref.safetensors")
    x, y = tiny_data(network, N_TRAIN)
    torch.save({"x": x, "y": y}, tmp / "train.pt")
    xe, ye = tiny_data(network, N_EVAL, seed=5)
    torch.save({"x": xe, "y": ye}, tmp / "eval.pt")
    return network, module, params, reference, tmp


def run(pair, name, *extra):
    network, _, _, _, tmp = pair
    out = tmp / name
    argv = ["measure", str(tmp / "ft.safetensors"), "--reference", str(tmp / "ref.safetensors")]
    argv += ["--model", SPECS[network], "--data", str(tmp / "train.pt")]
    argv += ["--eval-data", str(tmp / "eval.pt"), "--out", str(out), "--dtype", "float64"]
    argv += ["--quiet", "--batch-size", "4", "--samples", str(SAMPLES), "--sample-order", "file"]
    argv += extra
    assert main(argv) == 0
    return json.loads((out / "measurement.json").read_text())


def data(network, split="train"):
    return tiny_data(network, N_TRAIN) if split == "train" else tiny_data(network, N_EVAL, seed=5)


def reference_code_forms(module, params, directions, x, y, batch_size):
    """Per layer max over batches of v_iᵀ(H̄_b v)_i, v stacked over all layers."""
    layers = list(directions)
    v = torch.cat([directions[name].reshape(-1) for name in layers])
    best = dict.fromkeys(layers, -math.inf)
    for s in range(0, x.shape[0], batch_size):
        Hv = (
            dense_mean_hessian(module, params, layers, x[s : s + batch_size], y[s : s + batch_size])
            @ v
        )
        offset = 0
        for name in layers:
            d = params[name].numel()
            best[name] = max(best[name], float(v[offset : offset + d] @ Hv[offset : offset + d]))
            offset += d
    return best


@pytest.mark.parametrize("estimator", ["auto", "block", "positive", "ggn", "reference-code"])
def test_every_estimator_matches_the_oracle(pair, estimator):
    network, module, params, reference, _ = pair
    # --positive-rtol 0: every example runs all (≥ d) Lanczos steps, so the positive part is exact
    result = run(
        pair,
        f"est-{estimator}",
        "--estimator",
        estimator,
        "--lanczos-steps",
        "128",
        "--positive-rtol",
        "0",
    )
    x, y = data(network)
    x, y = x[:SAMPLES], y[:SAMPLES]
    directions = {name: params[name] - reference[name] for name in TINY_LAYERS[network]}
    if estimator == "reference-code":
        expected = reference_code_forms(module, params, directions, x, y, 4)
    methods = set()
    for layer in result["layers"]:
        name, form = layer["name"], layer["quadratic_form"]
        methods.add(layer["method"])
        if estimator == "reference-code":
            assert form["max"] == pytest.approx(expected[name], rel=1e-6)
            continue
        if estimator == "ggn":
            M = dense_ggn_blocks(module, params, name, x, y)
        else:
            M = blocks_of(network, name)
            M = M if estimator == "block" else positive_part(M)
        dense = dense_forms(M, directions[name])
        assert form["max"] == pytest.approx(float(dense.max()), rel=1e-6, abs=1e-12)
        assert form["mean"] == pytest.approx(float(dense.mean()), rel=1e-6, abs=1e-12)
        assert form["argmax"] == int(dense.argmax())
    if estimator == "auto":  # smooth layers go to Lanczos, the last (linear in logits) is certified
        assert methods == {"lanczos", "ggn-certified"}


def test_traces_eigenvalues_density_noise_certificate_and_bounds(pair):
    network, module, params, reference, tmp = pair
    layers = TINY_LAYERS[network]
    sigma, epsilon, loss_bound, n_train = 1e-3, 0.1, 5.0, 1000
    result = run(
        pair,
        "everything",
        "--trace",
        "--trace-probes",
        "200",
        "--eigen",
        "2",
        "--density",
        "--noise-sigma",
        str(sigma),
        "--noise-draws",
        "2000",
        "--certificate",
        "--epsilon",
        str(epsilon),
        "--loss-bound",
        str(loss_bound),
        "--n-train",
        str(n_train),
    )
    x, y = data(network)
    xs, ys = x[:SAMPLES], y[:SAMPLES]
    H = dense_mean_hessian(module, params, layers, xs, ys)
    blocks = diagonal_blocks(H, params, layers)
    by_name = {layer["name"]: layer for layer in result["layers"]}
    for name in layers:
        layer = by_name[name]
        trace = layer["trace"]
        exact = float(torch.trace(blocks[name]))
        assert abs(trace["mean"] - exact) <= 4.5 * trace["stderr"] + 1e-9 * abs(exact)
        per_example = torch.linalg.eigvalsh(blocks_of(network, name))
        positive = per_example.clamp(min=0).sum(dim=1)
        # SLQ at the default 32 Lanczos steps: within 4.5 standard errors plus the quadrature
        # tolerance stated in test_lanczos.py (5e-2 at K = 32 < d); exact on certified layers.
        slack = 5e-2 if layer["trace"]["positive_method"] == "slq" else 1e-9
        assert abs(trace["positive_max"] - float(positive.max())) <= 4.5 * trace[
            "positive_max_stderr"
        ] + slack * float(positive.max())
        top = torch.linalg.eigvalsh(blocks[name]).flip(0)[:2]
        for got, residual, want in zip(
            layer["top_eigenvalues"], layer["top_eigenvalue_residuals"], top.tolist(), strict=True
        ):
            assert abs(got - want) <= residual + 1e-9 * abs(want)
            assert got == pytest.approx(want, rel=1e-4)
    whole = result["top_eigenvalues_all_layers"]
    top = torch.linalg.eigvalsh(H).flip(0)[:2].tolist()
    assert whole["values"] == pytest.approx(top, rel=1e-4)
    # density: each run's quadrature mean Σ_j w_j θ_j is zᵀHz/‖z‖², unbiased for Tr(H)/D
    spectrum = json.loads((tmp / "everything" / "spectrum.json").read_text())
    nodes = torch.tensor(spectrum["nodes"], dtype=torch.float64)
    weights = torch.tensor(spectrum["weights"], dtype=torch.float64)
    D, runs = H.shape[0], nodes.shape[0]
    sd = math.sqrt(2 * (H.pow(2).sum() - H.diagonal().pow(2).sum())) / D / math.sqrt(runs)
    mean_eig = float((nodes * weights).sum(dim=1).mean())
    assert abs(mean_eig - float(torch.trace(H)) / D) <= 4.5 * sd
    assert weights.sum(dim=1).tolist() == pytest.approx([1.0] * runs, abs=1e-9)
    # noise stability at small σ: I(σ) ≈ (σ²/2)·Σ_i Tr[H̄_ii] (antithetic pairs: no odd terms)
    row = result["noise_stability"][0]
    predicted = 0.5 * sigma**2 * sum(float(torch.trace(b)) for b in blocks.values())
    assert row["sigma"] == sigma
    assert abs(row["mean"] - predicted) <= 4.5 * row["stderr"] + 1e-2 * abs(predicted)
    assert row["stderr"] < 0.5 * abs(predicted)  # enough draws for the check to bite
    traced = 0.5 * sigma**2 * sum(by_name[n]["trace"]["mean"] for n in layers)
    assert row["trace_prediction"] == pytest.approx(traced, rel=1e-9)
    # bounds: C, n and ε from the options; L̂ over the whole training set
    train_loss = float(F.cross_entropy(module(x), y))
    bounds = result["bounds"]
    assert result["loss"]["train"] == pytest.approx(train_loss, rel=1e-9)
    assert (bounds["C"], bounds["n"], bounds["epsilon"]) == (loss_bound, n_train, epsilon)
    hdm = sum(
        math.sqrt(loss_bound * max(by_name[n]["quadratic_form"]["max"], 0.0) / n_train)
        for n in layers
    )
    assert bounds["hessian_distance_measure"] == pytest.approx(hdm, rel=1e-9)
    assert bounds["theorem_2_1"] == pytest.approx((1 + epsilon) * (train_loss + hdm), rel=1e-9)
    trace_term = sum(
        by_name[n]["distance"]
        * math.sqrt(loss_bound * max(by_name[n]["trace"]["positive_max"], 0.0) / n_train)
        for n in layers
    )
    assert bounds["trace_corollary"] == pytest.approx(
        (1 + epsilon) * (train_loss + trace_term), rel=1e-9
    )
    # certificate: on the whole training set (not --n-train), KL from the distances and σ_i
    cert = bounds["pac_bayes_certificate"]
    assert cert["n"] == N_TRAIN and 0.0 <= cert["empirical_error"] <= cert["bound"] <= 1.0
    errors = float((module(x).argmax(dim=1) != y).double().mean())
    assert cert["deterministic_error"] == pytest.approx(errors)
    kl = 0.5 * sum(by_name[n]["distance"] ** 2 / cert["sigmas"][n] ** 2 for n in layers)
    assert cert["kl"] == pytest.approx(kl, rel=1e-9)


def test_relative_noise_matches_its_trace_prediction(pair):
    network, module, params, _, _ = pair
    layers = TINY_LAYERS[network]
    sigma = 1e-2
    result = run(
        pair,
        "relative",
        "--noise-sigma",
        str(sigma),
        "--noise-relative",
        "--trace-probes",
        "2000",
        "--noise-draws",
        "2000",
    )
    x, y = data(network)
    H = dense_mean_hessian(module, params, layers, x[:SAMPLES], y[:SAMPLES])
    w = torch.cat([params[name].reshape(-1).abs() for name in layers])
    A = w[:, None] * H * w[None, :]  # D H D, D = diag|w|: the relative-noise covariance / σ²
    predicted = 0.5 * sigma**2 * float(A.diagonal().sum())
    row = result["noise_stability"][0]
    assert abs(row["mean"] - predicted) <= 4.5 * row["stderr"] + 2e-2 * abs(predicted)
    assert row["stderr"] < 0.5 * abs(predicted)  # enough draws for the check to bite
    # the prediction's Hutchinson estimate of Tr(DHD) from 2000 joint probes, sd from A itself
    sd = math.sqrt(2 * float(A.pow(2).sum() - A.diagonal().pow(2).sum()) / 2000)
    assert abs(row["trace_prediction"] - predicted) <= 4.5 * 0.5 * sigma**2 * sd


def test_eval_split_hutchplusplus_and_layer_globs(pair):
    network, module, params, reference, _ = pair
    first = TINY_LAYERS[network][0]
    result = run(
        pair,
        "eval-split",
        "--hessian-split",
        "eval",
        "--estimator",
        "block",
        "--layers",
        f"{first[:-3]}*",  # a glob matching the first layer only
        "--trace",
        "--trace-method",
        "hutch++",
        "--trace-probes",
        "60",
    )
    assert [layer["name"] for layer in result["layers"]] == [first]
    assert result["data"]["n_hessian_samples"] == SAMPLES
    x, y = data(network, "eval")
    x, y = x[:SAMPLES], y[:SAMPLES]
    dense = dense_forms(blocks_of(network, first, "eval"), params[first] - reference[first])
    form = result["layers"][0]["quadratic_form"]
    assert form["max"] == pytest.approx(float(dense.max()), rel=1e-6)
    trace = result["layers"][0]["trace"]
    assert trace["method"] == "hutch++"
    exact = float(torch.trace(dense_mean_hessian(module, params, [first], x, y)))
    assert abs(trace["mean"] - exact) <= 4.5 * trace["stderr"] + 1e-9 * abs(exact)


def test_new_head_reference_zero_or_file(pair):
    network, module, params, reference, tmp = pair
    *_, shared, head = TINY_LAYERS[network]
    bias = head.replace("weight", "bias")
    # a reference whose head has another number of classes: the head is new
    other = {**module.state_dict(), **reference}
    other[head] = torch.zeros(7, params[head].shape[1], dtype=torch.float64)
    other[bias] = torch.zeros(7, dtype=torch.float64)
    save_state(other, tmp / "ref-other-head.safetensors")
    start = 0.1 * torch.randn(params[head].shape, generator=torch.Generator().manual_seed(9))
    save_state({head: start.double()}, tmp / "head.safetensors")
    H = blocks_of(network, head)
    for spec, w_s in (
        ("zero", torch.zeros_like(start).double()),
        (str(tmp / "head.safetensors"), start.double()),
    ):
        argv = [
            "measure",
            str(tmp / "ft.safetensors"),
            "--reference",
            str(tmp / "ref-other-head.safetensors"),
        ]
        argv += ["--model", SPECS[network], "--data", str(tmp / "train.pt"), "--quiet"]
        argv += [
            "--out",
            str(tmp / f"head-{len(spec)}"),
            "--dtype",
            "float64",
            "--samples",
            str(SAMPLES),
            "--sample-order",
            "file",
        ]
        argv += ["--estimator", "block", "--layers", shared, head, "--head-reference", spec]
        assert main(argv) == 0
        result = json.loads((tmp / f"head-{len(spec)}" / "measurement.json").read_text())
        first, layer = result["layers"]
        assert first["name"] == shared and first["reference_source"] == "reference"
        v = params[head] - w_s
        assert layer["reference_source"] == ("head-zero" if spec == "zero" else "head-file")
        assert layer["distance"] == pytest.approx(float(v.norm()), rel=1e-9)
        assert layer["quadratic_form"]["max"] == pytest.approx(
            float(dense_forms(H, v).max()), rel=1e-6
        )


def test_head_reference_from_the_run_manifest(pair):
    # Without --head-reference, the manifest's head_reference (relative to the run) is used.
    network, module, params, reference, tmp = pair
    *_, shared, head = TINY_LAYERS[network]
    other = {**module.state_dict(), **reference}
    other[head] = torch.zeros(7, params[head].shape[1], dtype=torch.float64)
    other[head.replace("weight", "bias")] = torch.zeros(7, dtype=torch.float64)
    run_dir = tmp / "manifest-run"
    run_dir.mkdir()
    save_state(other, run_dir / "pretrained.safetensors")
    start = 0.1 * torch.randn(params[head].shape, generator=torch.Generator().manual_seed(3))
    save_state({head: start.double()}, run_dir / "head-init.safetensors")
    shutil.copy(tmp / "ft.safetensors", run_dir / "epoch_001.safetensors")
    manifest = {
        "model": SPECS[network],
        "reference": "pretrained.safetensors",
        "data": {"train": str(tmp / "train.pt")},
        "head_reference": "head-init.safetensors",
    }
    (run_dir / "hessfine.json").write_text(json.dumps(manifest))
    argv = ["measure", str(run_dir / "epoch_001.safetensors"), "--out", str(tmp / "m-head")]
    argv += ["--dtype", "float64", "--samples", str(SAMPLES), "--sample-order", "file"]
    argv += ["--quiet", "--estimator", "block", "--layers", shared, head]
    assert main(argv) == 0
    layer = json.loads((tmp / "m-head" / "measurement.json").read_text())["layers"][1]
    assert layer["name"] == head and layer["reference_source"] == "head-file"
    v = params[head] - start.double()
    assert layer["distance"] == pytest.approx(float(v.norm()), rel=1e-9)
    assert main([*argv[:3], str(tmp / "m-zero"), *argv[4:], "--head-reference", "zero"]) == 0
    zero = json.loads((tmp / "m-zero" / "measurement.json").read_text())["layers"][1]
    assert zero["reference_source"] == "head-zero"


class TinyImageNet(nn.Module):
    """3×8×8 images → Linear → GELU → Linear(3); fails on any other image size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))


def tiny_image_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyImageNet().double().eval()


def test_image_folder_at_a_chosen_image_size(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for label in ("a", "b", "c"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    module = tiny_image_net()
    params = {k: p.detach() for k, p in module.named_parameters()}
    layers = ["fc1.weight", "fc2.weight"]
    reference = perturbed_reference(params, layers, scale=0.05)
    save_state(module.state_dict(), tmp_path / "ft.safetensors")
    save_state({**module.state_dict(), **reference}, tmp_path / "ref.safetensors")
    argv = [
        "measure",
        str(tmp_path / "ft.safetensors"),
        "--reference",
        str(tmp_path / "ref.safetensors"),
    ]
    argv += [
        "--model",
        "tests.test_measure_values:tiny_image_net",
        "--data",
        str(tmp_path / "images"),
    ]
    argv += ["--out", str(tmp_path / "out"), "--dtype", "float64", "--quiet", "--image-size", "8"]
    argv += ["--estimator", "block", "--samples", "all"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "measurement.json").read_text())
    assert result["data"]["n_train"] == 6 and result["settings"]["image_size"] == 8
    loaded = load_data(str(tmp_path / "images"), image_size=8)
    ((x, y),) = list(loaded.batches(6, limit=None, dtype=torch.float64, device="cpu"))
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    for layer in result["layers"]:
        H = dense_block_hessians(module, params, layer["name"], x, y)
        v = params[layer["name"]] - reference[layer["name"]]
        assert layer["quadratic_form"]["max"] == pytest.approx(
            float(dense_forms(H, v).max()), rel=1e-6
        )


def test_a_lanczos_cap_below_convergence_is_reported(pair, capsys):
    # two Lanczos steps cannot reach --positive-rtol on the smooth layers: each says how far its
    # value may be off, a note and a line on stderr name the layers and the option to raise
    result = run(pair, "capped", "--estimator", "auto", "--lanczos-steps", "2")
    lanczos = [layer for layer in result["layers"] if layer["method"] == "lanczos"]
    assert lanczos
    for layer in result["layers"]:
        form = layer["quadratic_form"]
        if layer["method"] != "lanczos":
            assert form["max_error_estimate"] == 0
            continue
        d = layer["diagnostics"]
        assert d["max_minus_error"] <= form["max"] <= d["max_plus_error"]
        spread = max(d["max_plus_error"] - form["max"], form["max"] - d["max_minus_error"])
        assert form["max_error_estimate"] == pytest.approx(spread)
    late = [
        layer["name"]
        for layer in lanczos
        if layer["quadratic_form"]["max_error_estimate"] > 1e-2 * layer["quadratic_form"]["max"]
    ]  # the note's criterion: above --positive-rtol (default 1e-2) of the value
    assert late
    notes = [note for note in result["notes"] if "did not converge" in note]
    assert len(notes) == 1 and "--lanczos-steps 4" in notes[0]
    assert all(name in notes[0] for name in late)
    assert "hessfine: warning: " + notes[0] in capsys.readouterr().err


def test_the_mean_interval_is_noted_and_converged_with_positive_target_mean(pair):
    # issue 18 item 1 through the command line: the default (target max) leaves pruned examples
    # at their lower bounds, and a note names each layer whose mean interval is wider than
    # 2 × --positive-rtol with the option that converges it; --positive-target mean converges
    # every interval to that width, and the exact mean (dense oracle) lies in each interval
    network, module, params, reference, tmp = pair
    x, y = (t[:SAMPLES] for t in data(network))
    widths = {}
    for target in ("max", "mean"):
        result = run(pair, f"target-{target}", "--positive-target", target)
        assert result["settings"]["positive_target"] == target
        wide = []
        for layer in result["layers"]:
            form = layer["quadratic_form"]
            if layer["method"] != "lanczos":
                assert form["mean_lower"] == form["mean"] == form["mean_upper"]
                continue
            H = positive_part(dense_block_hessians(module, params, layer["name"], x, y))
            exact = float(dense_forms(H, params[layer["name"]] - reference[layer["name"]]).mean())
            assert form["mean_lower"] <= exact * (1 + 1e-9) <= form["mean_upper"] * (1 + 2e-9)
            width = (form["mean_upper"] - form["mean_lower"]) / form["mean_lower"]
            widths[target, layer["name"]] = width
            if width > 2e-2:
                wide.append(layer["name"])
            if target == "mean":
                assert abs(form["mean"] - exact) <= 1e-2 * exact
        notes = [n for n in result["notes"] if "quadratic_form.mean of" in n]
        assert bool(wide) is (target == "max" and network != "cnn")
        if wide:
            assert len(notes) == 1 and all(name in notes[0] for name in wide)
            assert ("--positive-target mean" in notes[0]) is (target == "max")
        else:
            assert notes == []
    assert all(widths["mean", name] <= 2e-2 for (target, name) in widths if target == "mean")
