"""Lanczos and Gauss quadrature against operators with known spectra (dense float64)."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.linalg.lanczos import lanczos, quadrature, ritz_values
from hessfine.bounds.linalg.probes import rademacher

from tests.oracles import (
    TINY_NETWORKS,
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
