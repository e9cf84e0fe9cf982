"""Checkpoints that distributed training writes as directories of shards, one entry point for
:mod:`hessfine.analysis.checkpoints` and :mod:`.run_collections` (docs/inputs.md, "Sharded
checkpoints"): distributed checkpoints (:mod:`.dcp`: FSDP, accelerate, Lightning, a Trainer's
``pytorch_model_fsdp_0/``) and DeepSpeed ZeRO checkpoints (:mod:`.deepspeed`).

Such a directory is one checkpoint unless it holds Hugging Face weights (:mod:`.hf`), which are
read instead. A DCP checkpoint's tensors are read only once the model is known
(:attr:`ShardedCheckpoint.reader`, :func:`hessfine.analysis.checkpoints.materialize`); a ZeRO
checkpoint's are read at once. A file inside such a directory is not a checkpoint of its own.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> is_sharded(root), (root / ".metadata").write_bytes(b""), is_sharded(root)
    (False, 0, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.dcp import DcpReader, dcp_directory, dcp_files, read_dcp
from hessfine.analysis.sources.deepspeed import (
    holds_model_states,
    model_states_file,
    read_zero,
    zero_tag,
)
from hessfine.analysis.sources.files import sha256_of
from hessfine.analysis.sources.hf import hf_weights
from torch import Tensor


@dataclass(frozen=True, eq=False)
class ShardedCheckpoint:
    """A sharded checkpoint: ``path`` is the DCP directory or the ZeRO model states file read,
    ``sha256`` that of its files; ``state`` is empty while ``reader`` holds DCP data not yet
    read."""

    path: Path
    sha256: str
    training: dict[str, Any]
    state: dict[str, Tensor] = field(default_factory=dict)
    reader: DcpReader | None = None


def is_sharded(directory: Path) -> bool:
    """Whether ``directory`` is one DCP or DeepSpeed checkpoint (without Hugging Face weights)."""
    if hf_weights(directory, os.listdir(directory)) is not None:
        return False
    return dcp_directory(directory) is not None or zero_tag(directory) is not None


def read_sharded(directory: Path, *, trust: bool, label: str) -> ShardedCheckpoint:
    """The checkpoint in ``directory``, a sharded one (:func:`is_sharded`)."""
    if dcp_directory(directory) is not None:
        reader, training = read_dcp(directory, trust=trust, label=label)
        digest = sha256_of(dcp_files(reader.directory))
        return ShardedCheckpoint(reader.directory, digest, training, reader=reader)
    file, state, training = read_zero(directory, trust=trust, label=label)
    return ShardedCheckpoint(file, sha256_of([file]), training, state=state)


def sharded_digest(directory: Path, *, label: str) -> str:
    """The ``sha256`` that :func:`read_sharded` would record, without reading tensors."""
    location = dcp_directory(directory)
    if location is not None:
        return sha256_of(dcp_files(location))
    return sha256_of([model_states_file(directory, label=label)])


def refuse_shard_file(file: Path, *, label: str) -> None:
    """One line when ``file`` lies inside a sharded checkpoint (a ``.distcp`` shard, Lightning's
    ``meta.pt``, a ZeRO model states file): the directory is the checkpoint."""
    parent = file.parent
    if dcp_directory(parent) == parent or holds_model_states(parent):
        raise InputError(
            f"{label} {file} is part of the sharded checkpoint {parent}; pass that directory"
        )
