"""Weights files: ``.safetensors``, ``torch.save`` files and sharded checkpoints
(docs/inputs.md, "Checkpoints").

``.safetensors`` is read with :func:`safetensors.torch.load_file`; ``.pt/.pth/.bin/.ckpt`` and
timm's ``.pth.tar`` with ``torch.load(map_location="cpu", weights_only=True)``, which refuses
pickled Python objects (code) other than the plain-data :data:`SAFE_GLOBALS` (an
``argparse.Namespace``) unless the user passes ``--trust-checkpoint`` (``trust=True``: ``weights_only=False``, and
a pickled whole ``nn.Module`` is accepted). A state dict nested under ``state_dict``,
``model_state_dict`` or ``model`` (Lightning and common training scripts; repeatedly, e.g.
``{"model": {"state_dict": ...}}``) is unwrapped, and so is a mapping whose only tensor-holding
entry is a mapping. Non-tensor entries are dropped. A ``module.`` (DataParallel/DDP) or
``model.`` (Lightning) prefix is stripped while *every* key carries it; the names under which
PyTorch's wrappers hold a module (``_orig_mod``, ``_fsdp_wrapped_module``,
``_checkpoint_wrapped_module``) are removed by :func:`strip_wrappers` when aligning, where the
keys then match the model. Sharded checkpoints
(``*.safetensors.index.json`` or ``*.bin.index.json`` with a ``weight_map``) are read shard by
shard and merged.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "w.pt"
    >>> torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 3)}}, path)
    >>> state, digest = read_weights(path, trust=False, label="checkpoint")
    >>> list(state), len(digest)
    (['fc.weight'], 64)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from torch import Tensor, nn

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
PREFIXES = ("module.", "model.")
WRAPPERS = {
    "_orig_mod": "torch.compile",
    "_fsdp_wrapped_module": "FSDP",
    "_checkpoint_wrapped_module": "activation checkpointing",
}
"""Attribute names under which PyTorch's wrappers hold the wrapped module, with the wrapper."""
SAFE_GLOBALS = (argparse.Namespace,)
"""Plain-data classes that ``weights_only`` loading may rebuild (no code runs: the object is
created empty and its attributes set): timm's ``train.py`` saves its options, an
``argparse.Namespace``, in every checkpoint."""
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_CHUNK = 1 << 20


def one_line(err: BaseException) -> str:
    """``Type: message`` of an exception on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_json_object(path: Path, *, name: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; else one line: ``name`` is not readable, then ``fix``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{name} is not readable JSON ({one_line(err)}); {fix}") from None
    if not isinstance(value, dict):
        raise InputError(f"{name} must hold a JSON object, not {type(value).__name__}; {fix}")
    return value


def json_safe(value: object) -> Any:
    """``value`` as plain JSON data: what JSON cannot hold as its ``str``."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def sha256_of(files: Sequence[Path]) -> str:
    """SHA-256 of the concatenated bytes of ``files``."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of tensors held in memory: for each name in sorted order, the name, dtype and shape
    (``name\\0dtype\\0shape\\0``), then the tensor's bytes in row-major order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_weights(file: Path, *, trust: bool, label: str) -> tuple[dict[str, Tensor], str]:
    """The state dict in a weights file or shard index (prefixes stripped), and its SHA-256
    (of all shards' bytes in sorted shard-name order for a sharded checkpoint)."""
    if file.name.endswith(INDEX_SUFFIXES):
        state = _read_sharded(file, trust, label)
    else:
        state = read_file(file, trust=trust, label=label)
    return strip_prefixes(state), weights_digest(file, label=label)


def weights_digest(file: Path, *, label: str) -> str:
    """SHA-256 of a weights file, or of all shards of a shard index (sorted by name)."""
    if file.name.endswith(INDEX_SUFFIXES):
        return sha256_of(_shards(file, label)[1])
    _check_suffix(file, label)
    return sha256_of([file])


def _check_suffix(file: Path, label: str) -> None:
    if not file.name.endswith(WEIGHT_SUFFIXES):
        raise InputError(
            f"{label} {file}: unsupported file type {file.suffix!r}; "
            f"use one of {', '.join(WEIGHT_SUFFIXES)} or a sharded *.index.json"
        )


def pickled_objects(label: str, file: Path, name: str) -> InputError:
    """The error for a file whose pickle names ``name``, a global that could run code."""
    return InputError(
        f"{label} {file} contains pickled Python objects ({name}), which can run code; pass "
        "--trust-checkpoint only if you trust its source, or save a plain state_dict instead"
    )


def load_torch(file: Path, *, trust: bool, label: str, mmap: bool = False) -> object:
    """``torch.load`` on the CPU, ``weights_only`` (with :data:`SAFE_GLOBALS`) unless ``trust``;
    failures as one line.

    ``mmap=True`` maps the tensors' storage from the file instead of reading it into memory.
    """
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(file, map_location="cpu", weights_only=not trust, mmap=mmap)
    except Exception as err:  # any unpickling failure: the file is the user's to fix
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(err))
        if found and not trust:
            raise pickled_objects(label, file, found.group(1)) from None
        raise InputError(
            f"{label} {file}: cannot read PyTorch checkpoint ({one_line(err)[:300]}); it is "
            "truncated or corrupt, save or copy it again"
        ) from None


def read_file(file: Path, *, trust: bool, label: str) -> dict[str, Tensor]:
    """The state dict of one weights file (unwrapped, prefixes kept)."""
    _check_suffix(file, label)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as err:
            raise InputError(
                f"{label} {file}: cannot read safetensors file ({one_line(err)}); it is truncated "
                "or corrupt, save or copy it again"
            ) from None
    return state_of(load_torch(file, trust=trust, label=label), file, label)


def _has_tensors(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def state_of(obj: object, file: Path, label: str) -> dict[str, Tensor]:
    """The tensors of a loaded object: a module's state, or a (nested) state dict."""
    while True:
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise InputError(
                f"{label} {file} holds a {type(obj).__name__}, not a state dict; save "
                "model.state_dict() (or a dict with it under 'state_dict')"
            )
        nested = [obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping | nn.Module)]
        if not nested and not _has_tensors(obj):
            nested = [v for v in obj.values() if _has_tensors(v)]
            nested = nested if len(nested) == 1 else []
        if not nested:
            break
        obj = nested[0]
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        keys = ", ".join(map(str, list(obj)[:5])) or "none"
        raise InputError(
            f"{label} {file} holds no tensors (top-level keys: {keys}); expected a state dict, "
            "possibly under 'state_dict', 'model' or 'model_state_dict'"
        )
    return state


def _shards(index: Path, label: str) -> tuple[dict[str, str], list[Path]]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{label} {index}: not a shard index with a 'weight_map' ({one_line(err)}); "
            "save the checkpoint again"
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(
            f"{label} {index}: 'weight_map' must map tensor names to shard file names; "
            "save the checkpoint again"
        )
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise InputError(
                f"{label} {index}: shard {shard.name} is missing; copy every shard next to the index"
            )
    return weight_map, shards


def _read_sharded(index: Path, trust: bool, label: str) -> dict[str, Tensor]:
    weight_map, shards = _shards(index, label)
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(read_file(shard, trust=trust, label=label))
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise InputError(
            f"{label} {index}: {len(missing)} tensors listed in the index are in no shard "
            f"(first: {missing[0]!r}); save the checkpoint again"
        )
    return state


def strip_prefixes(
    state: dict[str, Tensor], prefixes: Sequence[str] = PREFIXES
) -> dict[str, Tensor]:
    """``state`` without the ``prefixes`` that every key carries (repeatedly)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def strip_wrappers(state: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``state`` with the :data:`WRAPPERS` names removed from its keys wherever they stand
    (``encoder._orig_mod.layer.weight`` → ``encoder.layer.weight``), and the names removed;
    ``state`` itself and ``()`` when no key holds one, or when two keys would become one."""
    unwrapped: dict[str, Any] = {}
    removed: set[str] = set()
    for key, value in state.items():
        *path, last = key.split(".")
        removed.update(p for p in path if p in WRAPPERS)
        unwrapped[".".join([*(p for p in path if p not in WRAPPERS), last])] = value
    if not removed or len(unwrapped) < len(state):
        return state, ()
    return unwrapped, tuple(name for name in WRAPPERS if name in removed)
