"""Per-example Hessian-vector products (vmapped forward-over-reverse, and the front that picks a
back end) against dense float64 blocks."""

import pytest
import torch
from hessfine.bounds.operators import per_example as per_example_module
from hessfine.bounds.operators import retained as retained_module
from hessfine.bounds.operators.per_example import (
    PerExampleHVP,
    VmappedPairHVP,
    block_forms_hvp,
    dense_example_blocks,
    layers_hvp,
)
from hessfine.bounds.safe_autodiff import differentiable

from tests.cases import tiny_case
from tests.oracles import dense_block_hessians
from tests.oracles import quadratic_forms as dense_forms

N = 10
MEMBERS = [torch.tensor([0, 3, 7]), torch.tensor([5, 3]), torch.tensor([1, 2, 8, 9])]


def random_blocks(directions, members):
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(m.numel(), directions[n].numel(), generator=g, dtype=torch.float64)
        for n, m in zip(directions, members, strict=True)
    ]


@pytest.mark.parametrize("network", ["attention", "cnn"])
def test_layers_hvp_gives_each_layer_its_own_block_for_its_own_examples(network):
    # one call for several layers, each with its own subset of examples: H_ii(x_b) u_b, with no
    # cross-layer terms
    module, fm, params, directions, x, y = tiny_case(network, N)
    names = list(directions)
    members = [torch.tensor([0, 3, 7]), torch.tensor([5]), torch.tensor([1, 2, 8, 9])]
    g = torch.Generator().manual_seed(0)
    blocks = [
        torch.randn(m.numel(), directions[n].numel(), generator=g, dtype=torch.float64)
        for n, m in zip(names, members, strict=True)
    ]
    with differentiable():
        images = layers_hvp(fm, params, names, x, y)(blocks, members)
    for name, m, u, image in zip(names, members, blocks, images, strict=True):
        H = dense_block_hessians(module, params, name, x, y)[m]
        torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("budget", [0, 2**26])
@pytest.mark.parametrize("network", ["attention", "mlp_gelu"])
def test_the_front_gives_each_layer_its_own_block_by_either_back_end(network, budget, monkeypatch):
    # Linear weights from the output graph; the others with retained-graph budget 0 from
    # vmapped calls (no per-pair graph is built), else from retained graphs. Either way
    # H_ii(x_b) u_b, and the same as the vmapped back end's
    monkeypatch.setattr(retained_module, "_RETAINED_BUDGET", budget)
    module, fm, params, directions, x, y = tiny_case(network, N)
    names, blocks = list(directions), random_blocks(directions, MEMBERS)
    with differentiable():
        products = PerExampleHVP(fm, params, x, y)
        images = products(names, blocks, MEMBERS)
        built = products.retained.size
        vmapped = VmappedPairHVP(fm, params, x, y)(names, blocks, MEMBERS)
        single = products.of_layer(names[1])(blocks[1], MEMBERS[1])
    others = [
        m.numel() for n, m in zip(names, MEMBERS, strict=True) if not products.output.supports(n)
    ]
    assert built == (0 if budget == 0 else sum(others))
    assert [products.output.supports(n) for n in names] == [
        n in ("fc1.weight", "fc2.weight", "fc3.weight", "head.weight") for n in names
    ]
    torch.testing.assert_close(single, images[1], rtol=1e-9, atol=1e-12)
    for name, m, u, image, other in zip(names, MEMBERS, blocks, images, vmapped, strict=True):
        H = dense_block_hessians(module, params, name, x, y)[m]
        torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(other, image, rtol=1e-9, atol=1e-12)


def test_vmapped_back_end_splits_the_layers_into_calls_within_the_budget(monkeypatch):
    # an element budget below any two layers' P · Σ d: one layers_hvp call per layer, the same
    # products
    module, fm, params, directions, x, y = tiny_case("attention", N)
    names, blocks = list(directions), random_blocks(directions, MEMBERS)
    calls = []

    def counted(fmodel, params, chosen, x, y):
        calls.append(list(chosen))
        return layers_hvp(fmodel, params, chosen, x, y)

    monkeypatch.setattr(per_example_module, "layers_hvp", counted)
    monkeypatch.setattr(per_example_module, "_ELEMENT_BUDGET", 100)
    with differentiable():
        images = VmappedPairHVP(fm, params, x, y)(names, blocks, MEMBERS)
    assert calls == [[name] for name in names]
    for name, m, u, image in zip(names, MEMBERS, blocks, images, strict=True):
        H = dense_block_hessians(module, params, name, x, y)[m]
        torch.testing.assert_close(image, (H @ u[..., None])[..., 0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("budget", [1, 2**26])
def test_dense_blocks_and_block_forms_match_the_dense_hessian(budget, monkeypatch):
    # budget 1: one column of the blocks per vmapped call
    monkeypatch.setattr(per_example_module, "_ELEMENT_BUDGET", budget)
    module, fm, params, directions, x, y = tiny_case("mlp_gelu", 4)
    name = "fc2.weight"
    H = dense_block_hessians(module, params, name, x, y)
    with differentiable():
        blocks = dense_example_blocks(fm, params, name, x, y)
        forms = block_forms_hvp(fm, params, name, directions[name], x, y)
    torch.testing.assert_close(blocks, H, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(forms, dense_forms(H, directions[name]), rtol=1e-9, atol=1e-12)
