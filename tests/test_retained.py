"""Per-example Hessian-vector products from retained double-backward graphs against dense float64
blocks."""

import pytest
import torch
from hessfine.bounds.operators.retained import RetainedLayersHVP, RetainedTail
from hessfine.bounds.safe_autodiff import differentiable

from tests.cases import tiny_case
from tests.oracles import dense_block_hessians

N = 10


@pytest.mark.parametrize("network", ["attention", "mlp_gelu"])
def test_retained_graph_gives_each_layer_its_own_block_for_its_own_examples(network):
    # double backward through one retained graph: H_ii(x_b) u_b for the pairs asked for (a
    # subset of those the graph was built for; example 3 runs in two layers at once, so a
    # cross-layer block H_ij would show), exact against the dense float64 blocks
    module, fm, params, directions, x, y = tiny_case(network, N)
    names = list(directions)
    members = [torch.tensor([0, 3, 7]), torch.tensor([5, 3]), torch.tensor([1, 3, 9])]
    with differentiable():
        hvp = RetainedLayersHVP(fm, params, names, x, y, members)
        asked_names, asked = [names[0], names[2]], [torch.tensor([7, 3]), torch.tensor([3])]
        assert hvp.size == 8 and hvp.covers(asked_names, asked)
        assert not hvp.covers([names[1]], [torch.tensor([0])])
        g = torch.Generator().manual_seed(0)
        blocks = [
            torch.randn(m.numel(), directions[n].numel(), generator=g, dtype=torch.float64)
            for n, m in zip(asked_names, asked, strict=True)
        ]
        for _ in range(2):  # the graph is reused
            images = hvp(asked_names, blocks, asked)
            for name, m, u, image in zip(asked_names, asked, blocks, images, strict=True):
                H = dense_block_hessians(module, params, name, x, y)[m]
                torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)


def test_retained_tail_rebuilds_for_the_running_pairs():
    # rebuilt when at most half of its pairs still run, or when asked for a pair it lacks
    _, fm, params, directions, x, y = tiny_case("mlp_gelu", N)
    name = "fc1.weight"
    tail = RetainedTail(fm, params, x, y)
    d = directions[name].numel()
    with differentiable():
        tail([name], [torch.ones(6, d, dtype=torch.float64)], [torch.arange(6)])
        assert tail.size == 6
        tail([name], [torch.ones(4, d, dtype=torch.float64)], [torch.arange(4)])
        assert tail.size == 6
        tail([name], [torch.ones(3, d, dtype=torch.float64)], [torch.arange(3)])
        assert tail.size == 3
        tail([name], [torch.ones(2, d, dtype=torch.float64)], [torch.tensor([1, 9])])
        assert tail.size == 2


def test_retained_tail_uses_a_graph_per_layer_while_pairs_are_many():
    # ≥ 8 running pairs per layer: one graph per layer; fewer: one joint graph (rebuilt once
    # half the pairs finished); the products are H_ii(x_b) u_b either way
    module, fm, params, directions, x, y = tiny_case("attention", N)
    names = list(directions)
    tail = RetainedTail(fm, params, x, y)
    g = torch.Generator().manual_seed(0)
    with differentiable():
        for members in ([torch.arange(N)] * 3, [torch.tensor([2]), torch.tensor([0, 5])]):
            chosen = names[: len(members)]
            blocks = [
                torch.randn(m.numel(), directions[n].numel(), generator=g, dtype=torch.float64)
                for n, m in zip(chosen, members, strict=True)
            ]
            images = tail(chosen, blocks, members)
            graphs = {id(tail.graphs[n]) for n in chosen}
            assert len(graphs) == (len(chosen) if members[0].numel() == N else 1)
            for name, m, u, image in zip(chosen, members, blocks, images, strict=True):
                H = dense_block_hessians(module, params, name, x, y)[m]
                torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)
