"""Distributed checkpoints of ``torch.distributed.checkpoint`` (DCP) (docs/inputs.md, "Sharded
checkpoints").

``dcp.save(state, checkpoint_id=DIR)`` writes a directory of ``*.distcp`` shards (one or more per
process) and a ``.metadata`` file (a pickle: every tensor's name, shape, dtype, and where each of
its chunks lies). FSDP and FSDP2 save sharded state dicts this way; a tensor sharded over
processes has one chunk per shard file. Names are flattened: ``{"model": {"fc.weight": W}}`` is
stored as ``model.fc.weight``. Three layouts are read:

- a DCP directory holding a bare state dict, or one under ``"model"`` (accelerate, the FSDP
  examples; other entries such as ``"optimizer"`` are never read);
- Lightning's ``FSDPStrategy(state_dict_type="sharded")`` checkpoint, a directory named like the
  ``.ckpt`` file would be, holding ``{"model": LightningModule.state_dict(), "optimizer_0": ...}``
  as DCP data and the rest of Lightning's checkpoint dict in ``meta.pt`` (epoch, global_step,
  hyper_parameters: :mod:`.lightning`);
- a Hugging Face ``Trainer`` ``checkpoint-N/`` under FSDP's sharded state dict: accelerate's
  ``save_fsdp_model`` writes ``{"model": state_dict}`` to ``checkpoint-N/pytorch_model_fsdp_0/``
  (in-memory names), beside ``trainer_state.json`` (:mod:`.trainer`) and no ``config.json``.

Nothing runs code: ``.metadata`` is read by an unpickler that admits only DCP's metadata classes,
``torch.Size`` and dtypes (``--trust-checkpoint`` lifts this), ``meta.pt`` with
``weights_only=True``, and only tensor entries are ever requested (DCP unpickles other entries
without restriction). The tensors are read in one process without a process group
(``dcp.load(..., no_dist=True)``) into tensors allocated in the model's dtypes, so each is read
once, converted as it is copied (:meth:`DcpReader.load`).

Example:
    >>> import tempfile, torch
    >>> import torch.distributed.checkpoint as dcp
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = dcp.save({"model": {"fc.weight": torch.ones(2, 3)}}, checkpoint_id=root, no_dist=True)
    >>> reader, _ = read_dcp(root, trust=False, label="checkpoint")
    >>> state = reader.load({"fc.weight": torch.zeros(2, 3, dtype=torch.float64)})
    >>> state["fc.weight"].dtype, float(state["fc.weight"].sum())
    (torch.float64, 6.0)
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import load_torch, one_line, pickled_objects, strip_wrappers
from hessfine.analysis.sources.lightning import (
    META_FILE,
    attribute_prefix,
    is_lightning,
    lightning_record,
)
from hessfine.analysis.sources.trainer import trainer_record
from torch import Tensor

METADATA = ".metadata"
SHARD_SUFFIX = ".distcp"
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
NAMESPACES = ("", "model.")
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
        "StorageMeta",
        "MetadataIndex",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}
_PATHS = {  # the checkpoint_id of StorageMeta, as a pure path (one from Windows reads on Linux)
    "PosixPath": PurePosixPath,
    "PurePosixPath": PurePosixPath,
    "WindowsPath": PureWindowsPath,
    "PureWindowsPath": PureWindowsPath,
}


def dcp_directory(directory: Path) -> Path | None:
    """Where the DCP data of a checkpoint directory lies: the directory itself when it holds
    ``.metadata`` or ``*.distcp`` files, its ``pytorch_model_fsdp_0/`` (a Trainer checkpoint),
    else ``None``."""
    if (directory / METADATA).is_file() or any(
        name.endswith(SHARD_SUFFIX) for name in os.listdir(directory)
    ):
        return directory
    trainer = directory / FSDP_MODEL_DIR
    return trainer if trainer.is_dir() else None


def dcp_files(location: Path) -> list[Path]:
    """The files of a DCP directory in sorted name order (what its SHA-256 covers)."""
    return sorted(p for p in location.iterdir() if p.is_file())


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its own classes, ``torch.Size``, dtypes and plain data."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "pathlib" and name in _PATHS:
            return _PATHS[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_metadata(location: Path, *, trust: bool, label: str) -> Any:
    """The ``Metadata`` of the DCP directory ``location``, unpickled without running code unless
    ``trust``; anything else is one line."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = location / METADATA
    if not path.is_file():
        raise InputError(
            f"{label} {location}: {METADATA} is missing beside the {SHARD_SUFFIX} shards; copy "
            "the whole checkpoint directory"
        )
    data = path.read_bytes()
    try:
        metadata = pickle.loads(data) if trust else _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("GLOBAL ") and not trust:
            raise pickled_objects(label, path, str(err).removeprefix("GLOBAL ")) from None
        raise _corrupt(label, path, err) from None
    except Exception as err:  # a truncated or foreign pickle
        raise _corrupt(label, path, err) from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, Metadata) or not isinstance(storage, dict):
        raise _corrupt(label, path, TypeError(f"holds a {type(metadata).__name__}"))
    if not all(isinstance(info, _StorageInfo) for info in storage.values()):
        raise InputError(
            f"{label} {location}: written by a DCP storage writer other than the file-system one; "
            "save it with torch.distributed.checkpoint.FileSystemWriter"
        )
    return metadata


def _corrupt(label: str, path: Path, err: BaseException) -> InputError:
    return InputError(
        f"{label} {path}: not readable DCP metadata ({one_line(err)[:200]}); it is truncated or "
        "corrupt, copy the checkpoint again"
    )


def read_dcp(directory: Path, *, trust: bool, label: str) -> tuple[DcpReader, dict[str, Any]]:
    """The reader of the DCP checkpoint in ``directory`` (its metadata read and checked) and what
    the training tool recorded: a Trainer's ``trainer_state.json``, Lightning's ``meta.pt``."""
    location = dcp_directory(directory) or directory
    metadata = read_metadata(location, trust=trust, label=label)
    training, namespaces = trainer_record(directory), NAMESPACES
    meta = location / META_FILE
    if meta.is_file():
        obj = load_torch(meta, trust=trust, label=label)
        if is_lightning(obj):
            training = lightning_record(obj)
            entries = metadata.state_dict_metadata
            inner = {k.removeprefix("model."): None for k in entries if k.startswith("model.")}
            attribute = attribute_prefix(inner)
            namespaces += () if attribute is None else (f"model.{attribute}",)
    return DcpReader(location, metadata, namespaces, label), training


@dataclass(frozen=True, eq=False)
class DcpReader:
    """A DCP directory with its metadata, ready to read the tensors a model names.

    ``namespaces`` are the prefixes under which the model's names may be stored (``""``,
    ``"model."``, Lightning's ``"model.<attribute>."``); ``label`` names the input in errors.
    """

    directory: Path
    metadata: Any
    namespaces: tuple[str, ...]
    label: str

    def load(
        self, like: Mapping[str, Tensor], *, required: Collection[str] = ()
    ) -> dict[str, Tensor]:
        """The stored tensors of the names in ``like`` (a model's state dict), each read into a
        new tensor of ``like``'s dtype and the stored shape, keyed by ``like``'s names.

        Stored names are matched without the names of PyTorch's wrappers
        (``_orig_mod``, ``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``:
        :func:`~hessfine.analysis.sources.files.strip_wrappers`). The namespace holding most of
        the names is used. Before anything is read, every name in
        ``required`` must be stored with ``like``'s shape, and every shard holding a chunk of a
        requested tensor must be present and long enough; else one line.
        """
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entries = self.metadata.state_dict_metadata.items()
        stored = {k: v for k, v in entries if isinstance(v, TensorStorageMetadata)}
        plain, _ = strip_wrappers({k: k for k in stored})  # name without wrappers → stored name
        space = max(self.namespaces, key=lambda p: sum(p + k in plain for k in like))
        names = {k: plain[space + k] for k in like if space + k in plain}
        self._check_required(like, names, stored, required)
        self._check_shards(set(names.values()))
        targets = {
            fqn: torch.empty(stored[fqn].size, dtype=like[k].dtype) for k, fqn in names.items()
        }
        self._read(targets)
        return {k: targets[fqn] for k, fqn in names.items()}

    def _where(self) -> str:
        return f"{self.label} {self.directory}"

    def _check_required(
        self,
        like: Mapping[str, Tensor],
        names: Mapping[str, str],
        stored: Mapping[str, Any],
        required: Collection[str],
    ) -> None:
        missing = [n for n in required if n not in names]
        if missing:
            example = next(iter(stored), "none")
            raise InputError(
                f"{self._where()} lacks {len(missing)} of the model's {len(required)} parameters "
                f"(first: {missing[0]!r}; it holds e.g. {example!r}): it was saved from another "
                "model; check --model and --model-kwargs"
            )
        for name in required:
            found, wanted = tuple(stored[names[name]].size), tuple(like[name].shape)
            if found != wanted:
                raise InputError(
                    f"{self._where()}: {name!r} has shape {found} but the model's is {wanted}: it "
                    "was saved from another model; match --model and --model-kwargs to it"
                )

    def _check_shards(self, fqns: set[str]) -> None:
        chunks: dict[str, list[Any]] = defaultdict(list)
        for index, info in self.metadata.storage_data.items():
            if index.fqn in fqns:
                chunks[index.fqn].append(info)
        sizes: dict[str, int | None] = {}
        for fqn in sorted(fqns):
            if not chunks[fqn]:
                raise InputError(
                    f"{self._where()}: {METADATA} places no data for {fqn!r}; save it again"
                )
            for info in chunks[fqn]:
                name = info.relative_path
                if name not in sizes:
                    file = self.directory / name
                    sizes[name] = file.stat().st_size if file.is_file() else None
                size = sizes[name]
                if size is None or size < info.offset + info.length:
                    state = "missing" if size is None else "truncated"
                    raise InputError(
                        f"{self._where()}: shard {name} is {state}; copy every {SHARD_SUFFIX} file "
                        "of the checkpoint"
                    )

    def _read(self, targets: dict[str, Tensor]) -> None:
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.api import CheckpointException

        metadata = self.metadata

        class Reader(FileSystemReader):
            """DCP's file reader, given the metadata already read without running code."""

            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                return metadata

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                load(targets, storage_reader=Reader(self.directory), no_dist=True)
        except (Exception, CheckpointException) as err:  # CheckpointException is no Exception
            failures = getattr(err, "failures", None)
            cause = next(iter(failures.values()))[0] if failures else err
            first = one_line(cause).split(". ")[0][:200]  # torch.load's own advice misleads here
            raise InputError(
                f"{self._where()}: cannot read the distributed checkpoint ({first}); a shard is "
                "corrupt, copy the checkpoint again"
            ) from None
