"""Hessian-vector products of the mean loss against the dense float64 mean-loss Hessian."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.mean_loss import (
    block_diagonal_hvp,
    flat_operator,
    flatten,
    mean_loss_hvp,
    unflatten,
)
from hessfine.bounds.safe_autodiff import differentiable

from tests.oracles import TINY_LAYERS, TINY_NETWORKS, dense_mean_hessian, diagonal_blocks, tiny_data


def setup(network):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS[network]
    x, y = tiny_data(network, 7)
    return module, fm, params, layers, x, y, [(x[:3], y[:3]), (x[3:], y[3:])]


@pytest.mark.parametrize("network", ["mlp_gelu", "attention"])
def test_products_of_the_whole_hessian_over_batches_of_different_sizes(network):
    module, fm, params, layers, x, y, batches = setup(network)
    H = dense_mean_hessian(module, params, layers, x, y)
    shapes = {name: params[name].shape for name in layers}
    u = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(0), dtype=H.dtype)
    with differentiable():
        hvp = mean_loss_hvp(fm, params, layers, batches)
        images = flatten(hvp(unflatten(u, shapes)), layers)
        flat = flat_operator(hvp, shapes)(u)
    torch.testing.assert_close(images, u @ H, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(flat, images, rtol=0, atol=0)


def test_diagonal_block_products_of_any_subset_of_the_layers():
    module, fm, params, layers, x, y, batches = setup("mlp_gelu")
    blocks = diagonal_blocks(dense_mean_hessian(module, params, layers, x, y), params, layers)
    g = torch.Generator().manual_seed(1)
    u = {name: torch.randn(params[name].shape, generator=g, dtype=torch.float64) for name in layers}
    chosen = {name: u[name] for name in layers[1:]}
    with differentiable():
        images = block_diagonal_hvp(fm, params, layers, batches)(chosen)
    assert list(images) == layers[1:]
    for name, image in images.items():
        expected = blocks[name] @ u[name].reshape(-1)
        torch.testing.assert_close(image.reshape(-1), expected, rtol=1e-9, atol=1e-12)


def test_flatten_and_unflatten_are_inverse():
    shapes = {"a": torch.Size([2, 3]), "b": torch.Size([4])}
    flat = torch.arange(20.0).reshape(2, 10)
    parts = unflatten(flat, shapes)
    assert parts["a"].shape == (2, 2, 3) and parts["b"].shape == (2, 4)
    assert torch.equal(flatten(parts, ["a", "b"]), flat)
