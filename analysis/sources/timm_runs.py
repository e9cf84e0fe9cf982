"""timm's ``train.py`` output directories (docs/inputs.md, "timm").

timm's ``CheckpointSaver`` (``timm/utils/checkpoint_saver.py``) writes into the run's output
directory after every epoch E (0-based) ``last.pth.tar``, and keeps ``checkpoint-E.pth.tar``
while it ranks among the ``--checkpoint-hist`` best by the eval metric, ``model_best.pth.tar``
(the best so far) and ``milestone-N.pth.tar`` snapshots. These are hard links to one file where
the file system allows, else copies; each distinct content is one checkpoint, under its
``checkpoint-N`` name where it has one (:func:`distinct_timm_files`). ``recovery-E-B.pth.tar`` (mid-epoch states for resuming) and the
``tmp.pth.tar``/``recovery_tmp.pth.tar`` being written are not checkpoints. ``summary.csv`` has
one row per epoch: ``epoch``, ``train_loss``, ``eval_loss``, ``eval_top1``, ``eval_top5``,
``lr`` (:func:`summary_row`).

A checkpoint is a dict: ``state_dict`` (the raw weights), ``state_dict_ema`` (the EMA weights,
with ``--model-ema``), ``epoch``, ``arch`` (the model's name), ``optimizer``, ``version`` (2;
older files stored the next epoch), ``metric``, ``args`` (the options, an
``argparse.Namespace``: read without ``--trust-checkpoint``, see
:data:`hessfine.analysis.sources.files.SAFE_GLOBALS`) and the saver's bookkeeping.
:func:`read_timm` takes the raw weights by default, as timm's ``validate.py`` and
``resume_checkpoint`` do (``timm.models.load_checkpoint`` prefers the EMA weights), or the EMA
weights.

Example:
    >>> import argparse
    >>> record = timm_record({"state_dict": {}, "epoch": 2, "arch": "resnet10t", "version": 2,
    ...                       "metric": 61.5, "args": argparse.Namespace(lr=0.1)},
    ...                      "raw", Path("absent/summary.csv"))
    >>> record["epoch"], record["arch"], record["args"], record["summary"]
    (2, 'resnet10t', {'lr': 0.1}, {})
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import (
    json_safe,
    load_torch,
    one_line,
    sha256_of,
    state_of,
    strip_prefixes,
)
from torch import Tensor

TimmWeights = Literal["raw", "ema"]
TIMM_WEIGHTS: tuple[TimmWeights, ...] = ("raw", "ema")
TIMM_SUFFIX = ".pth.tar"
SUMMARY = "summary.csv"
_TRANSIENT = re.compile(r"(recovery[-_].*|tmp)\.pth\.tar")
_COPIES = (
    re.compile(r"milestone-\d+\.pth\.tar"),
    re.compile(r"model_best\.pth\.tar"),
    re.compile(r"last\.pth\.tar"),
)


def is_timm(obj: object) -> bool:
    """Whether a loaded ``.pth.tar`` object has the layout of timm's ``CheckpointSaver``."""
    return isinstance(obj, Mapping) and {"state_dict", "epoch", "arch"} <= set(map(str, obj))


def read_timm(
    file: Path, *, weights: TimmWeights, trust: bool, label: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights of a ``.pth.tar`` file (prefixes stripped) and timm's record of it
    (:func:`timm_record`): its ``state_dict``, or ``state_dict_ema`` for ``weights="ema"``. A
    file not laid out by timm is read as any weights file, with an empty record."""
    obj = load_torch(file, trust=trust, label=label)
    if not is_timm(obj):
        return strip_prefixes(state_of(obj, file, label)), {}
    chosen = obj.get("state_dict_ema" if weights == "ema" else "state_dict")
    if chosen is None and weights == "ema":
        raise InputError(
            f"{label} {file} holds no EMA weights (state_dict_ema: timm's train.py saves them "
            "with --model-ema); drop --timm-weights ema"
        )
    state = strip_prefixes(state_of(chosen, file, label))
    return state, timm_record(obj, weights, file.parent / SUMMARY)


def timm_record(obj: Mapping[str, Any], weights: TimmWeights, summary: Path) -> dict[str, Any]:
    """``{"tool", "epoch", "arch", "weights", "metric", "args", "summary"}`` of a timm
    checkpoint, JSON-safe: ``epoch`` is the 0-based epoch saved (one less than a file before
    ``version`` 2 stores), ``summary`` that epoch's row of ``summary`` (:func:`summary_row`)."""
    epoch, version, metric, args = (obj.get(k) for k in ("epoch", "version", "metric", "args"))
    if not _is_int(epoch):
        epoch = None
    elif not (_is_int(version) and version >= 2):
        epoch -= 1
    return {
        "tool": "timm",
        "epoch": epoch,
        "arch": str(obj["arch"]),
        "weights": weights,
        "metric": _finite(metric),
        "args": json_safe(vars(args) if isinstance(args, argparse.Namespace) else args),
        "summary": summary_row(summary, epoch),
    }


def summary_row(path: Path, epoch: int | None) -> dict[str, float]:
    """The finite numbers but ``epoch`` of the row of timm's ``summary.csv`` for ``epoch`` (the
    last such row; a resumed run may repeat the header), ``{}`` when there is none."""
    if epoch is None or not path.is_file():
        return {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(
            f"{path} is not a readable CSV file ({one_line(err)}); repair or remove it"
        ) from None
    header: list[str] = []
    found: dict[str, float] = {}
    for row in rows:
        if row[:1] == ["epoch"]:
            header = row
        elif header and row and _finite(row[0]) == epoch:
            cells = zip(header[1:], row[1:], strict=False)
            found = {k: number for k, v in cells if (number := _finite(v)) is not None}
    return found


def distinct_timm_files(paths: Sequence[Path]) -> list[Path]:
    """``paths`` without timm's recovery and temporary files, and without each
    ``milestone-N``, ``model_best`` or ``last`` ``.pth.tar`` that holds the same bytes (a hard
    link or a copy) as a file kept before it in its directory: first the files saved once
    (``checkpoint-N``), then those names in that order."""
    kept = [p for p in paths if not p.name.endswith(TIMM_SUFFIX)]
    directories: dict[Path, list[Path]] = {}
    for path in paths:
        if path.name.endswith(TIMM_SUFFIX) and not _TRANSIENT.fullmatch(path.name):
            directories.setdefault(path.parent, []).append(path)
    digests: dict[Path, str] = {}

    def same(a: Path, b: Path) -> bool:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        for file in (a, b):
            if file not in digests:
                digests[file] = sha256_of([file])
        return digests[a] == digests[b]

    for files in directories.values():
        distinct: list[Path] = []
        for file in sorted(files, key=lambda f: (_copy_rank(f), f.name)):
            if not (_copy_rank(file) and any(same(file, other) for other in distinct)):
                distinct.append(file)
        kept.extend(distinct)
    return kept


def _copy_rank(path: Path) -> int:
    """0 for a file timm saves once, else 1 + the place of its name in :data:`_COPIES`."""
    return next((i + 1 for i, p in enumerate(_COPIES) if p.fullmatch(path.name)), 0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> float | None:
    """``value`` (a number or its text) as a finite float, else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
