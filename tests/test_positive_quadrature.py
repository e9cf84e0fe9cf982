"""Gauss–Radau quadrature and the adaptive positive-part quadrature against operators with known
spectra (dense float64)."""

from dataclasses import fields

import pytest
import torch
from hessfine.bounds.linalg.lanczos import lanczos, quadrature
from hessfine.bounds.linalg.positive_quadrature import (
    PositiveQuadrature,
    compression_upper,
    gauss_radau,
    positive_quadrature,
    positive_quadrature_many,
)

from tests.oracles import crossing_hessians


def _symmetric(n, dim, *, seed, scales=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, dim, generator=g, dtype=torch.float64)
    a = (a + a.transpose(1, 2)) / 2
    if scales is not None:
        a = a * torch.tensor(scales, dtype=torch.float64)[:, None, None]
    return a


def _apply(a):
    return lambda q, members: (a[members] @ q[..., None])[..., 0]


def _form(a, u, f):
    """uᵀ f(A) u per member from the dense eigendecomposition."""
    lam, vec = torch.linalg.eigh(a)
    return ((vec.transpose(1, 2) @ u[..., None])[..., 0] ** 2 * f(lam)).sum(dim=1)


def _exact_positive(a, u):
    return _form(a, u, lambda lam: lam.clamp(min=0))


def _two_large_two_small():
    """Four 80 × 80 indefinite members (two at scale ~1, two far below) and one start vector."""
    dim = 80
    a = _symmetric(4, dim, seed=4, scales=[1.0, 0.9, 0.05, 0.02])
    u = torch.randn(1, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = u.expand(4, -1).clone()
    return dim, a, u, _exact_positive(a, u)


def test_gauss_radau_exact_for_degree_2k():
    a = _symmetric(3, 30, seed=0)
    u = torch.randn(3, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = 5
    res = lanczos(lambda q: (a @ q[..., None])[..., 0], u, steps=k + 1)
    alpha, beta = res.alpha[:, :k], torch.cat([res.beta, res.residual[:, None]], dim=1)[:, :k]
    rule = gauss_radau(alpha, beta, res.norms, lambda lam: lam ** (2 * k))
    torch.testing.assert_close(rule, _form(a, u, lambda lam: lam ** (2 * k)), rtol=1e-9, atol=0)
    # not exact two degrees higher (so the check above is not vacuous)
    higher = gauss_radau(alpha, beta, res.norms, lambda lam: lam ** (2 * k + 2))
    assert not torch.allclose(higher, _form(a, u, lambda lam: lam ** (2 * k + 2)), rtol=1e-6)
    # the weights sum to ‖u‖²
    ones = gauss_radau(alpha, beta, res.norms, torch.ones_like)
    torch.testing.assert_close(ones, res.norms**2)


def test_gauss_radau_equals_gauss_after_breakdown():
    a = _symmetric(2, 12, seed=2)
    u = torch.randn(2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = lanczos(lambda q: (a @ q[..., None])[..., 0], u, steps=12)
    beta = torch.cat([res.beta, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    rule = gauss_radau(res.alpha, beta, res.norms, lambda lam: lam.clamp(min=0))
    torch.testing.assert_close(rule, _exact_positive(a, u), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(quadrature(res, lambda lam: lam.clamp(min=0)).double(), rule)


def test_gauss_radau_and_the_compression_bound_bracket_the_value_and_tighten_with_the_steps():
    # docs/mathematics.md, "The positive part by Lanczos quadrature": R_k ≤ uᵀA⁺u ≤ U_k,
    # R_k ≤ R_(k+1) and U_(k+1) ≤ U_k for every k (indefinite spectra, some mostly negative,
    # some cubed to spread them); U_1 is the Cauchy–Schwarz bound (α₁ + √(α₁² + β₁²))/2·‖u‖²
    dim = 60
    a = _symmetric(6, dim, seed=8)
    lam, vec = torch.linalg.eigh(a)
    lam = torch.stack([lam[0], lam[1] - 1.5, lam[2] + 1.0, lam[3] ** 3, lam[4] - 3.0, lam[5]])
    a = vec @ torch.diag_embed(lam) @ vec.transpose(1, 2)
    u = torch.randn(6, dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exact = _exact_positive(a, u)
    res = lanczos(lambda q: (a @ q[..., None])[..., 0], u, steps=dim)
    beta = torch.cat([res.beta, res.residual[:, None]], dim=1)
    rules = torch.stack(
        [
            gauss_radau(res.alpha[:, :k], beta[:, :k], res.norms, lambda t: t.clamp(min=0))
            for k in range(1, dim + 1)
        ],
        dim=1,
    )
    scale = exact.abs().max()
    assert bool((rules <= exact[:, None] + 1e-12 * scale).all())
    assert bool((rules[:, 1:] >= rules[:, :-1] - 1e-12 * scale).all())
    torch.testing.assert_close(rules[:, -1], exact, rtol=1e-9, atol=1e-12)
    assert float((1 - rules[:, 3] / exact).min()) > 1e-2  # far from exact at 4 steps
    uppers = torch.stack(
        [compression_upper(res.alpha[:, :k], beta[:, :k], res.norms) for k in range(1, dim + 1)],
        dim=1,
    )
    assert bool((uppers >= exact[:, None] - 1e-12 * scale).all())
    assert bool((uppers[:, 1:] <= uppers[:, :-1] + 1e-12 * scale).all())
    torch.testing.assert_close(uppers[:, -1], exact, rtol=1e-9, atol=1e-12)
    squared = res.norms**2
    cauchy_schwarz = squared * (res.alpha[:, 0] + torch.hypot(res.alpha[:, 0], beta[:, 0])) / 2
    torch.testing.assert_close(uppers[:, 0], cauchy_schwarz, rtol=1e-12, atol=0)
    for steps in (1, 4, 9, dim):
        run = positive_quadrature(_apply(a), u, max_steps=steps, rtol=0.0)
        assert bool((run.lower <= exact + 1e-12 * scale).all())
        assert bool((run.upper >= exact - 1e-12 * scale).all())
        assert bool(((run.values - exact).abs() <= run.errors + 1e-12 * scale).all())
        torch.testing.assert_close(run.lower, rules[:, steps - 1])
        torch.testing.assert_close(run.upper, uppers[:, steps - 1].clamp(min=run.lower))
    torch.testing.assert_close(run.values, exact, rtol=1e-9, atol=1e-12)


def test_positive_quadrature_converges_at_the_max_and_prunes_small_members():
    dim, a, u, exact = _two_large_two_small()
    res = positive_quadrature(_apply(a), u, max_steps=dim, rtol=1e-3)
    top = float(exact.max())
    assert abs(float(res.values.max()) - top) <= 5e-3 * top
    assert int(res.values.argmax()) == int(exact.argmax())
    # the small members cannot attain the max: pruned after a few steps
    assert bool(res.pruned[2]) and bool(res.pruned[3])
    assert int(res.steps[2:].max()) < dim // 4
    assert not bool(res.pruned[int(exact.argmax())])
    # every member is bracketed, pruned ones too, and its midpoint is within the half-width
    assert bool((res.lower <= exact + 1e-12).all()) and bool((res.upper >= exact - 1e-12).all())
    assert bool(((res.values - exact).abs() <= res.errors + 1e-12).all())
    # pruned: an upper bound below the maximiser's lower bound
    best = int(exact.argmax())
    assert bool((res.upper[res.pruned] < res.lower[best]).all())
    assert float(res.errors[best]) <= 1e-3 * top + 1e-12


def test_pruning_keeps_a_late_maximiser():
    # tests/oracles.crossing_hessians: member 1 is the maximiser (15) but converges late; at step
    # 4 its lower bound (9.5) is below member 0's (11.6), its upper bound (15.03) above, and
    # R + e = 11.08 (e = R_4 − R_2) above member 0's R − e: neither pruning rule stops it.
    # Member 0 is pruned once its upper bound falls below 15.
    H, v = crossing_hessians()
    u = v.expand(2, -1).clone()
    exact = _exact_positive(H, u)
    early = positive_quadrature(_apply(H), u, max_steps=4, rtol=0.0)
    two = positive_quadrature(_apply(H), u, max_steps=2, rtol=0.0)
    assert float(early.lower[1]) < float(early.lower[0]) < float(early.upper[1])
    change = float(early.lower[1] - two.lower[1])
    assert float(early.values[1]) < 0.9 * float(exact[1])

    res = positive_quadrature(_apply(H), u, max_steps=8, rtol=1e-3)
    assert int(res.values.argmax()) == int(exact.argmax()) == 1
    assert float(res.values.max()) == pytest.approx(float(exact.max()), rel=1e-9)
    assert not bool(res.pruned[1]) and bool(res.exhausted[1])
    assert bool(res.pruned[0]) and float(res.upper[0]) < float(exact[1])
    # a floor attained elsewhere: below member 1's R + e at step 4 it runs on (and is exact);
    # above R + e (the change rule) or above its upper bound, it is pruned there with its lower
    # bound as its value
    crossing = float(early.lower[1]) + change
    for floor, pruned in ((crossing - 0.1, False), (crossing + 0.5, True), (15.1, True)):
        alone = positive_quadrature(_apply(H[1:]), u[1:], max_steps=6, rtol=1e-2, floor=floor)
        assert bool(alone.pruned[0]) is pruned
        target = float(early.lower[1]) if pruned else float(exact[1])
        assert float(alone.values[0]) == pytest.approx(target, rel=1e-9)


def test_the_mean_target_converges_every_member_to_the_mean():
    # target="mean": Σ (U_b − R_b) ≤ 2 rtol Σ R_b, so the mean of the midpoints is within rtol
    # of the exact mean, where target="max" leaves the pruned members wide
    dim, a, u, exact = _two_large_two_small()
    for_max = positive_quadrature(_apply(a), u, max_steps=dim, rtol=1e-2)
    for_mean = positive_quadrature(_apply(a), u, max_steps=dim, rtol=1e-2, target="mean")
    assert float((for_max.upper - for_max.lower).sum()) > 2e-2 * float(for_max.lower.sum())
    assert float((for_mean.upper - for_mean.lower).sum()) <= 2e-2 * float(for_mean.lower.sum())
    assert abs(float(for_mean.values.mean() - exact.mean())) <= 1e-2 * float(exact.mean())
    assert not bool(for_mean.pruned.any())
    assert int(for_mean.steps.sum()) > int(for_max.steps.sum())


def test_positive_quadrature_without_tolerance_runs_all_steps_and_is_exact_at_dimension():
    a = _symmetric(3, 16, seed=6)
    u = torch.randn(3, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    res = positive_quadrature(_apply(a), u, max_steps=16, rtol=0.0)
    assert bool((res.steps == 16).all()) and bool(res.exhausted.all())
    assert not bool(res.pruned.any())
    torch.testing.assert_close(res.values, _exact_positive(a, u), rtol=1e-8, atol=1e-12)


def test_positive_quadrature_many_runs_families_in_lockstep_with_their_own_results():
    # three families of different dimensions and batch sizes: the same results as one
    # positive_quadrature each, in as many matvec calls as the longest family needs
    a = [_symmetric(4, 60, seed=8, scales=[1.0, 0.9, 0.05, 0.02]), _symmetric(2, 9, seed=9)]
    a.append(_symmetric(3, 30, seed=10))
    g = torch.Generator().manual_seed(11)
    u = [torch.randn(x.shape[0], x.shape[1], generator=g, dtype=torch.float64) for x in a]
    calls = []

    def matvec(families, blocks, members):
        calls.append(list(families))
        return [_apply(a[f])(q, m) for f, q, m in zip(families, blocks, members, strict=True)]

    many = positive_quadrature_many(matvec, u, max_steps=40, rtol=1e-3, floors=[0.0, 1.0, 0.0])
    for f, (res, floor) in enumerate(zip(many, [0.0, 1.0, 0.0], strict=True)):
        alone = positive_quadrature(_apply(a[f]), u[f], max_steps=40, rtol=1e-3, floor=floor)
        for field in fields(alone):
            assert torch.equal(getattr(res, field.name), getattr(alone, field.name)), field.name
    longest = max(int(res.steps.max()) for res in many)
    assert len(calls) == longest < sum(int(res.steps.max()) for res in many)
    assert calls[0] == [0, 1, 2] and calls[-1] == [
        f for f in range(3) if many[f].steps.max() == longest
    ]


def test_results_of_chunks_concatenate_member_by_member():
    a = _symmetric(5, 10, seed=12)
    u = torch.randn(5, 10, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    parts = [
        positive_quadrature(_apply(a[:2]), u[:2], max_steps=10, rtol=0.0),
        positive_quadrature(_apply(a[2:]), u[2:], max_steps=10, rtol=0.0),
    ]
    whole = PositiveQuadrature.cat(parts)
    for field in fields(whole):
        assert torch.equal(
            getattr(whole, field.name), torch.cat([getattr(p, field.name) for p in parts])
        )
    torch.testing.assert_close(whole.values, _exact_positive(a, u), rtol=1e-8, atol=1e-12)
