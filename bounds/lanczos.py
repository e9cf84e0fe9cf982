"""Batched Lanczos tridiagonalisation and Gauss quadrature of spectral functions.

For a symmetric operator H (d×d) and a start vector q₁ = u/‖u‖, k Lanczos steps with full
reorthogonalisation produce an orthonormal basis Q_k of the Krylov space K_k(H, u) and the
tridiagonal T_k = Q_kᵀ H Q_k (diagonal α, off-diagonal β). Writing T_k = S Θ Sᵀ,

    uᵀ f(H) u ≈ ‖u‖² · e₁ᵀ f(T_k) e₁ = ‖u‖² · Σ_j S₁ⱼ² f(θ_j),

the k-point Gauss quadrature of the spectral measure of H seen from u (Golub & Meurant,
"Matrices, Moments and Quadrature with Applications", 2010). It is exact for polynomials of
degree < 2k and exact for every f once k reaches the dimension of the Krylov space: then β_k = 0
("breakdown") and the Ritz values are eigenvalues of H. With f(λ) = max(λ, 0) this gives
uᵀ H⁺ u, the positive-part quadratic form of Ju, Li & Zhang (ICML 2022).

For f(λ) = max(λ, 0), which has a kink at 0, Gauss quadrature converges slowly and erratically:
a Ritz value near 0 carries the large weight of the near-null space of H. The Gauss–Radau rule
with a node prescribed at 0 (Golub, SIAM Rev. 1973; Golub & Meurant 2010, §6.2) extends T_k by
one row so that 0 is a node, puts that weight where f has its kink, and converges smoothly
(measured on ViT blocks in bench/BENCHMARKS.md). :func:`positive_quadrature` runs it adaptively
per member (see its docstring for the stopping rule).

Everything is batched: B independent operators (one per example, or one per random start) are
run together; ``matvec`` maps a (B, d) block of vectors to their images. When one member breaks
down its later Lanczos vectors are set to zero, so that its tridiagonal matrix becomes
block-diagonal [T_m, 0] and its quadrature is that of T_m.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))[None]
    >>> u = torch.ones(1, 3, dtype=torch.float64)
    >>> res = lanczos(lambda q: (A @ q[..., None])[..., 0], u, steps=3)
    >>> float(quadrature(res, lambda lam: lam.clamp(min=0))[0])  # 3 + 2
    5.0
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LanczosResult:
    """Output of :func:`lanczos` for a batch of B operators.

    ``alpha`` (B, k) and ``beta`` (B, k−1) define the tridiagonal matrices; ``norms`` (B,) are the
    norms of the start vectors; ``steps`` (B,) the number of steps before breakdown (k when the
    Krylov space was not exhausted); ``exhausted`` (B,) whether it broke down; ``residual`` (B,)
    the last off-diagonal element β_k (0 after breakdown), used for Ritz-value error bounds.
    """

    alpha: Tensor
    beta: Tensor
    norms: Tensor
    steps: Tensor
    exhausted: Tensor
    residual: Tensor

    def tridiagonal(self, k: int | None = None) -> Tensor:
        """The (B, k, k) tridiagonal matrices T_k (leading k×k blocks when ``k`` is given)."""
        k = self.alpha.shape[1] if k is None else k
        alpha, beta = self.alpha[:, :k], self.beta[:, : k - 1]
        return torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    steps: int,
    tol: float | None = None,
) -> LanczosResult:
    """Run ``steps`` Lanczos iterations with full reorthogonalisation on B operators at once.

    ``start`` is (B, d); ``matvec`` maps (B, d) → (B, d) (member b by its own operator). Steps are
    capped at d. Breakdown is declared when β_j ≤ tol · (largest |α|, β seen so far), with
    tol = ε^(2/3) of the dtype by default; from then on that member's vectors are zero.
    """
    return lanczos_many(lambda _, qs: [matvec(qs[0])], [start], steps=steps, tol=tol)[0]


def lanczos_many(
    matvec: Callable[[list[int], list[Tensor]], list[Tensor]],
    starts: list[Tensor],
    *,
    steps: int,
    tol: float | None = None,
) -> list[LanczosResult]:
    """:func:`lanczos` on several families of operators of different dimensions in lockstep.

    ``starts[f]`` is (B_f, d_f); at each step ``matvec(families, vectors)`` receives the indices
    of the families still running and their current Lanczos vectors and returns their images,
    so one call can share work
    between them (e.g. one forward/backward graph for the blocks of several layers). Family f
    runs min(steps, d_f) steps.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))[None]
        >>> B = torch.diag(torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64))[None]
        >>> mats = [A, B]  # A's family stops after 2 steps
        >>> def mv(families, qs):
        ...     return [(mats[f] @ q[..., None])[..., 0] for f, q in zip(families, qs)]
        >>> u, w = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
        >>> [int(r.steps[0]) for r in lanczos_many(mv, [u, w], steps=3)]
        [2, 3]
    """
    runs = [_lanczos_run(start, steps, tol) for start in starts]
    vectors = [next(run) for run in runs]
    results: list[LanczosResult | None] = [None] * len(runs)
    pending = list(range(len(runs)))
    while pending:
        images = matvec(pending, [vectors[f] for f in pending])
        still = []
        for f, w in zip(pending, images, strict=True):
            try:
                vectors[f] = runs[f].send(w)
                still.append(f)
            except StopIteration as done:
                results[f] = done.value
        pending = still
    return results


def _lanczos_run(start: Tensor, steps: int, tol: float | None):
    """Generator form of :func:`lanczos`: yields each Lanczos vector block, receives its image."""
    batch, dim = start.shape
    steps = min(steps, dim)
    tol = torch.finfo(start.dtype).eps ** (2.0 / 3.0) if tol is None else tol
    norms = start.norm(dim=1)
    q = start / norms.clamp_min(torch.finfo(start.dtype).tiny)[:, None]
    basis = start.new_empty(batch, steps, dim)  # column j is written before it is read
    alpha = start.new_zeros(batch, steps)
    beta = start.new_zeros(batch, steps)
    scale = start.new_zeros(batch)
    active = norms > 0
    used = torch.zeros(batch, dtype=torch.long, device=start.device)
    q_prev = torch.zeros_like(q)
    for j in range(steps):
        basis[:, j] = q
        used += active.long()
        w = yield q
        a = (q * w).sum(dim=1)
        w = w - a[:, None] * q - (beta[:, j - 1, None] * q_prev if j > 0 else 0.0)
        w = _reorthogonalise(w, basis[:, : j + 1])
        b = w.norm(dim=1)
        alpha[:, j] = torch.where(active, a, torch.zeros_like(a))
        scale = torch.maximum(scale, torch.maximum(a.abs(), b))
        broke = active & (b <= tol * scale)
        active = active & ~broke
        b = torch.where(active, b, torch.zeros_like(b))
        beta[:, j] = b
        q_prev = q
        q = torch.where(active[:, None], w / b.clamp_min(torch.finfo(b.dtype).tiny)[:, None], 0.0)
    exhausted = ~active | (used >= dim)
    return LanczosResult(
        alpha=alpha,
        beta=beta[:, : steps - 1],
        norms=norms,
        steps=used,
        exhausted=exhausted,
        residual=beta[:, steps - 1],
    )


def _reorthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """w_b minus its projection on the rows of basis_b (B, k, d), twice (classical Gram–Schmidt
    with reorthogonalisation, "twice is enough": Giraud et al., Numer. Math. 2005).

    Written as row-vector batched products, (B, 1, d)·(B, d, k) then (B, 1, k)·(B, k, d), which
    on the CPU run several times faster than ``einsum`` or the column form for B > 1.
    """
    for _ in range(2):
        w = w - torch.bmm(torch.bmm(w[:, None, :], basis.transpose(1, 2)), basis)[:, 0]
    return w


def quadrature(
    result: LanczosResult, f: Callable[[Tensor], Tensor], *, k: int | None = None
) -> Tensor:
    """‖u‖² · e₁ᵀ f(T_k) e₁ for every member (B,), in float64 (k = all steps by default)."""
    t = result.tridiagonal(k).double()
    theta, s = torch.linalg.eigh(t)
    weights = s[:, 0, :] ** 2
    values = (weights * f(theta)).sum(dim=1) * result.norms.double() ** 2
    return values.to(result.alpha.dtype)


def ritz_values(result: LanczosResult) -> tuple[Tensor, Tensor]:
    """Ritz values (B, k), descending, and their residual bounds |β_k · s_kj| (B, k)."""
    theta, s = torch.linalg.eigh(result.tridiagonal().double())
    bounds = (result.residual.double()[:, None] * s[:, -1, :]).abs()
    order = torch.argsort(theta, dim=1, descending=True)
    return theta.gather(1, order), bounds.gather(1, order)


def _positive_part(lam: Tensor) -> Tensor:
    return lam.clamp(min=0.0)


def gauss_radau(
    alpha: Tensor, beta: Tensor, norms: Tensor, f: Callable[[Tensor], Tensor], *, node: float = 0.0
) -> Tensor:
    """‖u‖² times the (k+1)-point Gauss–Radau rule with one node fixed at ``node``, (B,) float64.

    ``alpha`` (B, k) and ``beta`` (B, k) are the first k Lanczos coefficients *including* the
    residual β_k. T_k is extended by one row [β_k e_kᵀ, α̃] with α̃ = z + β_k² [(T_k − z)⁻¹]_kk, so
    that z is an eigenvalue of T̃_{k+1} (Golub 1973); the rule is exact for polynomials of degree
    ≤ 2k and equals Gauss quadrature when β_k = 0 (the Krylov space is exhausted).
    """
    alpha, beta, norms = alpha.double(), beta.double(), norms.double()
    k = alpha.shape[1]
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : k - 1], 1)
    t = t + torch.diag_embed(beta[:, : k - 1], -1)
    theta, s = torch.linalg.eigh(t)
    shift = theta - node
    tiny = torch.finfo(torch.float64).eps * theta.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    shift = torch.where(shift.abs() < tiny, torch.where(shift < 0, -tiny, tiny), shift)
    residual = beta[:, k - 1]
    extra = node + residual**2 * (s[:, -1, :] ** 2 / shift).sum(dim=1)
    extra = torch.where(residual == 0, torch.full_like(extra, node), extra)
    ext = torch.cat([alpha, extra[:, None]], dim=1)
    t = torch.diag_embed(ext) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, s = torch.linalg.eigh(t)
    return (s[:, 0, :] ** 2 * f(theta)).sum(dim=1) * norms**2


@dataclass(frozen=True)
class PositiveQuadrature:
    """Per-member uᵀH⁺u estimates of :func:`positive_quadrature` and how each was obtained.

    ``values``: the Gauss–Radau estimate at the member's last step; ``errors``: the change
    |R_k − R_⌈k/2⌉| of that estimate since half the steps (0 after breakdown, where the value
    is exact); ``lower``: max(uᵀHu, 0) = max(‖u‖²α₁, 0), a rigorous lower bound since H⁺ ⪰ H
    and H⁺ ⪰ 0; ``steps``: Lanczos steps used; ``exhausted``: the Krylov space was exhausted;
    ``pruned``: stopped because value + error was below another member's value − error.
    """

    values: Tensor
    errors: Tensor
    lower: Tensor
    steps: Tensor
    exhausted: Tensor
    pruned: Tensor


def positive_quadrature(
    matvec: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    *,
    max_steps: int,
    rtol: float = 1e-2,
    floor: float = float("-inf"),
    prune: bool = True,
    min_steps: int = 4,
    tol: float | None = None,
) -> PositiveQuadrature:
    """uᵀH_b⁺u for B operators by Lanczos with a per-member stopping rule, aimed at the maximum.

    ``matvec(q, members)`` maps the (A, d) block of the still-active ``members`` (indices into
    the batch) to their images, so finished members cost nothing. At checkpoints k = 4, 6, 8, 10,
    13, … (about 25% apart) the Gauss–Radau estimate R_k (node 0, :func:`gauss_radau`) and its
    error estimate e = |R_k − R_⌈k/2⌉| are formed. With M the largest current estimate over all
    members (and ``floor``, a value known to be attained elsewhere), a member stops when

    * e ≤ rtol · M / 2 (converged to the accuracy the maximum needs, with a safety factor 2), or
    * R_k + e < max(floor, max_m (R_m − e_m)) (it cannot attain the maximum: pruned),

    at breakdown (exact), or after ``max_steps``. ``prune=False`` keeps only the first rule (for
    members whose values are averaged rather than maximised, as in stochastic Lanczos quadrature). The error estimate assumes the error decreases
    with k (as measured for this rule; Gauss quadrature itself oscillates). ``rtol = 0`` runs every
    member for ``max_steps`` steps. Lanczos with full reorthogonalisation as in :func:`lanczos`.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))[None]
        >>> u = torch.ones(1, 3, dtype=torch.float64)
        >>> res = positive_quadrature(lambda q, m: (A @ q[..., None])[..., 0], u, max_steps=3)
        >>> float(res.values[0]), bool(res.exhausted[0])
        (5.0, True)
    """
    run = _positive_run(
        start,
        max_steps=max_steps,
        rtol=rtol,
        floor=floor,
        prune=prune,
        min_steps=min_steps,
        tol=tol,
    )
    try:
        request = next(run)
        while True:
            request = run.send(matvec(*request))
    except StopIteration as done:
        return done.value


def positive_quadrature_many(
    matvec: Callable[[list[int], list[Tensor], list[Tensor]], list[Tensor]],
    starts: list[Tensor],
    *,
    max_steps: int,
    rtol: float = 1e-2,
    floors: list[float] | None = None,
    prune: bool = True,
    min_steps: int = 4,
    tol: float | None = None,
) -> list[PositiveQuadrature]:
    """:func:`positive_quadrature` on several families of operators in lockstep.

    ``starts[f]`` is (B_f, d_f). At each step ``matvec(families, blocks, members)`` receives the
    families still running, the (A_f, d_f) blocks of their active members and those members'
    indices, and returns the images; one call can serve all families (e.g. one
    forward-over-reverse graph for the blocks of several layers), so the number of sequential
    calls is the largest number of steps of any family rather than their sum. Each family's
    stopping rule (and ``floors[f]``) is its own, so the results are those of
    :func:`positive_quadrature` run family by family.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, -1.0], dtype=torch.float64))[None]
        >>> B = torch.diag(torch.tensor([2.0, 5.0, -1.0], dtype=torch.float64))[None]
        >>> mats = [A, B]
        >>> def mv(families, qs, members):
        ...     return [(mats[f] @ q[..., None])[..., 0] for f, q in zip(families, qs)]
        >>> u, w = torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
        >>> [round(float(r.values[0]), 9) for r in positive_quadrature_many(mv, [u, w], max_steps=3)]
        [3.0, 7.0]
    """
    floors = [float("-inf")] * len(starts) if floors is None else floors
    runs = [
        _positive_run(
            start,
            max_steps=max_steps,
            rtol=rtol,
            floor=fl,
            prune=prune,
            min_steps=min_steps,
            tol=tol,
        )
        for start, fl in zip(starts, floors, strict=True)
    ]
    results: list[PositiveQuadrature | None] = [None] * len(runs)
    requests: dict[int, tuple[Tensor, Tensor]] = {}
    for f, run in enumerate(runs):
        try:
            requests[f] = next(run)
        except StopIteration as done:
            results[f] = done.value
    while requests:
        pending = list(requests)
        images = matvec(
            pending, [requests[f][0] for f in pending], [requests[f][1] for f in pending]
        )
        for f, w in zip(pending, images, strict=True):
            try:
                requests[f] = runs[f].send(w)
            except StopIteration as done:
                del requests[f]
                results[f] = done.value
    return results


def _positive_run(
    start: Tensor,
    *,
    max_steps: int,
    rtol: float,
    floor: float,
    prune: bool,
    min_steps: int,
    tol: float | None,
):
    """Generator form of :func:`positive_quadrature`: yields (block, members), receives images.

    The Lanczos state (vectors, basis, coefficients) is kept for the running members only,
    compacted whenever members stop, so that a step works on contiguous views and its cost
    does not depend on how many members have finished.
    """
    batch, dim = start.shape
    max_steps = min(max_steps, dim)
    tol = torch.finfo(start.dtype).eps ** (2.0 / 3.0) if tol is None else tol
    tiny = torch.finfo(start.dtype).tiny
    dev = start.device
    norms = start.norm(dim=1)
    f64 = dict(dtype=torch.float64, device=dev)
    values, errors = torch.zeros(batch, **f64), torch.zeros(batch, **f64)
    first = start.new_zeros(batch)
    steps = torch.zeros(batch, dtype=torch.long, device=dev)
    exhausted = torch.zeros(batch, dtype=torch.bool, device=dev)
    pruned = torch.zeros(batch, dtype=torch.bool, device=dev)
    started = norms > 0
    idx = started.nonzero()[:, 0]
    q = start[idx] / norms[idx, None]
    q_prev = torch.zeros_like(q)
    basis = start.new_empty(idx.numel(), max_steps, dim)  # written before read
    alpha = start.new_zeros(idx.numel(), max_steps)
    beta = start.new_zeros(idx.numel(), max_steps)
    scale = start.new_zeros(idx.numel())
    checkpoint = min_steps
    for j in range(max_steps):
        if idx.numel() == 0:
            break
        basis[:, j] = q
        w = yield q, idx
        a = (q * w).sum(dim=1)
        if j > 0:
            w = w - a[:, None] * q - beta[:, j - 1, None] * q_prev
        else:
            w = w - a[:, None] * q
            first[idx] = a
        w = _reorthogonalise(w, basis[:, : j + 1])
        b = w.norm(dim=1)
        alpha[:, j] = a
        scale = torch.maximum(scale, torch.maximum(a.abs(), b))
        broke = b <= tol * scale
        b = torch.where(broke, torch.zeros_like(b), b)
        beta[:, j] = b
        q_prev = q
        q = torch.where(broke[:, None], 0.0, w / b.clamp_min(tiny)[:, None])
        k = j + 1
        last = k == max_steps
        check = rtol > 0 and k >= checkpoint
        if not (check or last or bool(broke.any())):
            continue
        if check:
            checkpoint = max(k + 2, math.ceil(1.25 * k))
        est = gauss_radau(alpha[:, :k], beta[:, :k], norms[idx], _positive_part)
        half = max(1, math.ceil(k / 2))
        err = (est - gauss_radau(alpha[:, :half], beta[:, :half], norms[idx], _positive_part)).abs()
        err = torch.where(broke, torch.zeros_like(err), err)
        values[idx], errors[idx] = est, err
        stop = broke | last
        if check:
            top = float(values.max())
            low = max(floor, float((values - errors)[started].max()))
            converged = err <= 0.5 * rtol * top
            hopeless = (est + err < low) & ~converged & ~broke & prune
            pruned[idx] = hopeless
            stop = stop | converged | hopeless
        exhausted[idx] = broke | (last & (k >= dim))
        if bool(stop.any()):
            steps[idx[stop]] = k
            keep = ~stop
            idx, q, q_prev, scale = idx[keep], q[keep], q_prev[keep], scale[keep]
            basis, alpha, beta = basis[keep], alpha[keep], beta[keep]
    lower = (norms.double() ** 2 * first.double()).clamp(min=0.0)
    return PositiveQuadrature(values, errors, lower, steps, exhausted, pruned)
