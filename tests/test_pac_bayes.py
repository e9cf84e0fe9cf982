"""kl inversion against independent root finding; the certificate's invariants."""

import json
import math

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.pac_bayes import (
    DEFAULT_GRID,
    binomial_upper_bound,
    kl_bernoulli,
    kl_inverse_upper,
    lattice_prior_cost,
    optimal_sigmas,
    pac_bayes_certificate,
)
from scipy import optimize, stats

from tests.oracles import TINY_LAYERS, TINY_NETWORKS, perturbed_reference, tiny_data


def test_kl_bernoulli_known_values():
    assert kl_bernoulli(0.3, 0.3) == 0.0
    assert kl_bernoulli(0.0, 0.25) == pytest.approx(-math.log(0.75))
    assert kl_bernoulli(1.0, 0.25) == pytest.approx(-math.log(0.25))
    assert kl_bernoulli(0.5, 0.25) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert kl_bernoulli(0.2, 1.0) == math.inf and kl_bernoulli(0.2, 0.0) == math.inf


@pytest.mark.parametrize(
    ("q", "c"), [(0.1, 0.05), (0.02, 0.3), (0.5, 0.01), (0.9, 0.2), (0.3, 2.0), (1e-6, 1e-4)]
)
def test_kl_inverse_matches_brentq(q, c):
    expected = optimize.brentq(lambda p: kl_bernoulli(q, p) - c, q, 1 - 1e-15, xtol=1e-15)
    got = kl_inverse_upper(q, c)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got >= expected - 1e-15  # the upper end of the bisection bracket: conservative


def test_kl_inverse_edge_cases():
    c = 0.7
    assert kl_inverse_upper(0.0, c) == pytest.approx(1 - math.exp(-c), abs=1e-14)
    assert kl_inverse_upper(1.0, c) == 1.0
    assert kl_inverse_upper(0.4, 0.0) == 0.4
    assert kl_inverse_upper(0.4, 1e6) == pytest.approx(1.0, abs=1e-12)
    assert kl_inverse_upper(0.0, 1e300) == 1.0
    # q near 1: the root 1 − p* = (1 − q)·exp(−c/(1 − q) − …) is resolvable for q = 1 − 1e-6 …
    q = 1 - 1e-6
    expected = optimize.brentq(lambda p: kl_bernoulli(q, p) - 1e-7, q, 1 - 1e-16, xtol=1e-17)
    assert kl_inverse_upper(q, 1e-7) == pytest.approx(expected, abs=1e-14)
    # … and underflows to 1 for q = 1 − 1e-12, c = 1e-3 (1 − p* ≈ 1e-12·e^(−1e9)).
    assert kl_inverse_upper(1 - 1e-12, 1e-3) == 1.0
    values = [kl_inverse_upper(0.2, c) for c in (0.01, 0.1, 1.0, 10.0)]
    assert values == sorted(values) and all(0.2 < v <= 1 for v in values)
    with pytest.raises(ValueError):
        kl_inverse_upper(1.5, 0.1)


def test_binomial_upper_bound_closed_form_and_clopper_pearson():
    m, delta = 500, 0.05
    assert binomial_upper_bound(0, m, delta) == pytest.approx(1 - delta ** (1 / m), abs=1e-12)
    for k in (0, 3, 40, 250):
        kl_bound = binomial_upper_bound(k, m, delta)
        exact = stats.beta.ppf(1 - delta, k + 1, m - k)  # one-sided Clopper–Pearson
        assert exact - 1e-12 <= kl_bound <= exact + 0.05
    with pytest.raises(ValueError, match="errors"):
        binomial_upper_bound(6, 5, 0.1)


def test_lattice_prior_weights_sum_to_one():
    total = math.exp(-lattice_prior_cost(None)) + sum(
        math.exp(-lattice_prior_cost(k)) for k in range(-100000, 100001)
    )
    assert total == pytest.approx(1.0, abs=1e-4)


def test_optimal_sigmas_minimise_the_quadratic_proxy():
    dist, a, d, n = 2.0, 0.3, 50, 400
    s = optimal_sigmas({"w": dist}, {"w": a}, {"w": d}, n=n)["w"]

    def proxy(sig):
        return sig**2 * d * a + dist**2 / (n * sig**2)

    assert proxy(s) == pytest.approx(2 * math.sqrt(d * a * dist**2 / n))
    assert proxy(s) < min(proxy(0.9 * s), proxy(1.1 * s))
    assert optimal_sigmas({"w": 0.0}, {}, {"w": d}, n=n)["w"] == 0.0
    both = optimal_sigmas(
        {"w": dist, "u": dist}, {"w": a, "u": 0.0}, {"w": d, "u": d}, n=n
    )  # non-positive curvature falls back to the largest valid one
    assert both["u"] == both["w"] == pytest.approx(s)
    with pytest.raises(ValueError, match="curvature"):
        optimal_sigmas({"w": 1.0}, {"w": 0.0}, {"w": d}, n=n)


def certificate(network, n, *, curvature=0.1, seed=0, **kwargs):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS[network]
    reference = perturbed_reference(params, layers, scale=0.05)
    x, y = tiny_data(network, n, seed=seed)
    return pac_bayes_certificate(
        fm,
        params,
        reference,
        layers,
        [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])],
        n=n,
        curvature=dict.fromkeys(layers, curvature),
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ), (params, reference, layers)


@pytest.mark.parametrize("network", ["mlp_gelu", "attention"])
def test_certificate_invariants(network):
    cert, (params, reference, layers) = certificate(network, 128, draws=2)
    assert cert.empirical_error <= cert.empirical_error_upper <= cert.bound <= 1.0
    assert cert.trials == 2 * 128 and cert.scale in cert.grid
    assert cert.grid == DEFAULT_GRID == tuple(2.0**k for k in range(-4, 3))
    assert cert.bound == min(p.bound for p in cert.per_scale)
    kl = 0.5 * sum(
        float((params[k] - reference[k]).double().norm()) ** 2 / cert.sigmas[k] ** 2 for k in layers
    )
    assert cert.kl == pytest.approx(kl)
    assert all(cert.sigmas[k] == 2.0 ** cert.lattice[k] for k in layers)
    assert cert.prior_cost == pytest.approx(
        sum(lattice_prior_cost(k) for k in cert.lattice.values())
    )
    expected_complexity = (cert.kl + cert.prior_cost + math.log(4 * math.sqrt(128) / 0.05)) / 128
    assert cert.complexity == pytest.approx(expected_complexity)
    assert kl_bernoulli(cert.empirical_error_upper, cert.bound) == pytest.approx(
        cert.complexity, rel=1e-6
    )
    json.dumps(cert.to_json())


def test_certificate_tightens_with_more_data():
    small, _ = certificate("mlp_gelu", 64, draws=2)
    large, _ = certificate("mlp_gelu", 2048, draws=2)
    assert large.bound < small.bound - 0.1
    assert large.complexity < small.complexity


def test_grouped_draws_count_fewer_trials():
    single, _ = certificate("mlp_gelu", 128, draws=2, grid=(0.5,))
    grouped, _ = certificate("mlp_gelu", 128, draws=2, grid=(0.5,), examples_per_draw=8)
    assert grouped.trials == single.trials // 8 == 32
    assert grouped.kl == single.kl
    assert abs(grouped.empirical_error - single.empirical_error) < 0.1
    upper = binomial_upper_bound(grouped.empirical_error * 32, 32, 0.05 / 2)
    assert grouped.empirical_error_upper == pytest.approx(upper)
    assert grouped.empirical_error_upper - grouped.empirical_error > (
        single.empirical_error_upper - single.empirical_error
    )
    with pytest.raises(ValueError, match="multiple of examples_per_draw"):
        certificate("mlp_gelu", 128, draws=1, grid=(0.5,), examples_per_draw=5)


def test_tiny_noise_reproduces_the_deterministic_error():
    # Huge curvature → σ ≈ 2^-17: the stochastic predictor is the network itself.
    cert, _ = certificate("mlp_gelu", 64, curvature=1e16, draws=1, grid=(1.0,))
    assert cert.empirical_error == cert.deterministic_error
    assert cert.kl > 1e6 and cert.bound == 1.0


@pytest.mark.parametrize(
    ("examples", "n", "message"), [(16, 20, "whole training set"), (4, 4, "n ≥ 8")]
)
def test_certificate_rejects_wrong_sizes(examples, n, message):
    fm, params = FunctionalModel.from_module(TINY_NETWORKS["mlp_gelu"]())
    layers = TINY_LAYERS["mlp_gelu"]
    x, y = tiny_data("mlp_gelu", examples)
    with pytest.raises(ValueError, match=message):
        pac_bayes_certificate(
            fm,
            params,
            perturbed_reference(params, layers),
            layers,
            [(x, y)],
            n=n,
            curvature=dict.fromkeys(layers, 1.0),
            generator=torch.Generator(),
        )


def linear_certificate(weight, reference, x, y, *, curvature, grid, draws, seed):
    """The certificate of a bias-free float64 linear classifier z = W x (one layer, "weight")."""
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    module.weight.data = weight.clone()
    fm, params = FunctionalModel.from_module(module)
    return pac_bayes_certificate(
        fm,
        params,
        {"weight": reference},
        ["weight"],
        [(x[: len(y) // 2], y[: len(y) // 2]), (x[len(y) // 2 :], y[len(y) // 2 :])],
        n=len(y),
        curvature={"weight": curvature},
        grid=grid,
        draws=draws,
        generator=torch.Generator().manual_seed(seed),
    )


def sigma_of(point, distance):
    """σ of a grid point from its KL = ½‖v‖²/σ² (one layer), snapped to the lattice 2^k."""
    return 2.0 ** round(math.log2(distance / math.sqrt(2.0 * point.kl)))


def test_monte_carlo_error_matches_the_closed_form_gibbs_error():
    # Two classes, z = W x: under W + σ·N(0, I) the margin (w₁ − w₀)·x gains N(0, 2σ²‖x‖²), so
    # example (x, y) is misclassified with probability Φ(−s_y (w₁ − w₀)·x / (σ √2 ‖x‖)),
    # s_1 = 1, s_0 = −1. The labels make the noiseless network perfect, so an estimator that
    # forgets the noise reports 0; one that draws noise of the wrong size misses the curve.
    g = torch.Generator().manual_seed(0)
    n, d, draws = 64, 4, 40
    weight = torch.randn(2, d, generator=g, dtype=torch.float64)
    reference = weight - torch.randn(2, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    margin = x @ (weight[1] - weight[0])
    y = (margin > 0).long()
    distance = float((weight - reference).norm())
    sigma0 = 0.5  # A chosen so that σ* = 0.5: σ*² = ‖v‖ / sqrt(n d A)
    curvature = distance**2 / (sigma0**4 * n * 2 * d)
    cert = linear_certificate(
        weight, reference, x, y, curvature=curvature, grid=(0.5, 1.0, 4.0), draws=draws, seed=1
    )
    assert cert.deterministic_error == 0.0
    sigmas = [sigma_of(p, distance) for p in cert.per_scale]
    assert sigmas == [0.25, 0.5, 2.0]
    trials = draws * n
    for point, sigma in zip(cert.per_scale, sigmas, strict=True):
        signed = torch.where(y == 1, margin, -margin)
        p = stats.norm.cdf((-signed / (sigma * math.sqrt(2.0) * x.norm(dim=1))).numpy())
        gibbs = float(p.mean())
        assert gibbs > 0.02
        tolerance = 4.5 * math.sqrt(gibbs * (1 - gibbs) / trials)
        assert abs(point.empirical_error - gibbs) <= tolerance, (sigma, point, gibbs)


def test_monte_carlo_draws_are_independent_across_examples_and_passes():
    # n copies of one example with zero margin (W = 0): every draw misclassifies it with
    # probability ½. With an independent draw per example and per pass, the error rate ê over
    # D passes of n examples has variance 1/(4 D n); one draw shared by the examples of a pass
    # (or reused across passes) inflates it n-fold (D-fold). Seeds give independent estimates
    # (one grid scale each: the scales share their draws), so Σ_seeds (ê − ½)² · 4Dn is χ² with
    # one degree of freedom per seed under independence.
    n, d, draws, seeds = 16, 3, 16, 16
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64).expand(n, d).clone()
    y = torch.ones(n, dtype=torch.long)
    weight = torch.zeros(2, d, dtype=torch.float64)
    reference = torch.full((2, d), 0.3, dtype=torch.float64)
    statistic = 0.0
    for seed in range(seeds):
        cert = linear_certificate(
            weight, reference, x, y, curvature=1.0, grid=(1.0,), draws=draws, seed=seed
        )
        assert cert.deterministic_error == 1.0  # argmax of equal logits is class 0
        statistic += (cert.empirical_error - 0.5) ** 2 * 4 * draws * n
    assert stats.chi2.sf(statistic, seeds) > 1e-4
    assert stats.chi2.cdf(statistic, seeds) > 1e-4


def test_unchanged_layer_is_a_point_mass_and_validation():
    # A layer with v_i = 0 stays unperturbed: σ = 0, lattice None, prior cost log 3, no KL.
    fm, params = FunctionalModel.from_module(TINY_NETWORKS["mlp_gelu"]())
    layers = TINY_LAYERS["mlp_gelu"]
    reference = perturbed_reference(params, layers[:2], scale=0.05)
    x, y = tiny_data("mlp_gelu", 16)
    cert = pac_bayes_certificate(
        fm,
        params,
        reference,
        layers,
        [(x, y)],
        n=16,
        curvature=dict.fromkeys(layers, 0.1),
        grid=(1.0,),
        generator=torch.Generator().manual_seed(0),
    )
    assert cert.sigmas[layers[2]] == 0.0 and cert.lattice[layers[2]] is None
    assert cert.prior_cost == pytest.approx(
        math.log(3.0) + sum(lattice_prior_cost(cert.lattice[k]) for k in layers[:2])
    )
    kl = 0.5 * sum(
        float((params[k] - reference[k]).double().norm()) ** 2 / cert.sigmas[k] ** 2
        for k in layers[:2]
    )
    assert cert.kl == pytest.approx(kl)
    for delta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="delta"):
            binomial_upper_bound(1, 10, delta)
    with pytest.raises(ValueError, match="trials"):
        binomial_upper_bound(0, 0, 0.1)


def test_certificate_option_boundaries():
    # n = 8 is Maurer's smallest admissible size; δ = 1 and an empty or non-positive grid are not.
    cert, _ = certificate("mlp_gelu", 8, draws=1, grid=(1.0,))
    assert cert.n == 8 and 0.0 <= cert.bound <= 1.0
    for kwargs, message in (
        ({"delta": 1.0}, "delta"),
        ({"grid": ()}, "grid"),
        ({"grid": (1.0, -1.0)}, "grid"),
        ({"grid": (0.0,)}, "grid"),
        ({"grid": (math.inf,)}, "grid"),
    ):
        with pytest.raises(ValueError, match=message):
            certificate("mlp_gelu", 8, draws=1, **kwargs)
    for q, p in ((1.5, 0.5), (0.5, 1.5), (-0.1, 0.5), (0.5, -0.1)):
        with pytest.raises(ValueError, match="kl_bernoulli"):
            kl_bernoulli(q, p)


def test_no_moved_layer_gives_the_deterministic_error_exactly():
    # Every v_i = 0: the posterior is a point mass at W, so each draw errs exactly where W does.
    fm, params = FunctionalModel.from_module(TINY_NETWORKS["mlp_gelu"]())
    layers = TINY_LAYERS["mlp_gelu"]
    x, y = tiny_data("mlp_gelu", 16)
    cert = pac_bayes_certificate(
        fm,
        params,
        {k: params[k].clone() for k in layers},
        layers,
        [(x, y)],
        n=16,
        curvature=dict.fromkeys(layers, 0.1),
        grid=(0.5, 1.0),
        draws=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert 0.0 < cert.deterministic_error < 1.0
    assert cert.kl == 0.0 and all(s == 0.0 for s in cert.sigmas.values())
    for point in cert.per_scale:
        assert point.empirical_error == pytest.approx(cert.deterministic_error, abs=1e-12)
