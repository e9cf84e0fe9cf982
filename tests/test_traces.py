"""Traces against dense float64 Hessians: unbiased, within standard errors, converging."""

import math
import warnings

import pytest
import torch
from hessfine.bounds.estimators import traces
from hessfine.bounds.estimators.traces import (
    layer_traces,
    positive_trace_max,
    relative_noise_traces,
)
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators import retained as retained_module
from scipy import stats

from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    DesignedHessians,
    dense_block_hessians,
    dense_mean_hessian,
    diagonal_blocks,
    positive_part,
    tiny_data,
)


def setup(network, n=8):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    x, y = tiny_data(network, n)
    return module, fm, params, TINY_LAYERS[network], x, y


def dense_block_traces(module, params, layers, x, y):
    out, offset = {}, 0
    H = dense_mean_hessian(module, params, layers, x, y)
    for name in layers:
        d = params[name].numel()
        out[name] = float(torch.trace(H[offset : offset + d, offset : offset + d]))
        offset += d
    return out


@pytest.mark.parametrize("network", ["mlp_gelu", "cnn", "attention"])
def test_hutchinson_within_four_standard_errors(network):
    module, fm, params, layers, x, y = setup(network)
    exact = dense_block_traces(module, params, layers, x, y)
    g = torch.Generator().manual_seed(3)
    est = layer_traces(
        fm,
        params,
        layers,
        [(x[:5], y[:5]), (x[5:], y[5:])],
        probes=200,
        generator=g,
        exact_ggn=False,
    )
    for name in layers:
        assert abs(est[name].mean - exact[name]) <= 4 * est[name].stderr + 1e-12
        assert est[name].stderr > 0


def test_hutchinson_error_shrinks_with_probes():
    module, fm, params, layers, x, y = setup("mlp_tanh")
    exact = dense_block_traces(module, params, layers, x, y)
    errors, stderrs = [], []
    for probes in (10, 100, 1000):
        runs = []
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            runs.append(layer_traces(fm, params, layers, [(x, y)], probes=probes, generator=g))
        errors.append(sum(abs(r[n].mean - exact[n]) for r in runs for n in layers))
        stderrs.append(runs[0][layers[0]].stderr)
    assert errors[0] > errors[1] > errors[2]
    assert stderrs[0] > 2 * stderrs[1] > 4 * stderrs[2]


def test_hutchplusplus_exact_when_sketch_spans_block():
    module, fm, params, layers, x, y = setup("mlp_gelu")
    exact = dense_block_traces(module, params, layers, x, y)
    g = torch.Generator().manual_seed(0)
    est = layer_traces(
        fm, params, ["fc3.weight"], [(x, y)], probes=3 * 15, route="hutch++", generator=g
    )
    assert est["fc3.weight"].mean == pytest.approx(exact["fc3.weight"], rel=1e-8)
    est = layer_traces(
        fm, params, ["fc1.weight"], [(x, y)], probes=30, route="hutch++", generator=g
    )
    assert abs(est["fc1.weight"].mean - exact["fc1.weight"]) <= 4 * est["fc1.weight"].stderr + 1e-12


def test_hutchplusplus_standard_error_needs_two_residual_probes():
    # P probes: a sketch of S = max(1, P // 3), then G = max(1, P − 2S) residual probes whose
    # spread is the standard error: none from G = 1 (P = 2, 3: NaN, and no warning from
    # torch's std), one from G = 2 (P = 4). On a one-weight layer the sketch spans the block,
    # so the estimate is exact and the residual terms vanish (standard error 0).
    H = torch.tensor([[[2.0]], [[-0.5]], [[1.0]]], dtype=torch.float64)
    fm, params = FunctionalModel.from_module(DesignedHessians(1))
    batches = [(H, torch.ones(3, dtype=torch.long))]
    for probes, finite in ((2, False), (3, False), (4, True), (5, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = layer_traces(fm, params, ["weight"], batches, probes=probes, route="hutch++")
        assert not [w for w in caught if issubclass(w.category, UserWarning | RuntimeWarning)]
        est = est["weight"]
        assert est.mean == pytest.approx(float(H.mean()), rel=1e-12)
        assert (est.stderr == 0.0) if finite else math.isnan(est.stderr), (probes, est.stderr)
    # a wider layer with G = 2: a positive standard error
    module, fm, params, layers, x, y = setup("mlp_gelu")
    est = layer_traces(fm, params, ["fc1.weight"], [(x, y)], probes=4, route="hutch++")
    assert 0.0 < est["fc1.weight"].stderr < math.inf


def test_positive_trace_max_exact_and_slq():
    module, fm, params, layers, x, y = setup("mlp_gelu")
    certified = {"fc1.weight": False, "fc2.weight": False, "fc3.weight": True}
    g = torch.Generator().manual_seed(0)
    result = positive_trace_max(
        fm,
        params,
        layers,
        [(x[:4], y[:4]), (x[4:], y[4:])],
        certified=certified,
        probes=64,
        lanczos_steps=30,
        dense_limit=0,
        generator=g,
    )
    for name in layers:
        dense = torch.diagonal(
            positive_part(dense_block_hessians(module, params, name, x, y)), dim1=1, dim2=2
        ).sum(1)
        if certified[name]:
            assert result[name].route == "exact-ggn"
            assert result[name].max == pytest.approx(float(dense.max()), rel=1e-9)
            assert result[name].argmax == int(dense.argmax())
        else:
            assert result[name].route == "slq"
            assert abs(result[name].max - float(dense.max())) <= 4 * result[
                name
            ].stderr + 1e-3 * float(dense.max())


def test_slq_positive_trace_error_shrinks_with_probes():
    module, fm, params, layers, x, y = setup("mlp_gelu", n=3)
    name = "fc2.weight"
    dense = torch.diagonal(
        positive_part(dense_block_hessians(module, params, name, x, y)), dim1=1, dim2=2
    ).sum(1)
    errors = []
    for probes in (4, 64):
        err = 0.0
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            r = positive_trace_max(
                fm,
                params,
                [name],
                [(x, y)],
                certified={},
                probes=probes,
                lanczos_steps=30,
                dense_limit=0,
                generator=g,
            )
            err += abs(r[name].max - float(dense.max()))
        errors.append(err)
    assert errors[1] < errors[0]


def test_output_space_probes_on_certified_layers_unbiased_and_less_variable():
    module, fm, params, layers, x, y = setup("cnn")
    exact = dense_block_traces(module, params, layers, x, y)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    ggn = layer_traces(
        fm,
        params,
        layers,
        batches,
        probes=200,
        generator=torch.Generator().manual_seed(4),
        exact_ggn=False,
    )
    hessian = layer_traces(
        fm,
        params,
        layers,
        batches,
        probes=200,
        generator=torch.Generator().manual_seed(4),
        output_probes=False,
    )
    for name in layers:
        assert ggn[name].route == "hutchinson-ggn"
        assert hessian[name].route == "hutchinson"
        assert abs(ggn[name].mean - exact[name]) <= 4 * ggn[name].stderr + 1e-12
        assert 0 < ggn[name].stderr < hessian[name].stderr


def test_output_space_probes_converge_to_the_exact_trace():
    module, fm, params, layers, x, y = setup("cnn")
    exact = dense_block_traces(module, params, layers, x, y)
    errors = []
    for probes in (4, 400):
        est = layer_traces(
            fm,
            params,
            layers,
            [(x, y)],
            probes=probes,
            generator=torch.Generator().manual_seed(1),
            exact_ggn=False,
        )
        errors.append(max(abs(est[n].mean - exact[n]) / exact[n] for n in layers))
    assert errors[1] < errors[0] and errors[1] < 0.05


def test_smooth_layers_keep_hessian_probes():
    _, fm, params, layers, x, y = setup("mlp_gelu")
    est = layer_traces(fm, params, layers, [(x, y)], probes=4, exact_ggn=False)
    assert est["fc1.weight"].route == "hutchinson"
    assert est["fc3.weight"].route == "hutchinson-ggn"


@pytest.mark.parametrize("network", ["cnn", "mlp_gelu"])
def test_certified_layers_exact_by_default(network):
    module, fm, params, layers, x, y = setup(network)
    exact = dense_block_traces(module, params, layers, x, y)
    est = layer_traces(fm, params, layers, [(x[:5], y[:5]), (x[5:], y[5:])], probes=4)
    certified = layers if network == "cnn" else ["fc3.weight"]
    for name in layers:
        if name in certified:
            assert est[name].route == "exact-ggn" and est[name].stderr == 0.0
            assert est[name].mean == pytest.approx(exact[name], rel=1e-9)
        else:
            assert est[name].route == "hutchinson"


@pytest.mark.parametrize("network", ["attention", "mlp_gelu"])
def test_positive_trace_max_exact_dense_on_small_smooth_layers(network):
    module, fm, params, layers, x, y = setup(network)
    smooth = [n for n in layers if n != "head.weight" and n != "fc3.weight"]
    result = positive_trace_max(
        fm, params, smooth, [(x[:3], y[:3]), (x[3:], y[3:])], certified={}, probes=4
    )
    for name in smooth:
        assert params[name].numel() <= 4 * 128
        dense = torch.diagonal(
            positive_part(dense_block_hessians(module, params, name, x, y)), dim1=1, dim2=2
        ).sum(1)
        assert result[name].route == "exact-dense"
        assert result[name].max == pytest.approx(float(dense.max()), rel=1e-8)
        assert result[name].argmax == int(dense.argmax())
        assert result[name].mean == pytest.approx(float(dense.mean()), rel=1e-8)
        assert result[name].stderr == 0.0


def test_positive_trace_max_slq_on_attention_within_standard_errors():
    module, fm, params, layers, x, y = setup("attention")
    name = "attn.in_proj_weight"
    dense = torch.diagonal(
        positive_part(dense_block_hessians(module, params, name, x, y)), dim1=1, dim2=2
    ).sum(1)
    result = positive_trace_max(
        fm,
        params,
        [name],
        [(x, y)],
        certified={},
        probes=64,
        dense_limit=0,
        generator=torch.Generator().manual_seed(2),
    )[name]
    assert result.route == "slq" and result.stderr > 0
    assert abs(result.max - float(dense.max())) <= 4 * result.stderr + 1e-2 * float(dense.max())


def test_slq_positive_traces_same_with_retained_graphs_and_vmapped_products(monkeypatch):
    # the products of a run come from retained double-backward graphs when the running
    # (example, probe) members fit the budget, else from vmapped forward-over-reverse calls;
    # with 0 budget every product is vmapped: the same estimates to round-off
    _, fm, params, layers, x, y = setup("attention")

    def run():
        return positive_trace_max(
            fm,
            params,
            layers,
            [(x, y)],
            certified={},
            probes=3,
            dense_limit=0,
            generator=torch.Generator().manual_seed(4),
        )

    retained = run()
    monkeypatch.setattr(retained_module, "_RETAINED_BUDGET", 0)
    vmapped = run()
    for name in layers:
        assert retained[name].route == "slq"
        assert retained[name].max == pytest.approx(vmapped[name].max, rel=1e-9)
        assert retained[name].stderr == pytest.approx(vmapped[name].stderr, rel=1e-7)


@pytest.mark.parametrize(
    ("route", "probes", "layers", "dof"),
    [("hutchinson", 20, None, 19), ("hutch++", 30, ["fc1.weight"], 9)],
)
def test_reported_interval_covers_the_truth_at_the_nominal_rate(route, probes, layers, dof):
    # mean ± t_{0.975, dof} · stderr over 200 seeds should cover Tr[H̄_ii] 95% of the time. The
    # binomial standard deviation of the rate is 1.5% for 200 intervals (Hutch++, fc1 only: fc3's
    # sketch spans its block, so that estimate is exact and its interval empty) and ≈ 0.9% for
    # Hutchinson's 600 (three layers), so [0.91, 0.985] is at least a ±2.6σ band (measured:
    # 95.2% and 95.5%) that a wrong standard error (e.g. off by √2) or a biased mean leaves.
    # Hutch++'s error is that of its deflated Hutchinson part (probes − 2·⌊probes/3⌋ samples).
    module, fm, params, all_layers, x, y = setup("mlp_tanh")
    layers = layers or all_layers
    exact = dense_block_traces(module, params, layers, x, y)
    quantile = stats.t.ppf(0.975, dof)
    covered = total = 0
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        est = layer_traces(
            fm,
            params,
            layers,
            [(x, y)],
            probes=probes,
            route=route,
            generator=g,
            output_probes=False,
        )
        for name in layers:
            assert est[name].stderr > 0
            covered += abs(est[name].mean - exact[name]) <= quantile * est[name].stderr
            total += 1
    assert 0.91 <= covered / total <= 0.985, covered / total


def test_positive_trace_defaults_seeds_and_example_chunks(monkeypatch):
    module, fm, params, layers, x, y = setup("cnn")
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]

    def run(seed, certified):
        g = torch.Generator().manual_seed(seed)
        return positive_trace_max(
            fm,
            params,
            layers,
            batches,
            certified=certified,
            probes=4,
            lanczos_steps=8,
            dense_limit=0,
            generator=g,
        )

    # a layer missing from ``certified`` is estimated by SLQ; the seed drives the probes
    first, again, other = run(0, {}), run(0, {}), run(1, {})
    assert {r.route for r in first.values()} == {"slq"}
    assert all(first[n].max == again[n].max for n in layers)
    assert any(first[n].max != other[n].max for n in layers)
    # exact layers split into example chunks report the global argmax
    monkeypatch.setattr(traces, "_ELEMENT_BUDGET", 1)
    certified = dict.fromkeys(layers, True)
    chunked = run(0, certified)
    for name in layers:
        H = dense_block_hessians(module, params, name, x, y)
        dense = torch.linalg.eigvalsh(H).clamp(min=0).sum(dim=1)
        assert chunked[name].argmax == int(dense.argmax())
        assert chunked[name].max == pytest.approx(float(dense.max()), rel=1e-9)


def test_scaled_hutchinson_estimates_the_scaled_trace():
    # Tr[D H̄_ii D] = Σ_j D_j² (H̄_ii)_jj with probes z ⊙ D (the relative-noise traces).
    module, fm, params, layers, x, y = setup("mlp_gelu")
    H = dense_mean_hessian(module, params, layers, x, y)
    scaling = {name: params[name].abs() + 0.5 for name in layers}
    g = torch.Generator().manual_seed(0)
    est = layer_traces(fm, params, layers, [(x, y)], probes=400, generator=g, scaling=scaling)
    offset = 0
    for name in layers:
        d = params[name].numel()
        block = H[offset : offset + d, offset : offset + d]
        offset += d
        exact = float((scaling[name].reshape(-1) ** 2 * block.diagonal()).sum())
        assert "scaled" in est[name].route
        assert abs(est[name].mean - exact) <= 4.5 * est[name].stderr
        assert est[name].stderr < 0.5 * abs(exact)
    with pytest.raises(ValueError, match="hutchinson"):
        layer_traces(fm, params, layers, [(x, y)], probes=4, route="hutch++", scaling=scaling)


def test_relative_noise_traces_estimate_the_weighted_diagonal():
    # Tr[D_i H̄_ii D_i] = Σ_j W_ij² (H̄_ii)_jj, D_i = |W_i|: the traces of the relative-noise
    # prediction (tests/test_noise_stability.py checks that prediction)
    module, fm, params, layers, x, y = setup("mlp_tanh")
    blocks = diagonal_blocks(dense_mean_hessian(module, params, layers, x, y), params, layers)
    exact = {
        name: float((params[name].detach().reshape(-1) ** 2 * torch.diagonal(b)).sum())
        for name, b in blocks.items()
    }
    g = torch.Generator().manual_seed(4)
    traces = relative_noise_traces(fm, params, layers, [(x, y)], probes=400, generator=g)
    for name in layers:
        assert abs(traces[name].mean - exact[name]) < 4 * traces[name].stderr
