"""``hessfine demo``: the whole pipeline end to end on scikit-learn's handwritten digits.

Nothing is downloaded: the 8×8 digits ship with scikit-learn (``digits:train``/``digits:test``
of :mod:`hessfine.analysis.data`, 1,297/500 images). The demo builds a transfer problem in the paper's
setting (Ju, Li & Zhang, ICML 2022: fine-tuning a pretrained network on a small target set with
noisy labels):

1. **source task** — the training images of digits 0–4; a :func:`hessfine.finetune.models.digits_cnn`
   with five outputs is trained on them (plain cross-entropy). Its feature extractor (every
   tensor except the classifier ``head``) is saved as ``pretrained.safetensors``: the pretrained
   checkpoint W^(s). The head is left out because the target classes are new, so the fine-tuned
   head is a *new head*, measured from zero as in the paper's code (SPEC §3.3) and constrained
   around zero by the distance-constrained methods (:mod:`hessfine.finetune.methods`).
2. **target task** — digits 5–9 relabelled 0–4: a small training set (``n_train`` images drawn
   from the training split, fixed seed) whose labels are flipped with symmetric class-conditional
   noise (``noise_rate``, the true flip rate), and the clean test images of digits 5–9 for
   evaluation. Both are written as ``data/train.pt`` and ``data/test.pt`` (dicts with ``x``,
   ``y``) so that ``hessfine measure`` reads them like any user data; ``data/train_clean.pt``
   holds the clean training labels.
3. **fine-tuning** — one run directory per method under ``runs/`` (:func:`hessfine.finetune.runs.finetune_run`);
   the consistent loss of ``consistent`` and ``robust`` (the paper's algorithm) uses the known F.
4. **measurement** — ``hessfine measure`` on the final checkpoint of every run (the best epoch of
   ``early-stopping``) and, in the full demo, on intermediate epochs too, with the noisy training
   set as the data of the bound (n = ``n_train``) and the clean test set for the gap;
   ``measurements/METHOD/epoch_XXX/measurement.json``.
5. **comparison** — ``hessfine compare`` into ``comparison/`` (tables, correlations, figures);
   the overview figure is copied to ``figure.png``.

The generalization gap here is test loss (clean labels) minus training loss on the labels trained
on (noisy): a method that refuses to fit the flipped labels can have a negative gap.

``--quick`` trains three methods (plain, distance-constraint, robust) and measures only their
final checkpoints, without traces or noise stability; the full demo trains seven methods and
measures every tenth epoch with traces (hence the trace corollary) and noise stability.

Example:
    >>> result = run_demo(Path("hessfine-demo"), quick=True)      # doctest: +SKIP
    >>> print(result.table)                                        # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.compare import compare
from hessfine.analysis.data import load_data
from hessfine.analysis.errors import InputError
from hessfine.figures.tables import Row, finite
from hessfine.finetune.label_noise import corrupt_labels, symmetric_confusion
from hessfine.finetune.methods import CONSISTENT_METHODS, FinetuneConfig, finetune
from hessfine.finetune.models import digits_cnn
from hessfine.finetune.runs import RunResult, checkpoint_name, finetune_run
from safetensors.torch import save_file
from torch import Tensor

MODEL_SPEC = "hessfine.finetune.models:digits_cnn"
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
FULL_METHODS = (
    "plain",
    "early-stopping",
    "l2-sp",
    "label-smoothing",
    "consistent",
    "distance-constraint",
    "robust",
)
QUICK_METHODS = ("plain", "distance-constraint", "robust")
#: Step sizes of the consistent-loss methods. The backward-corrected loss has negative weights
#: (F⁻¹ off the diagonal), so it is unbounded below: with the step size of the other methods it
#: diverges on this task unless the distance constraint bounds the weights, and even then a
#: smaller step gives the better test accuracy (seed 0: test accuracy 0.70 at 0.001 against 0.34
#: at 0.005 for ``consistent``; 0.71 at 0.005 against 0.65 at 0.01 for ``robust``).
CONSISTENT_LR = {"consistent": 0.001, "robust": 0.005}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of one demo mode."""

    methods: tuple[str, ...]
    width: int
    pretrain_epochs: int
    epochs: int
    n_train: int
    noise_rate: float
    lr: float
    radius: float
    head_radius: float
    measure_every: int | None
    samples: int | None
    trace: bool
    noise_sigmas: tuple[float, ...]
    noise_draws: int


QUICK = DemoSettings(
    methods=QUICK_METHODS,
    width=16,
    pretrain_epochs=10,
    epochs=40,
    n_train=200,
    noise_rate=0.3,
    lr=0.02,
    radius=1.0,
    head_radius=1.5,
    measure_every=None,
    samples=None,
    trace=False,
    noise_sigmas=(),
    noise_draws=0,
)
FULL = replace(
    QUICK,
    methods=FULL_METHODS,
    measure_every=10,
    trace=True,
    noise_sigmas=(0.003, 0.01, 0.03),
    noise_draws=16,
)


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote: run directories, measurements, the comparison and the timings."""

    out: Path
    runs: dict[str, Path]
    measurements: list[Path]
    comparison: Path
    figure: Path | None
    rows: list[Row]
    table: str
    seconds: dict[str, float]


@dataclass(frozen=True)
class TargetData:
    """The target task: noisy and clean training labels, clean test set, and the file paths."""

    train_x: Tensor
    train_y_noisy: Tensor
    train_y_clean: Tensor
    test_x: Tensor
    test_y: Tensor
    train_file: Path
    test_file: Path


def _subset(x: Tensor, y: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Examples of ``classes`` (in file order) relabelled 0..len(classes)−1."""
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def _save_data(path: Path, x: Tensor, y: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x.contiguous(), "y": y.contiguous()}, path)
    return path


def target_data(out: Path, settings: DemoSettings, seed: int) -> TargetData:
    """Draw the target training set, corrupt its labels and write ``data/*.pt`` (module docs)."""
    train, test = load_data("digits:train"), load_data("digits:test")
    x, y = _subset(train.x, train.y, TARGET_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(y), generator=generator)[: settings.n_train].sort().values
    x, y = x[pick], y[pick]
    confusion = symmetric_confusion(len(TARGET_CLASSES), settings.noise_rate)
    noisy = corrupt_labels(y, confusion, generator=generator)
    test_x, test_y = _subset(test.x, test.y, TARGET_CLASSES)
    data = out / "data"
    _save_data(data / "train_clean.pt", x, y)
    return TargetData(
        x,
        noisy,
        y,
        test_x,
        test_y,
        _save_data(data / "train.pt", x, noisy),
        _save_data(data / "test.pt", test_x, test_y),
    )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run with one intra-op thread. The work is tiny (8×8 images, at most 200 examples per
    measurement), so more threads gain nothing, and on a busy machine their spinning costs
    orders of magnitude: on a 2-core machine under load, one measurement of the quick demo took
    0.2 s with one thread and 9–16 s with two, one training step 2.3 ms against 280 ms. The
    caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def pretrain(out: Path, settings: DemoSettings, seed: int) -> tuple[Path, dict[str, Tensor]]:
    """Train the source model on digits 0–4; save and return its feature extractor."""
    train = load_data("digits:train")
    x, y = _subset(train.x, train.y, SOURCE_CLASSES)
    with _seeded(seed):
        model = digits_cnn(num_classes=len(SOURCE_CLASSES), width=settings.width)
    config = FinetuneConfig("plain", epochs=settings.pretrain_epochs, lr=0.05, seed=seed)
    with _one_thread():
        finetune(model, {}, train_x=x, train_y=y, config=config)
    reference = {
        k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("head.")
    }
    path = out / "pretrained.safetensors"
    save_file(reference, str(path), metadata={"source_classes": json.dumps(SOURCE_CLASSES)})
    return path, reference


def method_config(method: str, settings: DemoSettings, seed: int) -> FinetuneConfig:
    """The fine-tuning settings of one method in the demo."""
    options: dict[str, Any] = {
        "epochs": settings.epochs,
        "lr": settings.lr,
        "batch_size": 32,
        "radius": settings.radius,
        "head_radius": settings.head_radius,
        "seed": seed,
        "save_every": settings.measure_every or settings.epochs,
    }
    if method in CONSISTENT_METHODS:
        confusion = symmetric_confusion(len(TARGET_CLASSES), settings.noise_rate)
        options["confusion"] = tuple(tuple(row) for row in confusion.tolist())
    options["lr"] = CONSISTENT_LR.get(method, settings.lr)
    return FinetuneConfig(method, **options)


def finetune_all(
    out: Path,
    settings: DemoSettings,
    seed: int,
    reference_path: Path,
    reference: dict[str, Tensor],
    data: TargetData,
) -> dict[str, RunResult]:
    """One run directory per method under ``out/runs``."""
    runs = {}
    model_kwargs = {"num_classes": len(TARGET_CLASSES), "width": settings.width}
    for method in settings.methods:
        with _seeded(seed + 1):
            model = digits_cnn(**model_kwargs)
        with _one_thread():
            runs[method] = finetune_run(
                model,
                reference,
                train_x=data.train_x,
                train_y_noisy=data.train_y_noisy,
                train_y_clean=data.train_y_clean,
                eval_x=data.test_x,
                eval_y=data.test_y,
                config=method_config(method, settings, seed),
                out_dir=out / "runs" / method,
                model_spec=MODEL_SPEC,
                model_kwargs=model_kwargs,
                reference_path=str(reference_path),
                data={"train": str(data.train_file), "eval": str(data.test_file)},
                label_noise={
                    "kind": "symmetric",
                    "rate": settings.noise_rate,
                    "confusion_matrix": symmetric_confusion(
                        len(TARGET_CLASSES), settings.noise_rate
                    ).tolist(),
                },
                overwrite=True,
            )
    return runs


def checkpoints_to_measure(run: RunResult, settings: DemoSettings) -> list[Path]:
    """The final checkpoint (best epoch of early stopping) and, in the full demo, the saved
    intermediate epochs."""
    final_epoch = run.manifest.get("best_epoch") or max(
        entry["epoch"] for entry in run.manifest["checkpoints"]
    )
    chosen = [run.directory / checkpoint_name(final_epoch)]
    if settings.measure_every is not None:
        chosen += [p for p in run.checkpoints if p not in chosen]
    return sorted(chosen)


def measure_argv(
    checkpoint: Path,
    reference: Path,
    data: TargetData,
    out_dir: Path,
    settings: DemoSettings,
    seed: int,
) -> list[str]:
    """Arguments of ``hessfine measure`` for one checkpoint of the demo."""
    argv = [
        "measure",
        str(checkpoint),
        "--reference",
        str(reference),
        "--data",
        str(data.train_file),
        "--eval-data",
        str(data.test_file),
        "--out",
        str(out_dir),
        "--model",
        MODEL_SPEC,
        "--model-kwargs",
        json.dumps({"num_classes": len(TARGET_CLASSES), "width": settings.width}),
        "--samples",
        "all" if settings.samples is None else str(settings.samples),
        "--device",
        "cpu",
        "--seed",
        str(seed),
        "--quiet",
    ]
    if settings.trace:
        argv.append("--trace")
    if settings.noise_sigmas:
        argv += ["--noise-sigma", *map(str, settings.noise_sigmas)]
        argv += ["--noise-draws", str(settings.noise_draws)]
    return argv


def measure_all(
    out: Path,
    runs: dict[str, RunResult],
    reference: Path,
    data: TargetData,
    settings: DemoSettings,
    seed: int,
) -> list[Path]:
    """Measure the chosen checkpoints of every run; return the measurement files."""
    from hessfine.analysis.cli import main

    files = []
    for method, run in runs.items():
        for checkpoint in checkpoints_to_measure(run, settings):
            directory = out / "measurements" / method / checkpoint.stem
            argv = measure_argv(checkpoint, reference, data, directory, settings, seed)
            with _one_thread():
                status = main(argv)
            if status != 0:
                raise RuntimeError(f"hessfine {' '.join(argv)} exited with status {status}")
            files.append(directory / "measurement.json")
    return files


def _cell(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if finite(value) else "-"


def summary_table(rows: Sequence[Row]) -> str:
    """Method, epoch, train/test accuracy, gap, Hessian distance measure and the Theorem 2.1
    bound next to the test loss, for the final measured checkpoint of every method."""
    final: dict[str, Row] = {}
    for row in rows:
        method = str(row.get("method"))
        if method not in final or _later(row, final[method]):
            final[method] = row
    order = {m: i for i, m in enumerate(FULL_METHODS)}
    final = dict(sorted(final.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))
    header = (
        f"{'method':<20} {'epoch':>5} {'train acc':>9} {'test acc':>8} {'gap':>7} "
        f"{'Hessian':>8} {'bound':>7} {'test loss':>9}"
    )
    lines = [header, "-" * len(header)]
    for method, row in final.items():
        lines.append(
            f"{method:<20} {_cell(row.get('epoch'), 0):>5} {_cell(row.get('train_accuracy')):>9} "
            f"{_cell(row.get('eval_accuracy')):>8} {_cell(row.get('generalization_gap_loss')):>7} "
            f"{_cell(row.get('hessian_distance_measure')):>8} "
            f"{_cell(row.get('theorem_2_1')):>7} {_cell(row.get('eval_loss')):>9}"
        )
    lines.append("train acc: on the noisy training labels; gap: test − train loss;")
    lines.append(
        "Hessian: Σ_i sqrt(C·𝓗_i/n); bound: Theorem 2.1 (train loss + Hessian), vs the test loss"
    )
    return "\n".join(lines)


def _later(row: Row, current: Row) -> bool:
    """Whether ``row`` is nearer the end of its run: the final model first, then the epoch."""

    def rank(r: Row) -> tuple[int, float]:
        epoch = r.get("epoch")
        return (r.get("final_checkpoint") == 1, epoch if finite(epoch) else -1.0)

    return rank(row) > rank(current)


def run_demo(out: Path, *, quick: bool, seed: int = 0) -> DemoResult:
    """Run the demo into ``out`` (module docs); return what it wrote."""
    settings = QUICK if quick else FULL
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def lap(name: str) -> None:
        seconds[name] = time.perf_counter() - start - sum(seconds.values())

    data = target_data(out, settings, seed)
    reference_path, reference = pretrain(out, settings, seed)
    lap("pretrain_s")
    runs = finetune_all(out, settings, seed, reference_path, reference, data)
    lap("finetune_s")
    shutil.rmtree(out / "measurements", ignore_errors=True)  # results of an earlier demo here
    shutil.rmtree(out / "comparison", ignore_errors=True)
    files = measure_all(out, runs, reference_path, data, settings, seed)
    lap("measure_s")
    comparison = compare(
        [out / "measurements"], out / "comparison", formats=("png",) if quick else ("png", "pdf")
    )
    overview = out / "comparison" / "overview.png"
    figure = None
    if overview.is_file():
        figure = out / "figure.png"
        shutil.copyfile(overview, figure)
    lap("compare_s")
    seconds["total_s"] = time.perf_counter() - start
    return DemoResult(
        out=out,
        runs={m: r.directory for m, r in runs.items()},
        measurements=files,
        comparison=out / "comparison" / "comparison.csv",
        figure=figure,
        rows=comparison.rows,
        table=summary_table(comparison.rows),
        seconds=seconds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hessfine demo``."""
    parser.description = (
        "Run everything end to end on scikit-learn's handwritten digits (no downloads): "
        "pretrain a small CNN on digits 0-4, fine-tune it on a small noisy-label set of digits "
        "5-9 with several methods, measure the Hessian quantities and bounds of every run, and "
        "compare them with the measured generalization gaps (tables and figures)."
    )
    parser.epilog = (
        "examples:\n"
        "  hessfine demo --quick              # three methods, final checkpoints: about 20 s\n"
        "  hessfine demo --out results/demo   # seven methods, every 10th epoch, traces and\n"
        "                                     # noise stability: about 2 minutes on 2 CPU cores\n"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--quick",
        action="store_true",
        help="three methods, final checkpoints only, no traces or noise stability",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("hessfine-demo"),
        metavar="DIR",
        help="output directory (default ./hessfine-demo)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine demo``; print the summary table and where the results are; return 0."""
    result = run_demo(args.out, quick=args.quick, seed=args.seed)
    print(result.table)
    print(
        f"\n{len(result.measurements)} measurements of {len(result.runs)} runs in "
        f"{result.seconds['total_s']:.0f} s → {result.out}"
    )
    print(f"  tables and figures: {result.comparison.parent}")
    if result.figure is not None:
        print(f"  overview figure:    {result.figure}")
    sys.stdout.flush()
    return 0
