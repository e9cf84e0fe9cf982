"""kl inversion against independent root finding; the certificate's invariants; the Monte Carlo
Gibbs risk and the certificate against closed forms (a linear classifier, and a one-weight causal
language model integrated by dense quadrature)."""

import json
import math

import numpy as np
import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.losses import CausalLMLoss
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
from torch import nn

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


# A causal language model with one weight, the gain g: after token a it predicts the argmax of
# U·tanh(g·E[a] + b) (vocabulary 3, width 2). The posterior N(g, σ²) is one-dimensional, so the
# Gibbs risk of every sequence is an integral over one Gaussian variable.
GAIN_EMBED = torch.tensor([[1.0, -0.5], [-0.8, 1.2], [0.4, 0.9]], dtype=torch.float64)
GAIN_UNEMBED = torch.tensor([[2.0, -1.0], [-1.5, 1.0], [0.3, 2.0]], dtype=torch.float64)
GAIN_BIAS = torch.tensor([0.2, -0.3], dtype=torch.float64)


class GainLM(nn.Module):
    """logits_t = U·tanh(g·E[x_t] + b): one parameter, ``gain``; E, U and b are buffers."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([gain], dtype=torch.float64))
        self.register_buffer("embed", GAIN_EMBED.clone())
        self.register_buffer("unembed", GAIN_UNEMBED.clone())
        self.register_buffer("bias", GAIN_BIAS.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * self.embed[ids] + self.bias) @ self.unembed.T


def gain_predictions(gains: np.ndarray) -> np.ndarray:
    """The token GainLM predicts after each vocabulary token, for every gain: shape (M, 3)."""
    hidden = np.tanh(gains[:, None, None] * GAIN_EMBED.numpy()[None] + GAIN_BIAS.numpy())
    return (hidden @ GAIN_UNEMBED.numpy().T).argmax(-1)


def gain_sequences(n: int, length: int, gain: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Token ids and unshifted labels (−100 off the label positions). Sequences with 1–2 label
    positions get random labels, longer ones mostly the model's own next token, so the mean of
    the per-sequence token errors differs from the pooled token error."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (n, length), generator=g)
    labels = torch.randint(0, 3, (n, length), generator=g)
    positions = torch.randint(1, length, (n,), generator=g)
    own = torch.from_numpy(gain_predictions(np.array([gain]))[0])[ids[:, :-1]]
    follow = torch.rand(n, length - 1, generator=g) < 0.9 * (positions[:, None] > 2)
    labels[:, 1:] = torch.where(follow, own, labels[:, 1:])
    steps = torch.arange(length)[None]
    labels[(steps == 0) | (steps > positions[:, None])] = -100
    return ids, labels


def kl_inverse_brentq(q: float, c: float) -> float:
    """sup{p : kl(q‖p) ≤ c} by scipy's root finder (independent of the bisection tested)."""
    return optimize.brentq(lambda p: kl_bernoulli(q, p) - c, q, 1 - 1e-15, xtol=1e-15)


def test_causal_lm_certificate_matches_the_gibbs_risk_by_quadrature():
    # Per sequence j the next-token error e_j(g') is the mean over its label positions of
    # [pred(g', x_t) ≠ y_{t+1}]: piecewise constant in g', so the Gibbs risk E_z[e_j(g + σz)]
    # (and E[e_j²]) is integrated by the midpoint rule on M cells of [−12, 12] in z, weighted by
    # their exact normal mass. The rule is exact on cells where the predictions do not change;
    # each change costs at most two cells' mass (≤ 2h/√(2π)), and |z| > 12 has mass 4e-33.
    # The certificate then follows in closed form from the Gibbs risk G:
    # B(G) = kl⁻¹(kl⁻¹(G, log(2|grid|/δ)/N), (½v²/σ² + log(2.25(|k|+1)(|k|+2)) + log(4√n/δ))/n),
    # with N = draws·n sequences. The Monte Carlo estimate ê of G has standard deviation
    # sqrt(Σ_j Var_j / draws)/n (independent draws per sequence and repetition, Var_j by the same
    # quadrature); ê must be within 4.5 of those (plus the quadrature error) of G, and the
    # reported bound between B(G − tol) and B(G + tol), since B is increasing.
    n, length, draws, delta = 64, 6, 200, 0.05
    gain, start = 1.0, 0.2
    ids, labels = gain_sequences(n, length, gain, seed=0)
    fm, params = FunctionalModel.from_module(GainLM(gain), loss=CausalLMLoss())
    distance = gain - start
    curvature = distance**2 / n  # σ* = 1: σ*² = |v| / sqrt(n · 1 · A)
    grid = (0.25, 0.5, 1.0, 2.0)
    half = n // 2
    cert = pac_bayes_certificate(
        fm,
        params,
        {"gain": torch.tensor([start], dtype=torch.float64)},
        ["gain"],
        [(ids[:half], labels[:half]), (ids[half:], labels[half:])],
        n=n,
        curvature={"gain": curvature},
        grid=grid,
        draws=draws,
        delta=delta,
        generator=torch.Generator().manual_seed(1),
    )
    assert cert.bounded_loss == "next-token error (mean over label positions)"
    assert cert.n == n and cert.trials == draws * n

    inputs, targets = ids[:, :-1].numpy(), labels[:, 1:].numpy()
    valid = targets != -100
    # wrong[j, a, c]: the share of j's label positions after token a whose label is not c
    wrong = (
        np.stack(
            [
                np.stack([((inputs == a) & valid & (targets != c)).sum(1) for c in range(3)], -1)
                for a in range(3)
            ],
            1,
        )
        / valid.sum(1)[:, None, None]
    )
    wrong_tokens = wrong * valid.sum(1)[:, None, None]

    def sequence_errors(predicted: np.ndarray) -> np.ndarray:
        return sum(wrong[:, a, predicted[:, a]] for a in range(3))  # (n, M)

    assert cert.deterministic_error == pytest.approx(
        float(sequence_errors(gain_predictions(np.array([gain]))).mean()), abs=1e-15
    )
    cells = 2**16
    edges = np.linspace(-12.0, 12.0, cells + 1)
    mass = np.diff(stats.norm.cdf(edges))
    width = edges[1] - edges[0]
    log_term = math.log(4 * math.sqrt(n) / delta)
    mc_term = math.log(2 * len(grid) / delta) / cert.trials
    for scale, point in zip(grid, cert.per_scale, strict=True):
        sigma = sigma_of(point, distance)
        assert sigma == scale
        predicted = gain_predictions(gain + sigma * 0.5 * (edges[1:] + edges[:-1]))
        changes = int((np.diff(predicted, axis=0) != 0).any(axis=1).sum())
        quadrature_error = 2 * changes * width / math.sqrt(2 * math.pi) + 2 * stats.norm.sf(12.0)
        assert 0 < changes <= 8 and quadrature_error < 3e-3
        errors = sequence_errors(predicted)
        gibbs = errors @ mass
        variance = float(((errors**2) @ mass - gibbs**2).sum())
        risk = float(gibbs.mean())
        tolerance = 4.5 * math.sqrt(variance / draws) / n + quadrature_error
        assert abs(point.empirical_error - risk) <= tolerance, (sigma, point, risk)
        pooled = (
            float(sum(wrong_tokens[:, a, predicted[:, a]] for a in range(3)).sum(0) @ mass)
            / valid.sum()
        )
        assert abs(pooled - risk) > 2 * tolerance  # a pooled token error would fail the test

        k = round(math.log2(sigma))
        kl, cost = 0.5 * distance**2 / sigma**2, math.log(2.25 * (abs(k) + 1) * (abs(k) + 2))
        assert point.kl == pytest.approx(kl, rel=1e-12)
        assert point.prior_cost == pytest.approx(cost, rel=1e-12)
        complexity = (kl + cost + log_term) / n

        def closed_form(q: float, complexity: float = complexity) -> float:
            return kl_inverse_brentq(kl_inverse_brentq(q, mc_term), complexity)

        assert point.bound == pytest.approx(closed_form(point.empirical_error), abs=1e-9)
        assert closed_form(risk - tolerance) - 1e-9 <= point.bound
        assert point.bound <= closed_form(risk + tolerance) + 1e-9
    assert cert.bound == min(p.bound for p in cert.per_scale) < 1.0


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
