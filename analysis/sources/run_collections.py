"""Directories of runs: every checkpoint below a directory (docs/inputs.md, "Directories of runs").

:func:`find_checkpoints` lists every weights file below a directory, recursively (one per saved
epoch of every run), except that a Hugging Face layout directory (:mod:`.hf`) or a PEFT adapter
directory (:mod:`.peft`) counts as one checkpoint and is not descended into, a Trainer output
directory (:mod:`.trainer`) contributes its ``checkpoint-N/`` sub-directories only, a
Lightning ``last.ckpt`` that repeats a numbered checkpoint is dropped (:mod:`.lightning`), and
in a timm output directory each distinct ``.pth.tar`` counts once, without the recovery files
(:mod:`.timm_runs`). Hidden
entries and well-known non-weight files (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state*.pth``, ``training_args.bin``) are skipped. :func:`is_run_collection` tells a
directory of runs from one checkpoint directory. A sharded checkpoint directory (:mod:`.sharded`:
DCP, DeepSpeed ZeRO) is one checkpoint too, not descended into.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("epoch_10.pt", "epoch_2.pt", "optimizer.pt"):
    ...     _ = (root / name).write_bytes(b"")
    >>> [p.name for p in find_checkpoints(root)], is_run_collection(root)
    (['epoch_2.pt', 'epoch_10.pt'], True)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import WEIGHT_SUFFIXES
from hessfine.analysis.sources.hf import hf_weights
from hessfine.analysis.sources.lightning import drop_repeated_last
from hessfine.analysis.sources.manifest import read_manifest
from hessfine.analysis.sources.peft import adapter_file
from hessfine.analysis.sources.sharded import is_sharded
from hessfine.analysis.sources.timm_runs import distinct_timm_files
from hessfine.analysis.sources.trainer import trainer_checkpoints

NOT_WEIGHTS = frozenset(
    {
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scheduler.bin",
        "scaler.pt",
        "training_args.bin",
    }
)


def find_checkpoints(directory: str | Path) -> list[Path]:
    """Every checkpoint under ``directory``: weights files, Hugging Face layout and PEFT adapter
    directories, timm's files once per content (module docs).

    Sorted by relative path in natural order (``epoch_2`` before ``epoch_10``), so the list is
    stable across runs and file systems.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; pass a directory of runs")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        trainer = trainer_checkpoints(here, dirnames)
        if trainer:
            dirnames[:] = trainer
            continue
        if hf_weights(here, filenames) or adapter_file(here) or is_sharded(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(here / f for f in filenames if is_weights_name(f))
    found = distinct_timm_files(drop_repeated_last(found))
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def is_run_collection(path: str | Path) -> bool:
    """Whether ``path`` is a directory of runs rather than one checkpoint (module docs)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    names = os.listdir(path)
    if "checkpoint" in read_manifest(path) or adapter_file(path):
        return False
    if trainer_checkpoints(path, names):
        return True
    if hf_weights(path, names) or is_sharded(path):
        return False
    found = find_checkpoints(path)
    return bool(found) and not (len(found) == 1 and found[0].parent == path and found[0].is_file())


def is_weights_name(name: str) -> bool:
    """Whether a file name is a weights file (not an optimizer, scheduler or RNG state)."""
    return (
        name.endswith(WEIGHT_SUFFIXES)
        and not name.startswith((".", "rng_state"))
        and name not in NOT_WEIGHTS
    )


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key with digit runs compared as numbers (``epoch_2`` before ``epoch_10``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]
