"""The layer-input/output-gradient route for v_iᵀ G_i v_i against dense float64 Gauss–Newton blocks."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.ghost import ghost_ggn_forms, ghost_modules, joint_certification
from hessfine.bounds.quadratic_forms import (
    certification_tolerance,
    certify_piecewise_linear,
    ggn_forms,
    quadratic_forms,
)
from hessfine.bounds.traces import _ghost_gauss_newton_traces, _vmapped_gauss_newton_traces
from torch import nn

from tests.oracles import (
    DTYPE,
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_output_perturbation_derivatives,
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
    forms = ghost_ggn_forms(fm, params, v, x, y)
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
    assert sorted(ghost_modules(fm, layers)) == sorted(layers)
    forms = ghost_ggn_forms(fm, params, v, x, y)
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
    fast = _ghost_gauss_newton_traces(fm, params, layers, x, y)
    assert sorted(fast) == sorted(layers)
    slow = _vmapped_gauss_newton_traces(fm, params, layers, x, y)
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-14)


def test_declines_when_logits_outnumber_the_budget():
    module = TINY_NETWORKS["cnn"]()
    fm, params = FunctionalModel.from_module(module)
    v = directions_of(params, ["head.weight"])
    x, y = tiny_data("cnn", 4)
    assert ghost_ggn_forms(fm, params, v, x, y, max_backward=2) == {}
    assert sorted(ghost_ggn_forms(fm, params, v, x, y, max_backward=3)) == ["head.weight"]


@pytest.mark.parametrize(("layers", "route"), [(None, "layer-io"), (["head.weight"], "jvp")])
def test_quadratic_forms_route_by_the_number_of_logits(layers, route):
    # 3 logits: shared backward passes pay for three CNN layers (3 ≤ 2·3), not for one (3 > 2).
    module = TINY_NETWORKS["cnn"]()
    fm, params = FunctionalModel.from_module(module)
    v = directions_of(params, layers or TINY_LAYERS["cnn"])
    x, y = tiny_data("cnn", 9)
    forms = quadratic_forms(fm, params, v, [(x[:5], y[:5]), (x[5:], y[5:])], estimator="block")
    for name, form in forms.items():
        assert form.method == "ggn-certified"
        assert form.diagnostics["ggn_products"] == route
        dense = dense_forms(dense_ggn_blocks(module, params, name, x, y), v[name])
        assert form.max == pytest.approx(float(dense.max()), rel=1e-9)
        assert form.argmax == int(dense.argmax())


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
    forms = ghost_ggn_forms(fm, params, v, x, y)
    assert sorted(forms) == sorted(layers)
    for name in layers[:: max(len(layers) // 8, 1)]:
        expected = ggn_forms(fm, params, name, v[name], x, y)
        torch.testing.assert_close(forms[name], expected, rtol=1e-10, atol=1e-14)


class Mixed(nn.Module):
    """ReLU layers; a GELU after `smooth` on a branch scaled by 1e-7, so that its derivatives are
    tiny next to the other layers' (its own curvature over its own squared first derivative is
    still large); a Linear used twice with ReLU (the weight enters quadratically); a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.smooth = nn.Linear(4, 6)
        self.tied = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) + 1e-7 * nn.functional.gelu(self.smooth(x))
        h = torch.relu(self.tied(torch.relu(self.tied(h))))
        return self.head(torch.relu(self.b(h)))


def test_joint_certification_certifies_a_relu_cnn_in_one_test():
    module = TINY_NETWORKS["cnn"]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS["cnn"]
    x, _ = tiny_data("cnn", 2)
    tested, q = joint_certification(fm, params, layers, x[:1])
    assert sorted(tested) == sorted(layers) and q == 0.0
    ratios = certify_piecewise_linear(fm, params, layers, x)
    assert ratios == dict.fromkeys(layers, 0.0)


def test_joint_certification_fails_on_smooth_networks():
    module = TINY_NETWORKS["mlp_gelu"]()
    fm, params = FunctionalModel.from_module(module)
    x, _ = tiny_data("mlp_gelu", 2)
    tested, q = joint_certification(fm, params, TINY_LAYERS["mlp_gelu"], x[:1])
    assert sorted(tested) == sorted(TINY_LAYERS["mlp_gelu"]) and q > 1e-2
    # attention's projections are not Linear modules' single-call weights: only the head is
    # tested, which certify_piecewise_linear does not take as a joint certificate
    module = TINY_NETWORKS["attention"]()
    fm, params = FunctionalModel.from_module(module)
    x, _ = tiny_data("attention", 2)
    assert joint_certification(fm, params, TINY_LAYERS["attention"], x[:1])[0] == ["head.weight"]


def test_certification_decisions_equal_the_per_layer_tests():
    # The joint test fails — because each layer's term is scaled by its own first derivative;
    # unscaled, the tiny GELU branch would pass as round-off — and leaves the tied weight out, so
    # every layer is decided by its own test: the dense oracle says which blocks equal their GGN.
    torch.manual_seed(0)
    module = Mixed().to(DTYPE).eval()
    fm, params = FunctionalModel.from_module(module)
    layers = [n for n, p in params.items() if n.endswith("weight")]
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randint(0, 3, (3,))
    tested, q = joint_certification(fm, params, layers, x[:1])
    assert "tied.weight" not in tested and q > certification_tolerance(DTYPE)
    ratios = certify_piecewise_linear(fm, params, layers, x)
    tolerance = certification_tolerance(DTYPE)
    decided = {name: ratios[name] <= tolerance for name in layers}
    assert decided == {
        "a.weight": True,
        "smooth.weight": False,
        "tied.weight": False,
        "b.weight": True,
        "head.weight": True,
    }
    for name, certified in decided.items():
        H = dense_block_hessians(module, params, name, x[:1], y[:1])
        G = dense_ggn_blocks(module, params, name, x[:1], y[:1])
        assert torch.allclose(H, G, rtol=1e-8, atol=1e-10) is certified


def test_joint_certification_value_equals_the_dense_perturbation_hessian():
    # Q = Σ_ij t_iᵀ ∇²_{δ_i δ_j} φ t_j / (|f_i| |f_j|), f_i = ⟨∂φ/∂δ_i, t_i⟩, t_i = u_i applied to
    # the layer's input, with r and u_i drawn from the same generator in the same order.
    module = TINY_NETWORKS["mlp_gelu"]()
    fm, params = FunctionalModel.from_module(module)
    layers = ["fc1.weight", "fc2.weight", "fc3.weight"]
    x, _ = tiny_data("mlp_gelu", 1)
    tested, q = joint_certification(
        fm, params, layers, x, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    r = torch.randn(1, 3, generator=g, dtype=DTYPE)
    u = [torch.randn(params[name].shape, generator=g, dtype=DTYPE) for name in layers]
    gradient, hessian, sizes = dense_output_perturbation_derivatives(module, layers, x, r)
    with torch.no_grad():
        h1 = module.act(module.fc1(x))
        inputs = [x, h1, module.act(module.fc2(h1))]
    t = [(inp @ w.T).reshape(-1) for inp, w in zip(inputs, u, strict=True)]
    first = [float(gi @ ti) for gi, ti in zip(gradient.split(sizes), t, strict=True)]
    scaled = torch.cat([ti / abs(fi) for ti, fi in zip(t, first, strict=True)])
    # fc3's gradient r is constant (its row of the Hessian is zero): tested, no term
    assert tested == layers
    assert q == pytest.approx(abs(float(scaled @ hessian @ scaled)), rel=1e-9)
    assert q > 1e-2


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
    assert list(ghost_ggn_forms(fm, params, v, x, y)) == ["used.weight"]
