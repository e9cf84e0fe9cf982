"""Per-layer Hessian traces: the mean trace (Hutchinson, Hutch++) and the per-example positive part.

``trace.mean`` of a layer is (1/N) Σ_n Tr[H_i(x_n)] = Tr[H̄_ii], the trace of the layer's diagonal
block of the mean-loss Hessian, comparable with PyHessian's ``trace``. Routes
(:attr:`hessfine.bounds.estimates.TraceEstimate.route`):

* Hutchinson (1989): Tr[A] = E[zᵀ A z] for Rademacher z. One joint probe over all selected layers
  costs a single Hessian-vector product; its layer-i sample z_iᵀ (H z)_i is unbiased for Tr[H_ii]
  because the cross-layer terms z_iᵀ H_ij z_j have mean zero. The standard error is the sample
  standard deviation over probes divided by √P.
* On layers certified piecewise linear
  (:func:`hessfine.bounds.operators.certification.certify_piecewise_linear`: every operation
  after the layer is ReLU, max-pooling, residual addition, eval-mode BatchNorm…) the logits'
  second derivative vanishes, so H_i(x) = G_i(x) = J_iᵀ (Σ_k r_k r_kᵀ) J_i with
  ∇²_z ℓ = Σ_k r_k r_kᵀ. There ``hutchinson`` probes the output space instead of the weights
  (the Monte-Carlo Gauss–Newton idea of Martens, Sutskever & Swersky, ICML 2012, and BackPACK's
  DiagGGN-MC, Dangel, Kunstner & Hennig, ICLR 2020): for Rademacher ξ_n ∈ {±1}^K per example,
  g = Σ_n J_{i,n}ᵀ Σ_k ξ_nk r_nk is one vector-Jacobian product of the batch, shared by all
  layers, and E‖g_i‖² = Σ_n Tr[G_i(x_n)] because the ξ are independent with unit variance. A
  probe then costs one backward pass (after one forward pass shared by all probes) instead of a
  double-backward Hessian-vector product, and the variance, 2 Σ_{a≠b} (g_aᵀ g_b)² over the
  per-(example, factor) gradients g_a, is small because those are nearly orthogonal. Each batch
  contributes its own ‖g_i‖² (the cross-batch terms, of mean zero, are left out), and ξ_n is
  keyed by the example's global index. Uncertified layers use the Hessian probes above.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with P probes split in thirds S, G (and
  the rest), Q = orth(A S), Tr[A] ≈ Tr[Qᵀ A Q] + (3/P)·Tr[Gᵀ (I−QQᵀ) A (I−QQᵀ) G]; per layer, since
  it needs products with each diagonal block. The reported standard error is that of the
  Hutchinson part on the deflated matrix.
* Scaled (:func:`relative_noise_traces`): Tr[D_i H̄_ii D_i] = Σ_j D_ij² (H̄_ii)_jj by Hutchinson
  with probes z ⊙ D_i — with D_i = |W_i| the traces that predict the noise stability under
  relative (magnitude-scaled) noise.

``trace.positive_max`` is max_n Tr[H_i⁺(x_n)], used by the paper's trace corollary. On layers
certified piecewise-linear (see :mod:`hessfine.bounds.operators.certification`)
H_i(x) = G_i(x) = J_iᵀ A J_i with A = ∇²_z ℓ = Σ_k r_k r_kᵀ (for cross-entropy
diag p − p pᵀ = M Mᵀ, M = diag(√p) − p √pᵀ), so Tr[H_i⁺(x)] = Σ_k ‖J_iᵀ r_k‖² exactly from one
vector-Jacobian product per factor and example (vmapped over both; k classes, or (T−1)·V for a
causal language model; :func:`hessfine.bounds.operators.gauss_newton.gauss_newton_traces`). On
other layers small enough (d_i ≤ min(probes × Lanczos steps, 4096)) it is exact from the dense
per-example block and its eigenvalues; on larger ones it is estimated per example by stochastic
Lanczos quadrature (Ubaru, Chen & Saad, SIMAX 2017): Tr[f(H)] ≈ (1/P) Σ_p z_pᵀ f(H) z_p with each
term by Lanczos quadrature, with its own probe count (``--positive-trace-probes``).

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
from typing import Literal

import torch
from hessfine.bounds.estimates import PositiveTrace, RunningReduction, TraceEstimate
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    batch_size,
    index_inputs,
    slice_inputs,
)
from hessfine.bounds.linalg.memory import CallSize, MemoryPlan
from hessfine.bounds.linalg.positive_quadrature import positive_quadrature
from hessfine.bounds.linalg.probes import base_key, keyed_generator, rademacher
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces
from hessfine.bounds.operators.layer_io import layer_io_gauss_newton_traces
from hessfine.bounds.operators.mean_loss import flat_operator, mean_loss_hvp
from hessfine.bounds.operators.per_example import (
    PerExampleHVP,
    dense_example_blocks,
    lanczos_layout,
)
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor

TraceRoute = Literal["hutchinson", "hutch++"]

_ELEMENT_BUDGET = 2**26


def layer_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    probes: int = 100,
    route: TraceRoute = "hutchinson",
    generator: torch.Generator | None = None,
    scaling: Mapping[str, Tensor] | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    output_probes: bool = True,
    exact_ggn: bool = True,
    memory: MemoryPlan | None = None,
) -> dict[str, TraceEstimate]:
    """Per-layer Tr[H̄_ii] of the mean-loss Hessian over all examples in ``batches``.

    With ``output_probes`` (default), ``hutchinson`` treats the layers certified piecewise
    linear on the first batch (losses with one logit vector per example: classification,
    regression, multi-label) through H_ii = G_ii: with ``exact_ggn``
    (default, unscaled traces, ``nn.Linear``/``nn.Conv2d`` weights) exactly, as the mean of
    the per-example Tr[G_i(x_n)]
    (:func:`hessfine.bounds.operators.layer_io.layer_io_gauss_newton_traces`, route
    ``exact-ggn``, standard error 0 — one batch backward pass per class, cheaper than the
    probes); otherwise with
    output-space probes (route ``hutchinson-ggn``, see the module docstring). Other layers use
    weight-space Hessian probes.

    With ``scaling`` (a tensor D_i per layer, shaped like the weight) the Hutchinson estimate is
    of Tr[D_i H̄_ii D_i] = Σ_j D_ij² (H̄_ii)_jj instead: probes z ⊙ D. Every process of ``shard``
    draws the same probes and the Hessian products are summed over processes
    (:func:`hessfine.bounds.operators.mean_loss.mean_loss_hvp`); ``progress`` counts probe vectors.
    ``memory`` sizes the examples per call of the Hessian products and exact Gauss–Newton traces
    (:mod:`hessfine.bounds.linalg.memory`; the output-space probes take whole batches, since
    each batch's ‖g_i‖² is their sample).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    memory = memory if memory is not None else MemoryPlan()
    batches = list(batches)
    if probes < 2:
        raise ValueError(f"probes must be at least 2 (for a standard error), not {probes}")
    with differentiable():
        if route == "hutchinson":
            ggn = _certified(fmodel, params, layers, batches) if output_probes else []
            hessian = [name for name in layers if name not in ggn]
            out = {}
            if ggn and exact_ggn and scaling is None:
                found = _exact_ggn_traces(fmodel, params, ggn, batches, probes, shard, memory)
                out.update(found)
                ggn = [name for name in ggn if name not in out]
            if hessian:
                hvp = mean_loss_hvp(
                    fmodel, params, hessian, batches, shard=shard, progress=progress, memory=memory
                )
                out.update(_hutchinson(hvp, params, hessian, probes, generator, scaling))
            if ggn:
                out.update(
                    _output_hutchinson(
                        fmodel, params, ggn, batches, probes, generator, scaling, shard, progress
                    )
                )
            return {name: out[name] for name in layers}
        if scaling is not None:
            raise ValueError("scaled traces are estimated with route='hutchinson' only")
        if route == "hutch++":
            return {
                name: _hutchplusplus(
                    mean_loss_hvp(
                        fmodel,
                        params,
                        [name],
                        batches,
                        shard=shard,
                        progress=progress,
                        memory=memory,
                    ),
                    params[name],
                    name,
                    probes,
                    generator,
                )
                for name in layers
            }
    raise ValueError(f"unknown trace route {route!r}; choose hutchinson or hutch++")


def _hutchinson(hvp, params, layers, probes, generator, scaling):
    z = {}
    for name in layers:
        z[name] = rademacher((probes, *params[name].shape), generator=generator, like=params[name])
        if scaling is not None:
            z[name] = z[name] * scaling[name]
    hz = hvp(z)
    route = "hutchinson" if scaling is None else "hutchinson-scaled"
    out = {}
    for name in layers:
        samples = (z[name] * hz[name]).reshape(probes, -1).sum(dim=1).double()
        stderr = float(samples.std() / math.sqrt(probes))
        out[name] = TraceEstimate(float(samples.mean()), stderr, probes, route)
    return out


def _certified(fmodel, params, layers, batches) -> list[str]:
    """The layers whose Hessian block is the Gauss–Newton block (losses with one logit vector per
    example only: not ``fmodel.loss.sequence``)."""
    if not batches or fmodel.loss.sequence:
        return []
    ratios = certify_piecewise_linear(
        fmodel, params, layers, batches[0][0], generator=keyed_generator("certify-traces")
    )
    return [n for n in layers if ratios[n] <= certification_tolerance(params[n].dtype)]


def _exact_ggn_traces(fmodel, params, layers, batches, probes, shard, memory):
    """Mean over examples of the exact per-example Tr[G_i] (ghost norms); layers it can do."""
    totals: dict[str, Tensor] = {}
    count = 0
    calls = memory.calls("exact-ggn")
    for _, (x, y) in shard.indexed(batches):

        def traces(start, stop, x=x, y=y, layers=layers):
            xs = slice_inputs(x, start, stop)
            return layer_io_gauss_newton_traces(fmodel, params, layers, xs, y[start:stop])

        for values in calls.run(traces, batch_size(x)):
            layers = [name for name in layers if name in values]
            totals = {name: totals.get(name, 0.0) + values[name].sum() for name in layers}
        count += int(y.shape[0])
    if not layers:
        return {}
    summed = shard.sum(torch.stack([totals[name] for name in layers])) / shard.total(count)
    return {
        name: TraceEstimate(float(value), 0.0, probes, "exact-ggn")
        for name, value in zip(layers, summed, strict=True)
    }


def _output_hutchinson(
    fmodel, params, layers, batches, probes, generator, scaling, shard, progress
):
    """Hutchinson in the output space on certified layers: samples ‖Σ_n J_nᵀ Σ_k ξ_nk r_nk‖²."""
    key = base_key(generator)
    first = params[layers[0]]
    samples = {
        name: torch.zeros(probes, dtype=torch.float64, device=first.device) for name in layers
    }
    count = 0
    for start, (x, y) in shard.indexed(batches):
        weights = [params[name].detach().requires_grad_(True) for name in layers]
        with torch.enable_grad():
            z = fmodel.logits({**params, **dict(zip(layers, weights, strict=True))}, x)
            factors = fmodel.loss.curvature_factors(z.detach(), y)  # (K, N, C)
            xi = torch.stack(
                [
                    rademacher(
                        (probes, factors.shape[0]),
                        generator=keyed_generator(key, "output-probe", start + n),
                        like=z,
                    )
                    for n in range(z.shape[0])
                ],
                dim=1,
            )  # (P, N, K)
            for p in range(probes):
                u = torch.einsum("nk,kn...->n...", xi[p], factors)
                grads = torch.autograd.grad(
                    z, weights, u, retain_graph=p < probes - 1, allow_unused=True
                )
                for name, g in zip(layers, grads, strict=True):
                    if g is not None:
                        if scaling is not None:
                            g = g * scaling[name]
                        samples[name][p] += g.detach().double().pow(2).sum()
                if progress is not None:
                    progress(1 / len(batches))
        count += int(y.shape[0])
    total = shard.total(count)
    if shard.world_size > 1:
        summed = shard.sum(torch.stack([samples[name] for name in layers]))
        samples = dict(zip(layers, summed, strict=True))
    route = "hutchinson-ggn" if scaling is None else "hutchinson-ggn-scaled"
    out = {}
    for name in layers:
        values = samples[name] / total
        stderr = float(values.std() / math.sqrt(probes))
        out[name] = TraceEstimate(float(values.mean()), stderr, probes, route)
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


def relative_noise_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    probes: int = 100,
    generator: torch.Generator,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> dict[str, TraceEstimate]:
    """Per-layer Tr[D_i H̄_ii D_i] = Σ_j W_ij² (H̄_ii)_jj with D_i = diag|W_i| (Hutchinson).

    Rademacher probes z are scaled to z ⊙ |w|; one joint probe over all layers costs one
    Hessian-vector product of the mean loss, and its layer-i sample (z_i⊙|w_i|)ᵀ(H (z⊙|w|))_i is
    unbiased for Tr[D_i H̄_ii D_i] because the cross-layer terms have mean zero (Hutchinson 1989).
    These are the traces that :func:`hessfine.bounds.estimators.noise_stability.trace_prediction`
    needs for relative noise.
    """
    scaling = {name: params[name].detach().abs() for name in layers}
    return layer_traces(
        fmodel,
        params,
        layers,
        batches,
        probes=probes,
        generator=generator,
        scaling=scaling,
        shard=shard,
        progress=progress,
        memory=memory,
    )


def positive_trace_max(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    certified: Mapping[str, bool],
    probes: int = 16,
    lanczos_steps: int = 128,
    rtol: float = 1e-2,
    dense_limit: int | None = None,
    generator: torch.Generator | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[int], None] | None = None,
    memory: MemoryPlan | None = None,
) -> dict[str, PositiveTrace]:
    """max over examples of Tr[H_i⁺(x)]: exact where possible, SLQ with a standard error elsewhere.

    * certified layers (``certified``): exact Σ_k ‖J_iᵀ r_k‖² (route ``exact-ggn``);
    * other layers with d_i ≤ ``dense_limit`` weights: exact, from the dense per-example block
      (d_i per-example HVPs, vmapped over examples and columns) and its eigenvalues (route
      ``exact-dense``). The default limit is min(probes × lanczos_steps, 4096): the dense block
      costs no more products than SLQ's worst case, and its d_i² entries per example stay small;
    * larger layers: SLQ with ``probes`` Rademacher probes per example (route ``slq``), each term
      by adaptive Gauss–Radau quadrature
      (:func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature`, no pruning) to
      ``rtol`` of the largest term or ``lanczos_steps`` steps; the standard error over probes of
      the maximising example is reported.

    The SLQ probes of example n come from a generator keyed by (one base draw of ``generator``,
    n) (:mod:`hessfine.bounds.linalg.probes`), so values do not depend on the batching; with a
    ``shard`` the batches are this process's share and ``argmax`` is the global example index
    (the per-process results are merged by the caller:
    :meth:`hessfine.bounds.estimates.PositiveTrace.merge`). ``progress`` is called with 1 per
    layer and batch. ``memory`` sizes the examples (SLQ: the (example, probe) members) per call
    (:mod:`hessfine.bounds.linalg.memory`); without it, fixed element counts do.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    memory = memory if memory is not None else MemoryPlan()
    if dense_limit is None:
        dense_limit = min(probes * lanczos_steps, 4096)
    key = base_key(generator)
    exact = [name for name in layers if certified.get(name, False)]
    dense = [n for n in layers if n not in exact and params[n].numel() <= dense_limit]
    slq = [n for n in layers if n not in exact and n not in dense]
    reductions = {name: RunningReduction() for name in layers}
    errors: dict[str, Tensor] = {}
    with differentiable():
        for first, (x, y) in shard.indexed(batches):
            if exact:
                calls = _example_chunks(fmodel, params, exact, x, y, memory)

                def traces(start, stop, x=x, y=y, first=first):
                    values = gauss_newton_traces(
                        fmodel, params, exact, slice_inputs(x, start, stop), y[start:stop]
                    )
                    for name in exact:
                        reductions[name].update(values[name], start=first + start)

                calls.run(traces, batch_size(x))
                if progress is not None:
                    progress(len(exact))
            for name in dense:
                reductions[name].update(
                    _dense_positive_traces(fmodel, params, name, x, y, memory), start=first
                )
                if progress is not None:
                    progress(1)
            for name in slq:
                mean, stderr = _slq_positive_traces(
                    fmodel, params, name, x, y, probes, lanczos_steps, rtol, (key, first), memory
                )
                before = reductions[name].max
                reductions[name].update(mean, start=first)
                if reductions[name].max != before:
                    errors[name] = stderr[int(mean.argmax())]
                if progress is not None:
                    progress(1)
    routes = {**dict.fromkeys(exact, "exact-ggn"), **dict.fromkeys(dense, "exact-dense")}
    return {
        name: PositiveTrace(
            max=reductions[name].max,
            argmax=reductions[name].argmax,
            mean=reductions[name].mean,
            stderr=float(errors[name]) if name in errors else 0.0,
            route=routes.get(name, "slq"),
            count=reductions[name].count,
        )
        for name in layers
    }


def _dense_positive_traces(fmodel, params, name, x, y, memory):
    """Exact Tr[H_i⁺(x_n)] = Σ_j max(λ_j, 0) per example, shape (B,), in example chunks."""
    d = params[name].numel()
    calls = _sized(memory, f"dense:{name}", max(1, _ELEMENT_BUDGET // (d * d)))

    def traces(start, stop):
        blocks = dense_example_blocks(
            fmodel, params, name, slice_inputs(x, start, stop), y[start:stop]
        )
        return torch.linalg.eigvalsh(blocks.double()).clamp(min=0.0).sum(dim=1)

    return torch.cat(calls.run(traces, y.shape[0]))


def _slq_positive_traces(fmodel, params, name, x, y, probes, steps, rtol, keys, memory):
    """Per-example SLQ estimates of Tr[H_i⁺(x)] and their standard errors, shape (B,).

    All (example, probe) pairs run as one batch of Lanczos members, in chunks that keep the
    Lanczos bases within memory (:func:`hessfine.bounds.operators.per_example.lanczos_layout`,
    the members counted as examples). The products come from retained double-backward graphs (as
    for the quadratic forms' positive part) when the running members fit their budget, else
    from vmapped forward-over-reverse calls
    (:class:`hessfine.bounds.operators.per_example.PerExampleHVP`). ``keys`` = (base key, global
    index of the first example): example n's probes come from the generator keyed by (base key,
    layer, n).
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
    (_, calls), *_ = lanczos_layout(
        fmodel, params, [name], x, y, steps=steps, memory=memory, capped=False
    )

    def members(start, stop):
        idx = examples[start:stop]
        # each (example, probe) member is its own row of the products' examples
        products = PerExampleHVP(
            fmodel, params, index_inputs(x, idx), y[idx], planned=memory.measured
        )
        # zᵀH⁺z = (Pz)ᵀH⁺(Pz) with P the projection on the example's input span, where the
        # products' back end allows it: the same sample, a faster-converging Lanczos run
        (probe,) = products.starts({name: z[start:stop]})
        result = positive_quadrature(
            products.of_layer(name), probe, max_steps=steps, rtol=rtol, target="mean"
        )
        return result.values

    samples = torch.cat(calls.run(members, examples.numel())).reshape(probes, count)
    if probes > 1:
        stderr = samples.std(dim=0) / math.sqrt(probes)
    else:
        stderr = torch.full((count,), float("nan"), dtype=samples.dtype, device=samples.device)
    return samples.mean(dim=0), stderr


def _example_chunks(fmodel, params, layers, x, y, memory):
    """The sizes of calls small enough that per-example, per-factor gradients fit in memory:
    measured under a memory plan, else from the number of gradient entries per example."""
    if memory.measured:
        return memory.calls("exact-ggn")
    z = fmodel.logits(params, slice_inputs(x, 0, 1))
    factors = fmodel.loss.curvature_factors(z, y[:1]).shape[0]
    per_example = sum(params[name].numel() for name in layers) * factors
    return CallSize("exact-ggn", None, max(1, _ELEMENT_BUDGET // max(per_example, 1)))


def _sized(memory, kind, chunk):
    """The calls of ``kind`` under a memory plan, else of ``chunk`` items (an element count)."""
    return memory.calls(kind) if memory.measured else CallSize(kind, None, chunk)
