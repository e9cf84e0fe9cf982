"""The positive-part quadratic form uᵀ H⁺ u by adaptive Gauss–Radau quadrature.

With k Lanczos steps from u (:mod:`hessfine.bounds.linalg.lanczos`), uᵀ f(H) u is approximated
by the Gauss quadrature ‖u‖² e₁ᵀ f(T_k) e₁ of the spectral measure of H seen from u (Golub &
Meurant, "Matrices, Moments and Quadrature with Applications", 2010). For f(λ) = max(λ, 0), which
gives uᵀ H⁺ u, the positive-part quadratic form of Ju, Li & Zhang (ICML 2022), and has a kink at
0, Gauss quadrature converges slowly and erratically: a Ritz value near 0 carries the large weight
of the near-null space of H. The Gauss–Radau rule with a node prescribed at 0 (Golub, SIAM Rev.
1973; Golub & Meurant 2010, §6.2) extends T_k by one row so that 0 is a node, puts that weight
where f has its kink, and converges smoothly (measured on ViT blocks in bench/BENCHMARKS.md).
:func:`positive_quadrature` runs it adaptively per member (see its docstring for the stopping
rule); :func:`positive_quadrature_many` runs several families of operators in lockstep.

As in :mod:`hessfine.bounds.linalg.lanczos`, B independent operators are run together and
``matvec`` maps a block of vectors to their images; here it receives only the members still
running, so that finished members cost nothing.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))[None]
    >>> u = torch.ones(1, 3, dtype=torch.float64)
    >>> res = positive_quadrature(lambda q, m: (A @ q[..., None])[..., 0], u, max_steps=3)
    >>> float(res.values[0])  # 3 + 2
    5.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from hessfine.bounds.linalg.lanczos import reorthogonalise
from torch import Tensor


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

    ``values``: the Gauss–Radau estimate at the member's last step, a lower bound of uᵀH⁺u
    that grows with the steps (:func:`positive_quadrature`); ``errors``: the change
    |R_k − R_⌈k/2⌉| of that estimate since half the steps (0 after breakdown, where the value
    is exact); ``lower``: max(uᵀHu, 0) = max(‖u‖²α₁, 0), a rigorous lower bound since H⁺ ⪰ H
    and H⁺ ⪰ 0 (the one-step value is at least this); ``upper``: a rigorous upper bound, the
    value where the Krylov space was exhausted, else (uᵀHu + ‖u‖‖Hu‖)/2 =
    ‖u‖²(α₁ + √(α₁² + β₁²))/2 (uᵀH⁺u = (uᵀHu + uᵀ|H|u)/2 and uᵀ|H|u ≤ ‖u‖‖Hu‖ by
    Cauchy–Schwarz); ``steps``: Lanczos steps used; ``exhausted``: the Krylov space was
    exhausted; ``pruned``: stopped because value + error was below another member's
    value − error.
    """

    values: Tensor
    errors: Tensor
    lower: Tensor
    upper: Tensor
    steps: Tensor
    exhausted: Tensor
    pruned: Tensor

    @classmethod
    def cat(cls, parts: Sequence[PositiveQuadrature]) -> PositiveQuadrature:
        """The members of ``parts`` (e.g. chunks of examples run one after another) in order."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


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
    members whose values are averaged rather than maximised, as in stochastic Lanczos
    quadrature). Every R_k is a lower bound of uᵀH⁺u and R_k ≤ R_(k+1) (in exact arithmetic;
    proof in docs/mathematics.md, "The positive part by Lanczos quadrature"), so the error
    e estimates how far below the converged value R_k lies; it is a heuristic, not a bound.
    ``rtol = 0`` runs every member for ``max_steps`` steps. Lanczos with full
    reorthogonalisation as in :func:`hessfine.bounds.linalg.lanczos.lanczos`.

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
        >>> results = positive_quadrature_many(mv, [u, w], max_steps=3)
        >>> [round(float(r.values[0]), 9) for r in results]
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
    spread = start.new_zeros(batch)
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
        w = reorthogonalise(w, basis[:, : j + 1])
        b = w.norm(dim=1)
        if j == 0:
            spread[idx] = b
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
    a1, b1, squared = first.double(), spread.double(), norms.double() ** 2
    lower = (squared * a1).clamp(min=0.0)
    upper = torch.where(exhausted, values, squared * (a1 + torch.hypot(a1, b1)) / 2)
    return PositiveQuadrature(values, errors, lower, upper, steps, exhausted, pruned)
