"""The piecewise-linearity certificate: per layer and joint, against dense float64 Hessians."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
    joint_certification,
)
from torch import nn

from tests.oracles import (
    DTYPE,
    TINY_LAYERS,
    TINY_NETWORKS,
    dense_block_hessians,
    dense_ggn_blocks,
    dense_output_perturbation_derivatives,
    tiny_data,
)


def test_certification_tolerance_is_looser_for_float32():
    assert certification_tolerance(torch.float32) > certification_tolerance(torch.float64) > 0


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
