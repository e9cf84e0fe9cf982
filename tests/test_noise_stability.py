"""Noise stability against the dense second-order prediction (σ²/2)·Σ_i mean_x Tr[H_i(x)]."""

import math

import pytest
import torch
from hessfine.bounds.estimators.noise_stability import noise_stability, trace_prediction
from hessfine.bounds.functional import FunctionalModel

from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_mean_hessian,
    diagonal_blocks,
    tiny_data,
)


def setup(network, n=8):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    x, y = tiny_data(network, n)
    return module, fm, params, TINY_LAYERS[network], x, y


def dense_diagonal_blocks(module, params, layers, x, y):
    """Diagonal blocks H̄_ii of the dense mean-loss Hessian (float64)."""
    return diagonal_blocks(dense_mean_hessian(module, params, layers, x, y), params, layers)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# The CNN is piecewise linear: its loss has kinks, and the second-order prediction holds only for
# σ below the pre-activation margins of the examples (at σ = 1e-3 kink crossings dominate).
@pytest.mark.parametrize(
    ("network", "sigma", "draws"),
    [("mlp_tanh", 1e-3, 1000), ("attention", 1e-3, 600), ("cnn", 1e-6, 300)],
)
def test_antithetic_estimate_matches_dense_trace_prediction(network, sigma, draws):
    module, fm, params, layers, x, y = setup(network)
    blocks = dense_diagonal_blocks(module, params, layers, x, y)
    prediction = trace_prediction(sigma, {k: float(torch.trace(b)) for k, b in blocks.items()})
    est = noise_stability(fm, params, layers, [(x, y)], sigma=sigma, draws=draws, generator=gen())
    assert prediction > 0
    assert abs(est.mean - prediction) < 4 * est.stderr
    assert est.stderr < 0.1 * prediction
    assert est.ci95[0] < est.mean < est.ci95[1]
    assert est.evaluations == 2 * draws and est.examples == 8


def test_antithetic_variance_far_below_plain_monte_carlo():
    _, fm, params, layers, x, y = setup("mlp_tanh", n=16)
    draws = 200
    anti = noise_stability(fm, params, layers, [(x, y)], sigma=1e-3, draws=draws, generator=gen(1))
    plain = noise_stability(
        fm,
        params,
        layers,
        [(x, y)],
        sigma=1e-3,
        draws=2 * draws,
        antithetic=False,
        generator=gen(2),
    )
    assert plain.evaluations == anti.evaluations
    # Variances of the two estimators at equal numbers of loss evaluations.
    assert plain.stderr**2 > 1e3 * anti.stderr**2


def test_relative_noise_matches_weighted_diagonal():
    module, fm, params, layers, x, y = setup("mlp_tanh")
    blocks = dense_diagonal_blocks(module, params, layers, x, y)
    exact = {
        name: float((params[name].detach().reshape(-1) ** 2 * torch.diagonal(b)).sum())
        for name, b in blocks.items()
    }
    sigma = 3e-3
    est = noise_stability(
        fm, params, layers, [(x, y)], sigma=sigma, draws=1000, relative=True, generator=gen(3)
    )
    assert est.relative
    assert abs(est.mean - trace_prediction(sigma, exact)) < 4 * est.stderr
    isotropic = {k: float(torch.trace(b)) for k, b in blocks.items()}
    assert all(abs(exact[k] - isotropic[k]) > 1e-3 for k in layers)


def test_result_independent_of_chunking_and_batch_split():
    _, fm, params, layers, x, y = setup("mlp_gelu", n=12)
    whole = noise_stability(fm, params, layers, [(x, y)], sigma=1e-2, draws=10, generator=gen(5))
    split = noise_stability(
        fm,
        params,
        layers,
        [(x[:5], y[:5]), (x[5:], y[5:])],
        sigma=1e-2,
        draws=10,
        generator=gen(5),
        chunk=3,
    )
    assert whole.samples == pytest.approx(split.samples, rel=1e-10, abs=1e-15)
    assert whole.base_loss == pytest.approx(split.base_loss, rel=1e-12)


def test_plain_monte_carlo_is_unbiased_at_larger_sigma():
    module, fm, params, layers, x, y = setup("mlp_tanh")
    blocks = dense_diagonal_blocks(module, params, layers, x, y)
    sigma = 3e-2
    prediction = trace_prediction(sigma, {k: float(torch.trace(b)) for k, b in blocks.items()})
    plain = noise_stability(
        fm, params, layers, [(x, y)], sigma=sigma, draws=4000, antithetic=False, generator=gen(6)
    )
    # Fourth-order terms are ~σ² relative to the prediction: well inside the Monte Carlo error.
    assert abs(plain.mean - prediction) < 4 * plain.stderr


def test_trace_prediction_closed_form():
    assert trace_prediction(0.1, {"a": 2.0, "b": 4.0}) == pytest.approx(0.03)
    assert trace_prediction(1.0, {}) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0, "draws": 4}, "sigma"),
        ({"sigma": math.nan, "draws": 4}, "sigma"),
        ({"sigma": 1e-3, "draws": 1}, "draws"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    _, fm, params, layers, x, y = setup("mlp_gelu", n=4)
    with pytest.raises(ValueError, match=message):
        noise_stability(fm, params, layers, [(x, y)], generator=gen(), **kwargs)


def test_unknown_layer_raises():
    _, fm, params, _, x, y = setup("mlp_gelu", n=4)
    with pytest.raises(ValueError, match="unknown layers"):
        noise_stability(fm, params, ["nope"], [(x, y)], sigma=1e-3, draws=4, generator=gen())
