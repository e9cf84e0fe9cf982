"""Top eigenvalues and the SLQ density against dense float64 Hessians."""

import math

import pytest
import torch
from hessfine.bounds.estimators.spectra import (
    spectral_density,
    top_eigenvalues,
    whole_top_eigenvalues,
)
from hessfine.bounds.functional import FunctionalModel

from tests.oracles import TINY_LAYERS, TINY_NETWORKS, dense_mean_hessian, tiny_data


@pytest.mark.parametrize("network", ["mlp_gelu", "cnn", "attention"])
def test_top_eigenvalues_per_layer_and_whole(network):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS[network]
    x, y = tiny_data(network, 8)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    per_layer = top_eigenvalues(fm, params, layers, batches, k=3, steps=200)
    for name in layers:
        dense = torch.linalg.eigvalsh(dense_mean_hessian(module, params, [name], x, y)).flip(0)[:3]
        assert per_layer[name].values == pytest.approx(dense.tolist(), rel=1e-5, abs=1e-9)
    whole = whole_top_eigenvalues(fm, params, layers, batches, k=2, steps=300)
    dense = torch.linalg.eigvalsh(dense_mean_hessian(module, params, layers, x, y)).flip(0)[:2]
    assert whole.values == pytest.approx(dense.tolist(), rel=1e-5)


def test_top_eigenvalue_converges_before_exhaustion_with_residual_bound():
    module = TINY_NETWORKS["attention"]()
    fm, params = FunctionalModel.from_module(module)
    x, y = tiny_data("attention", 8)
    dense = torch.linalg.eigvalsh(
        dense_mean_hessian(module, params, TINY_LAYERS["attention"], x, y)
    )
    e = whole_top_eigenvalues(fm, params, TINY_LAYERS["attention"], [(x, y)], k=1, steps=40)
    assert not e.exhausted
    assert abs(e.values[0] - float(dense[-1])) <= e.residuals[0] + 1e-10
    assert e.values[0] == pytest.approx(float(dense[-1]), rel=1e-4)


def test_density_integrates_to_one_and_matches_moments():
    module = TINY_NETWORKS["mlp_tanh"]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS["mlp_tanh"]
    x, y = tiny_data("mlp_tanh", 8)
    H = dense_mean_hessian(module, params, layers, x, y)
    g = torch.Generator().manual_seed(0)
    density = spectral_density(fm, params, layers, [(x, y)], runs=64, steps=20, generator=g)
    grid = torch.tensor(density.grid)
    values = torch.tensor(density.density)
    assert float(torch.trapezoid(values, grid)) == pytest.approx(1.0, abs=1e-3)
    nodes, weights = torch.tensor(density.nodes), torch.tensor(density.weights)
    mean_eig = float((nodes * weights).sum(1).mean())
    exact = float(torch.trace(H)) / H.shape[0]
    assert mean_eig == pytest.approx(
        exact, abs=0.2 * float(torch.linalg.eigvalsh(H).abs().max()) / 8
    )


def test_density_moments_match_the_dense_spectrum_below_full_dimension():
    # With k Lanczos steps each run's Gauss quadrature Σ_j w_j θ_j^m equals zᵀ H^m z / ‖z‖² for
    # m < 2k, so the m-th moment of the (Gaussian-smoothed) curve estimates Tr(H^m)/D plus the
    # kernel's moments, with the Hutchinson standard deviation known from H. k = 6 < D = 75:
    # the Ritz values are not eigenvalues, so a curve that ignores the weights w is off.
    module = TINY_NETWORKS["mlp_tanh"]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS["mlp_tanh"]
    x, y = tiny_data("mlp_tanh", 8)
    H = dense_mean_hessian(module, params, layers, x, y)
    D, runs, steps = H.shape[0], 64, 6
    g = torch.Generator().manual_seed(0)
    density = spectral_density(fm, params, layers, [(x, y)], runs=runs, steps=steps, generator=g)
    assert density.steps == steps
    grid = torch.tensor(density.grid, dtype=torch.float64)
    curve = torch.tensor(density.density, dtype=torch.float64)
    eig = torch.linalg.eigvalsh(H)
    sigma = density.bandwidth * (grid[-1] - grid[0]) / 1.1  # bandwidth × (Ritz range)
    gauss_moments = {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0, 4: 3.0}  # E ξ^k, ξ ~ N(0, 1)
    for m in (1, 2, 3, 4):
        got = float(torch.trapezoid(grid**m * curve, grid))
        # E over λ ~ spectrum and t ~ N(λ, σ²) of t^m:
        expected = sum(
            math.comb(m, k) * float(eig.pow(m - k).mean()) * float(sigma) ** k * gauss_moments[k]
            for k in range(m + 1)
        )
        power = torch.linalg.matrix_power(H, m)
        sd = math.sqrt(2 * (power.pow(2).sum() - power.diagonal().pow(2).sum())) / D / runs**0.5
        assert abs(got - expected) <= 4.5 * sd + 1e-9 * abs(expected), (m, got, expected, sd)


def test_lockstep_layers_equal_one_layer_at_a_time():
    module = TINY_NETWORKS["mlp_gelu"]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS["mlp_gelu"]
    x, y = tiny_data("mlp_gelu", 8)
    together = top_eigenvalues(
        fm, params, layers, [(x, y)], k=2, steps=12, generator=torch.Generator().manual_seed(5)
    )
    alone = top_eigenvalues(
        fm, params, layers[:1], [(x, y)], k=2, steps=12, generator=torch.Generator().manual_seed(5)
    )
    assert together[layers[0]].values == pytest.approx(alone[layers[0]].values, rel=1e-10)
    assert together[layers[0]].steps == alone[layers[0]].steps
