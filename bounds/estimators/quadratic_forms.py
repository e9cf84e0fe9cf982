"""Per-layer, per-example Hessian quadratic forms of the weight change (Ju, Li & Zhang, ICML 2022).

For a selected layer i with weight change v_i = W_i − W_i^(s) and one example (x, y), the paper's
generalization bound (Theorem 2.1) needs

    𝓗_i = max_(x, y) v_iᵀ H_i⁺(x) v_i,

where H_i(x) is the i-th diagonal block of the Hessian of ℓ(f_W(x), y) and H_i⁺ its positive part.
The estimators (``--estimator``, docs/cli.md; recorded as ``settings.estimator``):

* ``block``: v_iᵀ H_i(x) v_i exactly, the second derivative of t ↦ ℓ(f_{W+t·v_i}(x), y) at 0.
  On layers certified piecewise linear (see ``auto``) it equals the Gauss–Newton value from one
  JVP; elsewhere, for Linear, Conv and ``Conv1D`` weights called once, τ_iᵀ ∇²_{out_i} ℓ τ_i
  from one retained graph of the batch shared by all layers and one double backward per layer
  (:func:`hessfine.bounds.operators.output_graph.output_block_forms`,
  ``diagnostics["hvp_products"] = "output-graph"``), for other weights forward-over-reverse
  Hessian-vector products vmapped over the examples of the batch (``"vmapped"``); both exact for
  every operation, unlike nested forward mode (docs/mathematics.md, "Known traps in PyTorch's
  automatic differentiation").
* ``ggn``: v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' with a single JVP (the Gauss–Newton block); ∇²_z ℓ is
  the model's loss's curvature in the logits (diag p − p pᵀ for cross-entropy). For Linear and
  Conv weights with (B, C) logits and C ≤ 2 × their number, z' of all of them comes instead from
  one shared forward pass and C backward passes (:mod:`hessfine.bounds.operators.layer_io`),
  recorded as ``diagnostics["ggn_products"] = "layer-io"`` (else ``"jvp"``).
* ``positive``: v_iᵀ H_i⁺(x) v_i by adaptive Lanczos quadrature started from v_i (for Linear
  and ``Conv1D`` weights from v_i projected on the example's input span, which leaves the value
  unchanged and tightens the upper bound faster:
  :meth:`hessfine.bounds.operators.output_graph.OutputPairHVP.input_span_starts`; the
  Gauss–Radau rule with a node at 0,
  :func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature`), with per-example
  Hessian-vector products of the examples still running (retained double-backward graphs or
  vmapped forward-over-reverse, :class:`hessfine.bounds.operators.per_example.PerExampleHVP`):
  each example's value is bracketed by rigorous bounds (Gauss–Radau below, the compression bound
  above) and it stops once converged to ``positive_rtol`` of the layer's maximum or once it
  cannot attain the maximum (``positive_target="max"``), or, with ``"mean"``, once the layer's
  mean is within ``positive_rtol`` too; exact once its Krylov space is exhausted.
* ``auto``: the ``positive`` semantics. A layer whose logits are piecewise linear in W_i (every
  operation after it is ReLU, max-pooling, eval-mode BatchNorm, residual addition, pooling…) has
  z'' ≡ 0, so H_i(x) = G_i(x) is positive semi-definite and H_i⁺ = H_i: the single-JVP Gauss–Newton
  value is exact. This is certified numerically per layer: the second directional derivative of
  a random combination of the logits along a random probe of W_i vanishes on the first
  example(s) (:func:`hessfine.bounds.operators.certification.certify_piecewise_linear`).
  Uncertified layers use Lanczos quadrature.
* ``reference-code``: the quantity of the authors' released scripts
  (docs/mathematics.md, "What the authors' released code computes"): batches of
  ``reference_batch_size`` examples in order, Hessian of the batch-mean loss, v stacked over all
  selected layers, per layer v_iᵀ (H v)_i (cross-layer blocks included), maximum over batches.

All per-example values are reduced on the fly (running max, argmax and mean), so memory does not
grow with the number of examples; each layer's reduction is a
:class:`hessfine.bounds.estimates.QuadraticForm` whose ``route`` says how it was computed
(``ggn-certified``, ``ggn``, ``hvp``, ``lanczos`` or ``reference-code``). On the ``lanczos``
route ``mean_lower`` and ``mean_upper`` are the means of the examples' rigorous brackets
(:class:`hessfine.bounds.linalg.positive_quadrature.PositiveQuadrature`), which hold the exact
mean.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> v = {"0.weight": 0.1 * torch.randn(8, 4), "2.weight": 0.1 * torch.randn(3, 8)}
    >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> forms = quadratic_forms(fm, params, v, [batch], estimator="auto")
    >>> sorted(forms) == ["0.weight", "2.weight"] and forms["0.weight"].route
    'ggn-certified'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal, TypeVar

import torch
from hessfine.bounds.estimates import QuadraticForm, RunningReduction
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    slice_inputs,
)
from hessfine.bounds.linalg.memory import CallSize, MemoryPlan
from hessfine.bounds.linalg.positive_quadrature import (
    PositiveQuadrature,
    Target,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.operators.gauss_newton import GaussNewtonForms
from hessfine.bounds.operators.output_graph import output_block_forms
from hessfine.bounds.operators.per_example import PerExampleHVP, block_forms_hvp, lanczos_layout
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor
from torch.func import grad, jvp

Estimator = Literal["auto", "block", "positive", "ggn", "reference-code"]
ESTIMATORS: tuple[str, ...] = ("auto", "block", "positive", "ggn", "reference-code")
_Values = TypeVar("_Values", Tensor, dict[str, Tensor])


def positive_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    name: str,
    v: Tensor,
    x: Inputs,
    y: Tensor,
    *,
    steps: int,
    rtol: float = 1e-2,
    target: Target = "max",
    floor: float = float("-inf"),
    memory: MemoryPlan | None = None,
) -> PositiveQuadrature:
    """v_iᵀ H_i⁺(x) v_i for every example by adaptive Lanczos quadrature started from v_i
    (projected on each example's input span where the output-graph back end does the layer).

    :func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature` with per-example
    HVPs of the examples still running: each example stops once its Gauss–Radau estimate has
    converged to ``rtol`` times the largest value, or once it provably (up to its error
    estimate) cannot attain the maximum (within the batch, so that results do not depend on how
    batches are split over processes), or after ``steps`` steps. ``floor`` is a value already
    attained elsewhere. Examples are processed in chunks so that the Lanczos basis stays within
    memory (:func:`hessfine.bounds.operators.per_example.lanczos_layout`, sized by ``memory``).
    The products come from one retained double-backward graph per chunk (rebuilt as examples
    finish) when the chunk fits its budget, else from vmapped forward-over-reverse calls
    (:class:`hessfine.bounds.operators.per_example.PerExampleHVP`).
    """
    memory = memory if memory is not None else MemoryPlan()
    ((_, calls),) = lanczos_layout(fmodel, params, [name], x, y, steps=steps, memory=memory)
    steps = min(steps, v.numel())

    def chunk(start: int, stop: int) -> PositiveQuadrature:
        nonlocal floor
        ys = y[start:stop]
        products = PerExampleHVP(
            fmodel, params, slice_inputs(x, start, stop), ys, planned=memory.measured
        )
        (start_vectors,) = products.starts({name: v.reshape(1, -1).expand(ys.shape[0], -1)})
        part = positive_quadrature(
            products.of_layer(name),
            start_vectors,
            max_steps=steps,
            rtol=rtol,
            target=target,
            floor=floor,
        )
        floor = max(floor, float((part.lower - part.changes).max()))
        return part

    return PositiveQuadrature.cat(calls.run(chunk, batch_size(x)))


def positive_forms_layers(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Inputs,
    y: Tensor,
    *,
    steps: int,
    rtol: float = 1e-2,
    target: Target = "max",
    memory: MemoryPlan | None = None,
) -> dict[str, PositiveQuadrature]:
    """:func:`positive_forms` for several layers at once, their Lanczos steps in lockstep.

    :func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature_many`: each step is
    one product call for the still-running examples of every layer, so the sequential tails of
    the layers (the maximising example may need many more steps than the rest) overlap. Each
    layer's stopping rule is its own; the values are those of :func:`positive_forms` up to
    round-off. Examples are processed in chunks, and layers run in lockstep, as far as memory
    allows (:func:`hessfine.bounds.operators.per_example.lanczos_layout`: sized by the
    ``memory`` plan, or without one by fixed element counts; then the next set of layers
    runs). While the P running (layer, example) pairs of a step fit one call (P · Σ_i d_i
    within the per-call budget, or always under a memory plan), the products come from retained
    double-backward graphs (one per layer while the pairs are many, one joint graph for the
    tail; rebuilt as pairs and layers finish), which on the CPU are several times cheaper per
    step than vmapped forward-over-reverse calls (bench/BENCHMARKS.md, issue 10 item 3);
    otherwise the layers of a step are split into as few vmapped calls as keep P · Σ_i d_i
    within the budget (:class:`hessfine.bounds.operators.per_example.PerExampleHVP`).
    """
    names = list(directions)
    memory = memory if memory is not None else MemoryPlan()
    parts: dict[str, list[PositiveQuadrature]] = {name: [] for name in names}
    layout = lanczos_layout(fmodel, params, names, x, y, steps=steps, memory=memory)
    for lockstep, calls in layout:
        chosen = [names[f] for f in lockstep]
        floors = [float("-inf")] * len(chosen)

        def chunk(
            start: int, stop: int, chosen: list[str] = chosen, floors: list[float] = floors
        ) -> list[PositiveQuadrature]:
            ys = y[start:stop]
            products = PerExampleHVP(
                fmodel, params, slice_inputs(x, start, stop), ys, planned=memory.measured
            )
            starts = products.starts(
                {m: directions[m].reshape(1, -1).expand(ys.shape[0], -1) for m in chosen}
            )

            def matvec(
                families: list[int], blocks: list[Tensor], members: list[Tensor]
            ) -> list[Tensor]:
                return products([chosen[f] for f in families], blocks, members)

            results = positive_quadrature_many(
                matvec, starts, max_steps=steps, rtol=rtol, target=target, floors=floors
            )
            for f, part in enumerate(results):
                floors[f] = max(floors[f], float((part.lower - part.changes).max()))
            return results

        for results in calls.run(chunk, batch_size(x)):
            for name, part in zip(chosen, results, strict=True):
                parts[name].append(part)
    return {name: PositiveQuadrature.cat(chunks) for name, chunks in parts.items()}


def quadratic_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    *,
    estimator: Estimator = "auto",
    lanczos_steps: int = 128,
    positive_rtol: float = 1e-2,
    positive_target: Target = "max",
    reference_batch_size: int = 4,
    check_examples: int = 1,
    generator: torch.Generator | None = None,
    certify_on: Inputs | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[int], None] | None = None,
    memory: MemoryPlan | None = None,
) -> dict[str, QuadraticForm]:
    """Per-layer max / mean / argmax over examples of the chosen quadratic form.

    ``params`` is the full parameter dict of the fine-tuned network, ``directions`` maps each
    selected layer to v_i (same shape as the weight). ``batches`` yields (x, y) in example order.
    For the positive part, ``lanczos_steps`` caps the Lanczos steps per example and
    ``positive_rtol`` is the accuracy, relative to the layer's maximum, at which an example stops
    (0: always ``lanczos_steps`` steps) and ``positive_target`` whether the mean is converged to
    it too; see :func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature`.
    ``certify_on``: the inputs whose first example(s) certify the layers (default: the first
    batch). With a ``shard`` the batches are this process's share (whole batches of the global
    stream; for ``reference-code`` of exactly ``reference_batch_size``), ``argmax`` is global and
    the per-process results are merged by the caller
    (:meth:`hessfine.bounds.estimates.QuadraticForm.merge`). ``progress`` is called with 1 per
    layer and batch. ``memory``: the plan that sizes the calls on each batch (Gauss–Newton
    forms, each layer's Hessian-vector products, the Lanczos chunks;
    :mod:`hessfine.bounds.linalg.memory`); without one a call takes the whole batch and the
    Lanczos runs are chunked by fixed element counts. ``reference-code`` takes its batches
    whole: their size is its definition.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with differentiable():
        if estimator == "reference-code":
            stream = batches if shard.world_size > 1 else _rebatch(batches, reference_batch_size)
            return _reference_code_forms(fmodel, params, directions, stream, shard, progress)
        return _example_forms(
            fmodel,
            params,
            directions,
            batches,
            estimator=estimator,
            lanczos_steps=lanczos_steps,
            positive_rtol=positive_rtol,
            positive_target=positive_target,
            check_examples=check_examples,
            generator=generator,
            certify_on=certify_on,
            shard=shard,
            progress=progress,
            memory=memory if memory is not None else MemoryPlan(),
        )


def _example_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    *,
    estimator: str,
    lanczos_steps: int,
    positive_rtol: float,
    positive_target: Target,
    check_examples: int,
    generator: torch.Generator,
    certify_on: Inputs | None,
    shard: Shard,
    progress: Callable[[int], None] | None,
    memory: MemoryPlan,
) -> dict[str, QuadraticForm]:
    names = list(directions)
    reductions = {name: RunningReduction() for name in names}
    routes: dict[str, str] = {}
    diagnostics: dict[str, dict] = {name: {} for name in names}
    if certify_on is not None:
        routes = _choose_routes(
            fmodel, params, names, certify_on, estimator, check_examples, generator, diagnostics
        )
    gauss_newton: GaussNewtonForms | None = None
    for first, (x, y) in shard.indexed(batches):
        if not routes:
            routes = _choose_routes(
                fmodel, params, names, x, estimator, check_examples, generator, diagnostics
            )
        if gauss_newton is None:
            ggn = {n: directions[n] for n in names if routes[n] in ("ggn", "ggn-certified")}
            gauss_newton = GaussNewtonForms(fmodel, params, ggn)
        positive = positive_forms_layers(
            fmodel,
            params,
            {name: directions[name] for name in names if routes[name] == "lanczos"},
            x,
            y,
            steps=lanczos_steps,
            rtol=positive_rtol,
            target=positive_target,
            memory=memory,
        )
        forms = (
            _in_chunks(memory.calls("ggn"), gauss_newton, x, y) if gauss_newton.directions else {}
        )
        hvp = {name: directions[name] for name in names if routes[name] == "hvp"}
        blocks = (
            _in_chunks(
                memory.calls("hvp:output-graph"),
                lambda xs, ys, hvp=hvp: output_block_forms(fmodel, params, hvp, xs, ys),
                x,
                y,
            )
            if hvp
            else {}
        )
        for name in names:
            route = routes[name]
            bounds: dict[str, Tensor] = {}
            if name in forms:
                values = forms[name]
                diagnostics[name]["ggn_products"] = gauss_newton.products[name]
            elif route == "hvp":
                if name in blocks:
                    values = blocks[name]
                    diagnostics[name]["hvp_products"] = "output-graph"
                else:

                    def vmapped(xs: Inputs, ys: Tensor, name: str = name) -> Tensor:
                        return block_forms_hvp(fmodel, params, name, directions[name], xs, ys)

                    values = _in_chunks(memory.calls(f"hvp:{name}"), vmapped, x, y)
                    diagnostics[name]["hvp_products"] = "vmapped"
            else:
                result = positive[name]
                values, bounds = result.values, {"lower": result.lower, "upper": result.upper}
                _fold_lanczos_diagnostics(diagnostics[name], result, lanczos_steps, positive_rtol)
            reductions[name].update(values, start=first, **bounds)
            if progress is not None:
                progress(1)
    return {
        name: reductions[name].form(
            name,
            routes.get(name, estimator),
            _finish_diagnostics(diagnostics[name]),
        )
        for name in names
    }


def _in_chunks(
    calls: CallSize, compute: Callable[[Inputs, Tensor], _Values], x: Inputs, y: Tensor
) -> _Values:
    """``compute(x, y)`` of per-example values (a tensor, or a dict of them) in the chunks of
    examples that ``calls`` sizes."""
    parts = calls.run(lambda a, b: compute(slice_inputs(x, a, b), y[a:b]), batch_size(x))
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _choose_routes(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: Inputs,
    estimator: str,
    check_examples: int,
    generator: torch.Generator,
    diagnostics: dict[str, dict],
) -> dict[str, str]:
    """Decide, on the first batch, how each layer is computed (and record why)."""
    if estimator in ("ggn", "positive"):
        return dict.fromkeys(names, "ggn" if estimator == "ggn" else "lanczos")
    ratios = certify_piecewise_linear(
        fmodel, params, names, x, examples=check_examples, generator=generator
    )
    routes = {}
    for name in names:
        certified = ratios[name] <= certification_tolerance(params[name].dtype)
        diagnostics[name]["certification_residual"] = ratios[name]
        diagnostics[name]["certified_psd"] = certified
        fallback = "lanczos" if estimator == "auto" else "hvp"
        routes[name] = "ggn-certified" if certified else fallback
    return routes


def _fold_lanczos_diagnostics(
    diagnostics: dict, result: PositiveQuadrature, cap: int, rtol: float
) -> None:
    """Accumulate the convergence report of the positive part over batches.

    Reported (per layer): the step cap and tolerance; Lanczos steps per example (mean, max);
    ``error_bound``, the largest rigorous error of an example not pruned (its ``errors``: the
    half-width of a narrow bracket, else the whole width; absolute, in the units of the values:
    the reported max is within this of the sample's maximum, up to round-off); the fractions
    pruned and exhausted; ``lower_bound_max`` = max_x R_x, a rigorous lower bound of the true
    𝓗_i; and ``max_plus_error``, ``max_minus_error`` = max_x U_x over the examples not pruned
    and max_x R_x, between which the maximum lies
    (:attr:`hessfine.bounds.estimates.QuadraticForm.max_error_estimate`). Every entry is a
    max, a count-weighted mean or fraction, so that per-process reports merge exactly.
    """
    d = diagnostics
    d["lanczos_max_steps"] = cap
    d["positive_rtol"] = rtol
    kept = ~result.pruned
    d["_err"] = max(d.get("_err", 0.0), float(result.errors[kept].max()) if kept.any() else 0.0)
    d["_steps"] = d.get("_steps", 0) + int(result.steps.sum())
    d["_steps_max"] = max(d.get("_steps_max", 0), int(result.steps.max()))
    d["_pruned"] = d.get("_pruned", 0) + int(result.pruned.sum())
    d["_exhausted"] = d.get("_exhausted", 0) + int(result.exhausted.sum())
    d["_count"] = d.get("_count", 0) + result.values.numel()
    plus = float(result.upper[kept].max()) if kept.any() else float("-inf")
    d["_plus"] = max(d.get("_plus", float("-inf")), plus)
    d["_minus"] = max(d.get("_minus", float("-inf")), float(result.lower.max()))


def _finish_diagnostics(diagnostics: dict) -> dict:
    out = {k: v for k, v in diagnostics.items() if not k.startswith("_")}
    if "_count" in diagnostics:
        count = diagnostics["_count"]
        out["lanczos_steps_mean"] = diagnostics["_steps"] / count
        out["lanczos_steps_max"] = diagnostics["_steps_max"]
        out["error_bound"] = diagnostics["_err"]
        out["pruned_fraction"] = diagnostics["_pruned"] / count
        out["krylov_exhausted_fraction"] = diagnostics["_exhausted"] / count
        out["lower_bound_max"] = diagnostics["_minus"]
        out["max_plus_error"] = diagnostics["_plus"]
        out["max_minus_error"] = diagnostics["_minus"]
    return out


def _reference_code_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    shard: Shard,
    progress: Callable[[int], None] | None,
) -> dict[str, QuadraticForm]:
    """The authors' scripts' quantity: per layer v_iᵀ(H v)_i of the batch-mean loss, max over
    batches."""
    names = list(directions)
    reductions = {name: RunningReduction() for name in names}
    base = {name: params[name] for name in names}
    for index, (x, y) in enumerate(batches):
        global_index = index * shard.world_size + shard.rank

        def mean_loss(selected: dict[str, Tensor], x: Inputs = x, y: Tensor = y) -> Tensor:
            return fmodel.losses({**params, **selected}, x, y).mean()

        hv = jvp(lambda s: grad(mean_loss)(s), (base,), (dict(directions),))[1]
        for name in names:
            value = (hv[name] * directions[name]).sum().reshape(1)
            reductions[name].update(value, start=global_index)
        if progress is not None:
            progress(len(names))
    return {
        name: reductions[name].form(name, "reference-code", {"unit": "batch"}) for name in names
    }


def _cat_inputs(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Regroup a stream of batches into consecutive batches of exactly ``size`` (the last may be
    short)."""
    xs: list[Inputs] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += y.shape[0]
        while held >= size:
            x_all, y_all = _cat_inputs(xs), torch.cat(ys)
            yield slice_inputs(x_all, 0, size), y_all[:size]
            xs, ys = [slice_inputs(x_all, size, held)], [y_all[size:]]
            held -= size
    if held:
        yield _cat_inputs(xs), torch.cat(ys)
