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
    ...                  model="hessfine.finetune.models:digits_cnn", settings=MeasureSettings(samples=64))
    >>> result["bounds"]["theorem_2_1"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.checkpoints import (
    Alignment,
    Checkpoint,
    align,
    find_checkpoints,
    is_run_collection,
    load_checkpoint,
    load_head_reference,
    select_layers,
    sha256_of,
)
from hessfine.analysis.data import LabeledData, check_labels, load_data
from hessfine.analysis.errors import InputError
from hessfine.analysis.models import build_model, resolve_device
from hessfine.analysis.results import (
    MEASUREMENT,
    SCHEMA_VERSION,
    SPECTRUM,
    timestamp,
    versions,
    write_json_atomic,
)
from hessfine.analysis.sampling import (
    SAMPLE_ORDERS,
    Sample,
    SampleOrder,
    file_sample,
    stratified_sample,
)
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    NondeterministicModelError,
    check_deterministic,
)
from hessfine.bounds.generalization import assemble_bounds
from hessfine.bounds.noise_stability import noise_stability, relative_noise_traces, trace_prediction
from hessfine.bounds.pac_bayes import pac_bayes_certificate
from hessfine.bounds.quadratic_forms import (
    ESTIMATORS,
    Estimator,
    QuadraticForm,
    certification_tolerance,
    certify_piecewise_linear,
    quadratic_forms,
)
from hessfine.bounds.safe_autodiff import differentiable
from hessfine.bounds.spectra import (
    Eigenvalues,
    spectral_density,
    top_eigenvalues,
    whole_top_eigenvalues,
)
from hessfine.bounds.traces import PositiveTrace, TraceEstimate, layer_traces, positive_trace_max
from torch import Tensor
from tqdm import tqdm

Split = Literal["train", "eval"]
DType = Literal["float32", "float64"]
UNUSED = "unused"


@dataclass(frozen=True)
class MeasureSettings:
    """Every option of ``hessfine measure`` that changes the numbers (recorded in the result)."""

    estimator: Estimator = "auto"
    lanczos_steps: int = 32
    samples: int | None = 256
    sample_order: SampleOrder = "stratified"
    batch_size: int | None = None
    hessian_split: Split = "train"
    layers: tuple[str, ...] | None = None
    head_reference: str = "zero"
    trace: bool = False
    trace_probes: int = 100
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
        return out

    def validate(self) -> None:
        """Raise :class:`InputError` for option values that cannot work."""
        if self.estimator not in ESTIMATORS:
            raise InputError(
                f"--estimator {self.estimator!r} is unknown; use one of {', '.join(ESTIMATORS)}"
            )
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
            (self.eigen >= 0, f"--eigen must be ≥ 0, got {self.eigen}"),
            (self.noise_draws > 1, f"--noise-draws must be at least 2, got {self.noise_draws}"),
            (
                all(math.isfinite(s) and s > 0 for s in self.noise_sigma),
                f"--noise-sigma values must be finite and positive, got {list(self.noise_sigma)}",
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
) -> dict[str, Any]:
    """Measure one checkpoint and write ``out/measurement.json``; returns the result dict."""
    sources = Sources(Path(checkpoint), reference, data, eval_data, model, model_kwargs, trust)
    return _Measurement(sources, settings, verbose=verbose, quiet=quiet).run(Path(out))


def measure_path(
    checkpoint: str | Path,
    *,
    out: str | Path,
    settings: MeasureSettings = MeasureSettings(),
    quiet: bool = True,
    verbose: bool = False,
    **inputs: Any,
) -> list[Path]:
    """Measure one checkpoint, or every checkpoint of a directory of runs (resumable).

    For a directory of runs the result of ``RUNS/a/epoch_003.safetensors`` goes to
    ``OUT/a/epoch_003/measurement.json``; a checkpoint whose measurement already exists with the
    same settings and checkpoint hash is skipped.
    """
    path, out = Path(checkpoint), Path(out)
    if not path.exists():
        raise InputError(f"checkpoint {path}: no such file or directory; check the path")
    if not (path.is_dir() and is_run_collection(path)):
        measure(path, out=out, settings=settings, quiet=quiet, verbose=verbose, **inputs)
        return [out / MEASUREMENT]
    checkpoints = find_checkpoints(path)
    if not checkpoints:
        raise InputError(
            f"checkpoint directory {path} holds no checkpoints; point at a run directory"
        )
    written = []
    for file in checkpoints:
        relative = file.relative_to(path)
        target = out / relative.parent / relative.name.split(".")[0]
        if _already_measured(target / MEASUREMENT, file, settings):
            if not quiet:
                print(f"skipping {file} (already measured with these settings)")
            written.append(target / MEASUREMENT)
            continue
        if not quiet:
            print(f"measuring {file}")
        measure(file, out=target, settings=settings, quiet=quiet, verbose=verbose, **inputs)
        written.append(target / MEASUREMENT)
    return written


def _already_measured(result: Path, checkpoint: Path, settings: MeasureSettings) -> bool:
    if not result.is_file():
        return False
    try:
        previous = json.loads(result.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    wanted = json.loads(json.dumps(settings.to_json()))
    same_settings = {k: v for k, v in previous.get("settings", {}).items() if k != "device"}
    wanted.pop("device")
    digest = previous.get("provenance", {}).get("checkpoint_sha256")
    return same_settings == wanted and digest == sha256_of([checkpoint])


class _Measurement:
    """One measurement run: holds the loaded state between the phases."""

    def __init__(self, sources: Sources, settings: MeasureSettings, *, verbose: bool, quiet: bool):
        settings.validate()
        self.sources = sources
        self.settings = settings
        self.verbose = verbose
        self.quiet = quiet
        self.timings = dict.fromkeys(
            ("load_s", "quadratic_forms_s", "trace_s", "eigen_s", "noise_s", "certificate_s"), 0.0
        )

    def _progress(self, iterable: Iterable, total: int, desc: str) -> Iterator:
        return iter(tqdm(iterable, total=total, desc=desc, disable=self.quiet, leave=False))

    def run(self, out: Path) -> dict[str, Any]:
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
        count = len(hessian_data)
        self._check_forward(hessian_data)
        self.unused = self._unused_layers(hessian_data)
        self.layers = [name for name in self.layers if name not in self.unused]
        stats = self._loss_statistics(count)

        generator = torch.Generator().manual_seed(s.seed)
        t = time.perf_counter()
        forms = quadratic_forms(
            self.fmodel,
            self.params,
            {name: self.directions[name] for name in self.layers},
            self._progress(
                self._batches(hessian_data, count), self._n_batches(count), "quadratic forms"
            ),
            estimator=s.estimator,
            lanczos_steps=s.lanczos_steps,
            reference_batch_size=s.effective_batch_size,
            generator=generator,
        )
        self.timings["quadratic_forms_s"] = time.perf_counter() - t
        forms.update(
            {
                name: QuadraticForm(name, 0.0, 0.0, 0, count, UNUSED, {"used_in_eval": False})
                for name in self.unused
            }
        )

        def on_examples(estimator, **options):
            """Run a :mod:`bounds` estimator on the Hessian examples of the selected layers."""
            batches = self._batches(hessian_data, count)
            return estimator(
                self.fmodel, self.params, self.layers, batches, generator=generator, **options
            )

        traces, positive = None, None
        if s.trace or s.noise_sigma:
            t = time.perf_counter()
            traces = on_examples(layer_traces, probes=s.trace_probes, method=s.trace_method)
            if s.trace:
                certified = self._certified(forms, hessian_data)
                positive = on_examples(
                    positive_trace_max, certified=certified, lanczos_steps=s.lanczos_steps
                )
            self.timings["trace_s"] = time.perf_counter() - t
            traces.update({n: TraceEstimate(0.0, 0.0, s.trace_probes, UNUSED) for n in self.unused})
            if positive is not None:
                positive.update({n: PositiveTrace(0.0, 0, 0.0, 0.0, UNUSED) for n in self.unused})

        eigen, whole, density = {}, None, None
        if s.eigen or s.density:
            t = time.perf_counter()
            if s.eigen:
                eigen = on_examples(top_eigenvalues, k=s.eigen)
                whole = on_examples(whole_top_eigenvalues, k=s.eigen)
                unused_numel = {row.name: row.numel for row in self.alignment.rows}
                whole = _zeros_merged(whole, sum(unused_numel[n] for n in self.unused), s.eigen)
                nothing = Eigenvalues([], [], 0, True)
                eigen.update(
                    {n: _zeros_merged(nothing, unused_numel[n], s.eigen) for n in self.unused}
                )
            if s.density:
                density = on_examples(spectral_density)
            self.timings["eigen_s"] = time.perf_counter() - t

        noise = []
        if s.noise_sigma:
            t = time.perf_counter()
            noise = self._noise_stability(on_examples, traces)
            self.timings["noise_s"] = time.perf_counter() - t

        certificate = None
        if s.certificate:
            t = time.perf_counter()
            certificate = self._certificate(forms, generator)
            self.timings["certificate_s"] = time.perf_counter() - t

        C = s.loss_bound if s.loss_bound is not None else stats["max"]
        n = s.n_train if s.n_train is not None else len(self.train)
        bounds = assemble_bounds(
            train_loss=stats["train_loss"],
            layer_max={name: forms[name].max for name in self.layers},
            distances={name: self.distances[name] for name in self.layers},
            weights={name: self.params[name] for name in self.layers},
            directions={name: self.directions[name] for name in self.layers},
            trace_positive_max=None
            if positive is None
            else {name: positive[name].max for name in self.layers},
            alphas=self._alphas(),
            C=C,
            n=n,
            epsilon=s.epsilon,
            confusion=self._confusion(),
            certificate=certificate,
        )
        self.timings["total_s"] = time.perf_counter() - start
        result = self._result(forms, traces, positive, eigen, whole, noise, stats, bounds, count)
        if density is not None:
            write_json_atomic(
                out / SPECTRUM, {"checkpoint": str(self.checkpoint.path), **density.to_json()}
            )
            result["spectrum_file"] = SPECTRUM
        write_json_atomic(out / MEASUREMENT, result)
        return result

    # ----------------------------------------------------------------------------- loading
    def _load(self) -> None:
        src, s = self.sources, self.settings
        self.checkpoint = load_checkpoint(src.checkpoint, trust=src.trust, label="checkpoint")
        manifest = self.checkpoint.manifest
        base = self.checkpoint.directory or self.checkpoint.path.parent
        reference = src.reference or _from_manifest(manifest, "reference", base)
        if reference is None:
            raise InputError(
                "--reference is required (the pretrained checkpoint); pass --reference PATH"
            )
        self.reference: Checkpoint = load_checkpoint(
            reference, trust=src.trust, label="--reference"
        )
        spec = src.model or manifest.get("model")
        if spec is None:
            spec = (
                "hf"
                if self.checkpoint.directory
                and (self.checkpoint.directory / "config.json").is_file()
                else None
            )
        if spec is None:
            raise InputError("--model is required (e.g. torchvision:resnet18); pass --model SPEC")
        kwargs = (
            src.model_kwargs if src.model_kwargs is not None else manifest.get("model_kwargs", {})
        )
        self.model_spec, self.model_kwargs = spec, dict(kwargs or {})
        self.manifest = manifest
        module = build_model(spec, self.model_kwargs, hf_directory=self.checkpoint.directory)
        self.device = resolve_device(s.device)
        self.dtype = torch.float64 if s.dtype == "float64" else torch.float32
        module.to(dtype=self.dtype)
        self.layers = select_layers(module, list(s.layers) if s.layers else None)
        head = s.head_reference
        if head != "zero" and manifest.get("head_reference") and not Path(head).exists():
            head = str(_from_manifest(manifest, "head_reference", base))
        alignment: Alignment = align(
            module,
            self.checkpoint,
            self.reference,
            layers=self.layers,
            head_reference=load_head_reference(head, trust=src.trust),
        )
        self.alignment = alignment
        module.to(device=self.device)
        self.fmodel, self.params = FunctionalModel.from_module(module)
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
        self.train: LabeledData = load_data(
            str(data_spec), image_size=s.image_size, trust=src.trust, label="--data"
        )
        eval_spec = src.eval_data or _from_manifest(manifest, "data", base, key2="eval")
        self.eval: LabeledData | None = (
            None
            if eval_spec is None
            else load_data(
                str(eval_spec), image_size=s.image_size, trust=src.trust, label="--eval-data"
            )
        )
        self.data_specs = {
            "train": str(data_spec),
            "eval": None if eval_spec is None else str(eval_spec),
        }

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
        """Selected layers the loss does not depend on in eval mode (one forward/backward).

        E.g. the auxiliary classifiers of torchvision's GoogLeNet and Inception v3, which only
        training mode uses: their Hessian blocks are zero.
        """
        x, y = next(iter(self._batches(data, 1)))
        weights = {name: self.params[name].detach().requires_grad_(True) for name in self.layers}
        with torch.enable_grad(), differentiable():
            loss = self.fmodel.losses({**self.params, **weights}, x, y).sum()
            grads = (
                torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
                if loss.requires_grad
                else [None] * len(weights)
            )
        unused = [name for name, g in zip(self.layers, grads, strict=True) if g is None]
        if len(unused) == len(self.layers):
            raise InputError(
                f"--model {self.model_spec}: none of the selected layers is used in eval mode "
                "(the loss does not depend on them); select used layers with --layers"
            )
        return unused

    def _batches(self, data: LabeledData, count: int | None) -> Iterator[Batch]:
        return data.batches(
            self.settings.effective_batch_size, limit=count, dtype=self.dtype, device=self.device
        )

    def _n_batches(self, count: int) -> int:
        return math.ceil(count / self.settings.effective_batch_size)

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
        if logits.dim() != 2:
            raise InputError(
                f"--model {self.model_spec}: expected (batch, classes) logits, got shape {tuple(logits.shape)}"
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
            total, correct, n = 0.0, 0, 0
            with torch.no_grad(), differentiable():
                for x, y in self._progress(
                    self._batches(data, None), self._n_batches(len(data)), f"{split} loss"
                ):
                    logits = self.fmodel.logits(self.params, x)
                    total += float(
                        torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum")
                    )
                    correct += int((logits.argmax(-1) == y).sum())
                    n += y.shape[0]
            out[f"{split}_loss"], out[f"{split}_accuracy"] = total / n, correct / n
        worst = 0.0
        with torch.no_grad(), differentiable():
            for x, y in self._batches(self.hessian_data, count):
                worst = max(worst, float(self.fmodel.losses(self.params, x, y).max()))
        out["max"] = worst
        return out

    # ------------------------------------------------------------------------ computations
    def _certified(self, forms, data: LabeledData) -> dict[str, bool]:
        """Certification from the quadratic forms, or computed now (ggn/positive estimators)."""
        flags = {name: forms[name].diagnostics.get("certified_psd") for name in self.layers}
        if all(flag is not None for flag in flags.values()):
            return flags
        x, _ = next(iter(self._batches(data, 1)))
        with differentiable():
            ratios = certify_piecewise_linear(self.fmodel, self.params, self.layers, x)
        return {
            name: ratios[name] <= certification_tolerance(self.params[name].dtype)
            for name in self.layers
        }

    def _noise_stability(self, on_examples, traces) -> list[dict[str, Any]]:
        s = self.settings
        if s.noise_relative:
            traces = on_examples(relative_noise_traces, probes=s.trace_probes)
        means = {name: estimate.mean for name, estimate in traces.items()}
        rows = []
        for sigma in s.noise_sigma:
            result = on_examples(
                noise_stability, sigma=sigma, draws=s.noise_draws, relative=s.noise_relative
            )
            rows.append({**result.to_json(), "trace_prediction": trace_prediction(sigma, means)})
        return rows

    def _certificate(self, forms, generator) -> dict[str, Any]:
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
            batches = self._batches(self.hessian_data, None)
            ggn = quadratic_forms(self.fmodel, self.params, directions, batches, estimator="ggn")
            curvature, source = along_v(ggn), "gauss_newton"
        if not any(a > 0 for a in curvature.values()):
            curvature, source = dict.fromkeys(self.layers, 1.0), "unit"
        certificate = pac_bayes_certificate(
            self.fmodel,
            self.params,
            reference,
            self.layers,
            self._batches(self.train, None),
            n=len(self.train),
            curvature=curvature,
            generator=generator,
        )
        return {**certificate.to_json(), "curvature_source": source}

    def _sample_record(self) -> dict[str, Any]:
        s = self.settings
        population = len(self.train if s.hessian_split == "train" else self.eval)
        record = self.sample.to_json(s.sample_order, population)
        if len(self.sample.indices) == population and s.sample_order == "file":
            record["indices"] = None  # every example, in file order
        return record

    def _notes(self, count: int) -> list[str]:
        """Plain-language caveats about this result (``measurement.json → notes``)."""
        s = self.settings
        how = (
            "the first in file order"
            if s.sample_order == "file"
            else "a seeded class-stratified sample"
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

    def _confusion(self) -> Tensor | None:
        used = self.manifest.get("confusion_used")
        if isinstance(used, dict) and used.get("matrix") is not None:
            return torch.tensor(used["matrix"], dtype=torch.float64)
        return None

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
                    "positive_method": positive[name].method,
                    "probes": traces[name].probes,
                    "method": traces[name].method,
                }
            layers.append(
                {
                    "name": name,
                    "numel": row.numel,
                    "shape": list(row.shape),
                    "distance": row.distance,
                    "reference_source": row.source,
                    "method": form.method,
                    "quadratic_form": {"max": form.max, "mean": form.mean, "argmax": form.argmax},
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
            "epoch": _epoch_of(self.checkpoint.path, self.manifest),
            "layers": layers,
            "top_eigenvalues_all_layers": None
            if whole is None
            else {"values": whole.values, "residuals": whole.residuals},
            "loss": {"train": stats["train_loss"], "eval": stats["eval_loss"], "max": stats["max"]},
            "accuracy": {"train": stats["train_accuracy"], "eval": stats["eval_accuracy"]},
            "generalization_gap": {"loss": gap_loss, "accuracy": gap_acc},
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


def _zeros_merged(top: Eigenvalues, zeros: int, k: int) -> Eigenvalues:
    """The k largest of ``top`` and ``zeros`` exact zero eigenvalues (the blocks of unused layers).

    Exact: an eigenvalue of the used layers below ``top``'s k-th is below every value kept.
    """
    pairs = [*zip(top.values, top.residuals, strict=True), *[(0.0, 0.0)] * min(zeros, k)]
    pairs = sorted(pairs, key=lambda pair: -pair[0])[:k]
    return Eigenvalues(
        [value for value, _ in pairs], [res for _, res in pairs], top.steps, top.exhausted
    )


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
