"""The quantities a measurement computes, as one table.

Each :class:`Quantity` names the function of :mod:`hessfine.bounds` that computes it
(``estimator``, run on this process's share of the Hessian examples with the draws keyed by the
quantity's name and seed; for the two that need more than the Hessian examples, a function of
the run), its progress unit and the provenance timing it adds to (``phase``); its ``plan`` says
from the settings whether it is asked for and how it runs (:class:`Plan`: progress total, the
estimator's options, and how a layer the model does not use is reported — the result types'
``unused`` forms, exact since those layers' Hessian blocks are zero). :class:`hessfine.analysis.measure` runs the table in order, one loop:
time, retry with half the batch after a CUDA out-of-memory error, merge the processes' results
(each result type's ``merge``), complete with the unused layers, and keep the result under the
quantity's name for the quantities after it, the bounds and ``measurement.json``.

To add a quantity: write its estimator in :mod:`hessfine.bounds.estimators` returning a type of
:mod:`hessfine.bounds.estimates` (with ``to_json``, ``merge`` and ``unused``), add a row here with
its plan, write its entry of ``measurement.json`` (``_Measurement._record`` in
:mod:`hessfine.analysis.measure`) and declare its fields in :mod:`hessfine.analysis.schema`.

Example:
    >>> [q.name for q in QUANTITIES][:3]
    ['quadratic forms', 'trace', 'positive trace']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from hessfine.analysis.distributed import Context
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.measurement_inputs import MeasurementInputs
from hessfine.analysis.progress import Progress
from hessfine.bounds.estimates import (
    Eigenvalues,
    PositiveTrace,
    QuadraticForm,
    TraceEstimate,
    merge_layers,
)
from hessfine.bounds.estimators.noise_stability import noise_stability
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.estimators.spectra import (
    spectral_density,
    top_eigenvalues,
    whole_top_eigenvalues,
)
from hessfine.bounds.estimators.traces import (
    layer_traces,
    positive_trace_max,
    relative_noise_traces,
)
from hessfine.bounds.functional import Batch, ConsistentCrossEntropy
from hessfine.bounds.linalg.memory import MemoryPlan
from hessfine.bounds.linalg.probes import keyed_generator
from hessfine.bounds.pac_bayes import pac_bayes_certificate


class MeasurementRun(Protocol):
    """What the table reads of a running measurement (:class:`hessfine.analysis.measure`)."""

    settings: Any
    inputs: MeasurementInputs
    ctx: Context
    progress: Progress
    layers: list[str]
    unused: list[str]
    count: int
    batch_size: int
    hessian_data: LabeledData
    consistent: ConsistentCrossEntropy | None
    results: dict[str, Any]
    memory: MemoryPlan

    def batches(self, data: LabeledData, count: int | None) -> Iterator[Batch]: ...

    def local(self, data: LabeledData, count: int | None) -> Iterator[Batch]: ...

    def local_batches(self, data: LabeledData, count: int | None = None) -> int: ...

    def training_sample(self) -> LabeledData: ...

    def certified(
        self, forms: Mapping[str, QuadraticForm], data: LabeledData
    ) -> dict[str, bool]: ...


Run = MeasurementRun


@dataclass(frozen=True)
class Plan:
    """How a quantity that was asked for runs: its progress ``total`` (in the quantity's unit),
    the estimator's keyword ``options``, the estimator's first argument (the used layers, or
    their directions v_i), ``calls`` when it runs once per entry (each entry's options added;
    the result is then the list of results), ``per_batch`` when the estimator counts progress
    per batch, and ``complete``, which adds the unused layers to the result. ``whole_run``: the
    estimator takes the run itself (it needs more than the Hessian examples)."""

    total: float = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    subject: Literal["layers", "directions"] = "layers"
    calls: tuple[Mapping[str, Any], ...] | None = None
    per_batch: bool = False
    complete: Callable[[Any], Any] = field(default=lambda result: result)
    whole_run: bool = False


@dataclass(frozen=True)
class Quantity:
    """One row of the table: its name (progress stage and key of the keyed draws and of the
    results), provenance phase, progress unit, estimator, and ``plan``, which says from the
    run's settings whether it is asked for (None: not) and how it runs."""

    name: str
    phase: str
    unit: str
    estimator: Callable[..., Any]
    plan: Callable[[Run], Plan | None]


def _with_unused(run: Run, unused: Callable[[str], Any]) -> Callable[[dict], dict]:
    """``complete`` for a per-layer result: each unused layer gets ``unused(name)``."""
    return lambda result: {**result, **{name: unused(name) for name in run.unused}}


def _layer_batches(run: Run) -> int:
    return len(run.layers) * run.local_batches(run.hessian_data, run.count)


def _lanczos_steps(run: Run, dim: int) -> int:
    """The Lanczos steps of a top-eigenvalue run on ``dim`` weights (the spectra's default)."""
    return min(dim, max(2 * run.settings.eigen + 20, 40))


def _numel(run: Run, names: list[str]) -> int:
    return sum(run.inputs.params[name].numel() for name in names)


def _forms(run: Run) -> Plan:
    s = run.settings
    first_x, _ = next(iter(run.batches(run.hessian_data, run.count)))
    options = {"estimator": s.estimator, "lanczos_steps": s.lanczos_steps}
    options |= {"positive_rtol": s.positive_rtol, "positive_target": s.positive_target}
    options |= {"reference_batch_size": run.batch_size}
    return Plan(
        total=_layer_batches(run),
        options={**options, "certify_on": first_x, "memory": run.memory},
        subject="directions",
        complete=_with_unused(run, lambda name: QuadraticForm.unused(name, run.count)),
    )


def _trace(run: Run) -> Plan | None:
    s = run.settings
    if not (s.trace or s.noise_sigma):
        return None
    factor = len(run.layers) if s.trace_method == "hutch++" else 1
    unused = TraceEstimate.unused(s.trace_probes)
    return Plan(
        s.trace_probes * factor,
        {"probes": s.trace_probes, "route": s.trace_method, "memory": run.memory},
        complete=_with_unused(run, lambda name: unused),
    )


def _positive_trace(run: Run) -> Plan | None:
    s = run.settings
    if not s.trace:
        return None
    certified = run.certified(run.results["quadratic forms"], run.hessian_data)
    options = {"probes": s.positive_trace_probes, "lanczos_steps": s.lanczos_steps}
    return Plan(
        _layer_batches(run),
        {**options, "certified": certified, "rtol": s.positive_rtol, "memory": run.memory},
        complete=_with_unused(run, lambda name: PositiveTrace.unused()),
    )


def _eigenvalues(run: Run) -> Plan | None:
    k = run.settings.eigen
    if not k:
        return None
    steps = sum(_lanczos_steps(run, _numel(run, [name])) for name in run.layers)
    zeros = _with_unused(run, lambda name: Eigenvalues.unused(_numel(run, [name]), k))
    return Plan(steps, {"k": k, "memory": run.memory}, complete=zeros)


def _whole_eigenvalues(run: Run) -> Plan | None:
    k = run.settings.eigen
    if not k:
        return None
    zeros = _numel(run, run.unused)
    return Plan(
        _lanczos_steps(run, _numel(run, run.layers)),
        {"k": k, "memory": run.memory},
        complete=lambda whole: whole.with_zeros(zeros, k),
    )


def _density(run: Run) -> Plan | None:
    if not run.settings.density:
        return None
    return Plan(4 * min(64, _numel(run, run.layers)), {"memory": run.memory})


def _relative_trace(run: Run) -> Plan | None:
    s = run.settings
    wanted = bool(s.noise_sigma) and s.noise_relative
    return (
        Plan(s.trace_probes, {"probes": s.trace_probes, "memory": run.memory}) if wanted else None
    )


def _noise(run: Run) -> Plan | None:
    s = run.settings
    if not s.noise_sigma:
        return None
    sigmas = tuple({"sigma": sigma} for sigma in s.noise_sigma)
    options = {"draws": s.noise_draws, "relative": s.noise_relative, "memory": run.memory}
    return Plan(s.noise_draws, options, calls=sigmas, per_batch=True)


def _certificate(run: Run) -> Plan | None:
    return Plan(whole_run=True) if run.settings.certificate else None


def _consistent_forms(run: Run) -> Plan | None:
    return Plan(whole_run=True) if run.inputs.noise is not None else None


def consistent_forms(run: Run) -> tuple[dict[str, QuadraticForm], dict[str, bool], bool]:
    """𝓗̄_i of the consistent loss on the sampled training examples with their noisy labels.

    Its Gauss–Newton part is cross-entropy's, so layers certified piecewise linear (and every
    layer under the ``ggn`` estimator) reuse the clean value (flag True); the others are
    recomputed with ℓ̄ and the same estimator (``reference-code``: all layers, its cross-layer
    products are not certified). The last value says whether every layer is certified
    piecewise linear, so that ℓ̄'s Hessian (and its traces) equal cross-entropy's.
    """
    s, forms = run.settings, run.results["quadratic forms"]
    data = run.training_sample()
    certified = run.certified(forms, data)
    reused = dict.fromkeys(run.unused, True)
    if s.estimator == "ggn":
        reused.update(dict.fromkeys(run.layers, True))
    elif s.estimator == "reference-code":
        reused.update(dict.fromkeys(run.layers, False))
    else:
        reused.update(certified)
    smooth = [name for name in run.layers if not reused[name]]
    out = {name: forms[name] for name in forms if reused.get(name, False)}
    if smooth:
        fmodel = dataclasses.replace(run.inputs.fmodel, loss=run.consistent)
        first_x, _ = next(iter(run.batches(data, len(data))))
        stage = "quadratic forms (consistent loss)"
        total = len(smooth) * run.local_batches(data)
        with run.progress.stage(stage, total=total, unit="layer·batch") as update:
            noisy = quadratic_forms(
                fmodel,
                run.inputs.params,
                {name: run.inputs.directions[name] for name in smooth},
                run.local(data, len(data)),
                estimator=s.estimator,
                lanczos_steps=s.lanczos_steps,
                positive_rtol=s.positive_rtol,
                positive_target=s.positive_target,
                reference_batch_size=run.batch_size,
                generator=keyed_generator(s.seed, stage),
                certify_on=first_x,
                shard=run.ctx.shard(run.batch_size),
                progress=update,
                memory=run.memory,
            )
        out.update(merge_layers(run.ctx.gather(noisy)))
    return out, reused, all(certified[name] for name in run.layers)


def certificate(run: Run) -> dict[str, Any]:
    """The PAC-Bayes certificate with A_i = max(𝓗_i, 0)/‖v_i‖² (the curvature along v_i).

    When no layer has 𝓗_i > 0 (possible with ``block`` or ``reference-code``), A_i comes from
    the Gauss–Newton forms max_x v_iᵀG_i(x)v_i/‖v_i‖² (PSD) on the same examples, and if those
    vanish too, A_i = 1. Any choice keeps the certificate valid (its prior variances come from a
    lattice fixed in advance); ``curvature_source`` records which was used.
    """
    inputs, layers, ctx = run.inputs, run.layers, run.ctx
    params, directions = inputs.params, inputs.directions
    reference = {name: params[name] - directions[name] for name in layers}
    norms = {n: float(directions[n].double().pow(2).sum()) for n in layers}

    def along_v(values: Mapping[str, QuadraticForm]) -> dict[str, float]:
        return {n: max(values[n].max, 0.0) / norms[n] if norms[n] > 0 else 0.0 for n in norms}

    curvature, source = along_v(run.results["quadratic forms"]), "quadratic_form"
    if not any(a > 0 for a in curvature.values()):
        ggn = quadratic_forms(
            inputs.fmodel,
            params,
            {name: directions[name] for name in layers},
            run.local(run.hessian_data, None),
            estimator="ggn",
            shard=ctx.shard(run.batch_size),
            memory=run.memory,
        )
        curvature, source = along_v(merge_layers(ctx.gather(ggn))), "gauss_newton"
    if not any(a > 0 for a in curvature.values()):
        curvature, source = dict.fromkeys(layers, 1.0), "unit"
    draws = 4
    share = 1 / max(run.local_batches(inputs.train), 1)
    with run.progress.stage("certificate", total=draws, unit="repetition") as bar:
        found = pac_bayes_certificate(
            inputs.fmodel,
            params,
            reference,
            layers,
            run.local(inputs.train, None),
            n=len(inputs.train),
            curvature=curvature,
            draws=draws,
            generator=keyed_generator(run.settings.seed, "certificate"),
            shard=ctx.shard(run.batch_size),
            progress=lambda done: bar(done * share),
            memory=run.memory,
        )
    return {**found.to_json(), "curvature_source": source}


# One row a line: a table, not reformatted.
# fmt: off
QUANTITIES: tuple[Quantity, ...] = (
    Quantity("quadratic forms", "quadratic_forms_s", "layer·batch", quadratic_forms, _forms),
    Quantity("trace", "trace_s", "probe", layer_traces, _trace),
    Quantity("positive trace", "trace_s", "layer·batch", positive_trace_max, _positive_trace),
    Quantity("eigenvalues", "eigen_s", "Lanczos step", top_eigenvalues, _eigenvalues),
    Quantity("eigenvalues (all layers)", "eigen_s", "Lanczos step", whole_top_eigenvalues, _whole_eigenvalues),
    Quantity("density", "eigen_s", "Lanczos step", spectral_density, _density),
    Quantity("relative trace", "noise_s", "probe", relative_noise_traces, _relative_trace),
    Quantity("noise", "noise_s", "draw", noise_stability, _noise),
    Quantity("certificate", "certificate_s", "repetition", certificate, _certificate),
    Quantity("quadratic forms (consistent loss)", "quadratic_forms_noisy_labels_s", "layer·batch", consistent_forms, _consistent_forms),
)
# fmt: on
"""Every quantity, in the order computed (later ones read earlier results)."""

REPORTED_PHASES = ("quadratic_forms_s", "trace_s", "eigen_s", "noise_s", "certificate_s")
"""Timings written for every measurement (0 when not run); other phases only when run."""
