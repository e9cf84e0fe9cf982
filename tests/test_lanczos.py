"""Lanczos, Gauss and Gauss–Radau quadrature and the adaptive positive-part quadrature against
operators with known spectra (dense float64)."""

from dataclasses import fields

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.lanczos import (
    gauss_radau,
    lanczos,
    positive_quadrature,
    positive_quadrature_many,
    quadrature,
    ritz_values,
)
from hessfine.bounds.traces import rademacher

from tests.oracles import (
    TINY_NETWORKS,
    crossing_hessians,
    dense_block_hessians,
    positive_part,
    tiny_data,
)

DIM = 40


def spd_batch(batch=3, dim=DIM, seed=0):
    """B random symmetric matrices with known eigenvalues in [−1, 2] (both signs)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, dim, dim, generator=g, dtype=torch.float64))
    eig = -1 + 3 * torch.rand(batch, dim, generator=g, dtype=torch.float64)
    return (q * eig[:, None, :]) @ q.transpose(1, 2), eig


def apply(A):
    return lambda u: (A @ u[..., None])[..., 0]


def test_quadrature_is_exact_for_polynomials_below_degree_2k():
    A, _ = spd_batch()
    u = torch.randn(3, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = 5
    result = lanczos(apply(A), u, steps=k)
    assert result.alpha.shape == (3, k) and result.beta.shape == (3, k - 1)
    assert not bool(result.exhausted.any()) and result.steps.tolist() == [k] * 3
    for degree in range(2 * k):
        exact = torch.einsum("bi,bij,bj->b", u, torch.linalg.matrix_power(A, degree), u)
        got = quadrature(result, lambda lam, d=degree: lam**d)
        torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)
    exact = torch.einsum("bi,bij,bj->b", u, torch.linalg.matrix_power(A, 2 * k), u)
    assert not torch.allclose(quadrature(result, lambda lam: lam ** (2 * k)), exact, rtol=1e-6)
    # k = 3 of the 5 steps: exact to degree 5 only.
    cubic = torch.einsum("bi,bij,bj->b", u, torch.linalg.matrix_power(A, 5), u)
    torch.testing.assert_close(
        quadrature(result, lambda lam: lam**5, k=3), cubic, rtol=1e-10, atol=0
    )


def test_full_dimension_gives_the_exact_positive_part_and_residual_zero():
    A, eig = spd_batch()
    u = torch.randn(3, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = lanczos(apply(A), u, steps=DIM + 10)  # capped at the dimension
    assert result.alpha.shape == (3, DIM) and bool(result.exhausted.all())
    exact = torch.einsum("bi,bij,bj->b", u, positive_part(A), u)
    torch.testing.assert_close(quadrature(result, lambda lam: lam.clamp(min=0)), exact)
    theta, bounds = ritz_values(result)
    torch.testing.assert_close(theta, eig.sort(dim=1, descending=True).values)
    assert float(bounds.max()) < 1e-8


def test_breakdown_on_few_distinct_eigenvalues():
    # Three distinct eigenvalues: the Krylov space has dimension 3, Lanczos stops there.
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    eig = torch.tensor([2.0, -0.5, 0.25], dtype=torch.float64).repeat_interleave(
        torch.tensor([5, 20, DIM - 25])
    )
    A = ((q * eig) @ q.T)[None].expand(2, DIM, DIM)
    u = torch.randn(2, DIM, generator=g, dtype=torch.float64)
    u[1] = 0.0  # a zero start: no steps, value 0
    result = lanczos(apply(A), u, steps=10)
    assert result.steps.tolist() == [3, 0]
    assert result.exhausted.tolist() == [True, True]
    assert result.residual.tolist() == [0.0, 0.0]
    assert float(result.beta[0, 2:].abs().max()) == 0.0
    exact = u[0] @ positive_part(A[0]) @ u[0]
    values = quadrature(result, lambda lam: lam.clamp(min=0))
    assert float(values[0]) == pytest.approx(float(exact), rel=1e-10)
    assert float(values[1]) == 0.0
    assert result.norms.tolist() == pytest.approx([float(u[0].norm()), 0.0])


def test_ritz_residual_bounds_hold_before_convergence():
    A, eig = spd_batch(batch=2, seed=4)
    u = torch.randn(2, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = lanczos(apply(A), u, steps=12)
    theta, bounds = ritz_values(result)
    assert bool((theta[:, :-1] >= theta[:, 1:]).all())  # descending
    # every Ritz value lies within its residual bound of some eigenvalue (Parlett, Thm 11.4.1)
    gap = (theta[:, :, None] - eig[:, None, :]).abs().min(dim=2).values
    assert bool((gap <= bounds + 1e-12).all())
    assert float(bounds.max()) > 1e-6  # not yet converged: the bound is informative
    # Ritz values interlace: inside the spectrum
    assert bool((theta <= eig.max(dim=1, keepdim=True).values + 1e-12).all())
    assert bool((theta >= eig.min(dim=1, keepdim=True).values - 1e-12).all())


def test_batch_members_are_independent_and_scale_with_the_start():
    A, _ = spd_batch()
    u = torch.randn(3, DIM, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    together = quadrature(lanczos(apply(A), u, steps=8), torch.exp)
    for b in range(3):
        alone = quadrature(lanczos(apply(A[b : b + 1]), 3.0 * u[b : b + 1], steps=8), torch.exp)
        assert float(alone[0]) == pytest.approx(9.0 * float(together[b]), rel=1e-10)


def test_slq_positive_part_below_full_dimension_on_a_smooth_block():
    # Per-example Hessian blocks of the attention in_proj (d = 108): the quadrature error of
    # zᵀH⁺z at K < d steps from Rademacher z (the SLQ positive traces' bias, without the
    # Hutchinson noise), relative to zᵀ|H|z. Stated tolerance at K = 32: 5e-2 (worst measured over
    # 3 probe seeds × 4 examples: 2.2e-2); K = 16: 2.5e-1 (measured 0.11); exact at K = d.
    module = TINY_NETWORKS["attention"]()
    _, params = FunctionalModel.from_module(module)
    x, y = tiny_data("attention", 4)
    H = dense_block_hessians(module, params, "attn.in_proj_weight", x, y)
    d = H.shape[1]
    z = rademacher((4, d), generator=torch.Generator().manual_seed(0), like=H)
    exact = torch.einsum("bi,bij,bj->b", z, positive_part(H), z)
    absolute = torch.einsum("bi,bij,bj->b", z, positive_part(H) - positive_part(-H), z)
    errors = {}
    for steps in (16, 32, d):
        result = lanczos(apply(H), z, steps=steps)
        values = quadrature(result, lambda lam: lam.clamp(min=0))
        errors[steps] = float(((values - exact).abs() / absolute).max())
    assert errors[d] < 1e-10
    assert errors[32] < 5e-2 and errors[16] < 2.5e-1
    assert errors[32] > 1e-6  # K < d really is inexact here


def test_zero_operator_breaks_down_at_once():
    u = torch.ones(2, 5, dtype=torch.float64)
    result = lanczos(lambda q: torch.zeros_like(q), u, steps=3)
    assert result.steps.tolist() == [1, 1] and result.exhausted.tolist() == [True, True]
    assert quadrature(result, torch.exp).tolist() == pytest.approx([5.0, 5.0])


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


def test_positive_quadrature_converges_at_the_max_and_prunes_small_members():
    dim = 80
    a = _symmetric(4, dim, seed=4, scales=[1.0, 0.9, 0.05, 0.02])
    u = torch.randn(1, dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = u.expand(4, -1).clone()
    exact = _exact_positive(a, u)
    res = positive_quadrature(_apply(a), u, max_steps=dim, rtol=1e-3)
    top = float(exact.max())
    assert abs(float(res.values.max()) - top) <= 5e-3 * top
    assert int(res.values.argmax()) == int(exact.argmax())
    # the small members cannot attain the max: pruned after a few steps
    assert bool(res.pruned[2]) and bool(res.pruned[3])
    assert int(res.steps[2:].max()) < dim // 4
    assert not bool(res.pruned[int(exact.argmax())])
    # the stated error estimate bounds the actual error where the member converged
    kept = ~res.pruned & ~res.exhausted
    assert bool(((res.values - exact).abs()[kept] <= 3 * res.errors[kept] + 1e-12).all())
    torch.testing.assert_close(res.lower, (u * (a @ u[..., None])[..., 0]).sum(1).clamp(min=0))
    assert bool((res.lower <= exact + 1e-12).all())


def test_pruning_compares_with_value_minus_error_and_keeps_a_late_maximiser():
    # tests/oracles.crossing_hessians: member 1 is the maximiser (15) but converges late; at step
    # 4 its R + e is below member 0's R + e, above member 0's R − e. Pruned members report the
    # value they stopped at, so pruning member 1 would change the maximum.
    H, v = crossing_hessians()
    u = v.expand(2, -1).clone()
    exact = _exact_positive(H, u)
    early = positive_quadrature(_apply(H), u, max_steps=4, rtol=0.0)
    six = positive_quadrature(_apply(H), u, max_steps=6, rtol=0.0)
    crossing = float(early.values[1] + early.errors[1])
    assert (
        float(early.values[0] - early.errors[0])
        < crossing
        < float(early.values[0] + early.errors[0])
    )
    assert float(six.values[0] - six.errors[0]) < crossing < float(six.values[0])
    assert float(early.values[1]) < 0.9 * float(exact[1])

    res = positive_quadrature(_apply(H), u, max_steps=6, rtol=1e-2)
    assert int(res.values.argmax()) == int(exact.argmax()) == 1
    assert float(res.values.max()) == pytest.approx(float(exact.max()), rel=1e-2)
    assert not bool(res.pruned[1]) and bool(res.exhausted[1])
    # a floor attained elsewhere: below member 1's R + e at step 4 it runs on (and is exact);
    # above, it is pruned there with its step-4 value
    for floor, pruned in (
        (float(six.values[0] - six.errors[0]), False),
        (float(six.values[0]), True),
    ):
        alone = positive_quadrature(_apply(H[1:]), u[1:], max_steps=6, rtol=1e-2, floor=floor)
        assert bool(alone.pruned[0]) is pruned
        target = float(early.values[1]) if pruned else float(exact[1])
        assert float(alone.values[0]) == pytest.approx(target, rel=1e-9)


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
