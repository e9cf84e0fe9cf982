"""Lanczos quadrature rules and the adaptive positive-part quadrature against dense eigh."""

import torch
from hessfine.bounds.lanczos import gauss_radau, lanczos, positive_quadrature, quadrature


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


def test_positive_quadrature_without_tolerance_runs_all_steps_and_is_exact_at_dimension():
    a = _symmetric(3, 16, seed=6)
    u = torch.randn(3, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    res = positive_quadrature(_apply(a), u, max_steps=16, rtol=0.0)
    assert bool((res.steps == 16).all()) and bool(res.exhausted.all())
    assert not bool(res.pruned.any())
    torch.testing.assert_close(res.values, _exact_positive(a, u), rtol=1e-8, atol=1e-12)
