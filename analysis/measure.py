"""The measurement pipeline behind ``hessfine measure``: checkpoints + data → ``measurement.json``.

:func:`measure` loads a fine-tuned checkpoint and its reference, aligns the selected layers
(v_i = W_i − W_i^(s)), evaluates loss and accuracy on the training and evaluation data, computes
the per-layer Hessian quadratic forms on a seeded class-stratified sample of ``samples``
examples of the chosen split (:mod:`hessfine.analysis.sampling`; ``sample_order="file"``: the
first ``samples``) and, on request, traces, top eigenvalues, the spectral density, noise
stability and the PAC-Bayes certificate with :mod:`bounds` (layers the model does not use in
eval mode are reported as zero and left out), assembles the bounds of Ju, Li & Zhang (ICML 2022) and
writes ``measurement.json`` (SPEC §4) atomically. :func:`measure_path` does the same for every
checkpoint of a directory of runs, skipping those already measured with the same settings.

Example (the Python API; the command line is a thin layer over it):
    >>> from hessfine.analysis.measure import MeasureSettings, measure  # doctest: +SKIP
    >>> result = measure("runs/robust/epoch_010.safetensors", reference="pretrained.safetensors",
    ...                  data="digits:train", eval_data="digits:test", out="out/robust",
    ...                  model="hessfine.finetune.digit_networks:digits_cnn", settings=MeasureSettings(samples=64))
    >>> result["bounds"]["theorem_2_1"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from hessfine.analysis.checkpoints import (
    Alignment,
    Checkpoint,
    align,
    apply_adapter,
    checkpoint_digest,
    find_checkpoints,
    is_run_collection,
    load_checkpoint,
    load_head_reference,
    select_layers,
)
from hessfine.analysis.data import TASKS, LabeledData, Task, check_labels, load_data
from hessfine.analysis.distributed import Context
from hessfine.analysis.errors import InputError
from hessfine.analysis.gpu import full_precision, halving_batches
from hessfine.analysis.model_specs import build_model, resolve_device
from hessfine.analysis.progress import Progress
from hessfine.analysis.results import timestamp, versions, write_json_atomic
from hessfine.analysis.run_labels import noise_matrix, noisy_label_statistics, read_run_labels
from hessfine.analysis.sampling import (
    SAMPLE_ORDERS,
    Sample,
    SampleOrder,
    file_sample,
    stratified_sample,
)
from hessfine.analysis.schema import MEASUREMENT, SCHEMA_VERSION, SPECTRUM
from hessfine.bounds.estimates import (
    UNUSED,
    Eigenvalues,
    PositiveTrace,
    QuadraticForm,
    TraceEstimate,
    merge_layers,
)
from hessfine.bounds.estimators.noise_stability import noise_stability, trace_prediction
from hessfine.bounds.estimators.quadratic_forms import ESTIMATORS, Estimator, quadratic_forms
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
from hessfine.bounds.functional import (
    Batch,
    CausalLMLoss,
    ConsistentCrossEntropy,
    CrossEntropy,
    FunctionalModel,
    NondeterministicModelError,
    check_deterministic,
)
from hessfine.bounds.generalization import assemble_bounds, noise_matrix_inverse
from hessfine.bounds.linalg.probes import DRAWS_VERSION, keyed_generator
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.pac_bayes import pac_bayes_certificate
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor

Split = Literal["train", "eval"]
DType = Literal["float32", "float64"]
Distribute = Literal["examples", "checkpoints"]
T = TypeVar("T")

RUN_FACTS = ("device", "world_size", "batch_size_used", "attn_implementation")
"""Settings entries that record how a run was executed, not what was measured."""


@dataclass(frozen=True)
class MeasureSettings:
    """Every option of ``hessfine measure`` that changes the numbers (recorded in the result)."""

    estimator: Estimator = "auto"
    task: Task = "classification"
    lanczos_steps: int = 128
    positive_rtol: float = 1e-2
    samples: int | None = 256
    sample_order: SampleOrder = "stratified"
    batch_size: int | None = None
    hessian_split: Split = "train"
    layers: tuple[str, ...] | None = None
    head_reference: str | None = None
    trace: bool = False
    trace_probes: int = 100
    positive_trace_probes: int = 16
    trace_method: Literal["hutchinson", "hutch++"] = "hutchinson"
    eigen: int = 0
    density: bool = False
    noise_sigma: tuple[float, ...] = ()
    noise_draws: int = 50
    noise_relative: bool = False
    epsilon: float = 0.0
    loss_bound: float | None = None
    n_train: int | None = None
    certificate: bool = False
    device: str = "auto"
    dtype: DType = "float32"
    seed: int = 0
    image_size: int = 224

    @property
    def effective_batch_size(self) -> int:
        """``--batch-size``, defaulting to 4 for ``reference-code`` (the authors' scripts) else 32."""
        if self.batch_size is not None:
            return self.batch_size
        return 4 if self.estimator == "reference-code" else 32

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_size"] = self.effective_batch_size
        out["samples"] = "all" if self.samples is None else self.samples
        out["layers"] = None if self.layers is None else list(self.layers)
        out["noise_sigma"] = list(self.noise_sigma)
        out["draws"] = DRAWS_VERSION
        out["tf32"] = False
        return out

    def validate(self) -> None:
        """Raise :class:`InputError` for option values that cannot work."""
        if self.estimator not in ESTIMATORS:
            raise InputError(
                f"--estimator {self.estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
            )
        if self.task not in TASKS:
            raise InputError(f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}")
        if self.task == "causal-lm" and self.certificate:
            raise InputError(
                "--certificate bounds the 0-1 error of a classifier; drop it with --task causal-lm"
            )
        largest = torch.finfo(torch.float64 if self.dtype == "float64" else torch.float32).max
        checks = [
            (
                self.samples is None or self.samples > 0,
                f"--samples must be a positive integer or 'all', got {self.samples}",
            ),
            (
                self.batch_size is None or self.batch_size > 0,
                f"--batch-size must be positive, got {self.batch_size}",
            ),
            (self.lanczos_steps > 0, f"--lanczos-steps must be positive, got {self.lanczos_steps}"),
            (self.trace_probes > 1, f"--trace-probes must be at least 2, got {self.trace_probes}"),
            (
                self.positive_trace_probes > 1,
                f"--positive-trace-probes must be at least 2, got {self.positive_trace_probes}",
            ),
            (
                0 <= self.positive_rtol < 1,
                f"--positive-rtol must be in [0, 1), got {self.positive_rtol}",
            ),
            (self.eigen >= 0, f"--eigen must be ≥ 0, got {self.eigen}"),
            (self.noise_draws > 1, f"--noise-draws must be at least 2, got {self.noise_draws}"),
            (
                all(0 < s < largest for s in self.noise_sigma),
                f"--noise-sigma values must be positive and finite in {self.dtype}, got "
                f"{list(self.noise_sigma)}",
            ),
            (
                math.isfinite(self.epsilon) and self.epsilon >= 0,
                f"--epsilon must be finite and ≥ 0, got {self.epsilon}",
            ),
            (
                self.loss_bound is None or (math.isfinite(self.loss_bound) and self.loss_bound > 0),
                f"--loss-bound must be finite and positive, got {self.loss_bound}",
            ),
            (self.n_train is None or self.n_train > 0, "--n-train must be positive"),
            (self.image_size > 0, f"--image-size must be positive, got {self.image_size}"),
            (
                -(2**63) <= self.seed < 2**64,
                f"--seed must lie in [-2^63, 2^64) (torch's seeds), got {self.seed}",
            ),
            (
                self.sample_order in SAMPLE_ORDERS,
                f"--sample-order must be one of {', '.join(SAMPLE_ORDERS)}, got {self.sample_order!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


@dataclass(frozen=True)
class Sources:
    """Where a measurement's inputs come from (command-line values, else the run manifest)."""

    checkpoint: Path
    reference: str | None = None
    data: str | None = None
    eval_data: str | None = None
    model: str | None = None
    model_kwargs: Mapping[str, Any] | None = None
    trust: bool = False
    input_columns: tuple[str, ...] | None = None
    label_column: str | None = None


def measure(
    checkpoint: str | Path,
    *,
    reference: str | None = None,
    data: str | None = None,
    out: str | Path,
    eval_data: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    settings: MeasureSettings = MeasureSettings(),
    trust: bool = False,
    verbose: bool = False,
    quiet: bool = True,
    input_columns: tuple[str, ...] | None = None,
    label_column: str | None = None,
    context: Context | None = None,
) -> dict[str, Any]:
    """Measure one checkpoint and write ``out/measurement.json``; returns the result dict.

    ``input_columns``/``label_column`` choose the columns of a ``datasets`` directory.
    ``context`` (from :func:`hessfine.analysis.distributed.detect`) shares the work among the
    processes of a ``torchrun`` job; rank 0 writes.
    """
    sources = Sources(
        Path(checkpoint),
        reference,
        data,
        eval_data,
        model,
        model_kwargs,
        trust,
        input_columns,
        label_column,
    )
    settings.validate()
    ctx = context if context is not None else Context(device=resolve_device(settings.device))
    return _Measurement(sources, settings, ctx, verbose=verbose, quiet=quiet).run(Path(out))


def measure_path(
    checkpoint: str | Path,
    *,
    out: str | Path,
    settings: MeasureSettings = MeasureSettings(),
    quiet: bool = True,
    verbose: bool = False,
    context: Context | None = None,
    distribute: Distribute = "examples",
    **inputs: Any,
) -> list[Path]:
    """Measure one checkpoint, or every checkpoint of a directory of runs (resumable).

    For a directory of runs the result of ``RUNS/a/epoch_003.safetensors`` goes to
    ``OUT/a/epoch_003/measurement.json``; a checkpoint whose measurement already exists with the
    same settings and checkpoint hash is skipped. Under ``torchrun`` (``context``) the processes
    share each checkpoint's examples, or with ``distribute="checkpoints"`` take the checkpoints
    of a directory in turn (checkpoint j on rank j mod world_size, measured and written there).
    Returns the results written by this process.
    """
    settings.validate()
    ctx = context if context is not None else Context(device=resolve_device(settings.device))
    path, out = Path(checkpoint), Path(out)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or directory; check the path")
    options = {"settings": settings, "quiet": quiet, "verbose": verbose, **inputs}
    if not (path.is_dir() and is_run_collection(path)):
        measure(path, out=out, context=ctx, **options)
        return [out / MEASUREMENT] if ctx.is_writer else []
    checkpoints = find_checkpoints(path)
    if not checkpoints:
        raise InputError(
            f"checkpoint directory {path} holds no checkpoints; point at a run directory"
        )
    spread = ctx.active and distribute == "checkpoints"
    mine = list(ctx.local(checkpoints)) if spread else checkpoints
    worker = ctx.alone() if spread else ctx
    talk = not quiet and (spread or ctx.is_writer)
    written = []
    progress = Progress(enabled=talk)
    with progress.stage("checkpoints", total=len(mine), unit="checkpoint") as update:
        for file in mine:
            relative = file.relative_to(path)
            target = out / relative.parent / relative.name.split(".")[0]
            done = _already_measured(target / MEASUREMENT, file, settings)
            if worker.from_writer(done):
                if talk:
                    print(f"skipping {file} (already measured with these settings)")
            else:
                if talk:
                    print(f"measuring {file}")
                measure(file, out=target, context=worker, **options)
            if worker.is_writer:
                written.append(target / MEASUREMENT)
            update(1)
    return written


def _already_measured(result: Path, checkpoint: Path, settings: MeasureSettings) -> bool:
    if not result.is_file():
        return False
    try:
        previous = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    wanted = json.loads(json.dumps(settings.to_json()))
    same_settings = {k: v for k, v in previous.get("settings", {}).items() if k not in RUN_FACTS}
    wanted.pop("device")
    digest = previous.get("provenance", {}).get("checkpoint_sha256")
    return same_settings == wanted and digest == checkpoint_digest(checkpoint)


class _Measurement:
    """One measurement run: holds the loaded state between the phases."""

    def __init__(
        self,
        sources: Sources,
        settings: MeasureSettings,
        ctx: Context,
        *,
        verbose: bool,
        quiet: bool,
    ):
        self.sources = sources
        self.settings = settings
        self.ctx = ctx
        self.verbose = verbose and ctx.is_writer
        self.quiet = quiet
        self.progress = Progress(enabled=not quiet and ctx.is_writer)
        self.batch_size = settings.effective_batch_size
        self.timings = dict.fromkeys(
            ("load_s", "quadratic_forms_s", "trace_s", "eigen_s", "noise_s", "certificate_s"), 0.0
        )

    def run(self, out: Path) -> dict[str, Any]:
        with full_precision():
            return self._run(out)

    def _run(self, out: Path) -> dict[str, Any]:
        start = time.perf_counter()
        s = self.settings
        torch.manual_seed(s.seed)
        self._load()
        self.timings["load_s"] = time.perf_counter() - start
        population = self.train if s.hessian_split == "train" else self.eval
        if population is None:
            raise InputError(
                "--hessian-split eval needs --eval-data; pass it or use --hessian-split train"
            )
        if s.certificate and len(self.train) < 8:
            raise InputError(
                f"--certificate needs at least 8 training examples (the PAC-Bayes-kl bound), "
                f"--data {self.train.name} has {len(self.train)}; pass more data or drop "
                "--certificate"
            )
        self.sample = self._sample(population)
        hessian_data = self.hessian_data = self._sampled(population)
        count = self.count = len(hessian_data)
        self._check_forward(hessian_data)
        self.unused = self._unused_layers(hessian_data)
        self.layers = [name for name in self.layers if name not in self.unused]
        stats = self._retrying(lambda: self._loss_statistics(count))
        stats.update(self._noisy_label_statistics())

        t = time.perf_counter()
        forms = self._retrying(self._quadratic_forms)
        self.timings["quadratic_forms_s"] = time.perf_counter() - t
        forms.update({name: QuadraticForm.unused(name, count) for name in self.unused})

        traces, positive = None, None
        if s.trace or s.noise_sigma:
            t = time.perf_counter()
            method, probes = s.trace_method, s.trace_probes
            traces = self._on_examples(
                layer_traces,
                "trace",
                probes * len(self.layers) if method == "hutch++" else probes,
                "probe",
                probes=probes,
                route=method,
            )
            if s.trace:
                certified = self._certified(forms, hessian_data)
                positive = self._on_examples(
                    positive_trace_max,
                    "positive trace",
                    len(self.layers) * self._local_batches(),
                    "layer·batch",
                    certified=certified,
                    probes=s.positive_trace_probes,
                    lanczos_steps=s.lanczos_steps,
                    rtol=s.positive_rtol,
                )
                positive = merge_layers(self.ctx.gather(positive))
            self.timings["trace_s"] = time.perf_counter() - t
            traces.update({n: TraceEstimate.unused(s.trace_probes) for n in self.unused})
            if positive is not None:
                positive.update({n: PositiveTrace.unused() for n in self.unused})

        eigen, whole, density = {}, None, None
        if s.eigen or s.density:
            t = time.perf_counter()
            if s.eigen:
                dims = [self.params[name].numel() for name in self.layers]
                steps = lambda dim: min(dim, max(2 * s.eigen + 20, 40))  # noqa: E731
                eigen = self._on_examples(
                    top_eigenvalues,
                    "eigenvalues",
                    sum(map(steps, dims)),
                    "Lanczos step",
                    k=s.eigen,
                )
                whole = self._on_examples(
                    whole_top_eigenvalues,
                    "eigenvalues (all layers)",
                    steps(sum(dims)),
                    "Lanczos step",
                    k=s.eigen,
                )
                unused_numel = {row.name: row.numel for row in self.alignment.rows}
                whole = _zeros_merged(whole, sum(unused_numel[n] for n in self.unused), s.eigen)
                nothing = Eigenvalues([], [], 0, True)
                eigen.update(
                    {n: _zeros_merged(nothing, unused_numel[n], s.eigen) for n in self.unused}
                )
            if s.density:
                dim = sum(self.params[name].numel() for name in self.layers)
                density = self._on_examples(
                    spectral_density, "density", 4 * min(64, dim), "Lanczos step"
                )
            self.timings["eigen_s"] = time.perf_counter() - t

        noise = []
        if s.noise_sigma:
            t = time.perf_counter()
            noise = self._noise_stability(traces)
            self.timings["noise_s"] = time.perf_counter() - t

        certificate = None
        if s.certificate:
            t = time.perf_counter()
            certificate = self._retrying(lambda: self._certificate(forms))
            self.timings["certificate_s"] = time.perf_counter() - t

        noisy_forms, reused, piecewise_linear = None, {}, False
        if self.noise is not None:
            t = time.perf_counter()
            noisy_forms, reused, piecewise_linear = self._retrying(
                lambda: self._consistent_forms(forms)
            )
            self.timings["quadratic_forms_noisy_labels_s"] = time.perf_counter() - t

        C = s.loss_bound if s.loss_bound is not None else stats["max"]
        n = s.n_train if s.n_train is not None else len(self.train)
        bounds = assemble_bounds(
            train_loss=stats["train_loss"],
            layer_max={name: forms[name].max for name in self.layers},
            distances={name: self.distances[name] for name in self.layers},
            weights={name: self.params[name] for name in self._matrices()},
            directions={name: self.directions[name] for name in self._matrices()},
            trace_positive_max=None
            if positive is None
            else {name: positive[name].max for name in self.layers},
            alphas=self._alphas(),
            C=C,
            n=n,
            epsilon=s.epsilon,
            confusion=None if self.noise is None else self.noise.tensor(),
            consistent_train_loss=stats["train_consistent"],
            noisy_layer_max=None
            if noisy_forms is None
            else {name: noisy_forms[name].max for name in self.layers},
            noisy_trace_positive_max=None
            if positive is None or not piecewise_linear
            else {name: positive[name].max for name in self.layers},
            noise_matrix_source=None if self.noise is None else self.noise.source,
            certificate=certificate,
        )
        self.timings["total_s"] = time.perf_counter() - start
        result = self._result(forms, traces, positive, eigen, whole, noise, stats, bounds, count)
        for layer in result["layers"]:
            name = layer["name"]
            layer["quadratic_form_noisy_labels"] = (
                None if noisy_forms is None else _noisy_form_json(noisy_forms[name], reused[name])
            )
        if density is not None:
            result["spectrum_file"] = SPECTRUM
        if self.ctx.is_writer:
            if density is not None:
                spectrum = {"checkpoint": str(self.checkpoint.path), **density.to_json()}
                write_json_atomic(out / SPECTRUM, spectrum)
            write_json_atomic(out / MEASUREMENT, result)
        return result

    # ------------------------------------------------------------------------ execution
    def _retrying(self, compute: Callable[[], T]) -> T:
        """``compute()``, rerun with half the batch size after a CUDA out-of-memory error."""

        def attempt(size: int) -> T:
            self.batch_size = size
            return compute()

        allowed = self.settings.estimator != "reference-code" and not self.ctx.active
        value, self.batch_size = halving_batches(
            attempt, self.batch_size, allowed=allowed, on_retry=self._note_retry
        )
        return value

    def _note_retry(self, size: int) -> None:
        if not self.quiet and self.ctx.is_writer:
            print(f"CUDA out of memory: retrying with batch size {size}")

    def _local_batches(self) -> int:
        """Number of Hessian-example batches this process holds."""
        total = math.ceil(self.count / self.batch_size)
        return len(range(self.ctx.rank, total, self.ctx.world_size))

    def _local(self, data: LabeledData, count: int | None) -> Iterator[Batch]:
        """This process's batches of the first ``count`` examples (all when ``None``)."""
        return self.ctx.local(self._batches(data, count))

    def _on_examples(
        self, estimator, stage: str, total: float, unit: str, per_batch: bool = False, **options
    ):
        """Run a :mod:`bounds` estimator on this process's share of the Hessian examples, with
        draws keyed by (seed, stage) and a progress bar of ``total`` ``unit``s (``per_batch``:
        the estimator reports units per batch, shown as fractions of a unit)."""

        def compute():
            with self.progress.stage(stage, total=total, unit=unit) as bar:
                share = 1 / max(self._local_batches(), 1) if per_batch else 1
                update = bar if share == 1 else lambda done: bar(done * share)
                return estimator(
                    self.fmodel,
                    self.params,
                    self.layers,
                    self._local(self.hessian_data, self.count),
                    generator=keyed_generator(self.settings.seed, stage),
                    shard=self.ctx.shard(self.batch_size),
                    progress=update,
                    **options,
                )

        return self._retrying(compute)

    def _quadratic_forms(self):
        s = self.settings
        first_x, _ = next(iter(self._batches(self.hessian_data, self.count)))
        total = len(self.layers) * self._local_batches()
        with self.progress.stage("quadratic forms", total=total, unit="layer·batch") as update:
            forms = quadratic_forms(
                self.fmodel,
                self.params,
                {name: self.directions[name] for name in self.layers},
                self._local(self.hessian_data, self.count),
                estimator=s.estimator,
                lanczos_steps=s.lanczos_steps,
                positive_rtol=s.positive_rtol,
                reference_batch_size=self.batch_size,
                generator=keyed_generator(s.seed, "quadratic forms"),
                certify_on=first_x,
                shard=self.ctx.shard(self.batch_size),
                progress=update,
            )
        return merge_layers(self.ctx.gather(forms))

    # ----------------------------------------------------------------------------- loading
    def _load(self) -> None:
        src, s = self.sources, self.settings
        self.checkpoint = load_checkpoint(src.checkpoint, trust=src.trust, label="checkpoint")
        manifest = self.checkpoint.manifest
        base = self.checkpoint.directory or self.checkpoint.path.parent
        reference = src.reference or _from_manifest(manifest, "reference", base)
        adapter = self.checkpoint.adapter
        if reference is None and adapter is not None and adapter.base is not None:
            reference = str(adapter.base)
        if reference is None:
            raise InputError(
                "--reference is required (the pretrained checkpoint); pass --reference PATH"
            )
        self.reference: Checkpoint = load_checkpoint(
            reference, trust=src.trust, label="--reference"
        )
        self.checkpoint = apply_adapter(self.checkpoint, self.reference)
        hf_directory = self.checkpoint.directory
        if adapter is not None:
            hf_directory = self.reference.directory
        spec = src.model or manifest.get("model")
        if spec is None:
            spec = "hf" if hf_directory and (hf_directory / "config.json").is_file() else None
        if spec is None:
            raise InputError("--model is required (e.g. torchvision:resnet18); pass --model SPEC")
        kwargs = (
            src.model_kwargs if src.model_kwargs is not None else manifest.get("model_kwargs", {})
        )
        self.model_spec, self.model_kwargs = spec, dict(kwargs or {})
        self.manifest = manifest
        module = build_model(spec, self.model_kwargs, hf_directory=hf_directory)
        self.device = self.ctx.device
        self.dtype = torch.float64 if s.dtype == "float64" else torch.float32
        module.to(dtype=self.dtype)
        self.layers = select_layers(module, list(s.layers or self.checkpoint.layers or ()))
        head = s.head_reference
        if head is None:  # not given: the run manifest's head_reference, else zero
            given = manifest.get("head_reference")
            head = (
                "zero"
                if given in (None, "zero")
                else _from_manifest(manifest, "head_reference", base)
            )
        alignment: Alignment = align(
            module,
            self.checkpoint,
            self.reference,
            layers=self.layers,
            head_reference=load_head_reference(head, trust=src.trust),
        )
        self.alignment = alignment
        module.to(device=self.device)
        loss = CausalLMLoss() if s.task == "causal-lm" else CrossEntropy()
        self.fmodel, self.params = FunctionalModel.from_module(module, loss=loss)
        config = getattr(module, "config", None)
        self.attention = getattr(config, "_attn_implementation", None)
        self.directions = {
            name: alignment.directions[name].to(device=self.device, dtype=self.dtype)
            for name in self.layers
        }
        self.distances = {row.name: row.distance for row in alignment.rows}
        if self.verbose:
            print(alignment.format_table())
        data_spec = src.data or _from_manifest(manifest, "data", base, key2="train")
        if data_spec is None:
            raise InputError(
                "--data is required (the training data); pass --data PATH|digits:train"
            )
        options = {
            "image_size": s.image_size,
            "trust": src.trust,
            "task": s.task,
            "input_columns": src.input_columns,
            "label_column": src.label_column,
            "pad_token_id": getattr(getattr(module, "config", None), "pad_token_id", None),
        }
        self.train: LabeledData = load_data(str(data_spec), label="--data", **options)
        # Under recorded label noise: measure against the clean labels, keep the noisy ones.
        self.run_labels = read_run_labels(manifest, base, self.train)
        self.noisy_train = self.train
        if self.run_labels is not None:
            self.noisy_train = replace(self.train, y=self.run_labels.noisy)
            self.train = replace(self.train, y=self.run_labels.clean)
        self.noise = noise_matrix(manifest)
        eval_spec = src.eval_data or _from_manifest(manifest, "data", base, key2="eval")
        self.eval: LabeledData | None = (
            None if eval_spec is None else load_data(str(eval_spec), label="--eval-data", **options)
        )
        self.data_specs = {
            "train": str(data_spec),
            "eval": None if eval_spec is None else str(eval_spec),
        }

    def _batches(self, data: LabeledData, count: int | None) -> Iterator[Batch]:
        return data.batches(self.batch_size, limit=count, dtype=self.dtype, device=self.device)

    def _sample(self, data: LabeledData) -> Sample:
        """The Hessian examples: stratified (seeded) or the first N in file order; all if N ≥ |data|."""
        s = self.settings
        count = len(data) if s.samples is None else min(s.samples, len(data))
        if s.sample_order == "file" or count == len(data):
            return file_sample(data.y, count)
        return stratified_sample(data.y, count, generator=torch.Generator().manual_seed(s.seed))

    def _sampled(self, data: LabeledData) -> LabeledData:
        if len(self.sample.indices) == len(data):
            return data
        return data.subset(self.sample.indices)

    def _unused_layers(self, data: LabeledData) -> list[str]:
        x, y = next(iter(self._batches(data, 1)))
        unused = unused_layers(self.fmodel, self.params, self.layers, x, y)
        if len(unused) == len(self.layers):
            raise InputError(
                f"--model {self.model_spec}: none of the selected layers is used in eval mode "
                "(the loss does not depend on them); select used layers with --layers"
            )
        return unused

    def _check_forward(self, data: LabeledData) -> None:
        """The model accepts the inputs, its outputs cover the labels, and it is deterministic."""
        x, _ = next(
            iter(data.batches(min(4, len(data)), limit=4, dtype=self.dtype, device=self.device))
        )
        try:
            with torch.no_grad(), differentiable():
                logits = self.fmodel.logits(self.params, x)
                check_deterministic(self.fmodel, self.params, x)
        except NondeterministicModelError as err:
            raise InputError(f"--model {self.model_spec}: {err}") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shape = (
                tuple(x.shape)
                if isinstance(x, Tensor)
                else {k: tuple(v.shape) for k, v in x.items()}
            )
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"--data {data.name}: the model rejects inputs of shape {shape} ({first}); "
                "give data shaped for the model (e.g. --image-size) or the matching --model"
            ) from None
        causal = self.settings.task == "causal-lm"
        if logits.dim() != (3 if causal else 2):
            wanted = "(batch, length, vocabulary)" if causal else "(batch, classes)"
            hint = "" if causal else "; pass --task causal-lm for a language model"
            raise InputError(
                f"--model {self.model_spec}: expected {wanted} logits, got shape "
                f"{tuple(logits.shape)}{hint}"
            )
        self.num_classes = logits.shape[-1]
        check_labels(self.train, self.num_classes, option="--data")
        if self.eval is not None:
            check_labels(self.eval, self.num_classes, option="--eval-data")

    def _loss_statistics(self, count: int) -> dict[str, float | None]:
        """Mean loss and accuracy on train/eval, and the largest loss on the Hessian examples."""
        out: dict[str, float | None] = {}
        for split, data in (("train", self.train), ("eval", self.eval)):
            if data is None:
                out[f"{split}_loss"] = out[f"{split}_accuracy"] = None
                continue
            sums = torch.zeros(4, dtype=torch.float64)
            batches = len(
                range(self.ctx.rank, math.ceil(len(data) / self.batch_size), self.ctx.world_size)
            )
            with (
                torch.no_grad(),
                differentiable(),
                self.progress.stage(f"{split} loss", total=batches, unit="batch") as update,
            ):
                for x, y in self._local(data, None):
                    logits = self.fmodel.logits(self.params, x).double()
                    right, made = self.fmodel.loss.correct(logits, y)
                    part = [self.fmodel.loss(logits, y).sum(), right.sum(), made.sum()]
                    sums += torch.stack([*(t.cpu() for t in part), torch.tensor(float(len(y)))])
                    update(1)
            total, correct, predictions, n = self.ctx.all_sum(sums).tolist()
            out[f"{split}_loss"] = total / n
            out[f"{split}_accuracy"] = correct / max(predictions, 1.0)
        worst = 0.0
        with torch.no_grad(), differentiable():
            for x, y in self._local(self.hessian_data, count):
                worst = max(worst, float(self.fmodel.losses(self.params, x, y).max()))
        out["max"] = self.ctx.max(worst)
        return out

    # ------------------------------------------------------------------------ computations
    def _certified(self, forms, data: LabeledData) -> dict[str, bool]:
        """Certification from the quadratic forms, or computed now (ggn/positive estimators)."""
        flags = {name: forms[name].diagnostics.get("certified_psd") for name in self.layers}
        if all(flag is not None for flag in flags.values()):
            return flags
        x, _ = next(iter(self._batches(data, 1)))
        with differentiable():
            generator = keyed_generator(self.settings.seed, "certify")
            ratios = certify_piecewise_linear(
                self.fmodel, self.params, self.layers, x, generator=generator
            )
        return {
            name: ratios[name] <= certification_tolerance(self.params[name].dtype)
            for name in self.layers
        }

    def _noise_stability(self, traces) -> list[dict[str, Any]]:
        s = self.settings
        if s.noise_relative:
            traces = self._on_examples(
                relative_noise_traces,
                "relative trace",
                s.trace_probes,
                "probe",
                probes=s.trace_probes,
            )
        means = {name: estimate.mean for name, estimate in traces.items()}
        rows = []
        for sigma in s.noise_sigma:
            result = self._on_examples(
                noise_stability,
                "noise",
                s.noise_draws,
                "draw",
                per_batch=True,
                sigma=sigma,
                draws=s.noise_draws,
                relative=s.noise_relative,
            )
            rows.append({**result.to_json(), "trace_prediction": trace_prediction(sigma, means)})
        return rows

    def _certificate(self, forms) -> dict[str, Any]:
        """The PAC-Bayes certificate with A_i = max(𝓗_i, 0)/‖v_i‖² (the curvature along v_i).

        When no layer has 𝓗_i > 0 (possible with ``block`` or ``reference-code``), A_i comes from
        the Gauss–Newton forms max_x v_iᵀG_i(x)v_i/‖v_i‖² (PSD) on the same examples, and if those
        vanish too, A_i = 1. Any choice keeps the certificate valid (its prior variances come
        from a lattice fixed in advance); ``curvature_source`` records which was used.
        """
        reference = {name: self.params[name] - self.directions[name] for name in self.layers}
        norms = {n: float(self.directions[n].double().pow(2).sum()) for n in self.layers}

        def along_v(values: Mapping[str, QuadraticForm]) -> dict[str, float]:
            return {n: max(values[n].max, 0.0) / norms[n] if norms[n] > 0 else 0.0 for n in norms}

        curvature, source = along_v(forms), "quadratic_form"
        if not any(a > 0 for a in curvature.values()):
            directions = {name: self.directions[name] for name in self.layers}
            batches = self._local(self.hessian_data, None)
            shard = self.ctx.shard(self.batch_size)
            ggn = quadratic_forms(
                self.fmodel, self.params, directions, batches, estimator="ggn", shard=shard
            )
            ggn = merge_layers(self.ctx.gather(ggn))
            curvature, source = along_v(ggn), "gauss_newton"
        if not any(a > 0 for a in curvature.values()):
            curvature, source = dict.fromkeys(self.layers, 1.0), "unit"
        draws = 4
        batches = math.ceil(len(self.train) / self.batch_size)
        share = 1 / max(len(range(self.ctx.rank, batches, self.ctx.world_size)), 1)
        with self.progress.stage("certificate", total=draws, unit="repetition") as bar:
            certificate = pac_bayes_certificate(
                self.fmodel,
                self.params,
                reference,
                self.layers,
                self._local(self.train, None),
                n=len(self.train),
                curvature=curvature,
                draws=draws,
                generator=keyed_generator(self.settings.seed, "certificate"),
                shard=self.ctx.shard(self.batch_size),
                progress=lambda done: bar(done * share),
            )
        return {**certificate.to_json(), "curvature_source": source}

    def _sample_record(self) -> dict[str, Any]:
        s = self.settings
        population = len(self.train if s.hessian_split == "train" else self.eval)
        if len(self.sample.indices) == population:  # every example, in file order
            return {**self.sample.to_json("file", population), "indices": None}
        return self.sample.to_json(s.sample_order, population)

    def _matrices(self) -> list[str]:
        """The used layers with ≥2-D weights: those the prior distance measures are defined on."""
        return [name for name in self.layers if self.params[name].dim() >= 2]

    def _data_index(self, form: QuadraticForm) -> int | None:
        """Index in the data set of the example attaining 𝓗_i (None for batches, unused layers)."""
        if form.route in ("reference-code", UNUSED) or form.argmax < 0:
            return None
        return int(self.sample.indices[form.argmax])

    def _notes(self, count: int) -> list[str]:
        """Plain-language caveats about this result (``measurement.json → notes``)."""
        s = self.settings
        how = (
            "a seeded class-stratified sample"
            if self._sample_record()["order"] == "stratified"
            else "in file order"
        )
        notes = [
            f"𝓗_i (quadratic_form.max) is a maximum over {count} examples of the "
            f"{s.hessian_split} split ({how}; indices in data.hessian_sample), not over the data "
            "distribution, so theorem_2_1 and trace_corollary are estimates, not certified bounds."
        ]
        if s.estimator == "reference-code":
            notes.append(
                f"reference-code: consecutive batches of {s.effective_batch_size} of those "
                "examples in the recorded order; argmax is the index of the batch."
            )
        vectors = [name for name in self.layers if name not in self._matrices()]
        if vectors:
            notes.append(
                f"bounds.distance_measures leave out the 1-D parameters {', '.join(vectors)} "
                "(they are defined on weight matrices)."
            )
        if self.unused:
            notes.append(
                f"layers {', '.join(self.unused)} are not used by the model in eval mode: their "
                "Hessian blocks are zero, so they are reported with zero quadratic forms, traces "
                "and eigenvalues and left out of the bounds, noise stability, certificate and "
                "spectral density."
            )
        return notes

    def _alphas(self) -> dict[str, float] | None:
        radii = self.manifest.get("radii")
        if not isinstance(radii, dict):
            return None
        return {name: float(radii.get(name, self.distances[name])) for name in self.layers}

    def _noisy_label_statistics(self) -> dict[str, float | None]:
        """Loss and accuracy on the noisy training labels and the consistent loss (F known)."""
        self.consistent = None
        if self.run_labels is None and self.noise is None:
            return dict.fromkeys(("train_noisy", "train_noisy_accuracy", "train_consistent"))
        if self.noise is not None:
            try:
                inverse = noise_matrix_inverse(self.noise.tensor(), self.num_classes)
                # F⁻¹ stays float64 (its rows sum to 1 to ~1e-16); the loss casts it per call.
                self.consistent = ConsistentCrossEntropy(inverse.to(self.device))
            except ValueError as err:
                raise InputError(f"the run's noise matrix ({self.noise.source}): {err}") from None
        batches = self._batches(self.noisy_train, None)
        return noisy_label_statistics(self.fmodel, self.params, batches, self.consistent)

    def _consistent_forms(
        self, forms: Mapping[str, QuadraticForm]
    ) -> tuple[dict[str, QuadraticForm], dict[str, bool], bool]:
        """𝓗̄_i of the consistent loss on the sampled training examples with their noisy labels.

        Its Gauss–Newton part is cross-entropy's, so layers certified piecewise linear (and every
        layer under the ``ggn`` estimator) reuse the clean value (flag True); the others are
        recomputed with ℓ̄ and the same estimator (``reference-code``: all layers, its cross-layer
        products are not certified). The last value says whether every layer is certified
        piecewise linear, so that ℓ̄'s Hessian (and its traces) equal cross-entropy's.
        """
        s = self.settings
        sample = self.sample if s.hessian_split == "train" else self._sample(self.train)
        data = (
            self.noisy_train
            if len(sample.indices) == len(self.noisy_train)
            else self.noisy_train.subset(sample.indices)
        )
        certified = self._certified(forms, data)
        reused = {name: True for name in self.unused}
        if s.estimator == "ggn":
            reused.update({name: True for name in self.layers})
        elif s.estimator == "reference-code":
            reused.update({name: False for name in self.layers})
        else:
            reused.update(certified)
        smooth = [name for name in self.layers if not reused[name]]
        out = {name: forms[name] for name in forms if reused.get(name, False)}
        if smooth:
            fmodel = dataclasses.replace(self.fmodel, loss=self.consistent)
            first_x, _ = next(iter(self._batches(data, len(data))))
            batches = math.ceil(len(data) / self.batch_size)
            total = len(smooth) * len(range(self.ctx.rank, batches, self.ctx.world_size))
            stage = "quadratic forms (consistent loss)"
            with self.progress.stage(stage, total=total, unit="layer·batch") as update:
                noisy = quadratic_forms(
                    fmodel,
                    self.params,
                    {name: self.directions[name] for name in smooth},
                    self._local(data, len(data)),
                    estimator=s.estimator,
                    lanczos_steps=s.lanczos_steps,
                    positive_rtol=s.positive_rtol,
                    reference_batch_size=self.batch_size,
                    generator=keyed_generator(s.seed, stage),
                    certify_on=first_x,
                    shard=self.ctx.shard(self.batch_size),
                    progress=update,
                )
            out.update(merge_layers(self.ctx.gather(noisy)))
        return out, reused, all(certified[name] for name in self.layers)

    # ----------------------------------------------------------------------------- result
    def _result(
        self, forms, traces, positive, eigen, whole, noise, stats, bounds, count
    ) -> dict[str, Any]:
        s = self.settings
        layers = []
        for row in self.alignment.rows:
            name = row.name
            form = forms[name]
            trace = None
            if traces is not None and s.trace:
                trace = {
                    "mean": traces[name].mean,
                    "stderr": traces[name].stderr,
                    "positive_max": positive[name].max,
                    "positive_max_stderr": positive[name].stderr,
                    "positive_method": positive[name].route,
                    "probes": traces[name].probes,
                    "method": traces[name].route,
                }
            layers.append(
                {
                    "name": name,
                    "numel": row.numel,
                    "shape": list(row.shape),
                    "distance": row.distance,
                    "reference_source": row.source,
                    "method": form.route,
                    "quadratic_form": {
                        "max": form.max,
                        "mean": form.mean,
                        "argmax": form.argmax,
                        "argmax_index": self._data_index(form),
                    },
                    "diagnostics": dict(form.diagnostics),
                    "trace": trace,
                    "top_eigenvalues": eigen[name].values if name in eigen else None,
                    "top_eigenvalue_residuals": eigen[name].residuals if name in eigen else None,
                }
            )
        gap_loss = None if stats["eval_loss"] is None else stats["eval_loss"] - stats["train_loss"]
        gap_acc = (
            None
            if stats["eval_accuracy"] is None
            else stats["train_accuracy"] - stats["eval_accuracy"]
        )
        settings = s.to_json()
        settings["device"] = str(self.device)
        if self.attention is not None:
            settings["attn_implementation"] = self.attention
        training = self.checkpoint.training
        settings["world_size"] = self.ctx.world_size
        settings["batch_size_used"] = self.batch_size
        return {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": str(self.checkpoint.path),
            "reference": str(self.reference.path),
            "model": self.model_spec,
            "model_kwargs": self.model_kwargs,
            "mode": "eval",
            "settings": settings,
            "data": {
                "train": self.data_specs["train"],
                "eval": self.data_specs["eval"],
                "input_columns": None
                if self.sources.input_columns is None
                else list(self.sources.input_columns),
                "label_column": self.sources.label_column,
                "n_train": len(self.train),
                "n_eval": None if self.eval is None else len(self.eval),
                "n_hessian_samples": count,
                "num_classes": self.num_classes,
                "hessian_sample": self._sample_record(),
            },
            "unused_layers": list(self.unused),
            "notes": self._notes(count),
            "manifest": {
                k: self.manifest.get(k)
                for k in ("method", "seed", "epoch", "label_noise")
                if k in self.manifest
            },
            "epoch": _epoch_of(self.checkpoint.path, self.manifest)
            if training.get("epoch") is None
            else training["epoch"],
            "step": training.get("step"),
            "training": training or None,
            "layers": layers,
            "top_eigenvalues_all_layers": None
            if whole is None
            else {"values": whole.values, "residuals": whole.residuals},
            "labels": None if self.run_labels is None else self.run_labels.to_json(),
            "loss": {
                "train": stats["train_loss"],
                "eval": stats["eval_loss"],
                "max": stats["max"],
                "train_noisy": stats["train_noisy"],
                "train_consistent": stats["train_consistent"],
            },
            "accuracy": {
                "train": stats["train_accuracy"],
                "eval": stats["eval_accuracy"],
                "train_noisy": stats["train_noisy_accuracy"],
            },
            "generalization_gap": {
                "loss": gap_loss,
                "accuracy": gap_acc,
                "against": "clean training labels"
                if self.run_labels is not None
                else "training labels",
            },
            "bounds": bounds.to_json(),
            "noise_stability": noise,
            "provenance": {
                **versions(),
                "timestamp": timestamp(),
                "checkpoint_sha256": self.checkpoint.sha256,
                "reference_sha256": self.reference.sha256,
                "device_name": _device_name(self.device),
                "timings": {k: float(v) for k, v in self.timings.items()},
            },
        }


def unused_layers(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], layers: list[str], x, y: Tensor
) -> list[str]:
    """The ``layers`` the loss on (x, y) does not depend on: one forward and backward pass.

    E.g. the auxiliary classifiers of torchvision's GoogLeNet and Inception v3, which only
    training mode uses. Their Hessian blocks are zero (autograd gives them no gradient at all).
    """
    weights = {name: params[name].detach().requires_grad_(True) for name in layers}
    with torch.enable_grad(), differentiable():
        loss = fmodel.losses({**params, **weights}, x, y).sum()
        if not loss.requires_grad:
            return list(layers)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    return [name for name, g in zip(layers, grads, strict=True) if g is None]


def _zeros_merged(top: Eigenvalues, zeros: int, k: int) -> Eigenvalues:
    """The k largest of ``top`` and ``zeros`` exact zero eigenvalues (the blocks of unused layers).

    The block-diagonal Hessian's spectrum is the union of the blocks' spectra, so this is exact
    whenever ``top`` holds the k largest eigenvalues of the used layers.
    """
    pairs = [*zip(top.values, top.residuals, strict=True), *[(0.0, 0.0)] * min(zeros, k)]
    pairs = sorted(pairs, key=lambda pair: -pair[0])[:k]
    return Eigenvalues(
        [value for value, _ in pairs], [res for _, res in pairs], top.steps, top.exhausted
    )


def _noisy_form_json(form: QuadraticForm, reused: bool) -> dict[str, Any]:
    """``layers[].quadratic_form_noisy_labels``: 𝓗̄_i of the consistent loss on noisy labels."""
    method = f"same as clean ({form.route})" if reused else form.route
    return {"max": form.max, "mean": form.mean, "argmax": form.argmax, "method": method}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _epoch_of(path: Path, manifest: Mapping[str, Any]) -> int | None:
    for entry in manifest.get("checkpoints", []) or []:
        if isinstance(entry, dict) and entry.get("file") == path.name:
            return entry.get("epoch")
    return None


def _from_manifest(
    manifest: Mapping[str, Any], key: str, base: Path, *, key2: str | None = None
) -> str | None:
    """A path-like manifest entry, resolved against the manifest's directory."""
    value = manifest.get(key)
    if key2 is not None:
        value = value.get(key2) if isinstance(value, dict) else None
    if not isinstance(value, str) or not value:
        return None
    if ":" in value and not Path(value).exists() and not (base / value).exists():
        return value
    candidate = Path(value)
    return str(candidate if candidate.is_absolute() else (base / candidate))
