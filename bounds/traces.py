"""Per-layer Hessian traces: the mean trace (Hutchinson, Hutch++) and the per-example positive part.

``trace.mean`` of a layer is (1/N) Σ_n Tr[H_i(x_n)] = Tr[H̄_ii], the trace of the layer's diagonal
block of the mean-loss Hessian, comparable with PyHessian's ``trace``. Estimators:

* Hutchinson (1989): Tr[A] = E[zᵀ A z] for Rademacher z. One joint probe over all selected layers
  costs a single Hessian-vector product; its layer-i sample z_iᵀ (H z)_i is unbiased for Tr[H_ii]
  because the cross-layer terms z_iᵀ H_ij z_j have mean zero. The standard error is the sample
  standard deviation over probes divided by √P.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with P probes split in thirds S, G (and
  the rest), Q = orth(A S), Tr[A] ≈ Tr[Qᵀ A Q] + (3/P)·Tr[Gᵀ (I−QQᵀ) A (I−QQᵀ) G]; per layer, since
  it needs products with each diagonal block. The reported standard error is that of the
  Hutchinson part on the deflated matrix.

``trace.positive_max`` is max_n Tr[H_i⁺(x_n)], used by the paper's trace corollary. On layers
certified piecewise-linear (see :mod:`hessfine.bounds.quadratic_forms`) H_i(x) = G_i(x) = J_iᵀ A J_i with
A = ∇²_z ℓ = Σ_k r_k r_kᵀ (for cross-entropy diag p − p pᵀ = M Mᵀ, M = diag(√p) − p √pᵀ), so
Tr[H_i⁺(x)] = Σ_k ‖J_iᵀ r_k‖² exactly from one vector-Jacobian product per factor and example
(vmapped over both; k classes, or (T−1)·V for a causal language model). On other layers it is
estimated per example by stochastic Lanczos quadrature (Ubaru, Chen & Saad, SIMAX 2017):
Tr[f(H)] ≈ (1/P) Σ_p z_pᵀ f(H) z_p with each term by Lanczos quadrature.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> fm, params = FunctionalModel.from_module(torch.nn.Linear(3, 2))
    >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> t = layer_traces(fm, params, ["weight"], [batch], probes=30)["weight"]
    >>> t.mean >= 0 and t.probes == 30
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.hessian_products import flat_operator, mean_loss_hvp
from hessfine.bounds.lanczos import lanczos, quadrature
from hessfine.bounds.quadratic_forms import RunningReduction, per_example_hvp
from hessfine.bounds.safe_autodiff import differentiable
from hessfine.bounds.sharding import LOCAL, Shard, base_key, keyed_generator
from torch import Tensor
from torch.func import vjp, vmap

TraceMethod = Literal["hutchinson", "hutch++"]

_ELEMENT_BUDGET = 2**26


@dataclass(frozen=True)
class TraceEstimate:
    """Estimate of the mean over examples of Tr[H_i(x)] with its standard error."""

    mean: float
    stderr: float
    probes: int
    method: str


@dataclass(frozen=True)
class PositiveTrace:
    """max over examples of Tr[H_i⁺(x)], where it is attained, and how it was computed."""

    max: float
    argmax: int
    mean: float
    stderr: float
    method: str


def rademacher(shape: Sequence[int], *, generator: torch.Generator, like: Tensor) -> Tensor:
    """Independent ±1 entries (drawn on the CPU from ``generator``, moved to ``like``'s device)."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator)
    return (2.0 * bits - 1.0).to(dtype=like.dtype, device=like.device)


def layer_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    probes: int = 100,
    method: TraceMethod = "hutchinson",
    generator: torch.Generator | None = None,
    scaling: Mapping[str, Tensor] | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
) -> dict[str, TraceEstimate]:
    """Per-layer Tr[H̄_ii] of the mean-loss Hessian over all examples in ``batches``.

    With ``scaling`` (a tensor D_i per layer, shaped like the weight) the Hutchinson estimate is
    of Tr[D_i H̄_ii D_i] = Σ_j D_ij² (H̄_ii)_jj instead: probes z ⊙ D. Every process of ``shard``
    draws the same probes and the Hessian products are summed over processes
    (:func:`hessfine.bounds.hessian_products.mean_loss_hvp`); ``progress`` counts probe vectors.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = list(batches)
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (for a standard error), not {probes}")
    with differentiable():
        if method == "hutchinson":
            hvp = mean_loss_hvp(fmodel, params, layers, batches, shard=shard, progress=progress)
            return _hutchinson(hvp, params, layers, probes, generator, scaling)
        if scaling is not None:
            raise ValueError("scaled traces are estimated with method='hutchinson' only")
        if method == "hutch++":
            return {
                name: _hutchplusplus(
                    mean_loss_hvp(fmodel, params, [name], batches, shard=shard, progress=progress),
                    params[name],
                    name,
                    probes,
                    generator,
                )
                for name in layers
            }
    raise ValueError(f"unknown trace method {method!r}; choose hutchinson or hutch++")


def _hutchinson(hvp, params, layers, probes, generator, scaling):
    z = {}
    for name in layers:
        z[name] = rademacher((probes, *params[name].shape), generator=generator, like=params[name])
        if scaling is not None:
            z[name] = z[name] * scaling[name]
    hz = hvp(z)
    method = "hutchinson" if scaling is None else "hutchinson-scaled"
    out = {}
    for name in layers:
        samples = (z[name] * hz[name]).reshape(probes, -1).sum(dim=1).double()
        stderr = float(samples.std() / math.sqrt(probes))
        out[name] = TraceEstimate(float(samples.mean()), stderr, probes, method)
    return out


def _hutchplusplus(hvp, weight, name, probes, generator):
    matvec = flat_operator(hvp, {name: weight.shape})
    dim = weight.numel()
    sketch = max(1, probes // 3)
    residual_probes = max(1, probes - 2 * sketch)
    s = rademacher((sketch, dim), generator=generator, like=weight)
    q, _ = torch.linalg.qr(matvec(s).T)
    low_rank = float(torch.trace(q.T @ matvec(q.T).T))
    g = rademacher((residual_probes, dim), generator=generator, like=weight)
    g = g - (g @ q) @ q.T
    samples = (g * matvec(g)).sum(dim=1).double()
    stderr = (
        float(samples.std() / math.sqrt(residual_probes)) if residual_probes > 1 else float("nan")
    )
    return TraceEstimate(low_rank + float(samples.mean()), stderr, probes, "hutch++")


def gauss_newton_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Exact per-example Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖² for every layer, shape (B,) each.

    The r_k factor the loss's curvature in the logits, Σ_k r_k r_kᵀ = ∇²_z ℓ
    (``fmodel.loss.curvature_factors``; for cross-entropy the columns of
    M = diag(√p) − p √pᵀ, for a causal language model the same per label position, scaled by
    1/√m). One VJP per factor per example, vmapped over both; ``y`` is needed by losses whose
    curvature depends on the labels (causal LM).
    """
    selected = {name: params[name] for name in layers}

    def one(xi: Inputs, yi: Tensor | None) -> dict[str, Tensor]:
        def logits(sel: dict[str, Tensor]) -> Tensor:
            return fmodel.logits({**params, **sel}, unsqueeze_inputs(xi))

        z, pull = vjp(logits, selected)
        factors = fmodel.loss.curvature_factors(z, None if yi is None else yi[None])
        grads = vmap(pull)(factors)[0]
        return {name: grads[name].pow(2).sum() for name in layers}

    with differentiable():
        return vmap(one, in_dims=(0, None if y is None else 0))(x, y)


def positive_trace_max(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    certified: Mapping[str, bool],
    probes: int = 16,
    lanczos_steps: int = 32,
    generator: torch.Generator | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[int], None] | None = None,
) -> dict[str, PositiveTrace]:
    """max over examples of Tr[H_i⁺(x)]: exact on certified layers, SLQ elsewhere.

    The SLQ probes of example n come from a generator keyed by (one base draw of ``generator``,
    n) (:mod:`hessfine.bounds.sharding`), so values do not depend on the batching; with a
    ``shard`` the batches are this process's share and ``argmax`` is the global example index
    (the per-process results are merged by the caller). ``progress`` is called with 1 per
    layer and batch.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    key = base_key(generator)
    exact = [name for name in layers if certified.get(name, False)]
    slq = [name for name in layers if not certified.get(name, False)]
    reductions = {name: RunningReduction() for name in layers}
    errors: dict[str, Tensor] = {}
    with differentiable():
        for first, (x, y) in shard.indexed(batches):
            if exact:
                for start, stop in _example_chunks(fmodel, params, exact, x, y):
                    values = gauss_newton_traces(
                        fmodel, params, exact, slice_inputs(x, start, stop), y[start:stop]
                    )
                    for name in exact:
                        reductions[name].update(values[name], start=first + start)
                if progress is not None:
                    progress(len(exact))
            for name in slq:
                mean, stderr = _slq_positive_traces(
                    fmodel, params, name, x, y, probes, lanczos_steps, (key, first)
                )
                before = reductions[name].max
                reductions[name].update(mean, start=first)
                if reductions[name].max != before:
                    errors[name] = stderr[int(mean.argmax())]
                if progress is not None:
                    progress(1)
    return {
        name: PositiveTrace(
            max=reductions[name].max,
            argmax=reductions[name].argmax,
            mean=reductions[name].mean,
            stderr=float(errors[name]) if name in errors else 0.0,
            method="exact-ggn" if name in exact else "slq",
        )
        for name in layers
    }


def _slq_positive_traces(fmodel, params, name, x, y, probes, steps, keys):
    """Per-example SLQ estimates of Tr[H_i⁺(x)] and their standard errors, shape (B,).

    All (example, probe) pairs run as one batch of Lanczos members, in chunks that keep the
    Lanczos bases within memory. ``keys`` = (base key, global index of the first example):
    example n's probes come from the generator keyed by (base key, layer, n).
    """
    weight = params[name]
    count, dim = y.shape[0], weight.numel()
    steps = min(steps, dim)
    examples = torch.arange(count, device=y.device).repeat(probes)
    key, first = keys
    per_example = [
        rademacher((probes, dim), generator=keyed_generator(key, name, first + n), like=weight)
        for n in range(count)
    ]
    z = torch.stack(per_example, dim=1).reshape(probes * count, dim)
    chunk = max(1, _ELEMENT_BUDGET // (steps * dim))
    values = []
    for start in range(0, examples.numel(), chunk):
        idx = examples[start : start + chunk]
        matvec = per_example_hvp(fmodel, params, name, index_inputs(x, idx), y[idx])
        result = lanczos(matvec, z[start : start + chunk], steps=steps)
        values.append(quadrature(result, lambda lam: lam.clamp(min=0.0)).double())
    samples = torch.cat(values).reshape(probes, count)
    if probes > 1:
        stderr = samples.std(dim=0) / math.sqrt(probes)
    else:
        stderr = torch.full((count,), float("nan"), dtype=samples.dtype)
    return samples.mean(dim=0), stderr


def _example_chunks(fmodel, params, layers, x, y):
    """Example ranges small enough that per-example, per-factor gradients fit in memory."""
    z = fmodel.logits(params, slice_inputs(x, 0, 1))
    factors = fmodel.loss.curvature_factors(z, y[:1]).shape[0]
    per_example = sum(params[name].numel() for name in layers) * factors
    size = max(1, _ELEMENT_BUDGET // max(per_example, 1))
    n = batch_size(x)
    return [(start, min(n, start + size)) for start in range(0, n, size)]
