"""The quantities a measurement computes, as one table.

Each :class:`Quantity` says when it is asked for (``wanted``, from the settings), which function
of :mod:`hessfine.bounds` computes it (``estimator``, run on this process's share of the Hessian
examples with the draws keyed by the quantity's name and seed) or, for the two that need more
than the Hessian examples, which function of the run does (``compute``), how its progress counts
(``unit``, ``total``), the provenance timing it adds to (``phase``) and how a layer the model does
not use is reported (``complete``: the result types' ``unused`` forms, exact since those layers'
Hessian blocks are zero). :class:`hessfine.analysis.measure` runs the table in order, one loop:
time, retry with half the batch after a CUDA out-of-memory error, merge the processes' results
(each result type's ``merge``), complete with the unused layers, and keep the result under the
quantity's name for the quantities after it, the bounds and ``measurement.json``.

To add a quantity: write its estimator in :mod:`hessfine.bounds.estimators` returning a type of
:mod:`hessfine.bounds.estimates` (with ``to_json``, ``merge`` and ``unused``), add a row here,
write its JSON in :func:`hessfine.analysis.measure.record` and declare its fields in
:mod:`hessfine.analysis.schema`.

Example:
    >>> [q.name for q in QUANTITIES][:3]
    ['quadratic forms', 'trace', 'positive trace']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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

    def batches(self, data: LabeledData, count: int | None) -> Iterator[Batch]: ...

    def local(self, data: LabeledData, count: int | None) -> Iterator[Batch]: ...

    def local_batches(self, data: LabeledData, count: int | None = None) -> int: ...

    def training_sample(self) -> LabeledData: ...

    def certified(
        self, forms: Mapping[str, QuadraticForm], data: LabeledData
    ) -> dict[str, bool]: ...


Run = MeasurementRun


@dataclass(frozen=True)
class Quantity:
    """One row of the table (see the module docstring)."""

    name: str
    phase: str
    wanted: Callable[[Run], bool]
    unit: str = ""
    total: Callable[[Run], float] = lambda run: 0
    estimator: Callable[..., Any] | None = None
    options: Callable[[Run], dict[str, Any]] = lambda run: {}
    subject: Literal["layers", "directions"] = "layers"
    per_sigma: bool = False
    per_batch: bool = False
    compute: Callable[[Run], Any] | None = None
    complete: Callable[[Run, Any], Any] = lambda run, result: result


def _each(unused: Callable[[Run, str], Any]) -> Callable[[Run, dict], dict]:
    """``complete`` for a per-layer result: the unused layers get ``unused(run, name)``."""
    return lambda run, result: {**result, **{name: unused(run, name) for name in run.unused}}


def _layer_batches(run: Run) -> int:
    return len(run.layers) * run.local_batches(run.hessian_data, run.count)


def _lanczos_steps(run: Run, dim: int) -> int:
    """The Lanczos steps of a top-eigenvalue run on ``dim`` weights (the spectra's default)."""
    return min(dim, max(2 * run.settings.eigen + 20, 40))


def _numel(run: Run, names: list[str]) -> int:
    return sum(run.inputs.params[name].numel() for name in names)


def _form_options(run: Run) -> dict[str, Any]:
    s = run.settings
    first_x, _ = next(iter(run.batches(run.hessian_data, run.count)))
    return {
        "estimator": s.estimator,
        "lanczos_steps": s.lanczos_steps,
        "positive_rtol": s.positive_rtol,
        "reference_batch_size": run.batch_size,
        "certify_on": first_x,
    }


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
                reference_batch_size=run.batch_size,
                generator=keyed_generator(s.seed, stage),
                certify_on=first_x,
                shard=run.ctx.shard(run.batch_size),
                progress=update,
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
        )
    return {**found.to_json(), "curvature_source": source}


QUANTITIES: tuple[Quantity, ...] = (
    Quantity(
        "quadratic forms",
        "quadratic_forms_s",
        wanted=lambda run: True,
        estimator=quadratic_forms,
        unit="layer·batch",
        total=_layer_batches,
        options=_form_options,
        subject="directions",
        complete=_each(lambda run, name: QuadraticForm.unused(name, run.count)),
    ),
    Quantity(
        "trace",
        "trace_s",
        wanted=lambda run: run.settings.trace or bool(run.settings.noise_sigma),
        estimator=layer_traces,
        unit="probe",
        total=lambda run: (
            run.settings.trace_probes
            * (len(run.layers) if run.settings.trace_method == "hutch++" else 1)
        ),
        options=lambda run: {
            "probes": run.settings.trace_probes,
            "route": run.settings.trace_method,
        },
        complete=_each(lambda run, name: TraceEstimate.unused(run.settings.trace_probes)),
    ),
    Quantity(
        "positive trace",
        "trace_s",
        wanted=lambda run: run.settings.trace,
        estimator=positive_trace_max,
        unit="layer·batch",
        total=_layer_batches,
        options=lambda run: {
            "certified": run.certified(run.results["quadratic forms"], run.hessian_data),
            "probes": run.settings.positive_trace_probes,
            "lanczos_steps": run.settings.lanczos_steps,
            "rtol": run.settings.positive_rtol,
        },
        complete=_each(lambda run, name: PositiveTrace.unused()),
    ),
    Quantity(
        "eigenvalues",
        "eigen_s",
        wanted=lambda run: run.settings.eigen > 0,
        estimator=top_eigenvalues,
        unit="Lanczos step",
        total=lambda run: sum(_lanczos_steps(run, _numel(run, [n])) for n in run.layers),
        options=lambda run: {"k": run.settings.eigen},
        complete=_each(
            lambda run, name: Eigenvalues.unused(_numel(run, [name]), run.settings.eigen)
        ),
    ),
    Quantity(
        "eigenvalues (all layers)",
        "eigen_s",
        wanted=lambda run: run.settings.eigen > 0,
        estimator=whole_top_eigenvalues,
        unit="Lanczos step",
        total=lambda run: _lanczos_steps(run, _numel(run, run.layers)),
        options=lambda run: {"k": run.settings.eigen},
        complete=lambda run, whole: whole.with_zeros(_numel(run, run.unused), run.settings.eigen),
    ),
    Quantity(
        "density",
        "eigen_s",
        wanted=lambda run: run.settings.density,
        estimator=spectral_density,
        unit="Lanczos step",
        total=lambda run: 4 * min(64, _numel(run, run.layers)),
    ),
    Quantity(
        "relative trace",
        "noise_s",
        wanted=lambda run: bool(run.settings.noise_sigma) and run.settings.noise_relative,
        estimator=relative_noise_traces,
        unit="probe",
        total=lambda run: run.settings.trace_probes,
        options=lambda run: {"probes": run.settings.trace_probes},
    ),
    Quantity(
        "noise",
        "noise_s",
        wanted=lambda run: bool(run.settings.noise_sigma),
        estimator=noise_stability,
        unit="draw",
        total=lambda run: run.settings.noise_draws,
        options=lambda run: {
            "draws": run.settings.noise_draws,
            "relative": run.settings.noise_relative,
        },
        per_sigma=True,
        per_batch=True,
    ),
    Quantity(
        "certificate",
        "certificate_s",
        wanted=lambda run: run.settings.certificate,
        compute=certificate,
    ),
    Quantity(
        "quadratic forms (consistent loss)",
        "quadratic_forms_noisy_labels_s",
        wanted=lambda run: run.inputs.noise is not None,
        compute=consistent_forms,
    ),
)
"""Every quantity, in the order computed (later ones read earlier results)."""

REPORTED_PHASES = ("quadratic_forms_s", "trace_s", "eigen_s", "noise_s", "certificate_s")
"""Timings written for every measurement (0 when not run); other phases only when run."""
