"""Sanity checks of the dense oracles themselves (tests/oracles.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    DesignedHessians,
    crossing_hessians,
    dense_batch_mean_hessians,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_mean_hessian,
    math_attention,
    perturbed_reference,
    positive_part,
    quadratic_forms,
    tiny_data,
)


def _setup(network: str, n: int = 3):
    module = TINY_NETWORKS[network]()
    params = {k: p.detach() for k, p in module.named_parameters()}
    x, y = tiny_data(network, n)
    return module, params, x, y


@pytest.mark.parametrize("network", sorted(TINY_NETWORKS))
def test_networks_are_float64_deterministic_and_small(network):
    module, params, x, y = _setup(network)
    again = TINY_NETWORKS[network]()
    for name, p in again.named_parameters():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.detach(), params[name], rtol=0, atol=0)
    assert not module.training
    with math_attention():
        logits = module(x)
    assert logits.shape == (3, 3) and logits.dtype == torch.float64
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 3
    for name in TINY_LAYERS[network]:
        assert params[name].dim() == 2 or params[name].dim() == 4
        assert params[name].numel() <= 108


@pytest.mark.parametrize("network", sorted(TINY_NETWORKS))
def test_block_hessians_symmetric(network):
    module, params, x, y = _setup(network, n=2)
    for layer in TINY_LAYERS[network]:
        H = dense_block_hessians(module, params, layer, x, y)
        d = params[layer].numel()
        assert H.shape == (2, d, d)
        torch.testing.assert_close(H, H.transpose(1, 2), rtol=0, atol=1e-12)
        assert H.abs().max() > 1e-6


@pytest.mark.parametrize("network", ["mlp_gelu", "attention"])
def test_block_hessian_matches_finite_differences_of_gradients(network):
    module, params, x, y = _setup(network, n=1)
    layer = TINY_LAYERS[network][0]
    H = dense_block_hessians(module, params, layer, x, y)[0]
    w = params[layer]

    def grad_at(flat):
        p = dict(params)
        p[layer] = flat.reshape(w.shape).requires_grad_(True)
        with math_attention():
            loss = F.cross_entropy(functional_call(module, p, (x,)), y)
        return torch.autograd.grad(loss, p[layer])[0].reshape(-1)

    eps = 1e-5
    flat = w.reshape(-1)
    basis = torch.eye(flat.numel(), dtype=flat.dtype)
    fd = torch.stack(
        [(grad_at(flat + eps * e) - grad_at(flat - eps * e)) / (2 * eps) for e in basis]
    )
    torch.testing.assert_close(fd, H, rtol=1e-6, atol=1e-8)


def test_ggn_equals_hessian_on_relu_cnn():
    module, params, x, y = _setup("cnn", n=3)
    for layer in TINY_LAYERS["cnn"]:
        H = dense_block_hessians(module, params, layer, x, y)
        G = dense_ggn_blocks(module, params, layer, x, y)
        torch.testing.assert_close(H, G, rtol=1e-9, atol=1e-12)
        assert torch.linalg.eigvalsh(H).min() > -1e-10


@pytest.mark.parametrize("network", ["mlp_gelu", "mlp_tanh", "attention"])
def test_ggn_differs_from_hessian_on_smooth_networks(network):
    module, params, x, y = _setup(network, n=2)
    *hidden, head = TINY_LAYERS[network]
    for layer in hidden:
        H = dense_block_hessians(module, params, layer, x, y)
        G = dense_ggn_blocks(module, params, layer, x, y)
        assert (H - G).abs().max() > 1e-3 * G.abs().max()
        assert torch.linalg.eigvalsh(G).min() > -1e-10
        assert torch.linalg.eigvalsh(H).min() < -1e-8  # indefinite: the truncation matters
    # Logits are linear in the head weight: there the two coincide.
    torch.testing.assert_close(
        dense_block_hessians(module, params, head, x, y),
        dense_ggn_blocks(module, params, head, x, y),
        rtol=1e-9,
        atol=1e-12,
    )


def test_positive_part_of_known_matrix():
    c, s = 0.6, 0.8
    U = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    H = U @ torch.diag(torch.tensor([2.0, -3.0], dtype=torch.float64)) @ U.T
    expected = 2.0 * torch.outer(U[:, 0], U[:, 0])
    torch.testing.assert_close(positive_part(H), expected)
    batched = positive_part(torch.stack([H, -H]))
    torch.testing.assert_close(batched[1], 3.0 * torch.outer(U[:, 1], U[:, 1]))
    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        quadratic_forms(torch.stack([H, expected]), v.reshape(1, 2)),
        torch.stack([v @ H @ v, 2.0 * (U[:, 0] @ v) ** 2]),
    )


def test_designed_hessians_are_the_inputs_and_the_crossing_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    x = x + x.transpose(1, 2)  # symmetric, not diagonal
    module = DesignedHessians(4)
    params = dict(module.named_parameters())
    y = torch.ones(3, dtype=torch.long)
    torch.testing.assert_close(dense_block_hessians(module, params, "weight", x, y), x)
    H, v = crossing_hessians()
    values = quadratic_forms(positive_part(H), v)
    torch.testing.assert_close(values, torch.tensor([576 / 47, 15.0], dtype=torch.float64))


def test_mean_hessian_diagonal_blocks_are_mean_of_per_example_blocks():
    module, params, x, y = _setup("mlp_tanh", n=4)
    layers = TINY_LAYERS["mlp_tanh"]
    full = dense_mean_hessian(module, params, layers, x, y)
    sizes = [params[name].numel() for name in layers]
    assert full.shape == (sum(sizes), sum(sizes))
    torch.testing.assert_close(full, full.T, rtol=0, atol=1e-12)
    offset = 0
    for name, d in zip(layers, sizes, strict=True):
        block = full[offset : offset + d, offset : offset + d]
        torch.testing.assert_close(block, dense_block_hessians(module, params, name, x, y).mean(0))
        offset += d
    assert full[: sizes[0], sizes[0] :].abs().max() > 1e-6  # cross-layer blocks are there

    batches = dense_batch_mean_hessians(module, params, layers, x, y, batch_size=3)
    assert len(batches) == 2
    torch.testing.assert_close(batches[1], dense_mean_hessian(module, params, layers, x[3:], y[3:]))
    torch.testing.assert_close((3 * batches[0] + batches[1]) / 4, full)


def test_perturbed_reference_moves_only_selected_layers():
    module, params, _, _ = _setup("cnn")
    layers = TINY_LAYERS["cnn"]
    ref = perturbed_reference(params, layers, scale=0.5)
    for name, p in params.items():
        diff = p - ref[name]
        if name in layers:
            assert 0.3 < float(diff.std() / 0.5) < 1.7
        else:
            assert float(diff.abs().max()) == 0.0
    torch.testing.assert_close(
        ref["head.weight"], perturbed_reference(params, layers, scale=0.5)["head.weight"]
    )
