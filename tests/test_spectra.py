"""Top eigenvalues and the SLQ density against dense float64 Hessians."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.spectra import spectral_density, top_eigenvalues, whole_top_eigenvalues

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
