"""Checkpoint loading, layer selection and alignment of fine-tuned with pretrained weights.

:func:`load_checkpoint` is the one entry point for every source; each source has its own reader
in :mod:`hessfine.analysis.sources` (weights files, Hugging Face directories, directories of
runs, Trainer, PEFT and Lightning outputs). A *single checkpoint directory* is, by the first rule
that applies:

1. a PEFT adapter directory (:mod:`hessfine.analysis.sources.peft`): it needs the base weights,
   so its :class:`Checkpoint` has ``adapter`` set and an empty state until
   :func:`apply_adapter` merges it with the reference;
2. a directory whose manifest ``hessfine.json`` has a ``"checkpoint"`` entry (a path relative to
   the directory) — that file is the checkpoint, even when other weights files lie beside it;
3. a Hugging Face layout (:mod:`hessfine.analysis.sources.hf`), e.g. a Trainer's
   ``checkpoint-N/`` (its ``trainer_state.json`` read by :mod:`hessfine.analysis.sources.trainer`);
4. a directory whose only checkpoint (see :func:`find_checkpoints`) is one weights file directly
   inside it.

A directory of shards written by distributed training (:mod:`hessfine.analysis.sources.sharded`:
a DCP directory, a Trainer's ``checkpoint-N/`` with ``pytorch_model_fsdp_0/``, a DeepSpeed ZeRO
checkpoint) is one checkpoint before rule 4, unless rule 2 or 3 applies. A DCP checkpoint's
:class:`Checkpoint` has ``pending`` set and an empty state until :func:`materialize` reads the
tensors the model names (:func:`align` does so).

Any other directory with checkpoints below it is a *directory of runs*
(:mod:`hessfine.analysis.sources.run_collections`). A Lightning ``.ckpt`` file is read by
:mod:`hessfine.analysis.sources.lightning`, a timm ``.pth.tar`` by
:mod:`hessfine.analysis.sources.timm_runs`.

Alignment (docs/inputs.md, "Alignment and the head reference"). For the selected layers W_1..W_L,
``v_i = W_i − W_i^(s)``. A layer missing from the reference, or there with another shape, is a new
*head*: its W^(s) is zero (the paper's code: v = W) or the head's initial weights from
``--head-reference``.

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
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import (
    INDEX_SUFFIXES,
    PREFIXES,
    WEIGHT_SUFFIXES,
    WRAPPERS,
    load_torch,
    read_weights,
    sha256_of,
    state_of,
    strip_prefixes,
    strip_wrappers,
    weights_digest,
)
from hessfine.analysis.sources.hf import hf_weights
from hessfine.analysis.sources.lightning import attribute_prefix, is_lightning, lightning_record
from hessfine.analysis.sources.manifest import MANIFEST, read_manifest
from hessfine.analysis.sources.peft import ADAPTER_CONFIG, LoraAdapter, adapter_file, read_adapter
from hessfine.analysis.sources.run_collections import find_checkpoints, is_run_collection
from hessfine.analysis.sources.sharded import (
    DcpReader,
    is_sharded,
    read_sharded,
    refuse_shard_file,
    sharded_digest,
)
from hessfine.analysis.sources.timm_runs import TIMM_SUFFIX, TimmWeights, read_timm
from hessfine.analysis.sources.trainer import trainer_record
from torch import Tensor, nn

__all__ = [
    "MANIFEST",
    "WEIGHT_SUFFIXES",
    "Alignment",
    "AlignmentRow",
    "Checkpoint",
    "adapter_base",
    "align",
    "apply_adapter",
    "checkpoint_digest",
    "find_checkpoints",
    "is_run_collection",
    "load_checkpoint",
    "load_head_reference",
    "materialize",
    "read_manifest",
    "select_layers",
    "sha256_of",
]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A loaded checkpoint.

    ``path`` is the weights file actually read (the index file of a sharded checkpoint);
    ``sha256`` is the SHA-256 of that file's bytes (of all shards' bytes, in sorted shard-name
    order, for a sharded checkpoint); ``manifest`` is the content of ``hessfine.json`` beside it
    (``{}`` when absent); ``directory`` is the checkpoint directory — the directory given, or the
    file's parent when that holds ``hessfine.json`` or ``config.json`` — else ``None``.

    ``training`` is what the training tool recorded (``tool``, ``step``, ``epoch``; a Trainer's
    ``logged`` losses, Lightning's ``hyper_parameters``, timm's ``arch``, ``weights``, ``args``
    and ``summary`` row), ``{}`` when nothing. ``adapter`` is a PEFT adapter not yet merged
    (:func:`apply_adapter`); a merged one has ``deltas`` (exact float64 W − W_base of the adapted
    weights), their ``distances`` (from the factors) and its default ``layers``. ``prefixes`` are
    extra key prefixes that :func:`align` may remove. ``pending`` is a DCP checkpoint whose
    tensors are read for a model (:func:`materialize`).
    """

    path: Path
    state: dict[str, Tensor]
    sha256: str
    manifest: dict[str, Any]
    directory: Path | None
    training: dict[str, Any] = field(default_factory=dict)
    adapter: LoraAdapter | None = None
    deltas: dict[str, Tensor] | None = None
    distances: dict[str, float] | None = None
    layers: tuple[str, ...] | None = None
    prefixes: tuple[str, ...] = ()
    pending: DcpReader | None = None


def load_checkpoint(
    path: str | Path,
    *,
    trust: bool = False,
    label: str = "checkpoint",
    timm_weights: TimmWeights = "raw",
    tensors: bool = True,
) -> Checkpoint:
    """Load a checkpoint file or single checkpoint directory (see the module docs).

    ``trust=True`` allows unpickling arbitrary objects (``--trust-checkpoint``): only for files
    from a trusted source, since unpickling can run code. ``label`` names the input in error
    messages (e.g. ``"--reference"``). ``timm_weights`` chooses a timm checkpoint's raw or EMA
    weights (``--timm-weights``). ``tensors=False`` leaves ``state`` empty for a weights file that
    the caller loads itself (a Hugging Face directory, by transformers' ``from_pretrained``).
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise InputError(f"{label} {given}: no such file or directory; check the path")
    adapter_dir = _adapter_directory(given)
    if adapter_dir is not None:
        adapter, digest = read_adapter(adapter_dir, trust=trust, label=label)
        return Checkpoint(
            adapter.file,
            {},
            digest,
            read_manifest(adapter_dir),
            adapter_dir,
            training=trainer_record(adapter_dir),
            adapter=adapter,
        )
    if _is_sharded_directory(given):
        found = read_sharded(given, trust=trust, label=label)
        return Checkpoint(
            found.path,
            found.state,
            found.sha256,
            read_manifest(given),
            given,
            training=found.training,
            pending=found.reader,
        )
    if given.is_dir():
        manifest = read_manifest(given)
        file = _resolve_directory(given, manifest, label)
        directory: Path | None = given
    else:
        refuse_shard_file(given, label=label)
        file = given
        manifest = read_manifest(given.parent)
        has_config = (given.parent / "config.json").is_file()
        directory = given.parent if manifest or has_config else None
    if file.name.endswith(TIMM_SUFFIX):
        state, training = read_timm(file, weights=timm_weights, trust=trust, label=label)
        return Checkpoint(file, state, sha256_of([file]), manifest, directory, training=training)
    if file.suffix == ".ckpt":
        obj = load_torch(file, trust=trust, label=label)
        state = strip_prefixes(state_of(obj, file, label))
        digest = sha256_of([file])
        if is_lightning(obj):
            prefix = attribute_prefix(state)
            return Checkpoint(
                file,
                state,
                digest,
                manifest,
                directory,
                training=lightning_record(obj),
                prefixes=() if prefix is None else (prefix,),
            )
    elif tensors:
        state, digest = read_weights(file, trust=trust, label=label)
    else:
        state, digest = {}, weights_digest(file, label=label)
    training = trainer_record(directory) if directory is not None else {}
    return Checkpoint(file, state, digest, manifest, directory, training=training)


def apply_adapter(checkpoint: Checkpoint, base: Checkpoint) -> Checkpoint:
    """The PEFT adapter ``checkpoint`` merged into the weights of ``base`` (its reference)."""
    if checkpoint.adapter is None:
        return checkpoint
    state, deltas, distances, layers = checkpoint.adapter.merged(
        base.state, f"checkpoint {checkpoint.directory}"
    )
    return replace(
        checkpoint,
        state=state,
        adapter=None,
        deltas=deltas,
        distances=distances,
        layers=tuple(layers),
    )


def adapter_base(adapter: LoraAdapter, given: str | None, *, label: str, fix: str) -> str:
    """The base model of ``adapter``: ``given`` (an option), else the local directory its
    ``adapter_config.json`` names (``base_model_name_or_path``); else one line naming what the
    adapter records and ``fix``."""
    if given is not None:
        return given
    if adapter.base is not None:
        return str(adapter.base)
    named = adapter.config.get("base_model_name_or_path")
    recorded = (
        f"its base model {named!r} is not a local directory"
        if isinstance(named, str) and named
        else f"its {ADAPTER_CONFIG} names no base model"
    )
    raise InputError(f"{label} {adapter.directory} is a PEFT adapter and {recorded}; {fix}")


def checkpoint_digest(path: str | Path) -> str:
    """The ``sha256`` that :func:`load_checkpoint` would record, without reading tensors."""
    given = Path(path).expanduser()
    adapter_dir = _adapter_directory(given)
    if adapter_dir is not None:
        return sha256_of([adapter_file(adapter_dir), adapter_dir / ADAPTER_CONFIG])
    label = "checkpoint"
    if _is_sharded_directory(given):
        return sharded_digest(given, label=label)
    file = _resolve_directory(given, read_manifest(given), label) if given.is_dir() else given
    return weights_digest(file, label=label)


def _is_sharded_directory(path: Path) -> bool:
    return path.is_dir() and "checkpoint" not in read_manifest(path) and is_sharded(path)


def materialize(checkpoint: Checkpoint, model: nn.Module, *, strict: bool = False) -> Checkpoint:
    """``checkpoint`` with the tensors of a pending DCP checkpoint read for ``model``: those of
    the model's state-dict names, in the model's dtypes (:meth:`DcpReader.load`). ``strict``
    (a fine-tuned checkpoint) first requires every parameter with the model's shape."""
    if checkpoint.pending is None:
        return checkpoint
    required = [name for name, _ in model.named_parameters()] if strict else []
    state = checkpoint.pending.load(model.state_dict(), required=required)
    return replace(checkpoint, state=state, pending=None)


def _adapter_directory(path: Path) -> Path | None:
    directory = path if path.is_dir() else path.parent
    file = adapter_file(directory)
    return directory if file is not None and (path.is_dir() or path == file) else None


def load_head_reference(
    spec: str, *, trust: bool = False, model: nn.Module | None = None
) -> dict[str, Tensor] | None:
    """``--head-reference``: ``"zero"`` gives ``None`` (W^(s) = 0), else the state of a file (a
    DCP checkpoint read for ``model``)."""
    if spec.strip() == "zero":
        return None
    checkpoint = load_checkpoint(spec, trust=trust, label="--head-reference")
    return (checkpoint if model is None else materialize(checkpoint, model)).state


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
    hf = hf_weights(directory, names)
    if hf is not None:
        return hf
    indices = sorted(n for n in names if n.endswith(INDEX_SUFFIXES))
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


def select_layers(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    parts: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Names of the layers whose weights the analysis measures, in model order
    (docs/inputs.md, "Default layers").

    Default: the ≥2-D ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and transformers
    ``Conv1D``, the attention projections of ``nn.MultiheadAttention`` (``in_proj_weight``
    or ``q/k/v_proj_weight``; ``out_proj`` is a Linear), and the layers of fused parameters:
    ``parts`` maps a parameter held fused to the names of its layers, which replace its name
    (:mod:`hessfine.analysis.fused_experts`). Embeddings (and weights tied to them), biases and
    normalisation parameters are excluded. ``patterns`` (``--layers``) are
    :func:`fnmatch.fnmatchcase` globs over all parameter names and replace the default; each
    must match something.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
        >>> select_layers(net)
        ['0.weight', '3.weight']
        >>> select_layers(net, ["*.bias"])
        ['0.bias', '1.bias', '3.bias']
    """
    parts = parts or {}
    names = [split for name, _ in model.named_parameters() for split in parts.get(name, [name])]
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
        split
        for n, p in model.named_parameters()
        if n in parts or (n in wanted and p.ndim >= 2 and id(p) not in embedded)
        for split in parts.get(n, [n])
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
    ``unwrapped`` names, per input (``checkpoint``, ``reference``, ``--head-reference``), the
    wrapper names removed from its keys (:func:`hessfine.analysis.sources.files.strip_wrappers`).
    """

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    layers: list[str]
    reference: dict[str, Tensor]
    directions: dict[str, Tensor]
    rows: list[AlignmentRow]
    unwrapped: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def format_table(self) -> str:
        """A plain-text table: layer, shape, numel, source of W^(s), ‖v‖_F; then the totals and
        a line for each input whose keys lost wrapper names."""
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
        for label, names in self.unwrapped.items():
            removed = ", ".join(f"{name}. ({WRAPPERS[name]})" for name in names)
            lines.append(f"{label} keys: removed {removed}")
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
    state: dict[str, Any], wanted: set[str], prefixes: Sequence[str]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``state`` with a key prefix added or removed, or the wrapper names removed (and then a
    prefix), when that matches more of ``wanted``; and the wrapper names it removed."""
    unwrapped, names = strip_wrappers(state)
    best, hits, removed = state, len(wanted & state.keys()), ()
    for base, dropped in ((state, ()), (unwrapped, names)):
        candidates = [base]
        for prefix in prefixes:
            candidates.append({prefix + k: v for k, v in base.items()})
            candidates.append({k.removeprefix(prefix): v for k, v in base.items()})
        for candidate in candidates:
            if hits == len(wanted):
                return best, removed
            count = len(wanted & candidate.keys())
            if count > hits:
                best, hits, removed = candidate, count, dropped
    return best, removed


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
    removed, and the names of PyTorch's wrappers (``_orig_mod``, ``_fsdp_wrapped_module``,
    ``_checkpoint_wrapped_module``) removed wherever they stand, when the keys then match the
    model better. For a selected layer i, W^(s)_i is the reference's tensor when it has the same
    shape ("reference"); otherwise the layer is a new head and W^(s)_i is zero ("head-zero",
    v_i = W_i as in the paper's code) or ``head_reference[name]`` ("head-file", same shape
    required). At least one selected layer must come from the reference. A merged PEFT adapter's
    exact changes (``finetuned.deltas``) are v_i for the layers they cover, with the distances
    computed from the factors. Everything is checked before the model is modified, so a failed
    alignment leaves the model as it was. A pending DCP checkpoint is read for the model first
    (:func:`materialize`; strictly for ``finetuned``).
    """
    if isinstance(finetuned, Checkpoint):
        finetuned = materialize(finetuned, model, strict=True)
    if isinstance(reference, Checkpoint):
        reference = materialize(reference, model)
    ft_label, ft_state = _label_state(finetuned, "checkpoint")
    ref_label, ref_state = _label_state(reference, "reference")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    base = getattr(model, "base_model_prefix", "")
    prefixes = (*PREFIXES, f"{base}.") if isinstance(base, str) and base else PREFIXES
    exact: dict[str, tuple[Tensor, float]] = {}
    for given in (finetuned, reference):
        if isinstance(given, Checkpoint) and given.adapter is not None:
            raise InputError(
                f"{given.directory} is a PEFT adapter without its base model; measure it with "
                "hessfine measure ADAPTER --reference BASE, or merge it first"
            )
    if isinstance(finetuned, Checkpoint):
        prefixes = (*prefixes, *finetuned.prefixes)
        if finetuned.deltas is not None:
            distances = finetuned.distances or {}
            exact = {k: (v, distances[k]) for k, v in finetuned.deltas.items()}
            exact = _fit_prefix(exact, set(params), prefixes)[0]
    layers = _checked_layers(layers, params)
    unwrapped: dict[str, tuple[str, ...]] = {}
    ft_state, unwrapped["checkpoint"] = _fit_prefix(ft_state, set(params) | set(buffers), prefixes)
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
    ref_state, unwrapped["reference"] = _fit_prefix(ref_state, set(params), prefixes)
    starts, unwrapped["--head-reference"] = _starts(
        params, layers, ref_state, head_reference, prefixes, ref_label
    )
    with torch.no_grad():
        for name, tensor in [*params.items(), *loaded.items()]:
            tensor.copy_(ft_state[name])
    return _paired(params, buffers, starts, exact, unwrapped)


def align_loaded(
    weights: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    layers: Sequence[str],
    head_reference: Mapping[str, Tensor] | None = None,
    exact: Mapping[str, tuple[Tensor, float]] | None = None,
    labels: tuple[str, str] = ("checkpoint", "reference"),
    prefixes: Sequence[str] = PREFIXES,
) -> Alignment:
    """Pair the selected layers of weights already loaded into the model with their W^(s).

    ``weights`` are the model's fine-tuned parameters by name (a model loaded by transformers'
    ``from_pretrained``, its fused parameters split into their layers; a module in memory),
    ``reference`` the reference's tensors, by the same names once a key prefix of ``prefixes``
    or a wrapper's name is added or removed where that matches more of them (as in
    :func:`align`); a layer absent from it or shaped differently is a new head, as in
    :func:`align`, and ``exact`` holds the exact changes and distances of a merged PEFT adapter.
    ``labels`` name the fine-tuned weights and the reference in error messages.
    """
    layers = _checked_layers(layers, weights)
    for name, tensor in weights.items():
        _check_finite(labels[0], name, tensor)
    reference, unwrapped = _fit_prefix(dict(reference), set(weights), prefixes)
    starts, removed = _starts(weights, layers, reference, head_reference, prefixes, labels[1])
    names = {"reference": unwrapped, "--head-reference": removed}
    return _paired(weights, buffers, starts, exact or {}, names)


def _checked_layers(layers: Sequence[str], params: Mapping[str, Tensor]) -> list[str]:
    """``layers`` without repeats, each a parameter in ``params``; else an :class:`InputError`."""
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise InputError("no layers selected; pass --layers GLOB patterns that match weights")
    unknown = [n for n in layers if n not in params]
    if unknown:
        raise InputError(f"layer {unknown[0]!r} is not a parameter of the model; fix --layers")
    return layers


def _starts(
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    ref_state: Mapping[str, Tensor],
    head_reference: Mapping[str, Tensor] | None,
    prefixes: Sequence[str],
    ref_label: str,
) -> tuple[dict[str, tuple[Tensor, Source]], tuple[str, ...]]:
    """W^(s) of each selected layer and where it comes from (the reference, else a head: zero or
    ``head_reference``), checked; at least one must come from the reference. Also the wrapper
    names removed from ``head_reference``'s keys."""
    heads: dict[str, Tensor] = {}
    removed: tuple[str, ...] = ()
    if head_reference is not None:
        heads, removed = _fit_prefix(_label_state(head_reference, "")[1], set(layers), prefixes)
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
    return starts, removed


def _paired(
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    starts: Mapping[str, tuple[Tensor, Source]],
    exact: Mapping[str, tuple[Tensor, float]],
    unwrapped: Mapping[str, tuple[str, ...]],
) -> Alignment:
    """The alignment of the (loaded) ``params`` with the W^(s) of ``starts``: v_i = W_i − W^(s)_i
    and ‖v_i‖_F, or a merged adapter's ``exact`` change and distance; ``unwrapped`` the wrapper
    names removed from each input's keys."""
    reference_weights: dict[str, Tensor] = {}
    directions: dict[str, Tensor] = {}
    rows: list[AlignmentRow] = []
    for name, (start, source) in starts.items():
        weight = params[name].detach()
        start = start.detach().to(dtype=weight.dtype, device=weight.device)
        if name in exact and source == "reference":
            delta, distance = exact[name]
            direction = delta.to(dtype=weight.dtype, device=weight.device)
        else:
            direction = weight - start
            distance = float(torch.linalg.vector_norm(direction, dtype=torch.float64))
        reference_weights[name] = start
        directions[name] = direction
        rows.append(
            AlignmentRow(
                name=name,
                shape=tuple(weight.shape),
                numel=weight.numel(),
                source=source,
                distance=distance,
            )
        )
    return Alignment(
        params={k: p.detach() for k, p in params.items()},
        buffers={k: b.detach() for k, b in buffers.items()},
        layers=list(starts),
        reference=reference_weights,
        directions=directions,
        rows=rows,
        unwrapped={label: names for label, names in unwrapped.items() if names},
    )
