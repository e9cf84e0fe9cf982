"""A numerical PAC-Bayes certificate for a fine-tuned network (beyond the paper).

Posterior Q = N(W, diag σ_i²) and prior P = N(W^(s), diag σ_i²) on the selected layers (every
other weight fixed at its value in both), so with v_i = W_i − W_i^(s)

    KL(Q ‖ P) = ½ Σ_i ‖v_i‖² / σ_i²            (exact constant; the paper drops the ½).

**Choice of σ_i (the paper's optimal-covariance rule, docs/bounds.md, "PAC-Bayes pieces").**
Modelling the loss increase under noise by ½⟨Σ_i, A_i⟩ and the complexity by KL/n = (1/2n)⟨Σ_i⁻¹,
v_i v_iᵀ⟩, and restricting Σ_i = σ_i² I with a scalar curvature A_i·I (``curvature``; e.g. the trace
per dimension mean_x Tr[H_i(x)]/d_i, or the curvature 𝓗_i/‖v_i‖² along v_i), minimising
σ_i² d_i A_i + ‖v_i‖²/(n σ_i²) gives

    σ_i*² = ‖v_i‖ / sqrt(n · d_i · A_i),   value 2·sqrt(d_i A_i ‖v_i‖² / n),

the isotropic analogue of 2·sqrt(v_iᵀ A_i v_i / n). The certificate uses σ_i = λ·σ_i* with a
global scale λ from a fixed finite ``grid``, rounded to the lattice σ = 2^k (k ∈ ℤ).

**Validity.** The prior may not depend on the training data, but σ_i* does (through v_i and
A_i). The prior variances are therefore taken from a countable family fixed in advance: each
layer's σ_i is a lattice point 2^{k_i} with prior weight π(k) = 1 / (2.25 (|k|+1)(|k|+2)), or a
point mass at W_i^(s) (weight ⅓, used for layers with v_i = 0, which then stay unperturbed);
the weights sum to 1. A union bound over the family costs Σ_i log(1/π(k_i)) nats ("prior cost").
With probability ≥ 1 − δ/2 over the sample, simultaneously for every lattice configuration
(Maurer 2004, Thm. 5, PAC-Bayes-kl, n ≥ 8):

    kl(ê_Q ‖ e_Q) ≤ [KL(Q‖P) + Σ_i log(1/π(k_i)) + log(4·sqrt(n)/δ)] / n,

where ê_Q and e_Q are the expected 0-1 training and test errors of the stochastic predictor (the
Gibbs risk). The 0-1 error of an example is the fraction of its predictions that are wrong
(:func:`hessfine.bounds.losses.example_errors`, in [0, 1]): 0 or 1 for a classifier; for a
sequence (a causal or sequence-to-sequence language model, token classification) its token error,
the mean over its label positions, so that n counts sequences; the per-label error of a
multi-label example. The certificate names it (``bounded_loss``, the loss's ``error_name``). A
regression makes no predictions; its certificate is refused.
ê_Q is estimated by Monte Carlo: for each of ``draws`` repetitions every training example (or
every group of g = ``examples_per_draw`` consecutive examples) gets its own independent weight
draw, so the N = draws·n/g group error rates are independent [0, 1] variables whose mean is
ê_Q exactly, and the relative-entropy Chernoff bound (Hoeffding 1963, Thm. 1; Langford 2005)
gives ê_Q ≤ kl⁻¹(ê, log(1/δ_mc)/N) with probability ≥ 1 − δ_mc. The estimate is made at every
grid scale, so δ_mc = δ/(2·|grid|) (union over the grid). Then, since kl⁻¹ is increasing in its
first argument, with probability ≥ 1 − δ:

    e_Q ≤ kl⁻¹( ê_upper, [KL + prior cost + log(4 sqrt(n)/δ)] / n ),

minimised over the grid. The bound is on the stochastic (Gibbs) predictor's test error; it is
never below the Monte Carlo error and never above 1.

Example:
    >>> round(kl_inverse_upper(0.0, math.log(2)), 6)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    slice_inputs,
)
from hessfine.bounds.linalg.memory import CallSize, MemoryPlan
from hessfine.bounds.linalg.probes import base_key, keyed_generator
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.losses import example_errors
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor
from torch.func import vmap

DEFAULT_GRID: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0)
_ELEMENT_BUDGET = 2**26
_BISECTION_STEPS = 200


def kl_bernoulli(q: float, p: float) -> float:
    """kl(q‖p) = q log(q/p) + (1−q) log((1−q)/(1−p)) for q, p ∈ [0, 1] (0·log 0 = 0)."""
    if not (0.0 <= q <= 1.0 and 0.0 <= p <= 1.0):
        raise ValueError(f"kl_bernoulli needs q, p in [0, 1], got q={q}, p={p}")
    out = 0.0
    if q > 0.0:
        if p == 0.0:
            return float("inf")
        out += q * math.log(q / p)
    if q < 1.0:
        if p == 1.0:
            return float("inf")
        out += (1.0 - q) * math.log((1.0 - q) / (1.0 - p))
    return max(out, 0.0)


def kl_inverse_upper(q: float, c: float) -> float:
    """sup{p ∈ [q, 1] : kl(q‖p) ≤ c}, by bisection (returns the upper end, i.e. conservative).

    kl(q‖·) increases on [q, 1] from 0 to +∞ (for q < 1), so the set is an interval [q, p*]:
    c ≤ 0 gives q, q = 1 gives 1, and a huge c gives a value that rounds to 1.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"kl_inverse_upper needs q in [0, 1], got {q}")
    if math.isnan(c):
        raise ValueError("kl_inverse_upper got c = nan")
    if c <= 0.0 or q == 1.0:
        return q
    lo, hi = q, 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if kl_bernoulli(q, mid) > c:
            hi = mid
        else:
            lo = mid
    return hi


def binomial_upper_bound(errors: float, trials: int, delta: float) -> float:
    """Upper confidence bound, at level 1 − δ, on the mean of ``trials`` independent [0,1] values.

    p̄ = kl⁻¹(errors/trials, log(1/δ)/trials): the one-sided relative-entropy Chernoff bound
    P(mean ≤ q) ≤ exp(−trials·kl(q‖p)) for q < p (Hoeffding 1963, Thm. 1; Langford 2005, Thm. 3.3).
    It holds for independent, not necessarily identically distributed, variables in [0, 1]
    (``errors`` may be fractional). Slightly looser than Clopper–Pearson, and closed-form at 0
    errors: 1 − δ^(1/trials).
    """
    if trials < 1:
        raise ValueError(f"trials must be a positive integer, not {trials}")
    if not 0.0 <= errors <= trials:
        raise ValueError(f"errors must lie in [0, trials], got {errors} of {trials}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    return kl_inverse_upper(errors / trials, math.log(1.0 / delta) / trials)


def lattice_prior_cost(k: int | None) -> float:
    """log(1/π) of a lattice point σ = 2^k (``None``: the point mass), see the module docstring."""
    if k is None:
        return math.log(3.0)
    return math.log(2.25 * (abs(k) + 1) * (abs(k) + 2))


def optimal_sigmas(
    distances: Mapping[str, float],
    curvature: Mapping[str, float],
    numel: Mapping[str, int],
    *,
    n: int,
) -> dict[str, float]:
    """σ_i* = sqrt(‖v_i‖ / sqrt(n · d_i · A_i)); 0 for layers with v_i = 0 (left unperturbed).

    A layer with v_i ≠ 0 whose curvature is missing, zero, negative or not finite gets the
    largest valid A_j of the other layers (the smallest σ, i.e. the cautious choice); any choice
    keeps the certificate valid, since the prior variances come from a fixed lattice.
    """
    valid = [float(a) for a in curvature.values() if math.isfinite(float(a)) and float(a) > 0.0]
    out = {}
    for name, dist in distances.items():
        if dist == 0.0:
            out[name] = 0.0
            continue
        a = float(curvature.get(name, float("nan")))
        if not (math.isfinite(a) and a > 0.0):
            if not valid:
                raise ValueError(
                    "every layer's curvature is missing, zero or negative; the certificate needs "
                    "positive finite A_i (e.g. the mean Hessian trace per dimension)"
                )
            a = max(valid)
        out[name] = math.sqrt(dist / math.sqrt(n * numel[name] * a))
    return out


@dataclass(frozen=True)
class GridPoint:
    """The certificate at one grid scale λ."""

    scale: float
    bound: float
    empirical_error: float
    empirical_error_upper: float
    kl: float
    prior_cost: float


@dataclass(frozen=True)
class Certificate:
    """Certified bound on the stochastic predictor's test 0-1 error and every term in it;
    ``bounded_loss`` names the per-example error bounded (e.g. ``"0-1 error"``)."""

    bound: float
    bounded_loss: str
    empirical_error: float
    empirical_error_upper: float
    deterministic_error: float
    kl: float
    prior_cost: float
    complexity: float
    delta: float
    n: int
    scale: float
    grid: tuple[float, ...]
    draws: int
    examples_per_draw: int
    trials: int
    sigmas: Mapping[str, float]
    lattice: Mapping[str, int | None]
    per_scale: tuple[GridPoint, ...]

    def to_json(self) -> dict:
        """A JSON-ready dict (``measurement.json → bounds.pac_bayes_certificate``)."""
        return {
            "bound": self.bound,
            "bounded_loss": self.bounded_loss,
            "empirical_error": self.empirical_error,
            "empirical_error_upper": self.empirical_error_upper,
            "deterministic_error": self.deterministic_error,
            "kl": self.kl,
            "prior_cost": self.prior_cost,
            "complexity": self.complexity,
            "delta": self.delta,
            "n": self.n,
            "scale": self.scale,
            "grid": list(self.grid),
            "draws": self.draws,
            "examples_per_draw": self.examples_per_draw,
            "trials": self.trials,
            "sigmas": dict(self.sigmas),
            "lattice": dict(self.lattice),
            "per_scale": [vars(p).copy() for p in self.per_scale],
        }


def pac_bayes_certificate(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    n: int,
    curvature: Mapping[str, float],
    delta: float = 0.05,
    grid: Sequence[float] = DEFAULT_GRID,
    draws: int = 4,
    examples_per_draw: int = 1,
    generator: torch.Generator,
    chunk: int | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> Certificate:
    """PAC-Bayes-kl certificate for posterior N(W, diag σ_i²), prior N(W^(s), diag σ_i²).

    Args:
        fmodel, params: the fine-tuned network W.
        reference: W^(s) for every selected layer (e.g. pretrained weights; zeros for a new head).
        layers: the perturbed layers.
        batches: the whole training set (exactly ``n`` examples).
        n: training-set size (≥ 8, Maurer's condition).
        curvature: A_i > 0 per layer (see the module docstring and :func:`optimal_sigmas`).
        delta: total failure probability (δ/2 Monte Carlo, δ/2 PAC-Bayes).
        grid: candidate global scales λ (fixed in advance, positive).
        draws: Monte Carlo repetitions; per repetition every group of ``examples_per_draw``
            consecutive examples gets its own independent weight draw.
        examples_per_draw: g ≥ 1, dividing every batch size. The group error rates are
            independent [0, 1] variables with mean ê_Q, so ``trials`` = draws·n/g. g = 1 (one draw
            per example) gives the tightest Monte Carlo term; a larger g draws g times less noise
            (the cost that dominates for large models).
        generator: source of the base key (one draw) of the weight draws; each group's draw
            comes from its own keyed generator on the parameters' device
            (:mod:`hessfine.bounds.linalg.probes`), shared by all grid scales (common random
            numbers), so the result depends neither on the batching nor on the number of
            processes.
        chunk: groups evaluated together in one ``vmap`` (each with its own weight copy);
            default: sized by ``memory``, else from an element budget.
        shard: this process's share of the batches; the error counts are summed over processes.
        progress: called with 1 per Monte Carlo repetition and batch (a fraction of 1 per call
            when a batch is split).
        memory: the plan that sizes the calls (:mod:`hessfine.bounds.linalg.memory`, kind
            ``certificate``): the groups of a call, each with its own weight draw per repetition
            and its errors unperturbed and at every scale; default: no plan, the groups of a
            ``vmap`` from an element budget.

    The batches are streamed once (memory does not grow with ``n``), and the counts are exact
    sums, so they do not depend on the calls.
    """
    layers = list(layers)
    bounded_loss = fmodel.loss.error_name
    if bounded_loss is None:
        raise ValueError(f"a {fmodel.loss.task} predicts no classes: its 0-1 error is not defined")
    grid = tuple(float(g) for g in grid)
    if not grid or any(not (math.isfinite(g) and g > 0) for g in grid):
        raise ValueError(f"grid must be a non-empty tuple of positive scales, got {grid}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    if n < 8:
        raise ValueError(f"the PAC-Bayes-kl bound needs n ≥ 8 training examples, got {n}")
    if draws < 1 or examples_per_draw < 1:
        raise ValueError("draws and examples_per_draw must be positive integers")
    missing = [name for name in layers if name not in params or name not in reference]
    if missing or not layers:
        raise ValueError(f"layers {missing or layers} must be in both params and reference")
    directions = {name: (params[name] - reference[name]).detach() for name in layers}
    distances = {name: float(directions[name].double().norm()) for name in layers}
    numel = {name: params[name].numel() for name in layers}
    base = optimal_sigmas(distances, curvature, numel, n=n)
    memory = memory if memory is not None else MemoryPlan()
    if chunk is not None:
        calls = CallSize("certificate", None, chunk)
    elif memory.measured:
        calls = memory.calls("certificate")
    else:
        calls = CallSize("certificate", None, _ELEMENT_BUDGET // max(sum(numel.values()), 1))
    lattices = [{name: _round_to_lattice(scale * base[name]) for name in layers} for scale in grid]
    scale_sigmas = [
        {name: 0.0 if k is None else 2.0**k for name, k in lattice.items()} for lattice in lattices
    ]
    counts = _error_counts(
        fmodel,
        params,
        scale_sigmas,
        batches,
        draws=draws,
        group=examples_per_draw,
        key=base_key(generator),
        calls=calls,
        shard=shard,
        progress=progress,
    )
    total, deterministic_errors = int(counts[0]), float(counts[1])
    if total != n:
        raise ValueError(f"batches hold {total} examples but n = {n}; pass the whole training set")
    trials = draws * n // examples_per_draw
    deterministic = deterministic_errors / n

    delta_mc = delta / (2 * len(grid))
    log_term = math.log(4.0 * math.sqrt(n) / delta)
    points, configs = [], []
    for scale, lattice, sigmas, errors in zip(
        grid, lattices, scale_sigmas, counts[2:].tolist(), strict=True
    ):
        kl = 0.5 * sum(
            distances[name] ** 2 / sigmas[name] ** 2 for name in layers if sigmas[name] > 0
        )
        cost = sum(lattice_prior_cost(k) for k in lattice.values())
        ehat = errors / (draws * n)
        upper = binomial_upper_bound(errors / examples_per_draw, trials, delta_mc)
        complexity = (kl + cost + log_term) / n
        bound = kl_inverse_upper(upper, complexity)
        points.append(GridPoint(scale, bound, ehat, upper, kl, cost))
        configs.append((sigmas, lattice, complexity))
    best = min(range(len(grid)), key=lambda i: points[i].bound)
    chosen = points[best]
    sigmas, lattice, complexity = configs[best]
    return Certificate(
        bound=chosen.bound,
        bounded_loss=bounded_loss,
        empirical_error=chosen.empirical_error,
        empirical_error_upper=chosen.empirical_error_upper,
        deterministic_error=deterministic,
        kl=chosen.kl,
        prior_cost=chosen.prior_cost,
        complexity=complexity,
        delta=delta,
        n=n,
        scale=chosen.scale,
        grid=grid,
        draws=draws,
        examples_per_draw=examples_per_draw,
        trials=trials,
        sigmas=sigmas,
        lattice=lattice,
        per_scale=tuple(points),
    )


def _round_to_lattice(sigma: float) -> int | None:
    """Nearest k with 2^k ≈ σ in log scale; None for σ = 0 (point mass)."""
    if sigma == 0.0:
        return None
    return round(math.log2(sigma))


def _error_counts(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    scale_sigmas: Sequence[Mapping[str, float]],
    batches: Iterable[Batch],
    *,
    draws: int,
    group: int,
    key: int,
    calls: CallSize,
    shard: Shard,
    progress: Callable[[float], None] | None,
) -> Tensor:
    """[examples, deterministic 0-1 errors, stochastic errors at every scale], summed over
    processes, in one streamed pass over the batches; each example's 0-1 error is
    :func:`hessfine.bounds.losses.example_errors`. A call (sized by ``calls``, in groups) takes
    its examples' errors unperturbed and at every repetition and scale.

    In repetition d the group starting at global example m gets unit noise Z from the generator
    keyed by (``key``, d, m), shared by every scale (W + σ_s ⊙ Z at scale s): the counts depend
    neither on the batching, nor on the calls, nor on the number of processes.
    """
    noisy = [name for name, s in scale_sigmas[0].items() if s > 0]
    device = params[noisy[0]].device if noisy else torch.device("cpu")

    def one(u: dict[str, Tensor], xg: Inputs) -> Tensor:
        perturbed = {**params, **{name: params[name] + u[name] for name in noisy}}
        return fmodel.logits(perturbed, xg)

    def errors(x: Inputs, y: Tensor, first: int, start: int, stop: int, groups: int) -> Tensor:
        """[deterministic, every scale] errors of groups ``start:stop`` of the batch."""
        xs = slice_inputs(x, start * group, stop * group)
        labels = y[start * group : stop * group]
        found = torch.zeros(1 + len(scale_sigmas), dtype=torch.float64)
        found[0] = float(example_errors(fmodel.loss, fmodel.logits(params, xs), labels).sum())
        if not noisy:
            found[1:] = draws * found[0]
            return found
        xg = _grouped(xs, group)
        for d in range(draws):
            units = [
                _unit_noise(
                    params, noisy, keyed_generator(key, d, first + m * group, device=device)
                )
                for m in range(start, stop)
            ]
            z = {name: torch.stack([u[name] for u in units]) for name in noisy}
            del units
            for s, sigmas in enumerate(scale_sigmas):
                noise = {name: sigmas[name] * z[name] for name in noisy}
                logits = vmap(one)(noise, xg).flatten(0, 1)
                found[1 + s] += float(example_errors(fmodel.loss, logits, labels).sum())
            if progress is not None:
                progress((stop - start) / groups)
        return found

    counts = torch.zeros(2 + len(scale_sigmas), dtype=torch.float64)
    with torch.no_grad(), differentiable():
        for first, (x, y) in shard.indexed(batches):
            size = batch_size(x)
            if size % group:
                raise ValueError(
                    f"every batch size must be a multiple of examples_per_draw = {group}"
                )
            n = size // group
            parts = calls.run(lambda a, b, x=x, y=y, f=first, n=n: errors(x, y, f, a, b, n), n)
            counts[0] += size
            counts[1:] += torch.stack(parts).sum(dim=0)
    return shard.sum(counts)


def _unit_noise(
    params: Mapping[str, Tensor], names: Sequence[str], generator: torch.Generator
) -> dict[str, Tensor]:
    """Standard normal tensors shaped like ``params[name]``, drawn in ``names`` order."""
    return {
        name: torch.randn(
            params[name].shape,
            generator=generator,
            dtype=params[name].dtype,
            device=params[name].device,
        )
        for name in names
    }


def _grouped(x: Inputs, group: int) -> Inputs:
    """(G·g, …) → (G, g, …) for a tensor or every tensor of a dict."""
    if isinstance(x, Tensor):
        return x.reshape(-1, group, *x.shape[1:])
    return {k: v.reshape(-1, group, *v.shape[1:]) for k, v in x.items()}
