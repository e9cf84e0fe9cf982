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
from typing import Literal

import torch
from hessfine.bounds.linalg.lanczos import reorthogonalise
from torch import Tensor

Target = Literal["max", "mean"]
"""What a positive-quadrature run converges: the maximum over its members, or their mean too."""


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


def compression_upper(alpha: Tensor, beta: Tensor, norms: Tensor) -> Tensor:
    """A rigorous upper bound of uᵀH⁺u from k Lanczos steps, (B,) float64; decreasing in k.

    With Q_k the Lanczos basis from u, H Q_k = Q_k T_k + β_k q_(k+1) e_kᵀ gives the compression
    Q_kᵀ H² Q_k = T_k² + β_k² e_k e_kᵀ =: M_k exactly. The square root is operator concave, so
    Jensen's operator inequality for isometries (Hansen & Pedersen, "Jensen's operator
    inequality", Bull. London Math. Soc. 2003) gives √(Q_kᵀ H² Q_k) ⪰ Q_kᵀ √(H²) Q_k = Q_kᵀ|H|Q_k,
    hence uᵀ|H|u ≤ ‖u‖² e₁ᵀ √M_k e₁ and, with uᵀH⁺u = (uᵀHu + uᵀ|H|u)/2 and uᵀHu = ‖u‖²α₁,

        uᵀH⁺u ≤ ‖u‖² (α₁ + e₁ᵀ √M_k e₁) / 2.

    At k = 1 this is the Cauchy–Schwarz bound (α₁ + √(α₁² + β₁²))/2; a larger Krylov space
    gives a smaller value (the compression to a subspace is a compression of M_k), and after
    breakdown (β_k = 0) it is exact. M_k = BᵀB with B the (k+1)×k matrix [T_k; β_k e_kᵀ], so
    √M_k = V Σ Vᵀ from the singular values of B, which keeps small eigenvalues of |H| to the
    working precision (the square roots of M_k's eigenvalues would lose half of it).
    ``alpha``, ``beta``: (B, k), ``beta`` including the
    residual β_k, as for :func:`gauss_radau` (docs/mathematics.md, "The positive part by
    Lanczos quadrature").
    """
    alpha, beta, norms = alpha.double(), beta.double(), norms.double()
    k = alpha.shape[1]
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, : k - 1], 1)
    t = t + torch.diag_embed(beta[:, : k - 1], -1)
    last = torch.zeros_like(t[:, :1])
    last[:, 0, k - 1] = beta[:, k - 1]
    _, sigma, vh = torch.linalg.svd(torch.cat([t, last], dim=1), full_matrices=False)
    absolute = (vh[:, :, 0] ** 2 * sigma).sum(dim=1)
    return (alpha[:, 0] + absolute) / 2 * norms**2


@dataclass(frozen=True)
class PositiveQuadrature:
    """Per-member uᵀH⁺u estimates of :func:`positive_quadrature` and how each was obtained.

    ``lower``: the Gauss–Radau value R_k at the member's last step, a rigorous lower bound of
    uᵀH⁺u that grows with the steps; ``upper``: :func:`compression_upper` U_k at that step, a
    rigorous upper bound that falls with the steps (both exact after breakdown, up to
    round-off); ``values``: the midpoint (R_k + U_k)/2 and ``errors``: the half-width
    (U_k − R_k)/2, so that |values − uᵀH⁺u| ≤ errors; ``steps``: Lanczos steps used;
    ``exhausted``: the Krylov space was exhausted; ``pruned``: stopped because it cannot attain
    the maximum (its upper bound below another member's lower bound) or, by the change rule, is
    not expected to (:func:`positive_quadrature`); ``changes``: |R_k − R_⌈k/2⌉| at the last
    checkpoint, so that max(lower − changes) is the floor a later run may prune against.
    """

    values: Tensor
    errors: Tensor
    lower: Tensor
    upper: Tensor
    steps: Tensor
    exhausted: Tensor
    pruned: Tensor
    changes: Tensor

    @classmethod
    def cat(cls, parts: Sequence[PositiveQuadrature]) -> PositiveQuadrature:
        """The members of ``parts`` (e.g. chunks of examples run one after another) in order."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def _water_level(widths: Tensor, budget: float) -> float:
    """The largest τ with Σ_b min(w_b, τ) ≤ ``budget`` (inf when Σ_b w_b ≤ budget).

    Members whose width is at most τ may stop: the widths of those that stop stay at most τ,
    and τ only grows as running widths shrink and the lower bounds (hence the budget) grow, so
    once every member has stopped Σ_b w_b ≤ budget.
    """
    if float(widths.sum()) <= budget:
        return math.inf
    ordered = widths.sort().values
    below = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)[:-1]])
    above = torch.arange(ordered.numel(), 0, -1, device=ordered.device, dtype=ordered.dtype)
    first = int((below + above * ordered > budget).nonzero()[0])
    return max(float((budget - below[first]) / above[first]), 0.0)


def positive_quadrature(
    matvec: Callable[[Tensor, Tensor], Tensor],
    start: Tensor,
    *,
    max_steps: int,
    rtol: float = 1e-2,
    floor: float = float("-inf"),
    target: Target = "max",
    min_steps: int = 4,
    tol: float | None = None,
) -> PositiveQuadrature:
    """uᵀH_b⁺u for B operators by Lanczos, each member bracketed and stopped by a target rule.

    ``matvec(q, members)`` maps the (A, d) block of the still-active ``members`` (indices into
    the batch) to their images, so finished members cost nothing. At checkpoints k = 4, 6, 8, 10,
    13, … (about 25% apart) each member's value is bracketed by two rigorous bounds: the
    Gauss–Radau rule R_k (node 0, :func:`gauss_radau`) below and :func:`compression_upper` U_k
    above (proofs in docs/mathematics.md, "The positive part by Lanczos quadrature"); the
    member's value is the midpoint, within the half-width (U_k − R_k)/2 of uᵀH⁺u; under
    ``"max"`` only once its bracket is narrow (below; else its lower bound R_k, since the
    midpoint of a wide bracket overstates the value on Hessian spectra: after a few steps R_k
    is 40–90% of the value where U_k is 1.3–4 times it, on the GELU ViT of
    bench/BENCHMARKS.md). With L the largest lower bound of any member (and ``floor``, a value
    known to be attained elsewhere), a member stops at breakdown (exact), after ``max_steps``,
    or by the rule of ``target``:

    * ``"max"`` (the maximum over members is wanted): once U_k − R_k ≤ 2 rtol · L, so that its
      midpoint is within rtol · L of its exact value; or once it cannot attain the maximum
      (pruned): U_k < L, or, by the change rule, R_k + e_k < max_m (R_m − e_m) with
      e = |R_k − R_⌈k/2⌉| the change since half the steps (an estimate: the Gauss–Radau values
      grow towards the exact one, so a member whose value plus its recent growth stays below
      another's value minus its growth is not expected to overtake it; the rigorous rule alone
      cannot prune in time where the brackets converge slowly, as on GPT-2's 1.77M-weight
      blocks). A pruned member's value is R_k and its error U_k − R_k, since a midpoint of a
      wide bracket would overstate it; so is a member the step cap stopped before its bracket
      was narrow. The largest value is within rtol of the maximum over the members not pruned
      (rigorously, where the maximiser converged), and of the maximum as far as the change
      rule holds;
    * ``"mean"`` (the mean is wanted too): the rule above without the change rule and, with
      w_b = U_b − R_b, once
      w_b ≤ τ for the largest τ with Σ_b min(w_b, τ) ≤ 2 rtol Σ_b R_b (a water level: members
      whose brackets are already narrow leave room for the others). τ only grows, so when all
      have stopped Σ_b w_b ≤ 2 rtol Σ_b R_b and the mean of the midpoints is within rtol of
      the exact mean (every member's value is its midpoint).

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
        target=target,
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
    target: Target = "max",
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
            target=target,
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
    target: Target,
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
    lower, upper = torch.zeros(batch, **f64), torch.zeros(batch, **f64)
    changes = torch.zeros(batch, **f64)
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
        w = w - a[:, None] * q
        if j > 0:
            w = w - beta[:, j - 1, None] * q_prev
        w = reorthogonalise(w, basis[:, : j + 1])
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
        low = gauss_radau(alpha[:, :k], beta[:, :k], norms[idx], _positive_part)
        high = torch.maximum(compression_upper(alpha[:, :k], beta[:, :k], norms[idx]), low)
        high = torch.where(broke, low, high)
        lower[idx], upper[idx] = low, high
        stop = broke | last
        if check:
            width = high - low
            best = max(floor, float(lower[started].max()))
            converged = width <= 2 * rtol * best
            half = max(1, math.ceil(k / 2))
            earlier = gauss_radau(alpha[:, :half], beta[:, :half], norms[idx], _positive_part)
            changes[idx] = torch.where(broke, torch.zeros_like(low), (low - earlier).abs())
            likely = max(floor, float((lower - changes)[started].max()))
            below = high < best
            if target == "max":
                below = below | (low + changes[idx] < likely)
            hopeless = below & ~converged & ~broke
            done = converged | hopeless
            if target == "mean":
                done = done & (width <= _water_level(upper - lower, 2 * rtol * float(lower.sum())))
            pruned[idx] = hopeless
            stop = stop | done
        exhausted[idx] = broke | (last & (k >= dim))
        if bool(stop.any()):
            steps[idx[stop]] = k
            keep = ~stop
            idx, q, q_prev, scale = idx[keep], q[keep], q_prev[keep], scale[keep]
            basis, alpha, beta = basis[keep], alpha[keep], beta[keep]
    best = max(floor, float(lower.max())) if batch else 0.0
    narrow = (upper - lower <= 2 * rtol * best) | exhausted
    middle = ~pruned & narrow if target == "max" else torch.ones_like(pruned)
    values = torch.where(middle, (lower + upper) / 2, lower)
    errors = torch.where(middle, (upper - lower) / 2, upper - lower)
    return PositiveQuadrature(values, errors, lower, upper, steps, exhausted, pruned, changes)
