"""Every quadratic-form estimator against dense float64 Hessians on the tiny networks."""

import pytest
import torch
from hessfine.bounds.estimators.quadratic_forms import (
    positive_forms,
    positive_forms_layers,
    quadratic_forms,
)
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators import per_example as per_example_module
from hessfine.bounds.operators import retained as retained_module
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.operators.output_graph import OutputPairHVP
from hessfine.bounds.safe_autodiff import differentiable

from tests.cases import tiny_case
from tests.oracles import (
    TINY_LAYERS,
    TINY_NETWORKS,
    DesignedHessians,
    assert_matches,
    crossing_hessians,
    dense_batch_mean_hessians,
    dense_block_hessians,
    dense_ggn_blocks,
    perturbed_reference,
    positive_part,
    tiny_data,
)
from tests.oracles import quadratic_forms as dense_forms

NETWORKS = list(TINY_NETWORKS)
N = 10


def without_output_graph(monkeypatch):
    """Every per-example product from the per-pair back ends (retained graphs with per-pair
    weights, vmapped calls), as for layers that are not Linear/Conv1D weights."""
    monkeypatch.setattr(OutputPairHVP, "supports", lambda self, name: False)


def setup(network):
    module, fm, params, directions, x, y = tiny_case(network, N)
    return module, fm, params, directions, x, y, [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.parametrize("network", NETWORKS)
def test_block_matches_dense_hessian(network):
    module, fm, params, directions, x, y, batches = setup(network)
    forms = quadratic_forms(fm, params, directions, batches, estimator="block")
    for name, v in directions.items():
        dense = dense_forms(dense_block_hessians(module, params, name, x, y), v)
        assert_matches(forms[name], dense)
        assert forms[name].route in ("ggn-certified", "hvp")


@pytest.mark.parametrize("network", NETWORKS)
def test_ggn_matches_dense_gauss_newton(network):
    module, fm, params, directions, x, y, batches = setup(network)
    forms = quadratic_forms(fm, params, directions, batches, estimator="ggn")
    for name, v in directions.items():
        assert_matches(forms[name], dense_forms(dense_ggn_blocks(module, params, name, x, y), v))
        assert forms[name].route == "ggn"


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("estimator", ["positive", "auto"])
def test_positive_part_exact_when_steps_reach_dimension(network, estimator):
    module, fm, params, directions, x, y, batches = setup(network)
    steps = max(v.numel() for v in directions.values())
    forms = quadratic_forms(
        fm, params, directions, batches, estimator=estimator, lanczos_steps=steps, positive_rtol=0
    )
    for name, v in directions.items():
        H = dense_block_hessians(module, params, name, x, y)
        assert_matches(forms[name], dense_forms(positive_part(H), v))
        if forms[name].route == "lanczos":
            assert forms[name].diagnostics["krylov_exhausted_fraction"] == 1.0


def test_positive_part_differs_from_raw_block_on_smooth_network():
    module, fm, params, directions, x, y, _ = setup("mlp_gelu")
    H = dense_block_hessians(module, params, "fc1.weight", x, y)
    v = directions["fc1.weight"]
    assert not torch.allclose(dense_forms(H, v), dense_forms(positive_part(H), v), rtol=1e-3)


def test_positive_converges_with_lanczos_steps():
    module, fm, params, directions, x, y, batches = setup("attention")
    name = "attn.in_proj_weight"
    exact = dense_forms(
        positive_part(dense_block_hessians(module, params, name, x, y)), directions[name]
    )
    errors = []
    for steps in (2, 8, 32, 108):
        form = quadratic_forms(
            fm,
            params,
            {name: directions[name]},
            batches,
            estimator="positive",
            lanczos_steps=steps,
            positive_rtol=0,
        )[name]
        errors.append(abs(form.mean - float(exact.mean())) / float(exact.mean()))
    assert errors[-1] < 1e-6
    assert errors[0] > errors[2] > errors[3]


def test_positive_brackets_below_full_dimension_and_the_error_bound():
    # The smooth attention in_proj block (d = 108, Krylov space never exhausted here) below its
    # dimension, three directions v, 10 examples. Errors are relative to max_x v·H⁺(x)v.
    # * fixed K = 32 steps (positive_rtol = 0): every example's midpoint within its half-width of
    #   the exact value (rigorous), and error_bound = the largest half-width bounds the max's error;
    # * the adaptive default (rtol 1e-2): the max within 1e-2 and within error_bound.
    module, fm, params, _, x, y, _ = setup("attention")
    name = "attn.in_proj_weight"
    H_plus = positive_part(dense_block_hessians(module, params, name, x, y))
    for seed in (1, 2, 3):
        v = params[name] - perturbed_reference(params, [name], seed=seed)[name]
        exact = dense_forms(H_plus, v)
        scale = float(exact.max())
        with differentiable():
            run = positive_forms(fm, params, name, v, x, y, steps=32, rtol=0)
        assert bool(((run.values - exact).abs() <= run.errors + 1e-12 * scale).all())
        assert bool((run.lower <= exact + 1e-12 * scale).all())
        assert bool((run.upper >= exact - 1e-12 * scale).all())
        fixed = quadratic_forms(
            fm,
            params,
            {name: v},
            [(x, y)],
            estimator="positive",
            lanczos_steps=32,
            positive_rtol=0,
        )[name]
        assert fixed.max == pytest.approx(float(run.values.max()), rel=1e-12)
        assert fixed.diagnostics["krylov_exhausted_fraction"] == 0.0
        assert abs(fixed.max - scale) <= fixed.diagnostics["error_bound"] + 1e-12 * scale
        assert abs(fixed.max - scale) <= fixed.max_error_estimate + 1e-12 * scale
        adaptive = quadratic_forms(fm, params, {name: v}, [(x, y)], estimator="positive")[name]
        miss = abs(adaptive.max - scale)
        assert miss <= 1e-2 * scale and miss <= adaptive.diagnostics["error_bound"] + 1e-12 * scale


@pytest.mark.parametrize(
    ("network", "certified"),
    [
        ("cnn", {"conv1.weight": True, "block.conv.weight": True, "head.weight": True}),
        ("mlp_gelu", {"fc1.weight": False, "fc2.weight": False, "fc3.weight": True}),
        (
            "attention",
            {"attn.in_proj_weight": False, "attn.out_proj.weight": False, "head.weight": True},
        ),
    ],
)
def test_auto_certification(network, certified):
    module, fm, params, directions, x, y, batches = setup(network)
    forms = quadratic_forms(fm, params, directions, batches, estimator="auto")
    for name, expected in certified.items():
        assert forms[name].diagnostics["certified_psd"] is expected
        assert forms[name].route == ("ggn-certified" if expected else "lanczos")
        with differentiable():
            ratio = certify_piecewise_linear(fm, params, [name], x)[name]
        assert (ratio <= certification_tolerance(torch.float64)) is expected
        if expected:
            H, G = (f(module, params, name, x, y) for f in (dense_block_hessians, dense_ggn_blocks))
            torch.testing.assert_close(H, G, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("network", ["mlp_tanh", "cnn", "attention"])
def test_reference_code_matches_dense_batch_mean_hessians(network):
    module, fm, params, directions, x, y, batches = setup(network)
    layers = list(directions)
    forms = quadratic_forms(fm, params, directions, batches, estimator="reference-code")
    v = torch.cat([directions[name].reshape(-1) for name in layers])
    per_batch = {name: [] for name in layers}
    for H in dense_batch_mean_hessians(module, params, layers, x, y, 4):
        hv, offset = H @ v, 0
        for name in layers:
            d = directions[name].numel()
            per_batch[name].append(float(hv[offset : offset + d] @ v[offset : offset + d]))
            offset += d
    for name in layers:
        assert_matches(forms[name], torch.tensor(per_batch[name], dtype=torch.float64))
        assert forms[name].count == 3


def test_reference_code_differs_from_paper_quantity():
    _, fm, params, directions, _, _, batches = setup("mlp_gelu")
    ours = quadratic_forms(fm, params, directions, batches, estimator="auto")
    theirs = quadratic_forms(fm, params, directions, batches, estimator="reference-code")
    assert any(abs(ours[n].max - theirs[n].max) > 0.1 * abs(ours[n].max) for n in directions)


def test_float32_block_agrees_with_float64():
    module, fm, params, directions, x, y, batches = setup("attention")
    forms64 = quadratic_forms(fm, params, directions, batches, estimator="block")
    module32 = module.float()
    fm32, params32 = FunctionalModel.from_module(module32)
    dirs32 = {k: v.float() for k, v in directions.items()}
    batches32 = [(bx.float(), by) for bx, by in batches]
    forms32 = quadratic_forms(fm32, params32, dirs32, batches32, estimator="block")
    for name in directions:
        assert forms32[name].max == pytest.approx(forms64[name].max, rel=1e-4)


def test_unknown_estimator_is_rejected():
    _, fm, params, directions, _, _, batches = setup("cnn")
    with pytest.raises(ValueError, match="unknown estimator"):
        quadratic_forms(fm, params, directions, batches, estimator="exact")


@pytest.mark.parametrize("rtol", [1e-2, 1e-4])
def test_adaptive_positive_part_reaches_its_tolerance_at_the_max(rtol):
    module, fm, params, directions, x, y, batches = setup("attention")
    forms = quadratic_forms(fm, params, directions, batches, estimator="auto", positive_rtol=rtol)
    for name, v in directions.items():
        form = forms[name]
        if form.route != "lanczos":
            continue
        exact = dense_forms(positive_part(dense_block_hessians(module, params, name, x, y)), v)
        assert abs(form.max - float(exact.max())) <= rtol * float(exact.max())
        d = form.diagnostics
        assert d["positive_rtol"] == rtol and d["lanczos_max_steps"] == 128
        assert 4 <= d["lanczos_steps_mean"] <= d["lanczos_steps_max"] <= 128
        assert d["error_bound"] <= rtol * d["lower_bound_max"] * (1 + 1e-9)
        assert d["lower_bound_max"] <= float(exact.max()) * (1 + 1e-9)


@pytest.mark.parametrize("network", ["mlp_gelu", "cnn", "attention"])
@pytest.mark.parametrize("target", ["max", "mean"])
def test_the_mean_is_bracketed_by_its_interval_and_converged_on_request(network, target):
    # issue 18 item 1, against the dense positive parts at positive_rtol 1e-2: on exact routes
    # mean_lower = mean = mean_upper = the exact mean; on the lanczos route mean_lower ≤ exact ≤
    # mean_upper (rigorous up to round-off) and the max within rtol of the exact max. With the
    # default target (max) pruned examples stop early at their lower bound, so the mean is low
    # (by several % on the attention in_proj block) and its interval wide; with target "mean"
    # the interval is at most 2 rtol wide and the mean within rtol of the exact mean
    module, fm, params, directions, x, y, batches = setup(network)
    forms = quadratic_forms(fm, params, directions, batches, positive_target=target)
    widths = []
    for name, v in directions.items():
        exact = dense_forms(positive_part(dense_block_hessians(module, params, name, x, y)), v)
        mean, top = float(exact.mean()), float(exact.max())
        form = forms[name].to_json()
        if forms[name].route != "lanczos":
            assert form["mean_lower"] == form["mean_upper"] == form["mean"]
            assert form["mean"] == pytest.approx(mean, rel=1e-6)
            continue
        assert form["mean_lower"] <= mean * (1 + 1e-9) and form["mean_upper"] >= mean * (1 - 1e-9)
        assert form["mean_lower"] <= form["mean"] <= form["mean_upper"]
        assert abs(form["max"] - top) <= 1e-2 * top
        widths.append((form["mean_upper"] - form["mean_lower"]) / form["mean_lower"])
        if target == "mean":
            assert abs(form["mean"] - mean) <= 1e-2 * mean
            assert widths[-1] <= 2e-2
    assert network == "cnn" or (max(widths) > 2e-2) is (target == "max")


@pytest.mark.parametrize("budget", [0, 2**26])
def test_lockstep_positive_part_matches_layer_by_layer_under_a_small_memory_budget(
    monkeypatch, budget
):
    # budgets so small that examples run one at a time, the layers form two lockstep sets and
    # the layers of a step are split over several calls: the results are still those of
    # positive_forms run layer by layer (the same chunks, hence the same pruning), with
    # vmapped forward-over-reverse products (retained-graph budget 0) or retained graphs
    monkeypatch.setattr(per_example_module, "_LOCKSTEP_BUDGET", 700)
    monkeypatch.setattr(per_example_module, "_ELEMENT_BUDGET", 200)
    monkeypatch.setattr(retained_module, "_RETAINED_BUDGET", budget)
    without_output_graph(monkeypatch)
    _, fm, params, directions, x, y, _ = setup("attention")
    with differentiable():
        joint = positive_forms_layers(fm, params, directions, x, y, steps=12, rtol=1e-3)
        for name, v in directions.items():
            alone = positive_forms(fm, params, name, v, x, y, steps=12, rtol=1e-3)
            torch.testing.assert_close(joint[name].values, alone.values, rtol=1e-9, atol=1e-12)
            assert torch.equal(joint[name].steps, alone.steps)
            assert torch.equal(joint[name].pruned, alone.pruned)


@pytest.mark.parametrize("network", ["attention", "mlp_gelu"])
def test_positive_part_switches_to_the_retained_graph_mid_run(network, monkeypatch):
    # with a retained-graph budget (P pairs × Σ d of their layers) of a third of that of all
    # pairs (N × Σ d), the first steps use vmapped forward-over-reverse products and the
    # retained graph takes over as pairs finish: the same steps, pruning and values as vmapped
    # products throughout (budget 0), and exact against the dense positive part when the
    # Krylov spaces are exhausted
    without_output_graph(monkeypatch)
    module, fm, params, directions, x, y, _ = setup(network)
    steps = max(v.numel() for v in directions.values())
    calls = []
    original = retained_module.RetainedLayersHVP.__call__

    def counted(self, names, blocks, members):
        calls.append(sum(b.shape[0] for b in blocks) * sum(b.shape[1] for b in blocks))
        return original(self, names, blocks, members)

    monkeypatch.setattr(retained_module.RetainedLayersHVP, "__call__", counted)
    full = N * sum(v.numel() for v in directions.values())
    small = full // 3
    runs = {}
    with differentiable():
        for budget in (0, small):
            monkeypatch.setattr(retained_module, "_RETAINED_BUDGET", budget)
            for rtol, cap in ((1e-3, 24), (0.0, steps)):
                runs[budget, rtol] = positive_forms_layers(
                    fm, params, directions, x, y, steps=cap, rtol=rtol
                )
    assert calls and max(calls) <= small
    for rtol in (1e-3, 0.0):
        for name in directions:
            vmapped, retained = runs[0, rtol][name], runs[small, rtol][name]
            torch.testing.assert_close(retained.values, vmapped.values, rtol=1e-9, atol=1e-12)
            assert torch.equal(retained.steps, vmapped.steps)
            assert torch.equal(retained.pruned, vmapped.pruned)
    for name, v in directions.items():
        exact = dense_forms(positive_part(dense_block_hessians(module, params, name, x, y)), v)
        torch.testing.assert_close(runs[small, 0.0][name].values, exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("one_example_per_chunk", [False, True])
def test_pruning_keeps_the_maximiser_whose_early_estimate_is_low(
    monkeypatch, one_example_per_chunk
):
    # tests/oracles.crossing_hessians as the per-example Hessians of a one-layer network: the
    # maximiser (example 1) converges late, and at step 4 its lower bound is below example 0's.
    # Whether the examples run together or one per chunk (then example 0's final lower bound is
    # the floor of example 1's run), example 1 may only be pruned once its upper bound is below
    # example 0's lower bound: the max and argmax are the dense oracle's.
    if one_example_per_chunk:
        monkeypatch.setattr(per_example_module, "_ELEMENT_BUDGET", 6 * 48)
    H, v = crossing_hessians()
    module = DesignedHessians(v.numel())
    fm, params = FunctionalModel.from_module(module)
    y = torch.ones(2, dtype=torch.long)
    torch.testing.assert_close(dense_block_hessians(module, params, "weight", H, y), H)
    exact = dense_forms(positive_part(H), v)
    form = quadratic_forms(
        fm, params, {"weight": v}, [(H, y)], estimator="positive", lanczos_steps=6
    )["weight"]
    assert form.argmax == int(exact.argmax()) == 1
    assert form.max == pytest.approx(float(exact.max()), rel=1e-2)
    with differentiable():
        alone = positive_forms(fm, params, "weight", v, H, y, steps=6, rtol=1e-2)
    assert int(alone.values.argmax()) == 1 and not bool(alone.pruned[1])
    assert float(alone.values[1]) == pytest.approx(float(exact[1]), rel=1e-2)


def test_later_chunks_are_pruned_against_the_best_value_of_earlier_ones(monkeypatch):
    # two examples per chunk. Chunk 1: example 0 exact after 2 steps (v·H⁺v = 48, the maximum)
    # and a tiny example 1 (converged relative to it at step 4). Chunk 2: example 2,
    # v·H⁺v = 12.26, converging slowly: its upper bound at step 4 (15.0) is far below the best
    # lower bound of chunk 1 (48, not the tiny one's), so it is pruned there rather than running
    # to the step cap.
    monkeypatch.setattr(per_example_module, "_ELEMENT_BUDGET", 2 * 12 * 48)
    (slow, _), v = crossing_hessians()
    two = torch.diag(torch.tensor([2.0] * 24 + [-1.0] * 24, dtype=torch.float64))
    H = torch.stack([two, 0.01 * slow, slow])
    fm, params = FunctionalModel.from_module(DesignedHessians(v.numel()))
    y = torch.ones(3, dtype=torch.long)
    with differentiable():
        result = positive_forms(fm, params, "weight", v, H, y, steps=12)
    assert result.pruned.tolist() == [False, False, True] and result.steps.tolist() == [2, 4, 4]
    assert float(result.values[0]) == pytest.approx(48.0, rel=1e-12)
    form = quadratic_forms(
        fm, params, {"weight": v}, [(H, y)], estimator="positive", lanczos_steps=12
    )["weight"]
    assert form.diagnostics["pruned_fraction"] == pytest.approx(1 / 3)
    assert form.max == pytest.approx(48.0, rel=1e-12) and form.argmax == 0


@pytest.mark.parametrize(("layers", "route"), [(None, "layer-io"), (["head.weight"], "jvp")])
def test_quadratic_forms_route_by_the_number_of_logits(layers, route):
    # 3 logits: shared backward passes pay for three CNN layers (3 ≤ 2·3), not for one (3 > 2).
    module = TINY_NETWORKS["cnn"]()
    fm, params = FunctionalModel.from_module(module)
    reference = perturbed_reference(params, layers or TINY_LAYERS["cnn"])
    v = {name: params[name] - reference[name] for name in layers or TINY_LAYERS["cnn"]}
    x, y = tiny_data("cnn", 9)
    forms = quadratic_forms(fm, params, v, [(x[:5], y[:5]), (x[5:], y[5:])], estimator="block")
    for name, form in forms.items():
        assert form.route == "ggn-certified"
        assert form.diagnostics["ggn_products"] == route
        dense = dense_forms(dense_ggn_blocks(module, params, name, x, y), v[name])
        assert form.max == pytest.approx(float(dense.max()), rel=1e-9)
        assert form.argmax == int(dense.argmax())
