"""The layer-input/output-gradient route for v_iᵀ G_i v_i and Tr[G_i] against dense float64
Gauss–Newton blocks and the JVP/VJP route."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.gauss_newton import ggn_forms, vjp_gauss_newton_traces
from hessfine.bounds.operators.layer_io import (
    layer_io_gauss_newton_traces,
    layer_io_ggn_forms,
    linear_conv_modules,
)
from hessfine.bounds.safe_autodiff import differentiable
from torch import nn

from tests.oracles import (
    DTYPE,
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_ggn_blocks,
    perturbed_reference,
    tiny_data,
)
from tests.oracles import quadratic_forms as dense_forms


def directions_of(params, layers):
    reference = perturbed_reference(params, layers)
    return {name: params[name] - reference[name] for name in layers}


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("cnn", ["conv1.weight", "block.conv.weight", "head.weight"]),
        ("mlp_gelu", ["fc1.weight", "fc2.weight", "fc3.weight"]),
        ("attention", ["attn.out_proj.weight", "head.weight"]),
    ],
)
def test_matches_the_dense_gauss_newton_block(network, expected):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    v = directions_of(params, TINY_LAYERS[network])
    x, y = tiny_data(network, 7)
    forms = layer_io_ggn_forms(fm, params, v, x, y)
    # MultiheadAttention's in_proj_weight is not a Linear module's weight; out_proj is an
    # nn.Linear subclass (NonDynamicallyQuantizableLinear) whose weight attention uses
    # functionally, so neither is recorded.
    assert sorted(forms) == sorted(n for n in expected if n != "attn.out_proj.weight")
    for name, values in forms.items():
        dense = dense_forms(dense_ggn_blocks(module, params, name, x, y), v[name])
        torch.testing.assert_close(values, dense, rtol=1e-10, atol=1e-14)


class Shapes(nn.Module):
    """Conv1d, grouped and 'same'-padded Conv2d, Conv3d, a Linear used twice (tied), and a Linear
    whose output a ReLU overwrites in place (as in torchvision's VGG)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", groups=2, dilation=2)
        self.c3 = nn.Conv3d(1, 2, 2)
        self.tied = nn.Linear(6, 6)
        self.inplace = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c1(x))  # (B, 4, 4)
        h = torch.tanh(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 4)))  # (B, 4, 4, 4)
        h = torch.tanh(self.c3(h.unsqueeze(1)))  # (B, 2, 3, 3, 3)
        h = h.flatten(2).mean(-1).repeat(1, 3)  # (B, 6)
        h = torch.tanh(self.tied(torch.tanh(self.tied(h))))
        h = nn.functional.relu(self.inplace(h), inplace=True)
        return self.head(h)


def test_conv_variants_tied_weights_and_in_place_outputs():
    torch.manual_seed(0)
    module = Shapes().to(DTYPE).eval()
    fm, params = FunctionalModel.from_module(module)
    layers = [n for n, p in params.items() if n.endswith("weight")]
    v = {name: torch.randn_like(params[name]) for name in layers}
    x, y = torch.randn(5, 2, 8, dtype=DTYPE), torch.randint(0, 3, (5,))
    assert sorted(linear_conv_modules(fm, layers)) == sorted(layers)
    forms = layer_io_ggn_forms(fm, params, v, x, y)
    # inplace's output is overwritten by a ReLU: its gradient must still be the one at the Linear.
    assert sorted(forms) == sorted(layers)
    for name, values in forms.items():
        torch.testing.assert_close(
            values, ggn_forms(fm, params, name, v[name], x, y), rtol=1e-10, atol=1e-14
        )
        dense = dense_forms(dense_ggn_blocks(module, params, name, x, y), v[name])
        torch.testing.assert_close(values, dense, rtol=1e-10, atol=1e-14)


def test_traces_of_a_layer_whose_output_is_overwritten_in_place():
    torch.manual_seed(0)
    module = Shapes().to(DTYPE).eval()
    fm, params = FunctionalModel.from_module(module)
    layers = ["tied.weight", "inplace.weight", "head.weight"]
    x, y = torch.randn(5, 2, 8, dtype=DTYPE), torch.randint(0, 3, (5,))
    fast = layer_io_gauss_newton_traces(fm, params, layers, x, y)
    assert sorted(fast) == sorted(layers)
    slow = vjp_gauss_newton_traces(fm, params, layers, x, y)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-14)


def test_declines_when_logits_outnumber_the_budget():
    module = TINY_NETWORKS["cnn"]()
    fm, params = FunctionalModel.from_module(module)
    v = directions_of(params, ["head.weight"])
    x, y = tiny_data("cnn", 4)
    assert layer_io_ggn_forms(fm, params, v, x, y, max_backward=2) == {}
    assert sorted(layer_io_ggn_forms(fm, params, v, x, y, max_backward=3)) == ["head.weight"]


@pytest.mark.parametrize("architecture", ["squeezenet1_0", "shufflenet_v2_x0_5"])
def test_torchvision_architectures_match_the_jvp_route(architecture):
    # Real layouts: SqueezeNet's ReLU(inplace=True) after every convolution and channel
    # concatenation, ShuffleNet's depthwise (grouped) convolutions and channel shuffles.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = getattr(torchvision.models, architecture)(num_classes=10).to(DTYPE).eval()
    fm, params = FunctionalModel.from_module(net)
    layers = [name for name, p in params.items() if p.dim() > 1]
    v = {name: 0.01 * torch.randn_like(params[name]) for name in layers}
    x, y = torch.randn(2, 3, 64, 64, dtype=DTYPE), torch.tensor([1, 7])
    forms = layer_io_ggn_forms(fm, params, v, x, y)
    assert sorted(forms) == sorted(layers)
    for name in layers[:: max(len(layers) // 8, 1)]:
        expected = ggn_forms(fm, params, name, v[name], x, y)
        torch.testing.assert_close(forms[name], expected, rtol=1e-10, atol=1e-14)


def test_layers_never_called_are_left_out():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    fm, params = FunctionalModel.from_module(WithUnused().to(DTYPE))
    v = {name: torch.ones_like(params[name]) for name in ("used.weight", "unused.weight")}
    x, y = torch.randn(2, 4, dtype=DTYPE), torch.tensor([0, 2])
    assert list(layer_io_ggn_forms(fm, params, v, x, y)) == ["used.weight"]


@pytest.mark.parametrize(
    ("network", "ghost"),
    [
        ("cnn", ["conv1.weight", "block.conv.weight", "head.weight"]),
        ("attention", ["head.weight"]),  # out_proj's weight is used functionally: vmapped route
        ("mlp_gelu", ["fc1.weight", "fc2.weight", "fc3.weight"]),
    ],
)
def test_ghost_norm_gauss_newton_traces_match_the_vmapped_route(network, ghost):
    fm, params = FunctionalModel.from_module(TINY_NETWORKS[network]())
    layers = TINY_LAYERS[network]
    x, y = tiny_data(network, 8)
    with differentiable():
        fast = layer_io_gauss_newton_traces(fm, params, layers, x, y)
    assert sorted(fast) == sorted(ghost)
    slow = vjp_gauss_newton_traces(fm, params, layers, x, y)
    for name in ghost:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-14)
