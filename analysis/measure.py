"""The measurement pipeline behind ``hessfine measure``: checkpoints + data → ``measurement.json``.

:func:`measure` loads a fine-tuned checkpoint and its reference and aligns the selected layers
(v_i = W_i − W_i^(s); :mod:`hessfine.analysis.measurement_inputs`), evaluates loss and accuracy
on the training and evaluation data, chooses the Hessian examples — a seeded class-stratified
sample of ``samples`` examples of the chosen split (:mod:`hessfine.analysis.sampling`;
``sample_order="file"``: the first ``samples``) — and computes the quantities of the table
:data:`hessfine.analysis.quantities.QUANTITIES` that the settings ask for, with the estimators of
:mod:`hessfine.bounds`: the per-layer Hessian quadratic forms always; traces, top eigenvalues,
the spectral density, noise stability and the PAC-Bayes certificate on request; under a
recorded label-noise matrix, the consistent loss's forms. Layers the model does not use in eval
mode are reported as zero and left out. It then assembles the bounds of Ju, Li & Zhang (ICML
2022) and writes ``measurement.json`` (fields in ``docs/schema.md``) atomically, from the results'
own ``to_json``. :func:`measure_path` does the same for every checkpoint of a directory of runs,
skipping those already measured with the same settings.

Example (the Python API; the command line is a thin layer over it):
    >>> from hessfine.analysis.measure import MeasureSettings, measure  # doctest: +SKIP
    >>> result = measure("runs/robust/epoch_010.safetensors", reference="pretrained.safetensors",
    ...                  data="digits:train", eval_data="digits:test", out="out/robust",
    ...                  model="hessfine.finetune.digit_networks:digits_cnn",
    ...                  settings=MeasureSettings(samples=64))
    >>> result["bounds"]["theorem_2_1"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from hessfine.analysis.checkpoints import checkpoint_digest, find_checkpoints, is_run_collection
from hessfine.analysis.data import TASKS, LabeledData, Processing, Task
from hessfine.analysis.distributed import Context
from hessfine.analysis.errors import InputError
from hessfine.analysis.gpu import full_precision, halving_batches
from hessfine.analysis.measurement import Measurement
from hessfine.analysis.measurement_inputs import (
    DType,
    MeasurementInputs,
    Sources,
    check_forward,
    load_inputs,
    unused_layers,
)
from hessfine.analysis.memory import (
    MemoryBudget,
    ProcessMeter,
    human,
    parse_max_memory,
    resolve_budget,
)
from hessfine.analysis.model_specs import resolve_device
from hessfine.analysis.progress import Progress
from hessfine.analysis.quantities import QUANTITIES, REPORTED_PHASES, Plan, Quantity
from hessfine.analysis.results import timestamp, versions
from hessfine.analysis.run_labels import noisy_label_statistics
from hessfine.analysis.sampling import (
    SAMPLE_ORDERS,
    Sample,
    SampleOrder,
    file_sample,
    stratified_sample,
)
from hessfine.analysis.schema import MEASUREMENT, SCHEMA_VERSION, SPECTRUM
from hessfine.analysis.sources.processors import processor_record
from hessfine.analysis.sources.timm_runs import TIMM_WEIGHTS, TimmWeights
from hessfine.bounds.estimates import UNUSED, QuadraticForm, merge_layers
from hessfine.bounds.estimators.noise_stability import trace_prediction
from hessfine.bounds.estimators.quadratic_forms import ESTIMATORS, Estimator
from hessfine.bounds.functional import Batch, ConsistentCrossEntropy, Inputs, slice_inputs
from hessfine.bounds.generalization import Bounds, assemble_bounds, noise_matrix_inverse
from hessfine.bounds.linalg.memory import MemoryBudgetError, MemoryPlan
from hessfine.bounds.linalg.positive_quadrature import Target
from hessfine.bounds.linalg.probes import DRAWS_VERSION, keyed_generator
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor

Split = Literal["train", "eval"]
Distribute = Literal["examples", "checkpoints"]
T = TypeVar("T")

RUN_FACTS = (
    "device",
    "world_size",
    "batch_size_used",
    "attn_implementation",
    "experts_implementation",
    "max_memory",
    "max_memory_bytes",
    "chunks",
)
"""Settings entries that record how a run was executed, not what was measured (a resumed run
with other values of them is already measured)."""

__all__ = ["MeasureSettings", "Sources", "measure", "measure_path", "unused_layers"]


@dataclass(frozen=True)
class MeasureSettings:
    """Every option of ``hessfine measure`` that changes the numbers (recorded in the result).

    ``task`` None chooses the task from the model (:func:`hessfine.analysis.tasks.choose_task`);
    the result records the task measured and how it was chosen.

    The fields are the command line's options with ``_`` for ``-`` and their defaults
    (docs/cli.md); ``hessfine.measure_model`` and the training callbacks take them as keyword
    arguments. Exported as ``hessfine.MeasureSettings``.
    """

    estimator: Estimator = "auto"
    task: Task | None = None
    lanczos_steps: int = 128
    positive_rtol: float = 1e-2
    positive_target: Target = "max"
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
    timm_weights: TimmWeights = "raw"
    max_memory: int | float | str | None = None

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
        del out["timm_weights"]  # recorded for timm checkpoints only (_Measurement._record)
        return out

    def check_task(self, task: str | None) -> None:
        """Raise :class:`InputError` for options that do not apply to ``task``."""
        if task == "regression" and self.certificate:
            raise InputError(
                "--certificate bounds a 0-1 error, and a regression predicts no classes; drop "
                "--certificate with --task regression"
            )

    def validate(self) -> None:
        """Raise :class:`InputError` for option values that cannot work."""
        if self.estimator not in ESTIMATORS:
            raise InputError(
                f"--estimator {self.estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
            )
        if self.task is not None and self.task not in TASKS:
            raise InputError(f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}")
        self.check_task(self.task)
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
            (
                self.positive_target in ("max", "mean"),
                f"--positive-target must be max or mean, got {self.positive_target!r}",
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
            (
                self.timm_weights in TIMM_WEIGHTS,
                f"--timm-weights must be one of {', '.join(TIMM_WEIGHTS)}, got {self.timm_weights!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if self.max_memory is not None:
            parse_max_memory(self.max_memory)


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
    processing: Processing | None = None,
    context: Context | None = None,
) -> dict[str, Any]:
    """Measure one checkpoint on disk and write ``out/measurement.json``.

    What ``hessfine measure CHECKPOINT`` does (exported as ``hessfine.measure``; for a module in
    memory see ``hessfine.measure_model``).

    Args:
        checkpoint: The fine-tuned checkpoint: a weights file, a Hugging Face or Trainer
            directory, a PEFT adapter, a Lightning or timm checkpoint, a sharded checkpoint.
        reference: The pretrained checkpoint (default: from the run manifest, or a PEFT
            adapter's local base).
        data: The training data spec (default: from the run manifest).
        out: The output directory.
        eval_data: The evaluation data spec, for the measured gap.
        model: The model spec (``torchvision:NAME``, ``hf``, ``file.py:FACTORY``, …).
        model_kwargs: Keyword arguments of the model spec.
        settings: The options that change the numbers.
        trust: Allow pickled objects in checkpoint files (they can run code).
        verbose: Print the layer alignment table.
        quiet: No progress bars.
        input_columns: The input columns of a ``datasets`` directory.
        label_column: Its label column.
        processing: Its raw text or image columns, made into inputs by the model's own tokenizer
            or image processor (:mod:`hessfine.analysis.sources.processors`).
        context: This process's share of a ``torchrun`` job
            (:func:`hessfine.analysis.distributed.detect`); rank 0 writes.

    Returns:
        The ``measurement.json`` document.
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
        processing,
    )
    settings.validate()
    ctx = context if context is not None else Context(device=resolve_device(settings.device))

    def load() -> MeasurementInputs:
        torch.manual_seed(settings.seed)  # models built from their spec start from this seed
        return load_inputs(
            sources,
            task=settings.task,
            dtype=settings.dtype,
            layers=settings.layers,
            head_reference=settings.head_reference,
            image_size=settings.image_size,
            device=ctx.device,
            timm_weights=settings.timm_weights,
            verbose=verbose and ctx.is_writer,
        )

    result = measure_inputs(load, settings, ctx, quiet=quiet)
    if ctx.is_writer:
        result.save(out)
    return result.to_json()


def measure_inputs(
    load: Callable[[], MeasurementInputs],
    settings: MeasureSettings,
    ctx: Context,
    *,
    quiet: bool = True,
) -> Measurement:
    """The measuring core that files and Python objects both go through.

    ``load()`` gives the :class:`MeasurementInputs` (:func:`load_inputs` for files,
    :func:`hessfine.analysis.in_memory_inputs.object_inputs` for modules and data in memory); it
    is timed as ``load_s``. Then the Hessian examples are chosen, the quantities of
    :data:`~hessfine.analysis.quantities.QUANTITIES` that ``settings`` ask for are computed on
    this process's share of them (``ctx``), and the bounds assembled. Nothing is written: the
    :class:`Measurement` holds ``measurement.json`` (and ``spectrum.json``) for ``save``.
    """
    with full_precision():
        start = time.perf_counter()
        budget = _budget(settings, ctx)
        inputs = load()
        meter = ProcessMeter(budget.bytes, inputs.device)
        if not meter.measurable:
            return _Measurement(inputs, settings, ctx, quiet=quiet, start=start).run()
        loaded = meter.usage()
        if loaded > budget.bytes:
            raise InputError(
                f"{budget.option} is less than the {human(loaded)} the model and data take once "
                "loaded; raise --max-memory"
            )
        return _Measurement(inputs, settings, ctx, quiet=quiet, start=start).run(meter, budget)


def _budget(settings: MeasureSettings, ctx: Context) -> MemoryBudget:
    """The memory budget of this process (a fraction of the memory available is shared by the
    processes of a torchrun job on this machine, on the CPU)."""
    processes = 1
    if ctx.active and ctx.device.type != "cuda":
        processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return resolve_budget(settings.max_memory, ctx.device, processes=processes)


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
    weights = same_settings.pop("timm_weights", "raw")  # recorded for timm checkpoints only
    if same_settings.pop("task_source", None) != "given" and settings.task is None:
        same_settings["task"] = None  # chosen from the model then and now: the checkpoint decides
    for fact in RUN_FACTS:
        wanted.pop(fact, None)
    digest = previous.get("provenance", {}).get("checkpoint_sha256")
    return (
        same_settings == wanted
        and weights == settings.timm_weights
        and digest == checkpoint_digest(checkpoint)
    )


class _Measurement:
    """One measurement: the loaded inputs, the Hessian examples and the table's results.

    The attributes are what :class:`hessfine.analysis.quantities.MeasurementRun` reads.
    """

    def __init__(
        self,
        inputs: MeasurementInputs,
        settings: MeasureSettings,
        ctx: Context,
        *,
        quiet: bool,
        start: float,
    ):
        self.inputs = inputs
        self.settings = settings
        self.ctx = ctx
        self.quiet = quiet
        self.start = start
        self.progress = Progress(enabled=not quiet and ctx.is_writer)
        self.batch_size = settings.effective_batch_size
        self.timings = dict.fromkeys(("load_s", *REPORTED_PHASES), 0.0)
        self.timings["load_s"] = time.perf_counter() - start
        self.results: dict[str, Any] = {}
        self.consistent: ConsistentCrossEntropy | None = None
        self.memory = MemoryPlan()
        self.chunks: dict[str, dict[str, int]] = {}

    def run(
        self, meter: ProcessMeter | None = None, budget: MemoryBudget | None = None
    ) -> Measurement:
        """Choose the examples, compute the asked quantities and bounds: the result.

        ``meter``: the memory meter that sizes every stage's calls under ``budget`` (None: no
        budget, each call takes its whole batch).
        """
        self.meter, self.budget = meter, budget
        self.loaded = None if meter is None else meter.usage()
        self._choose_examples()
        stats = self._within_budget("loss", lambda: self._retrying(self._statistics))
        for quantity in QUANTITIES:
            self.memory = MemoryPlan(self.meter, cap=self.batch_size)
            plan = quantity.plan(self)
            if plan is not None:
                t = time.perf_counter()
                self.results[quantity.name] = self._within_budget(
                    quantity.name,
                    lambda q=quantity, p=plan: self._retrying(lambda: self._compute(q, p)),
                )
                elapsed = time.perf_counter() - t
                self.timings[quantity.phase] = self.timings.get(quantity.phase, 0.0) + elapsed
        unconverged = self._unconverged_note()
        if unconverged and self.ctx.is_writer:
            print(f"hessfine: warning: {unconverged}", file=sys.stderr)
        bounds = self._bounds(stats)
        self.timings["total_s"] = time.perf_counter() - self.start
        density = self.results.get("density")
        spectrum = None
        if density is not None:
            spectrum = {"checkpoint": str(self.inputs.checkpoint.path), **density.to_json()}
        return Measurement.from_record(self._record(stats, bounds), spectrum)

    # ------------------------------------------------------------------------ examples
    def _choose_examples(self) -> None:
        """The Hessian examples (checked against the model) and the layers the model uses."""
        s, inputs = self.settings, self.inputs
        population = inputs.train if s.hessian_split == "train" else inputs.eval
        if population is None:
            raise InputError(
                "--hessian-split eval needs --eval-data; pass it or use --hessian-split train"
            )
        s.check_task(inputs.task.task)
        if s.certificate and len(inputs.train) < 8:
            raise InputError(
                f"--certificate needs at least 8 training examples (the PAC-Bayes-kl bound), "
                f"--data {inputs.train.name} has {len(inputs.train)}; pass more data or drop "
                "--certificate"
            )
        self.sample = self._sample(population)
        self.hessian_data = self._sampled(population, self.sample)
        self.count = len(self.hessian_data)
        self.num_classes = check_forward(inputs, self.hessian_data)
        x, y = next(iter(self.batches(self.hessian_data, 1)))
        self.unused = unused_layers(inputs.fmodel, inputs.params, inputs.layers, x, y)
        if len(self.unused) == len(inputs.layers):
            raise InputError(
                f"--model {inputs.model_spec}: none of the selected layers is used in eval mode "
                "(the loss does not depend on them); select used layers with --layers"
            )
        self.layers = [name for name in inputs.layers if name not in self.unused]

    def _sample(self, data: LabeledData) -> Sample:
        """The Hessian examples: stratified (seeded) or the first N in file (or iteration) order;
        all if N ≥ |data|."""
        s = self.settings
        count = len(data) if s.samples is None else min(s.samples, len(data))
        if s.sample_order == "file" or data.iterated or count == len(data):
            return file_sample(data.y, count)
        return stratified_sample(data.y, count, generator=torch.Generator().manual_seed(s.seed))

    @staticmethod
    def _sampled(data: LabeledData, sample: Sample) -> LabeledData:
        return data if len(sample.indices) == len(data) else data.subset(sample.indices)

    def training_sample(self) -> LabeledData:
        """The sampled training examples with the noisy labels trained on (the examples of
        the Hessian sample when it is drawn from the training split)."""
        s = self.settings
        sample = self.sample if s.hessian_split == "train" else self._sample(self.inputs.train)
        return self._sampled(self.inputs.noisy_train, sample)

    # ------------------------------------------------------------------------ execution
    def batches(self, data: LabeledData, count: int | None) -> Iterator[Batch]:
        """Every batch of the first ``count`` examples (all when ``None``), on the device."""
        return data.batches(
            self.batch_size, limit=count, dtype=self.inputs.dtype, device=self.inputs.device
        )

    def local(self, data: LabeledData, count: int | None) -> Iterator[Batch]:
        """This process's batches of the first ``count`` examples (all when ``None``)."""
        return self.ctx.local(self.batches(data, count))

    def local_batches(self, data: LabeledData, count: int | None = None) -> int:
        """How many batches of the first ``count`` examples of ``data`` this process holds."""
        n = len(data) if count is None else min(count, len(data))
        return len(range(self.ctx.rank, math.ceil(n / self.batch_size), self.ctx.world_size))

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

    def _within_budget(self, name: str, compute: Callable[[], T]) -> T:
        """``compute()`` of the stage ``name`` under its memory plan (``memory``, made before
        the stage; the loss pass makes its own), whose chosen call sizes are recorded in
        ``chunks``. A call that cannot fit one example under the budget is a one-line error."""
        if name == "loss":
            self.memory = MemoryPlan(self.meter, cap=self.batch_size)
        try:
            return compute()
        except MemoryBudgetError as err:
            assert self.budget is not None
            needed = "runs out of memory" if err.needed is None else f"needs {human(err.needed)}"
            raise InputError(
                f"{self.budget.option} is too small: one example of the {name} stage "
                f"({err.kind}) {needed} with {human(max(err.headroom, 0))} left under it after "
                "the model and data; raise --max-memory or select fewer --layers"
            ) from None
        finally:
            sizes = self.memory.sizes()
            if sizes:
                self.chunks[name] = sizes

    def _note_retry(self, size: int) -> None:
        if not self.quiet and self.ctx.is_writer:
            print(f"CUDA out of memory: retrying with batch size {size}")

    def _compute(self, quantity: Quantity, plan: Plan) -> Any:
        """One quantity of the table: its estimator on this process's share of the Hessian
        examples (once per entry of ``plan.calls``), merged over the processes and completed
        with the unused layers; or, for ``plan.whole_run``, its own computation."""
        if plan.whole_run:
            return quantity.estimator(self)
        if plan.calls is not None:
            return [self._on_examples(quantity, plan, **call) for call in plan.calls]
        return plan.complete(self._on_examples(quantity, plan))

    def _on_examples(self, quantity: Quantity, plan: Plan, **call: Any) -> Any:
        """The quantity's estimator with draws keyed by (seed, name) and a progress bar."""
        inputs = self.inputs
        subject: Any = self.layers
        if plan.subject == "directions":
            subject = {name: inputs.directions[name] for name in self.layers}
        with self.progress.stage(quantity.name, total=plan.total, unit=quantity.unit) as bar:
            share = 1 / max(self.local_batches(self.hessian_data, self.count), 1)
            update = (lambda done: bar(done * share)) if plan.per_batch else bar
            value = quantity.estimator(
                inputs.fmodel,
                inputs.params,
                subject,
                self.local(self.hessian_data, self.count),
                generator=keyed_generator(self.settings.seed, quantity.name),
                shard=self.ctx.shard(self.batch_size),
                progress=update,
                **plan.options,
                **call,
            )
        parts = self.ctx.gather(value)
        return merge_layers(parts) if isinstance(value, Mapping) else type(value).merge(parts)

    # ------------------------------------------------------------------------ statistics
    def _statistics(self) -> dict[str, float | None]:
        """The loss passes: on train/eval (:meth:`_loss_statistics`) and on the noisy training
        labels (:meth:`_noisy_label_statistics`), in the calls of the loss stage's plan."""
        return {**self._loss_statistics(), **self._noisy_label_statistics()}

    def _loss_statistics(self) -> dict[str, float | None]:
        """Mean loss, accuracy (None without predictions: regression) and the fraction of examples
        predicted right throughout (exact match) on train/eval, and the largest loss on the
        Hessian examples (taken in the same pass when they are a whole split)."""
        fmodel, params = self.inputs.fmodel, self.inputs.params
        out: dict[str, float | None] = {}
        worst = 0.0
        splits = (("train", self.inputs.train), ("eval", self.inputs.eval))
        for split, data in splits:
            if data is None:
                out[f"{split}_loss"] = out[f"{split}_accuracy"] = None
                out[f"{split}_exact_match"] = None
                continue
            sums = torch.zeros(6, dtype=torch.float64)  # 6th: the largest loss
            batches = self.local_batches(data)
            hessian = data is self.hessian_data

            def part(x: Inputs, y: Tensor, hessian: bool = hessian) -> Tensor:
                logits = fmodel.logits(params, x)
                losses = fmodel.loss(logits, y)
                top = losses.max() if hessian else torch.tensor(0.0)
                right, made = (t.double() for t in fmodel.loss.correct(logits, y))
                exact = (right == made).double()
                part = [losses.double().sum(), right.sum(), made.sum(), exact.sum()]
                count = torch.tensor(float(len(y)), dtype=torch.float64)
                return torch.stack([*(t.cpu().double() for t in part), count, top.cpu().double()])

            with (
                torch.no_grad(),
                differentiable(),
                self.progress.stage(f"{split} loss", total=batches, unit="batch") as update,
            ):
                for x, y in self.local(data, None):
                    for found in self._forward_chunks("loss", part, x, y):
                        sums[:5] += found[:5]
                        worst = max(worst, float(found[5]))
                    update(1)
            total, correct, predictions, exact_matches, n = self.ctx.all_sum(sums[:5]).tolist()
            out[f"{split}_loss"] = total / n
            out[f"{split}_accuracy"] = correct / predictions if predictions else None
            out[f"{split}_exact_match"] = exact_matches / n if predictions else None
        if all(data is not self.hessian_data for _, data in splits):

            def largest(x: Inputs, y: Tensor) -> float:
                return float(fmodel.losses(params, x, y).max())

            with torch.no_grad(), differentiable():
                for x, y in self.local(self.hessian_data, self.count):
                    worst = max(worst, *self._forward_chunks("loss:largest", largest, x, y))
        out["max"] = self.ctx.max(worst)
        return out

    def _forward_chunks(
        self, kind: str, compute: Callable[[Inputs, Tensor], T], x: Inputs, y: Tensor
    ) -> list[T]:
        """``compute`` on the examples of a batch, in the calls of ``kind`` the plan sizes: one
        size for every batch (fitted on the first batch's first examples), so that equal splits
        give equal values."""
        calls = self.memory.calls(kind, steady=True)
        calls.fit(lambda k: compute(slice_inputs(x, 0, k), y[:k]), len(y))
        return calls.run(lambda a, b: compute(slice_inputs(x, a, b), y[a:b]), len(y))

    def _noisy_label_statistics(self) -> dict[str, float | None]:
        """Loss and accuracy on the noisy training labels and the consistent loss (F known)."""
        inputs = self.inputs
        if inputs.run_labels is None and inputs.noise is None:
            return dict.fromkeys(("train_noisy", "train_noisy_accuracy", "train_consistent"))
        if inputs.noise is not None:
            try:
                inverse = noise_matrix_inverse(inputs.noise.tensor(), self.num_classes)
                # F⁻¹ stays float64 (its rows sum to 1 to ~1e-16); the loss casts it per call.
                self.consistent = ConsistentCrossEntropy(inverse.to(inputs.device))
            except ValueError as err:
                raise InputError(f"the run's noise matrix ({inputs.noise.source}): {err}") from None
        batches = self.batches(inputs.noisy_train, None)
        return noisy_label_statistics(
            inputs.fmodel,
            inputs.params,
            batches,
            self.consistent,
            split=lambda compute, x, y: self._forward_chunks("loss:noisy", compute, x, y),
        )

    def certified(self, forms: Mapping[str, QuadraticForm], data: LabeledData) -> dict[str, bool]:
        """Certification from the quadratic forms, or computed now (ggn/positive estimators)."""
        flags = {name: forms[name].diagnostics.get("certified_psd") for name in self.layers}
        if all(flag is not None for flag in flags.values()):
            return flags
        params = self.inputs.params
        x, _ = next(iter(self.batches(data, 1)))
        with differentiable():
            generator = keyed_generator(self.settings.seed, "certify")
            ratios = certify_piecewise_linear(
                self.inputs.fmodel, params, self.layers, x, generator=generator
            )
        return {
            name: ratios[name] <= certification_tolerance(params[name].dtype)
            for name in self.layers
        }

    # ------------------------------------------------------------------------ result
    def _matrices(self) -> list[str]:
        """The used layers with ≥2-D weights: those the prior distance measures are defined on."""
        return [name for name in self.layers if self.inputs.params[name].dim() >= 2]

    def _bounds(self, stats: Mapping[str, float | None]) -> Bounds:
        s, inputs, results = self.settings, self.inputs, self.results
        forms, positive = results["quadratic forms"], results.get("positive trace")
        noisy, _, piecewise_linear = results.get(
            "quadratic forms (consistent loss)", (None, {}, False)
        )
        radii = inputs.manifest.get("radii")
        alphas = None
        if isinstance(radii, dict):
            alphas = {n: float(radii.get(n, inputs.distances[n])) for n in self.layers}

        def per_layer(values: Mapping[str, Any] | None) -> dict[str, float] | None:
            return None if values is None else {n: values[n].max for n in self.layers}

        return assemble_bounds(
            train_loss=stats["train_loss"],
            layer_max=per_layer(forms),
            distances={name: inputs.distances[name] for name in self.layers},
            weights={name: inputs.params[name] for name in self._matrices()},
            directions={name: inputs.directions[name] for name in self._matrices()},
            trace_positive_max=per_layer(positive),
            alphas=alphas,
            C=s.loss_bound if s.loss_bound is not None else stats["max"],
            n=s.n_train if s.n_train is not None else len(inputs.train),
            epsilon=s.epsilon,
            confusion=None if inputs.noise is None else inputs.noise.tensor(),
            consistent_train_loss=stats["train_consistent"],
            noisy_layer_max=per_layer(noisy),
            noisy_trace_positive_max=per_layer(positive if piecewise_linear else None),
            noise_matrix_source=None if inputs.noise is None else inputs.noise.source,
            certificate=results.get("certificate"),
        )

    def _record(self, stats: Mapping[str, float | None], bounds: Bounds) -> dict[str, Any]:
        """The ``measurement.json`` document (``docs/schema.md``) from the results' ``to_json``."""
        s, inputs, results = self.settings, self.inputs, self.results
        forms, eigen = results["quadratic forms"], results.get("eigenvalues", {})
        noisy, reused, _ = results.get("quadratic forms (consistent loss)", (None, {}, False))
        layers = []
        for row in inputs.alignment.rows:
            name, form = row.name, forms[row.name]
            trace = None
            if s.trace:
                trace = {
                    **results["trace"][name].to_json(),
                    **results["positive trace"][name].to_json(),
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
                        **form.to_json(),
                        "argmax_index": self._data_index(form),
                        "max_error_estimate": form.max_error_estimate,
                    },
                    "diagnostics": dict(form.diagnostics),
                    "trace": trace,
                    "top_eigenvalues": eigen[name].values if name in eigen else None,
                    "top_eigenvalue_residuals": eigen[name].residuals if name in eigen else None,
                    "quadratic_form_noisy_labels": None
                    if noisy is None
                    else _noisy_form_json(noisy[name], reused[name]),
                }
            )
        settings = s.to_json()
        settings["task"] = inputs.task.task
        if inputs.task.source is not None:
            settings["task_source"] = inputs.task.source
        settings["device"] = str(inputs.device)
        if inputs.attention is not None:
            settings["attn_implementation"] = inputs.attention
        if inputs.experts is not None:
            settings["experts_implementation"] = inputs.experts
        settings["world_size"] = self.ctx.world_size
        settings["batch_size_used"] = self.batch_size
        settings["max_memory_bytes"] = None if self.budget is None else self.budget.bytes
        settings["chunks"] = self.chunks
        training = inputs.checkpoint.training
        if training.get("tool") == "timm":
            settings["timm_weights"] = s.timm_weights
        whole = results.get("eigenvalues (all layers)")
        traces = results.get("relative trace" if s.noise_relative else "trace", {})
        means = {name: estimate.mean for name, estimate in traces.items()}
        noise = [
            {**n.to_json(), "trace_prediction": trace_prediction(n.sigma, means)}
            for n in results.get("noise", [])
        ]
        record = {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": str(inputs.checkpoint.path),
            "reference": str(inputs.reference.path),
            "model": inputs.model_spec,
            "model_kwargs": inputs.model_kwargs,
            "mode": "eval",
            "settings": settings,
            "data": {
                **inputs.data_specs,
                **processor_record(inputs.train, inputs.eval),
                "n_train": len(inputs.train),
                "n_eval": None if inputs.eval is None else len(inputs.eval),
                "n_hessian_samples": self.count,
                "num_classes": self.num_classes,
                "hessian_sample": self._sample_record(),
            },
            "unused_layers": list(self.unused),
            "notes": self._notes(),
            "manifest": {
                k: inputs.manifest.get(k)
                for k in ("method", "seed", "epoch", "label_noise")
                if k in inputs.manifest
            },
            "epoch": _epoch_of(inputs.checkpoint.path, inputs.manifest)
            if training.get("epoch") is None
            else training["epoch"],
            "step": training.get("step"),
            "training": training or None,
            "layers": layers,
            "top_eigenvalues_all_layers": None if whole is None else whole.to_json(),
            "labels": None if inputs.run_labels is None else inputs.run_labels.to_json(),
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
                **(
                    {
                        "train_exact_match": stats["train_exact_match"],
                        "eval_exact_match": stats["eval_exact_match"],
                    }
                    if inputs.task.task == "multi-label"
                    else {}
                ),
            },
            "generalization_gap": {
                "loss": _difference(stats["eval_loss"], stats["train_loss"]),
                "accuracy": _difference(stats["train_accuracy"], stats["eval_accuracy"]),
                "against": "clean training labels"
                if inputs.run_labels is not None
                else "training labels",
            },
            "bounds": bounds.to_json(),
            "noise_stability": noise,
            "provenance": {
                **versions(),
                "timestamp": timestamp(),
                "checkpoint_sha256": inputs.checkpoint.sha256,
                "reference_sha256": inputs.reference.sha256,
                "device_name": _device_name(inputs.device),
                "timings": {k: float(v) for k, v in self.timings.items()},
                "memory": {
                    "after_load_bytes": self.loaded,
                    "peak_bytes": None if self.meter is None else self.meter.highest(),
                },
            },
        }
        if "density" in results:
            record["spectrum_file"] = SPECTRUM
        return record

    def _sample_record(self) -> dict[str, Any]:
        s = self.settings
        data = self.inputs.train if s.hessian_split == "train" else self.inputs.eval
        population = len(data)
        every = len(self.sample.indices) == population
        order = "iteration" if data.iterated else "file" if every else s.sample_order
        record = self.sample.to_json(order, population)
        return {**record, "indices": None} if every else record  # None: all, in that order

    def _data_index(self, form: QuadraticForm) -> int | None:
        """Index in the data set of the example attaining 𝓗_i (None for batches, unused layers)."""
        if form.route in ("reference-code", UNUSED) or form.argmax < 0:
            return None
        return int(self.sample.indices[form.argmax])

    def _unconverged_note(self) -> str | None:
        """The layers whose positive part the Lanczos step cap stopped before it converged to
        --positive-rtol (quadratic_form.max_error_estimate above positive_rtol × max), and the
        option to raise; None when there are none (or --positive-rtol is 0: fixed steps)."""
        s = self.settings
        forms = self.results["quadratic forms"]
        worst = {
            name: forms[name].max_error_estimate / max(abs(forms[name].max), 1e-300)
            for name in self.layers
            if forms[name].route == "lanczos"
            and s.positive_rtol > 0
            and forms[name].max_error_estimate > s.positive_rtol * abs(forms[name].max)
        }
        if not worst:
            return None
        top = max(worst, key=worst.__getitem__)
        return (
            f"quadratic_form.max of {', '.join(worst)} did not converge to --positive-rtol "
            f"{s.positive_rtol:g}: the Lanczos step cap (--lanczos-steps {s.lanczos_steps}) "
            "stopped examples near the maximum while their estimates were still changing "
            f"(quadratic_form.max_error_estimate, up to {worst[top]:.1%} of the value for {top}); "
            f"raise --lanczos-steps (e.g. --lanczos-steps {2 * s.lanczos_steps}) for these layers."
        )

    def _notes(self) -> list[str]:
        """Plain-language caveats about this result (``measurement.json → notes``)."""
        s = self.settings
        how = {
            "stratified": "a seeded class-stratified sample",
            "file": "in file order",
            "iteration": "the first in iteration order, not a random sample",
        }[self._sample_record()["order"]]
        notes = [
            f"𝓗_i (quadratic_form.max) is a maximum over {self.count} examples of the "
            f"{s.hessian_split} split ({how}; indices in data.hessian_sample), not over the data "
            "distribution, so theorem_2_1 and trace_corollary are estimates, not certified bounds."
        ]
        forms = self.results["quadratic forms"]
        wide = [
            n
            for n in self.layers
            if forms[n].mean_upper is not None
            and forms[n].mean_upper - forms[n].mean_lower
            > 2 * s.positive_rtol * abs(forms[n].mean_lower)
        ]
        if wide:
            why = (
                "an example that cannot attain the layer's maximum stops early with its lower "
                "bound as its value (diagnostics.pruned_fraction; the maximum stays within "
                "--positive-rtol); --positive-target mean converges every example until the mean "
                "is within --positive-rtol (several times the cost of the positive part)"
                if s.positive_target == "max"
                else f"the Lanczos step cap stopped examples first; raise --lanczos-steps "
                f"(e.g. --lanczos-steps {2 * s.lanczos_steps})"
            )
            notes.append(
                f"quadratic_form.mean of {', '.join(wide)} may be further than --positive-rtol "
                "from the exact mean, which lies in [mean_lower, mean_upper] (rigorous up to "
                "round-off; docs/mathematics.md, "
                f'"The positive part by Lanczos quadrature"): {why}.'
            )
        unconverged = self._unconverged_note()
        if unconverged:
            notes.append(unconverged)
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
        notes.extend(self.inputs.notes)
        if self.unused:
            notes.append(
                f"layers {', '.join(self.unused)} are not used by the model in eval mode: their "
                "Hessian blocks are zero, so they are reported with zero quadratic forms, traces "
                "and eigenvalues and left out of the bounds, noise stability, certificate and "
                "spectral density."
            )
        return notes


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _noisy_form_json(form: QuadraticForm, reused: bool) -> dict[str, Any]:
    """``layers[].quadratic_form_noisy_labels``: 𝓗̄_i of the consistent loss on noisy labels."""
    route = f"same as clean ({form.route})" if reused else form.route
    return {**form.to_json(), "method": route}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _epoch_of(path: Path, manifest: Mapping[str, Any]) -> int | None:
    for entry in manifest.get("checkpoints", []) or []:
        if isinstance(entry, dict) and entry.get("file") == path.name:
            return entry.get("epoch")
    return None
