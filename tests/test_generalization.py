"""Bound assembly: every field recomputed independently from per-layer values."""

import dataclasses
import json
import math

import pytest
import torch
from hessfine.bounds.generalization import (
    Bounds,
    as_matrix,
    assemble_bounds,
    classification_margins,
    consistent_loss_factor,
    hessian_distance_measure,
    noise_matrix_inverse,
    prior_distance_measures,
    spectral_norm,
    theorem_2_1,
    trace_corollary,
)

LAYER_MAX = {"conv": 4.0, "fc": 0.25, "neg": -1.0}
TRACE_MAX = {"conv": 10.0, "fc": 2.0, "neg": 0.5}
DIST = {"conv": 2.0, "fc": 0.5, "neg": 1.0}


def symmetric_confusion(k, rho):
    """Symmetric noise: the label flips with probability ρ to one of the k − 1 other classes."""
    off = rho / (k - 1)
    return torch.full((k, k), off, dtype=torch.float64) + (1 - rho - off) * torch.eye(k)


def test_hessian_distance_measure_and_theorem():
    C, n = 2.0, 50
    expected = math.sqrt(C * 4.0 / n) + math.sqrt(C * 0.25 / n) + 0.0
    assert hessian_distance_measure(LAYER_MAX, C=C, n=n) == pytest.approx(expected)
    assert theorem_2_1(0.3, expected, epsilon=0.1) == pytest.approx(1.1 * 0.3 + 1.1 * expected)


def test_epsilon_defaults_to_zero():
    assert theorem_2_1(0.3, 0.5) == pytest.approx(0.8)
    assert trace_corollary(0.2, TRACE_MAX, DIST, C=1.5, n=200) == pytest.approx(
        trace_corollary(0.2, TRACE_MAX, DIST, C=1.5, n=200, epsilon=0.0)
    )


def test_trace_corollary_uses_alpha_times_sqrt_trace():
    C, n = 1.5, 200
    term = sum(DIST[k] * math.sqrt(C * TRACE_MAX[k] / n) for k in TRACE_MAX)
    got = trace_corollary(0.2, TRACE_MAX, DIST, C=C, n=n, epsilon=0.0)
    assert got == pytest.approx(0.2 + term)
    with pytest.raises(ValueError, match="alphas lacks"):
        trace_corollary(0.2, TRACE_MAX, {"conv": 1.0}, C=C, n=n)


@pytest.mark.parametrize(("k", "rho"), [(2, 0.2), (3, 0.4), (10, 0.6)])
def test_consistent_loss_factor_symmetric_noise_closed_form(k, rho):
    # F = aI + b11ᵀ with a = 1 − ρk/(k−1), b = ρ/(k−1); F⁻¹ = (I − b11ᵀ)/a, row sum (1+(k−2)b)/|a|.
    a, b = 1 - rho * k / (k - 1), rho / (k - 1)
    assert consistent_loss_factor(symmetric_confusion(k, rho)) == pytest.approx(
        (1 + (k - 2) * b) / abs(a)
    )


def test_consistent_loss_factor_rejects_singular_and_bad_shapes():
    with pytest.raises(ValueError, match="singular"):
        consistent_loss_factor(symmetric_confusion(4, 0.75))
    with pytest.raises(ValueError, match="square"):
        consistent_loss_factor(torch.ones(2, 3))
    assert consistent_loss_factor(torch.eye(5)) == pytest.approx(1.0)


def near_singular_symmetric_noise(gap):
    """2-class symmetric noise at rate ρ = 1/2 − gap: eigenvalues 1 and 2·gap, cond(F) = 1/(2·gap)."""
    return torch.tensor([[0.5 + gap, 0.5 - gap], [0.5 - gap, 0.5 + gap]], dtype=torch.float64)


def test_consistent_loss_factor_condition_number_guard_at_its_limit():
    # cond(F) ≈ 1.5e12, finite and just above the limit 1e12: rejected as singular
    F = near_singular_symmetric_noise(3.4e-13)
    assert math.isfinite(float(torch.linalg.cond(F))) and 1e12 < torch.linalg.cond(F) < 2e12
    with pytest.raises(ValueError, match=r"singular \(condition number 1\.\d+e\+12\)"):
        consistent_loss_factor(F)
    # cond(F) ≈ 1e11, below the limit: κ = 1/(1 − 2ρ) = 1/(2·gap) (to the rounding of F's entries)
    assert consistent_loss_factor(near_singular_symmetric_noise(5e-12)) == pytest.approx(
        1e11, rel=1e-3
    )


def test_noise_matrix_inverse_checks_the_number_of_classes():
    F = symmetric_confusion(3, 0.3)
    torch.testing.assert_close(noise_matrix_inverse(F, 3) @ F, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="3×3, the model has 4 classes"):
        noise_matrix_inverse(F, 4)


def test_matrices_and_spectral_norms():
    conv = torch.zeros(4, 2, 3, 3)
    conv[1, 0, 1, 1] = -5.0
    conv[2, 1, 0, 0] = 3.0
    assert as_matrix(conv).shape == (4, 18)
    assert spectral_norm(conv) == pytest.approx(5.0)
    assert spectral_norm(torch.diag(torch.tensor([1.0, 7.0, 2.0]))) == pytest.approx(7.0)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (8, 3, 3, 3), (1, 9), (9, 1)])
def test_spectral_norm_equals_the_largest_singular_value(shape):
    # The Gram-matrix route against the SVD, on wide, tall, convolutional and rank-one shapes,
    # with a spread spectrum (the second singular value close to the first).
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    top = float(torch.linalg.svdvals(as_matrix(w))[0])
    assert spectral_norm(w) == pytest.approx(top, rel=1e-12)
    assert spectral_norm(w.float()) == pytest.approx(top, rel=1e-6)


def test_classification_margins():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0]])
    got = classification_margins(logits, torch.tensor([0, 2]))
    assert got.tolist() == pytest.approx([1.0, -4.0])


def diagonal_layers():
    w = {
        "a": torch.diag(torch.tensor([3.0, 1.0])),
        "b": torch.diag(torch.tensor([0.5, 2.0, 1.0])).reshape(3, 3, 1, 1),
    }
    v = {"a": torch.tensor([[0.0, 0.3], [0.4, 0.0]]), "b": torch.full((3, 3, 1, 1), 0.1)}
    return w, v


def test_prior_distance_measures_by_hand():
    w, v = diagonal_layers()
    n, gamma, B, delta = 400, 0.5, 2.0, 0.05
    spec = {"a": 3.0, "b": 2.0}
    dist = {"a": 0.5, "b": 0.3}
    prod = 6.0
    li = prod * (dist["a"] / spec["a"] + dist["b"] / spec["b"]) / math.sqrt(n)
    d, h = 2, 3
    ratio_sq = sum((dist[k] / spec[k]) ** 2 for k in spec)
    inner = B**2 * d**2 * h * math.log(d * h) * prod**2 * ratio_sq + math.log(d * n / delta)
    ney = math.sqrt(inner / (gamma**2 * n))
    got = prior_distance_measures(w, v, n=n, margin=gamma, input_norm=B, delta=delta)
    assert got["spectral_product_distance"] == pytest.approx(li)
    assert got["neyshabur_2018_complexity"] == pytest.approx(ney)
    assert got["spectral_product_distance_log10"] == pytest.approx(math.log10(li))
    assert got["neyshabur_2018_complexity_log10"] == pytest.approx(math.log10(ney))


def test_prior_distance_measures_of_one_wide_layer_and_one_example():
    # d = 1 layer, h = the larger side (5) of the 2×5 matrix, n = 1 is a valid size
    v = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 4.0]])
    got = prior_distance_measures([torch.ones(2, 5)], [v], n=1, delta=0.05)
    assert got["spectral_product_distance"] == pytest.approx(5.0)
    inner = 1 * 5 * math.log(5) * 25.0 + math.log(1 / 0.05)
    assert got["neyshabur_2018_complexity"] == pytest.approx(math.sqrt(inner))


def test_prior_distance_measures_of_zero_layers_are_defined_by_continuity():
    n, d, h, delta = 100, 3, 2, 0.05
    w = [2 * torch.eye(2), torch.zeros(2, 2), 3 * torch.eye(2)]  # a zero-initialised layer
    v = [0.1 * torch.eye(2), torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2)]
    got = prior_distance_measures(w, v, n=n)
    # Only the zero layer's own term survives: ‖v_2‖·‖M_1‖·‖M_3‖ = 5·2·3.
    assert got["spectral_product_distance"] == pytest.approx(30 / math.sqrt(n))
    inner = d**2 * h * math.log(d * h) * 30.0**2 + math.log(d * n / delta)
    assert got["neyshabur_2018_complexity"] == pytest.approx(math.sqrt(inner / n))
    # The same network with a tiny instead of a zero layer gives (nearly) the same values.
    w_eps = [w[0], 1e-12 * torch.eye(2), w[2]]
    near = prior_distance_measures(w_eps, v, n=n)
    assert near["spectral_product_distance"] == pytest.approx(got["spectral_product_distance"])
    # Two zero layers: every term has a zero factor; the log10 is −∞, never a domain error.
    both = prior_distance_measures([torch.zeros(2, 2)] * 2, [torch.ones(2, 2)] * 2, n=n)
    assert both["spectral_product_distance"] == 0.0
    assert both["spectral_product_distance_log10"] == -math.inf
    assert both["neyshabur_2018_complexity"] == pytest.approx(
        math.sqrt(math.log(2 * n / delta) / n)
    )


def test_prior_distance_measures_survive_overflow():
    w = {f"l{i}": 1e20 * torch.eye(3) for i in range(20)}
    v = {k: torch.eye(3) for k in w}
    got = prior_distance_measures(w, v, n=10)
    assert got["spectral_product_distance"] == math.inf
    # log10: 20·20 (product) + log10(20 · √3 · 1e-20) − ½ log10(10)
    assert got["spectral_product_distance_log10"] == pytest.approx(
        400 + math.log10(20 * math.sqrt(3)) - 20.5
    )


def test_assemble_bounds_recomputes_every_field():
    w, v = diagonal_layers()
    layer_max = {"a": 1.2, "b": 0.3}
    trace_max = {"a": 5.0, "b": 2.0}
    dist = {"a": 0.5, "b": 0.3}
    C, n, eps = 2.5, 1000, 0.05
    confusion = symmetric_confusion(3, 0.3)
    factor = (1 + 1 * 0.15) / (1 - 0.45)
    common = {
        "train_loss": 0.4,
        "layer_max": layer_max,
        "distances": dist,
        "weights": w,
        "directions": v,
        "trace_positive_max": trace_max,
        "C": C,
        "n": n,
        "confusion": confusion,
    }
    out = assemble_bounds(
        **common,
        epsilon=eps,
        consistent_train_loss=0.6,
        noisy_trace_positive_max=trace_max,
        noise_matrix_source="known",
        certificate={"bound": 0.5},
    )
    assert isinstance(out, Bounds)
    hdm = sum(math.sqrt(C * layer_max[k] / n) for k in layer_max)
    trace_term = sum(dist[k] * math.sqrt(C * trace_max[k] / n) for k in trace_max)
    assert out.hessian_distance_measure == pytest.approx(hdm)
    assert out.theorem_2_1 == pytest.approx((1 + eps) * (0.4 + hdm))
    assert out.trace_corollary == pytest.approx((1 + eps) * (0.4 + trace_term))
    assert out.noisy_label_factor == pytest.approx(factor)
    assert out.hessian_distance_measure_noisy_labels == pytest.approx(hdm * math.sqrt(factor))
    assert out.theorem_2_1_noisy_labels == pytest.approx(
        (1 + eps) * (0.6 + hdm * math.sqrt(factor))
    )
    assert out.trace_corollary_noisy_labels == pytest.approx(
        (1 + eps) * (0.6 + trace_term * math.sqrt(factor))
    )
    assert out.noise_matrix_source == "known"
    assert out.distance_measures == prior_distance_measures(w, v, n=n)
    # 𝓗_i of the consistent loss replace the clean ones where given; no ℓ̄ traces, no corollary.
    noisy_forms = {"a": 2.0, "b": 0.5}
    other = assemble_bounds(**common, consistent_train_loss=-0.1, noisy_layer_max=noisy_forms)
    hdm_bar = sum(math.sqrt(C * factor * noisy_forms[k] / n) for k in noisy_forms)
    assert other.hessian_distance_measure_noisy_labels == pytest.approx(hdm_bar)
    assert other.theorem_2_1_noisy_labels == pytest.approx(-0.1 + hdm_bar)
    assert other.trace_corollary_noisy_labels is None and other.trace_corollary is not None
    payload = json.loads(json.dumps(out.to_json()))
    for key in ("C", "n", "epsilon", "hessian_distance_measure", "theorem_2_1", "trace_corollary"):
        assert key in payload
    assert payload["pac_bayes_certificate"] == {"bound": 0.5}
    assert set(payload["distance_measures"]) == {
        "spectral_product_distance",
        "spectral_product_distance_log10",
        "neyshabur_2018_complexity",
        "neyshabur_2018_complexity_log10",
    }


def test_assemble_bounds_without_optional_inputs():
    w, v = diagonal_layers()
    out = assemble_bounds(
        train_loss=0.1,
        layer_max={"a": 1.0, "b": 1.0},
        distances={"a": 0.5, "b": 0.3},
        weights=w,
        directions=v,
        C=1.0,
        n=100,
    )
    assert out.trace_corollary is None and out.pac_bayes_certificate is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.C = 2.0
    assert out.noisy_label_factor is None and out.theorem_2_1_noisy_labels is None
    assert out.theorem_2_1 == pytest.approx(0.1 + 0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"C": -1.0, "n": 10}, "loss bound"), ({"C": 1.0, "n": 0}, "positive integer")],
)
def test_bad_constants_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hessian_distance_measure({"a": 1.0}, **kwargs)
    with pytest.raises(ValueError, match="epsilon"):
        theorem_2_1(0.1, 0.2, epsilon=-0.5)


def test_constants_at_their_boundaries():
    assert hessian_distance_measure({"a": 2.0}, C=0.0, n=1) == 0.0  # C = 0 and n = 1 are valid
    assert hessian_distance_measure({"a": 2.0}, C=2.0, n=1) == pytest.approx(2.0)
    for C, n in ((-1e-9, 10), (math.inf, 10), (1.0, 0)):
        with pytest.raises(ValueError):
            hessian_distance_measure({"a": 2.0}, C=C, n=n)


@pytest.mark.parametrize(
    "options", [{"margin": 0.0}, {"input_norm": 0.0}, {"delta": 1.0}, {"delta": 0.0}, {"n": 0}]
)
def test_prior_distance_measures_reject_each_bad_option(options):
    w, v = [torch.eye(2)], [torch.ones(2, 2)]
    with pytest.raises(ValueError, match="margin and input_norm|n must be"):
        prior_distance_measures(w, v, **{"n": 4, **options})


def test_prior_distance_measures_need_the_same_layers():
    with pytest.raises(ValueError, match="same layers"):
        prior_distance_measures({"a": torch.eye(2)}, {"b": torch.ones(2, 2)}, n=4)
    with pytest.raises(ValueError, match="same layers"):
        prior_distance_measures({"a": torch.eye(2)}, [torch.ones(2, 2)], n=4)


@pytest.mark.parametrize(
    ("weights", "directions"),
    [([], []), ([torch.eye(2)], []), ([torch.eye(2)], [torch.ones(2, 2)] * 2)],
)
def test_prior_distance_measures_need_as_many_directions_as_weights(weights, directions):
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        prior_distance_measures(weights, directions, n=4)


def test_consistent_loss_factor_is_the_largest_row_sum_of_the_inverse():
    F = torch.tensor([[0.9, 0.1, 0.0], [0.3, 0.6, 0.1], [0.0, 0.2, 0.8]], dtype=torch.float64)
    rows = torch.linalg.inv(F).abs().sum(dim=1)
    assert rows.max() > rows.min() + 0.1  # asymmetric noise: the rows differ
    assert consistent_loss_factor(F) == pytest.approx(float(rows.max()), rel=1e-12)


def test_a_usable_estimate_is_kept_and_a_degenerate_one_shrunk_within_the_kappa_limit():
    from hessfine.bounds.generalization import KAPPA_LIMIT, usable_noise_matrix
    from hessfine.finetune.confusion import symmetric_confusion

    good = symmetric_confusion(10, 0.4)
    kept = usable_noise_matrix(good)
    assert kept.shrinkage == 0.0 and torch.equal(kept.matrix, good.double())
    assert kept.kappa == pytest.approx(consistent_loss_factor(good)) == kept.estimate_kappa
    # a Dual-T-like estimate: diagonal 0.14–0.42 and uneven rows, invertible but with a huge κ
    g = torch.Generator().manual_seed(3)
    rough = torch.rand(10, 10, generator=g, dtype=torch.float64) ** 4
    rough.fill_diagonal_(0.0)
    rough = rough / rough.sum(dim=1, keepdim=True) * (1 - torch.linspace(0.14, 0.42, 10))[:, None]
    rough = rough + torch.diag(torch.linspace(0.14, 0.42, 10, dtype=torch.float64))
    assert consistent_loss_factor(rough) > KAPPA_LIMIT
    used = usable_noise_matrix(rough, steps=20)
    assert 0 < used.shrinkage <= 1 and used.kappa <= KAPPA_LIMIT
    flip = float(1 - rough.diagonal().mean())
    assert used.flip_rate == pytest.approx(flip)
    assert float(1 - used.matrix.diagonal().mean()) == pytest.approx(flip)  # same noise level
    assert torch.allclose(used.matrix.sum(dim=1), torch.ones(10, dtype=torch.float64))
    one_less = usable_noise_matrix(rough, steps=20).shrinkage - 1 / 20
    symmetric = torch.full_like(rough, flip / 9).fill_diagonal_(1 - flip)
    assert consistent_loss_factor((1 - one_less) * rough + one_less * symmetric) > KAPPA_LIMIT
    assert used.target == "symmetric"
    singular = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert usable_noise_matrix(singular).kappa <= KAPPA_LIMIT
    chance = usable_noise_matrix(symmetric_confusion(10, 0.85))  # S(ρ̂) itself: κ > the limit
    assert chance.target == "identity" and chance.shrinkage > 0 and chance.kappa <= KAPPA_LIMIT
