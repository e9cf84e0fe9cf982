"""The demo's units of work — scoring one point of a selection grid, fine-tuning one run,
measuring one checkpoint — and the pool of processes that runs them
(:mod:`hessfine.analysis.demo`).

A unit is a small frozen dataclass that names its inputs by file (the cached pretrained
extractor, the data files the demo wrote), so that it can be sent to another process; its
``run()`` does the work and returns the result. :class:`Pool` runs a list of units on ``jobs``
processes (started with ``spawn``: nothing of the parent's thread pools is forked), or in this
process for ``jobs = 1``, each unit on one intra-op thread, and returns the results in the order
of the list. Every unit is deterministic on one thread, so what the demo writes does not depend
on ``jobs``; only the time does. The pool counts the CPU time its worker processes spent, so
that the demo can report the CPU time of all its processes.

Example:
    >>> with Pool(jobs=1) as pool:                                  # doctest: +SKIP
    ...     scores = pool.run([ScorePoint(...), ...], "selecting", quiet=True)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from hessfine.analysis.data import LabeledData, load_data
from hessfine.analysis.errors import InputError
from hessfine.analysis.measure import MeasureSettings, measure_path
from hessfine.finetune.digit_networks import digits_resnet
from hessfine.finetune.methods import FinetuneConfig
from hessfine.finetune.run_directory import RunResult, finetune_run
from hessfine.finetune.selection import Score, score_point
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm import tqdm

__all__ = [
    "MODEL_SPEC",
    "NUM_CLASSES",
    "TARGET_TEST",
    "MeasureCheckpoint",
    "ModelSource",
    "Pool",
    "ScorePoint",
    "TrainRun",
    "available_cores",
    "build_model",
    "one_thread",
]

MODEL_SPEC = "hessfine.finetune.digit_networks:digits_resnet"
TARGET_TEST = "digits28:test"
NUM_CLASSES = 10


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: the work is small (28×28 images, a few hundred examples), so more
    threads gain nothing, and on a busy machine their spinning costs far more than it saves.
    The caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_model(seed: int, width: int) -> nn.Module:
    """The demo's network (:data:`MODEL_SPEC`), initialised with ``seed`` (the caller's random
    state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return digits_resnet(num_classes=NUM_CLASSES, width=width)


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=32)
def _data(stamp: tuple[str, int, int]) -> LabeledData:
    return load_data(stamp[0])


@lru_cache(maxsize=4)
def _tensors(stamp: tuple[str, int, int]) -> dict[str, Tensor]:
    return load_file(stamp[0])


def read_data(path: Path | str) -> LabeledData:
    """A data file or built-in set, read once per process (again when the file changes)."""
    path = Path(path)
    return _data(_stamp(path) if path.exists() else (str(path), 0, 0))


@dataclass(frozen=True)
class ModelSource:
    """The network to fine-tune: initialised with ``seed``, the extractor of ``reference``."""

    seed: int
    width: int
    reference: Path

    def model(self) -> nn.Module:
        return build_model(self.seed, self.width)

    def state(self) -> dict[str, Tensor]:
        return _tensors(_stamp(self.reference))


@dataclass(frozen=True)
class ScorePoint:
    """One point of a method's selection grid: fine-tune on ``train`` (the labels trained on;
    the clean labels in ``clean``) with ``config`` and score on ``validation``
    (:func:`hessfine.finetune.selection.score_point`)."""

    source: ModelSource
    config: FinetuneConfig
    options: tuple[tuple[str, float | int], ...]
    train: Path
    clean: Path
    validation: Path

    def run(self) -> Score:
        train, clean, validation = (read_data(p) for p in (self.train, self.clean, self.validation))
        return score_point(
            self.source.model(),
            self.source.state(),
            train_x=train.x,
            train_y=train.y,
            val_x=validation.x,
            val_y=validation.y,
            config=self.config,
            options=dict(self.options),
            train_y_clean=clean.y,
        )


@dataclass(frozen=True)
class TrainRun:
    """One fine-tuning run written to ``out_dir`` (:func:`hessfine.finetune.run_directory.finetune_run`):
    trained on ``train`` (clean labels in ``clean``), tested on the target test set. ``run()``
    returns the run, or a line saying why it failed (a divergence, a singular estimate)."""

    source: ModelSource
    config: FinetuneConfig
    train: Path
    clean: Path
    out_dir: Path
    data: Mapping[str, Any]
    label_noise: Mapping[str, Any] | None = None
    selection: Mapping[str, Any] | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def run(self) -> RunResult | str:
        train, clean, test = read_data(self.train), read_data(self.clean), read_data(TARGET_TEST)
        try:
            return finetune_run(
                self.source.model(),
                self.source.state(),
                train_x=train.x,
                train_y_noisy=train.y,
                train_y_clean=clean.y,
                eval_x=test.x,
                eval_y=test.y,
                config=self.config,
                out_dir=self.out_dir,
                model_spec=MODEL_SPEC,
                model_kwargs=dict(self.model_kwargs),
                reference_path=str(self.source.reference),
                data=dict(self.data),
                label_noise=None if self.label_noise is None else dict(self.label_noise),
                overwrite=True,
                selection=None if self.selection is None else dict(self.selection),
            )
        except (FloatingPointError, ValueError) as err:
            return " ".join(str(err).split())


@dataclass(frozen=True)
class MeasureCheckpoint:
    """``hessfine measure`` of one checkpoint into ``out`` with ``settings``, on the data file
    it was trained on and the target test set. ``run()`` returns the files written, or a line
    naming the checkpoint and the error (an error here is the demo's own fault)."""

    checkpoint: Path
    out: Path
    settings: MeasureSettings
    reference: Path
    data: Path
    model_kwargs: Mapping[str, Any]

    def run(self) -> list[Path] | str:
        try:
            return measure_path(
                self.checkpoint,
                out=self.out,
                settings=self.settings,
                reference=str(self.reference),
                data=str(self.data),
                eval_data=TARGET_TEST,
                model=MODEL_SPEC,
                model_kwargs=dict(self.model_kwargs),
            )
        except InputError as err:
            return f"measuring {self.checkpoint} failed: {err}"


class Unit(Protocol):
    def run(self) -> Any: ...


def _work(unit: Unit) -> tuple[Any, float]:
    """Run ``unit`` on one thread; its result and the CPU seconds it took."""
    start = time.process_time()
    with one_thread():
        result = unit.run()
    return result, time.process_time() - start


def _start_worker() -> None:
    torch.set_num_threads(1)


class Pool:
    """Runs units of work on ``jobs`` processes (module docs); a context manager that stops its
    processes on exit. ``worker_cpu`` is the CPU time the worker processes have spent."""

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise InputError(f"--jobs {jobs}: give a number of processes ≥ 1")
        self.jobs = jobs
        self.worker_cpu = 0.0
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def run(self, units: Sequence[Unit], desc: str, quiet: bool) -> list[Any]:
        """The results of ``units``, in their order."""
        bar = tqdm(
            total=len(units), desc=desc, unit="run", disable=quiet or not sys.stderr.isatty()
        )
        with bar:
            if self.jobs == 1 or len(units) <= 1:
                results = []
                for unit in units:
                    results.append(_work(unit)[0])
                    bar.update()
                return results
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.jobs,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                )
            futures = [self._executor.submit(_work, unit) for unit in units]
            for _ in as_completed(futures):
                bar.update()
            done = [f.result() for f in futures]
        self.worker_cpu += sum(cpu for _, cpu in done)
        return [result for result, _ in done]
