"""Checkpoint loading, layer selection and alignment of fine-tuned with pretrained weights.

Files (SPEC §3.3). ``.safetensors`` is read with :func:`safetensors.torch.load_file`;
``.pt/.pth/.bin/.ckpt`` with ``torch.load(map_location="cpu", weights_only=True)``, which
refuses pickled Python objects (code) unless the user passes ``--trust-checkpoint``
(``trust=True``: ``weights_only=False``, and a pickled whole ``nn.Module`` is accepted). A state
dict nested under ``state_dict``, ``model_state_dict`` or ``model`` (Lightning and common training
scripts; repeatedly, e.g. ``{"model": {"state_dict": ...}}``) is unwrapped, and so is a mapping
whose only tensor-holding entry is a mapping. Non-tensor entries are dropped. A ``module.``
(DataParallel/DDP) or ``model.`` (Lightning) prefix is stripped while *every* key carries it.
Sharded checkpoints (``*.safetensors.index.json`` or ``*.bin.index.json`` with a
``weight_map``) are read shard by shard and merged.

Directories. A *single checkpoint directory* is, by the first rule that applies:

1. a directory whose manifest ``hessfine.json`` has a ``"checkpoint"`` entry (a path relative to
   the directory) — that file is the checkpoint, even when other weights files lie beside it;
2. a Hugging Face layout: ``model.safetensors``, ``model.safetensors.index.json``,
   ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (first found), else its only
   ``*.index.json``;
3. a directory whose only checkpoint (see :func:`find_checkpoints`) is one weights file directly
   inside it.

Any other directory with checkpoints below it is a *directory of runs*
(:func:`is_run_collection`): :func:`find_checkpoints` lists every weights file in it, recursively
(one per saved epoch of every run), except that a Hugging Face layout directory counts as one
checkpoint and is not descended into. Hidden entries and well-known non-weight files
(``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``, ``training_args.bin``)
are skipped.

Alignment (SPEC §1, §3.3). For the selected layers W_1..W_L, ``v_i = W_i − W_i^(s)``. A layer
missing from the reference, or there with another shape, is a new *head*: its W^(s) is zero (the
paper's code: v = W) or the head's initial weights from ``--head-reference``.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> ref = {k: v + 1 for k, v in net.state_dict().items() if k != "2.weight"}
    >>> a = align(net, net.state_dict(), ref, layers=select_layers(net))
    >>> [(r.name, r.source) for r in a.rows]
    [('0.weight', 'reference'), ('2.weight', 'head-zero')]
    >>> round(a.rows[0].distance, 4)  # ‖v‖_F = sqrt(12): every entry of the 4×3 v is −1
    3.4641
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.errors import InputError
from torch import Tensor, nn

__all__ = [
    "MANIFEST",
    "WEIGHT_SUFFIXES",
    "Alignment",
    "AlignmentRow",
    "Checkpoint",
    "align",
    "find_checkpoints",
    "is_run_collection",
    "load_checkpoint",
    "load_head_reference",
    "read_manifest",
    "select_layers",
]

MANIFEST = "hessfine.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
_HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_NOT_WEIGHTS = frozenset(
    {
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scheduler.bin",
        "scaler.pt",
        "training_args.bin",
    }
)
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "model.")
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint.

    ``path`` is the weights file actually read (the index file of a sharded checkpoint);
    ``sha256`` is the SHA-256 of that file's bytes (of all shards' bytes, in sorted shard-name
    order, for a sharded checkpoint); ``manifest`` is the content of ``hessfine.json`` beside it
    (``{}`` when absent); ``directory`` is the checkpoint directory — the directory given, or the
    file's parent when that holds ``hessfine.json`` or ``config.json`` — else ``None``.
    """

    path: Path
    state: dict[str, Tensor]
    sha256: str
    manifest: dict[str, Any]
    directory: Path | None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The JSON object in ``directory/hessfine.json``, or ``{}`` when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"manifest {path} is not readable JSON ({_one_line(err)}); fix or delete it"
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"manifest {path} must hold a JSON object, not {type(value).__name__}; fix or delete it"
        )
    return value


def load_checkpoint(
    path: str | Path, *, trust: bool = False, label: str = "checkpoint"
) -> Checkpoint:
    """Load a checkpoint file or single checkpoint directory (see the module docs).

    ``trust=True`` allows unpickling arbitrary objects (``--trust-checkpoint``): only for files
    from a trusted source, since unpickling can run code. ``label`` names the input in error
    messages (e.g. ``"--reference"``).
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise InputError(f"{label} {given}: no such file or directory; check the path")
    if given.is_dir():
        manifest = read_manifest(given)
        file = _resolve_directory(given, manifest, label)
        directory: Path | None = given
    else:
        file = given
        manifest = read_manifest(given.parent)
        has_config = (given.parent / "config.json").is_file()
        directory = given.parent if manifest or has_config else None
    if file.name.endswith(_INDEX_SUFFIXES):
        state, digest = _read_sharded(file, trust, label)
    elif file.suffix in WEIGHT_SUFFIXES:
        digest = sha256_of([file])
        state = _read_file(file, trust, label)
    else:
        raise InputError(
            f"{label} {file}: unsupported file type {file.suffix!r}; "
            f"use one of {', '.join(WEIGHT_SUFFIXES)} or a sharded *.index.json"
        )
    return Checkpoint(file, _strip_prefixes(state), digest, manifest, directory)


def load_head_reference(spec: str, *, trust: bool = False) -> dict[str, Tensor] | None:
    """``--head-reference``: ``"zero"`` gives ``None`` (W^(s) = 0), else the state of a file."""
    if spec.strip() == "zero":
        return None
    return load_checkpoint(spec, trust=trust, label="--head-reference").state


def find_checkpoints(directory: str | Path) -> list[Path]:
    """Every checkpoint under ``directory``: weights files, and Hugging Face layout directories.

    Sorted by relative path in natural order (``epoch_2`` before ``epoch_10``), so the list is
    stable across runs and file systems.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; pass a directory of runs")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if _hf_layout(here, filenames):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(here / f for f in filenames if _is_weights_name(f))
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def is_run_collection(path: str | Path) -> bool:
    """Whether ``path`` is a directory of runs rather than one checkpoint (module docs)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if "checkpoint" in read_manifest(path) or _hf_layout(path, os.listdir(path)):
        return False
    found = find_checkpoints(path)
    return bool(found) and not (len(found) == 1 and found[0].parent == path and found[0].is_file())


def _resolve_directory(directory: Path, manifest: dict[str, Any], label: str) -> Path:
    if "checkpoint" in manifest:
        named = manifest["checkpoint"]
        if not isinstance(named, str) or not (directory / named).is_file():
            raise InputError(
                f"{label} {directory}: {MANIFEST} names checkpoint {named!r}, which is not a file "
                "in that directory; fix the manifest's 'checkpoint' entry"
            )
        return directory / named
    names = os.listdir(directory)
    hf = _hf_layout(directory, names)
    if hf is not None:
        return hf
    indices = sorted(n for n in names if n.endswith(_INDEX_SUFFIXES))
    if len(indices) > 1:
        raise InputError(
            f"{label} {directory}: several shard indices ({', '.join(indices)}); pass one of them"
        )
    found = find_checkpoints(directory)
    if len(found) == 1 and found[0].parent == directory and found[0].is_file():
        return found[0]
    if not found:
        raise InputError(
            f"{label} {directory}: no checkpoint in this directory; expected a file ending in "
            f"{', '.join(WEIGHT_SUFFIXES)}"
        )
    shown = ", ".join(p.relative_to(directory).as_posix() for p in found[:3])
    more = ", ..." if len(found) > 3 else ""
    raise InputError(
        f"{label} {directory}: a directory of runs with {len(found)} checkpoints ({shown}{more}); "
        f'pass one of them, or name it in {MANIFEST} as {{"checkpoint": FILE}}'
    )


def _hf_layout(directory: Path, names: Sequence[str]) -> Path | None:
    present = set(names)
    for name in _HF_FILES:
        if name in present and (directory / name).is_file():
            return directory / name
    indices = sorted(n for n in present if n.endswith(_INDEX_SUFFIXES))
    return directory / indices[0] if len(indices) == 1 else None


def _is_weights_name(name: str) -> bool:
    return (
        name.endswith(WEIGHT_SUFFIXES)
        and not name.startswith((".", "rng_state"))
        and name not in _NOT_WEIGHTS
    )


def _natural_key(text: str) -> list[tuple[int, int, str]]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def sha256_of(files: Sequence[Path]) -> str:
    """SHA-256 of the concatenated bytes of ``files``."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _read_file(file: Path, trust: bool, label: str) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as err:
            raise InputError(
                f"{label} {file}: cannot read safetensors file ({_one_line(err)}); it is truncated "
                "or corrupt, save or copy it again"
            ) from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=not trust)
    except Exception as err:  # any unpickling failure: the file is the user's to fix
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL ([\w.]+)", str(err))
        if found and not trust:
            raise InputError(
                f"{label} {file} contains pickled Python objects ({found.group(1)}), which can run "
                "code; pass --trust-checkpoint only if you trust its source, or save a plain "
                "state_dict instead"
            ) from None
        raise InputError(
            f"{label} {file}: cannot read PyTorch checkpoint ({_one_line(err)[:300]}); it is "
            "truncated or corrupt, save or copy it again"
        ) from None
    return _state_of(obj, file, label)


def _has_tensors(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, Tensor) for v in obj.values())


def _state_of(obj: object, file: Path, label: str) -> dict[str, Tensor]:
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


def _read_sharded(index: Path, trust: bool, label: str) -> tuple[dict[str, Tensor], str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{label} {index}: not a shard index with a 'weight_map' ({_one_line(err)}); "
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
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(_read_file(shard, trust, label))
    missing = [k for k in weight_map if k not in state]
    if missing:
        raise InputError(
            f"{label} {index}: {len(missing)} tensors listed in the index are in no shard "
            f"(first: {missing[0]!r}); save the checkpoint again"
        )
    return state, sha256_of(shards)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def select_layers(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the layers whose weights the analysis measures, in model order (SPEC §3.4).

    Default: the ≥2-D ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers
    ``Conv1D``, and the attention projections of ``nn.MultiheadAttention`` (``in_proj_weight``
    or ``q/k/v_proj_weight``; ``out_proj`` is a Linear). Embeddings (and weights tied to them),
    biases and normalisation parameters are excluded. ``patterns`` (``--layers``) are
    :func:`fnmatch.fnmatchcase` globs over all parameter names and replace the default; each
    must match something.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
        >>> select_layers(net)
        ['0.weight', '3.weight']
        >>> select_layers(net, ["*.bias"])
        ['0.bias', '1.bias', '3.bias']
    """
    names = [name for name, _ in model.named_parameters()]
    if patterns:
        chosen: set[str] = set()
        for pattern in patterns:
            hits = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            if not hits:
                examples = ", ".join(names[:3]) or "none"
                raise InputError(
                    f"--layers {pattern!r} matches no parameter of the model (names look like "
                    f"{examples}); fix the glob"
                )
            chosen |= hits
        return [n for n in names if n in chosen]
    conv1d = sys.modules.get("transformers.pytorch_utils")
    weighted = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if conv1d is not None:
        weighted += (conv1d.Conv1D,)
    wanted: set[str] = set()
    embedded: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.Embedding | nn.EmbeddingBag):
            embedded.add(id(module.weight))
        elif isinstance(module, weighted):
            wanted.add(prefix + "weight")
        elif isinstance(module, nn.MultiheadAttention):
            wanted.update(
                prefix + attr
                for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                if own.get(attr) is not None
            )
    layers = [
        n
        for n, p in model.named_parameters()
        if n in wanted and p.ndim >= 2 and id(p) not in embedded
    ]
    if not layers:
        raise InputError(
            "the model has no Linear, Conv or attention weights to measure; choose parameters "
            "with --layers GLOB"
        )
    return layers


Source = Literal["reference", "head-zero", "head-file"]


@dataclass(frozen=True)
class AlignmentRow:
    """One selected layer: its shape, where W^(s) came from, and ‖v‖_F = ‖W − W^(s)‖_F."""

    name: str
    shape: tuple[int, ...]
    numel: int
    source: Source
    distance: float


@dataclass(frozen=True, eq=False)
class Alignment:
    """Fine-tuned weights W, pretrained weights W^(s) and directions v = W − W^(s).

    ``params``/``buffers`` are the model's complete fine-tuned parameters and buffers (a buffer
    absent from the checkpoint, e.g. a non-persistent one, keeps the model's value);
    ``reference`` and ``directions`` hold W^(s)_i and v_i for the selected ``layers`` only.
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    layers: list[str]
    reference: dict[str, Tensor]
    directions: dict[str, Tensor]
    rows: list[AlignmentRow]

    def format_table(self) -> str:
        """A plain-text table: layer, shape, numel, source of W^(s), ‖v‖_F."""
        header = ("layer", "shape", "numel", "W^(s) from", "||v||_F")
        body = [
            (r.name, "x".join(map(str, r.shape)), str(r.numel), r.source, f"{r.distance:.6g}")
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.rjust(w) if i in (2, 4) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in [header, *body]
        ]
        heads = sum(r.source != "reference" for r in self.rows)
        total = sum(r.numel for r in self.rows)
        lines.append(f"{len(self.rows)} layers ({heads} heads), {total} weights")
        return "\n".join(lines)

    def to_json(self) -> list[dict[str, Any]]:
        """The rows as JSON-ready dicts."""
        return [
            {
                "name": r.name,
                "shape": list(r.shape),
                "numel": r.numel,
                "source": r.source,
                "distance": r.distance,
            }
            for r in self.rows
        ]


def _label_state(value: Checkpoint | Mapping[str, Tensor], label: str) -> tuple[str, dict]:
    if isinstance(value, Checkpoint):
        return f"{label} {value.path}", value.state
    return label, {str(k): v for k, v in value.items() if isinstance(v, Tensor)}


def _fit_prefix(
    state: dict[str, Tensor], wanted: set[str], prefixes: Sequence[str]
) -> dict[str, Tensor]:
    """``state`` with a key prefix added or removed when that matches more of ``wanted``."""
    best, hits = state, len(wanted & state.keys())
    for prefix in prefixes:
        if hits == len(wanted):
            break
        added = {prefix + k: v for k, v in state.items()}
        removed = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
        for candidate in (added, removed):
            count = len(wanted & candidate.keys())
            if count > hits:
                best, hits = candidate, count
    return best


def _all_finite(tensor: Tensor) -> bool:
    # A NaN or ±Inf entry makes the sum non-finite, so a finite sum proves every entry finite;
    # only a non-finite sum (which may be an overflow of finite entries) needs the exact test.
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _check_finite(label: str, name: str, tensor: Tensor) -> None:
    if tensor.is_floating_point() and not _all_finite(tensor):
        raise InputError(
            f"{label}: layer {name!r} contains NaN or Inf (did the run diverge?); "
            "use another checkpoint"
        )


def _check_shape(label: str, name: str, found: Tensor, expected: Tensor) -> None:
    if tuple(found.shape) != tuple(expected.shape):
        raise InputError(
            f"{label}: layer {name!r} has shape {tuple(found.shape)} but the model's is "
            f"{tuple(expected.shape)}; match --model and --model-kwargs (e.g. num_classes) to it"
        )


def align(
    model: nn.Module,
    finetuned: Checkpoint | Mapping[str, Tensor],
    reference: Checkpoint | Mapping[str, Tensor],
    *,
    layers: Sequence[str],
    head_reference: Mapping[str, Tensor] | None = None,
) -> Alignment:
    """Load ``finetuned`` into ``model`` and pair each selected layer with its W^(s).

    Every model parameter must be in the fine-tuned state with the model's shape and finite
    values (extra checkpoint entries are ignored; a missing buffer keeps the model's value). A
    ``module.``/``model.``/base-model prefix (Hugging Face ``base_model_prefix``) is added or
    removed when the keys then match the model better. For a selected layer i, W^(s)_i is the
    reference's tensor when it has the same shape ("reference"); otherwise the layer is a new
    head and W^(s)_i is zero ("head-zero", v_i = W_i as in the paper's code) or
    ``head_reference[name]`` ("head-file", same shape required). At least one selected layer must
    come from the reference. Everything is checked before the model is modified, so a failed
    alignment leaves the model as it was.
    """
    ft_label, ft_state = _label_state(finetuned, "checkpoint")
    ref_label, ref_state = _label_state(reference, "reference")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    base = getattr(model, "base_model_prefix", "")
    prefixes = (*_PREFIXES, f"{base}.") if isinstance(base, str) and base else _PREFIXES
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise InputError("no layers selected; pass --layers GLOB patterns that match weights")
    unknown = [n for n in layers if n not in params]
    if unknown:
        raise InputError(f"layer {unknown[0]!r} is not a parameter of the model; fix --layers")

    ft_state = _fit_prefix(ft_state, set(params) | set(buffers), prefixes)
    missing = [n for n in params if n not in ft_state]
    if missing:
        raise InputError(
            f"{ft_label} lacks {len(missing)} of the model's parameters (first: {missing[0]!r}); "
            "check that --model and --model-kwargs describe this checkpoint"
        )
    loaded = {n: b for n, b in buffers.items() if n in ft_state}
    for name, tensor in [*params.items(), *loaded.items()]:
        _check_shape(ft_label, name, ft_state[name], tensor)
        _check_finite(ft_label, name, ft_state[name])

    ref_state = _fit_prefix(ref_state, set(params), prefixes)
    heads: dict[str, Tensor] = {}
    if head_reference is not None:
        heads = _fit_prefix(_label_state(head_reference, "")[1], set(layers), prefixes)
    starts: dict[str, tuple[Tensor, Source]] = {}
    for name in layers:
        shape = params[name].shape
        candidate = ref_state.get(name)
        if candidate is not None and tuple(candidate.shape) == tuple(shape):
            _check_finite(ref_label, name, candidate)
            starts[name] = (candidate, "reference")
        elif head_reference is None:
            starts[name] = (torch.zeros(shape), "head-zero")
        else:
            start = heads.get(name)
            if start is None:
                raise InputError(
                    f"--head-reference lacks {name!r}, a head layer (absent from the reference or "
                    "shaped differently); add it to that file or use --head-reference zero"
                )
            _check_shape("--head-reference", name, start, params[name])
            _check_finite("--head-reference", name, start)
            starts[name] = (start, "head-file")
    if all(source != "reference" for _, source in starts.values()):
        raise InputError(
            f"{ref_label} shares none of the {len(starts)} selected layers with the model (by name "
            "and shape); check --reference and --model"
        )

    with torch.no_grad():
        for name, tensor in [*params.items(), *loaded.items()]:
            tensor.copy_(ft_state[name])
    reference_weights: dict[str, Tensor] = {}
    directions: dict[str, Tensor] = {}
    rows: list[AlignmentRow] = []
    for name, (start, source) in starts.items():
        weight = params[name].detach()
        start = start.detach().to(dtype=weight.dtype, device=weight.device)
        direction = weight - start
        reference_weights[name] = start
        directions[name] = direction
        rows.append(
            AlignmentRow(
                name=name,
                shape=tuple(weight.shape),
                numel=weight.numel(),
                source=source,
                distance=float(torch.linalg.vector_norm(direction, dtype=torch.float64)),
            )
        )
    return Alignment(
        params={k: p.detach() for k, p in params.items()},
        buffers={k: b.detach() for k, b in buffers.items()},
        layers=layers,
        reference=reference_weights,
        directions=directions,
        rows=rows,
    )
