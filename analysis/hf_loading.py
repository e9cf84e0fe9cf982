"""Hugging Face model directories loaded by transformers' own loader (docs/inputs.md,
"Hugging Face directories").

transformers 5 builds many models with parameter names of its own (ViT's
``vit.layers.0.attention.q_proj``, Mixtral's fused ``mlp.experts.gate_up_proj``) while their
checkpoints keep the names they were saved with (``vit.encoder.layer.0.attention.attention.query``,
one ``w1``/``w3``/``w2`` per expert), and ``from_pretrained`` converts between them. A
measurement of a model directory (:func:`hessfine.analysis.sources.hf.model_directory`:
``save_pretrained`` output, a Trainer's ``checkpoint-N/``) with the model spec ``hf`` or
``hf:DIR`` therefore loads it with ``from_pretrained`` — local files only, no remote code, in the
measurement's dtype, the class :func:`hessfine.analysis.model_specs.hf_model_class` chooses,
``--model-kwargs`` set on the config — and aligns the fine-tuned model with its reference by
their names in memory, which are the layer names of the results. Fused mixture-of-experts
parameters are split into one layer per expert matrix (:mod:`hessfine.analysis.fused_experts`).

:func:`load_pretrained` loads, in this order, so that one whole model at most is in memory at a
time:

1. the reference, into the fine-tuned model's class and config: a model directory by
   ``from_pretrained``, a weights file as its ``state_dict``; a tensor it lacks or holds with
   another shape (another number of labels: ``ignore_mismatched_sizes``) belongs to a new head
   (``--head-reference``). Only the selected layers' tensors are kept;
2. the fine-tuned model, which becomes the measured module; a parameter it lacks or holds with
   another shape is an error.

:func:`load_reference` reads a reference for a model already built (``hessfine finetune``'s
starting weights, ``hessfine measure``'s W^(s) of a checkpoint file): a model directory is loaded
by ``from_pretrained`` into a transformers model's class and config, under the names in memory,
and a PEFT adapter is merged into its base model first.

A PEFT LoRA adapter is applied to its base model as peft applies it: its keys name modules of
the model in memory. An adapter saved under transformers 4 with the names of then (``query``
and ``value`` on a ViT) names modules that do not exist, and is refused (peft cannot apply it
either); LoRA on expert parameters (``target_parameters``) is refused as before
(:mod:`hessfine.analysis.sources.peft`).

Example:
    >>> loaded = load_pretrained(load_checkpoint("tuned/", tensors=False),  # doctest: +SKIP
    ...                          "base/", spec="hf", model_kwargs={}, dtype=torch.float64)
    >>> loaded.layers[:1], loaded.alignment.rows[0].source  # doctest: +SKIP
    (['vit.embeddings.patch_embeddings.projection.weight'], 'reference')
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.checkpoints import (
    Alignment,
    Checkpoint,
    adapter_base,
    align_loaded,
    apply_adapter,
    load_checkpoint,
    materialize,
    select_layers,
)
from hessfine.analysis.errors import InputError
from hessfine.analysis.fused_experts import NOTE as EXPERTS_NOTE
from hessfine.analysis.fused_experts import fused_experts, fused_owners, fused_parts
from hessfine.analysis.model_specs import hf_config, hf_implementations, hf_model_class
from hessfine.analysis.sources.files import one_line
from hessfine.analysis.sources.hf import model_directory
from hessfine.analysis.sources.peft import ADAPTER_CONFIG, LoraAdapter
from hessfine.bounds.functional import FusedParameter, split_parameters
from torch import Tensor, nn

NOTE = (
    "Layer names are the parameter names of the model as transformers {version} builds it in "
    "memory (loaded with from_pretrained); for some architectures (ViT, DeiT, BEiT, Swin, "
    "DINOv2, GPT-NeoX, mixture-of-experts models) they differ from the names in the checkpoint "
    "files and in results under those names."
)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """The measured module, loaded and aligned with its reference.

    ``fused`` are its parameters held fused and measured as their layers, ``layers`` the
    selected layers (names in memory), ``checkpoint`` and ``reference`` what was read (a merged
    adapter's exact changes in ``checkpoint.deltas``), ``experts`` the experts implementation of
    a mixture-of-experts model and ``notes`` what ``measurement.json → notes`` should say.
    """

    module: nn.Module
    fused: tuple[FusedParameter, ...]
    layers: list[str]
    alignment: Alignment
    checkpoint: Checkpoint
    reference: Checkpoint
    experts: str | None = None
    notes: tuple[str, ...] = ()


def pretrained_route(spec: str, checkpoint: Checkpoint, reference: str) -> bool:
    """Whether :func:`load_pretrained` loads this measurement: the spec is ``hf`` or ``hf:DIR``
    and the checkpoint (the reference, for a PEFT adapter) is a Hugging Face model directory."""
    model = reference if checkpoint.adapter is not None else checkpoint.path
    return spec.strip().partition(":")[0] == "hf" and model_directory(model) is not None


def load_pretrained(
    checkpoint: Checkpoint,
    reference: str,
    *,
    spec: str,
    model_kwargs: Mapping[str, Any],
    dtype: torch.dtype,
    layers: Sequence[str] = (),
    head_reference: Mapping[str, Tensor] | None = None,
    trust: bool = False,
) -> LoadedModel:
    """Load the fine-tuned model of ``checkpoint`` (read with ``tensors=False``, or a PEFT
    adapter) and its ``reference`` by ``from_pretrained``, and align the selected layers
    (``layers``: ``--layers`` globs, else the default selection) as the module docs say."""
    with _quiet():
        adapter = checkpoint.adapter
        if adapter is not None:
            return _adapted(
                checkpoint, adapter, reference, spec, model_kwargs, dtype, layers, trust
            )
        directory = model_directory(checkpoint.path)
        config = _config(spec, directory, model_kwargs)
        model_class = hf_model_class(spec, config)
        start, weights, selected = reference_weights(
            reference, model_class, config, dtype, layers, trust
        )
        label = f"checkpoint {directory}"
        model, _ = _from_pretrained(model_class, directory, config, dtype, label, trust)
    fused = fused_experts(model)
    alignment = align_loaded(
        split_parameters(model, fused),
        dict(model.named_buffers()),
        weights,
        layers=selected,
        head_reference=head_reference,
        labels=(label, f"--reference {start.path}"),
    )
    return _loaded(model, fused, selected, alignment, checkpoint, start)


def _loaded(
    model: nn.Module,
    fused: tuple[FusedParameter, ...],
    layers: list[str],
    alignment: Alignment,
    checkpoint: Checkpoint,
    reference: Checkpoint,
) -> LoadedModel:
    """The :class:`LoadedModel` of a model loaded by ``from_pretrained``, with its notes."""
    import transformers

    notes = [NOTE.format(version=transformers.__version__)] + ([EXPERTS_NOTE] if fused else [])
    experts = getattr(model.config, "_experts_implementation", None) if fused else None
    return LoadedModel(
        model, fused, layers, alignment, checkpoint, reference, experts, tuple(notes)
    )


def reference_weights(
    spec: str,
    model_class: type[nn.Module],
    config: Any,
    dtype: torch.dtype,
    patterns: Sequence[str],
    trust: bool,
) -> tuple[Checkpoint, dict[str, Tensor], list[str]]:
    """The reference checkpoint, the selected layers' reference tensors (those it holds with the
    model's shapes) and the selected layers, from the reference loaded into ``model_class``."""
    directory = model_directory(spec)
    label = "--reference"
    reference = load_checkpoint(spec, trust=trust, label=label, tensors=directory is None)
    if reference.adapter is not None:
        raise InputError(
            f"{label} {reference.directory} is a PEFT adapter, not a model; pass --reference the "
            "pretrained model (the adapter's base)"
        )
    source = directory if directory is not None else reference.path
    state = None if directory is not None else reference.state
    model, info = _from_pretrained(
        model_class, source, config, dtype, f"{label} {source}", trust, state=state, partial=True
    )
    fused = fused_experts(model)
    layers = select_layers(model, patterns, fused_parts(fused))
    absent = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    owner = fused_owners(fused)
    weights = split_parameters(model, fused)
    kept = {n: weights[n].clone() for n in layers if owner.get(n, n) not in absent}
    return replace(reference, state={}), kept, layers


def _adapted(
    checkpoint: Checkpoint,
    adapter: LoraAdapter,
    reference: str,
    spec: str,
    model_kwargs: Mapping[str, Any],
    dtype: torch.dtype,
    patterns: Sequence[str],
    trust: bool,
) -> LoadedModel:
    """The PEFT ``adapter`` of ``checkpoint`` merged into its base model ``reference`` (a model
    directory) by module names in memory; the base's tensors are the reference (so no layer is a
    new head)."""
    directory = model_directory(reference)
    base = load_checkpoint(reference, trust=trust, label="--reference", tensors=False)
    config = _config(spec, directory, model_kwargs)
    model_class = hf_model_class(spec, config)
    label = f"--reference {directory}"
    model, _ = _from_pretrained(model_class, directory, config, dtype, label, trust)
    fused, merged = _merged_in_place(model, adapter, patterns=patterns, label=label)
    done = replace(
        checkpoint,
        adapter=None,
        deltas=merged.deltas,
        distances=merged.distances,
        layers=tuple(merged.adapted),
    )
    return _loaded(model, fused, merged.layers, merged.alignment, done, base)


def load_reference(
    path: str, model: nn.Module, *, trust: bool, label: str = "--reference"
) -> Checkpoint:
    """The reference checkpoint ``path`` with its tensors (``state``) under the names of
    ``model``.

    A PEFT adapter is merged into its base model, the local directory its
    ``adapter_config.json`` names (the checkpoint is then the adapter's: its files and digest).
    For a transformers ``model`` and a model directory (or such a base), the tensors are loaded
    by ``from_pretrained`` into the model's class and config, so their names are those in
    memory; those the directory lacks or holds with another shape (a head for another number of
    labels) are left out. Otherwise the tensors keep the names of the files (a DCP checkpoint's
    read for ``model``).
    """
    fix = (
        f"set base_model_name_or_path in its {ADAPTER_CONFIG} to the base model's local "
        "directory (saved with save_pretrained)"
    )
    config = getattr(model, "config", None)
    transformers_model = config is not None and callable(getattr(model, "from_pretrained", None))

    def hf_directory(where: str) -> Path | None:
        return model_directory(where) if transformers_model else None

    checkpoint = load_checkpoint(path, trust=trust, label=label, tensors=hf_directory(path) is None)
    adapter = checkpoint.adapter
    if adapter is None:
        directory = hf_directory(path)
        if directory is None:
            return materialize(checkpoint, model)
        return replace(checkpoint, state=_pretrained_state(model, directory, None, label, trust))
    base = adapter_base(adapter, None, label=label, fix=fix)
    directory = hf_directory(base)
    if directory is not None:
        state = _pretrained_state(model, directory, adapter, label, trust)
        return replace(checkpoint, state=state, adapter=None)
    start = load_checkpoint(base, trust=trust, label=f"the base model of {label}")
    if start.adapter is not None:
        raise InputError(
            f"{label} {adapter.directory}: its base model {base} is a PEFT adapter too; merge "
            "that one into its own base (merge_and_unload) and save the result"
        )
    merged = apply_adapter(checkpoint, materialize(start, model))
    return replace(merged, deltas=None, distances=None, layers=None)


def _pretrained_state(
    model: nn.Module, directory: Path, adapter: LoraAdapter | None, label: str, trust: bool
) -> dict[str, Tensor]:
    """The tensors of the model directory ``directory`` loaded by ``from_pretrained`` into
    ``model``'s class, config and dtype (``adapter`` merged in), without those it lacks or holds
    with another shape."""
    dtype = next(model.parameters()).dtype
    where = f"{label} {directory}"
    with _quiet():
        loaded, info = _from_pretrained(
            type(model), directory, model.config, dtype, where, trust, partial=True
        )
    if adapter is not None:
        _merged_in_place(loaded, adapter, patterns=(), label=where)
    absent = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    return {k: v for k, v in loaded.state_dict().items() if k not in absent}


def _merged_in_place(
    model: nn.Module, adapter: LoraAdapter, *, patterns: Sequence[str], label: str
) -> tuple[tuple[FusedParameter, ...], MergedAdapter]:
    """``adapter`` merged into the base weights of ``model`` (:func:`merge_adapter`), written
    into the model; its fused parameters and the merge."""
    fused = fused_experts(model)
    weights = split_parameters(model, fused)
    buffers = dict(model.named_buffers())
    merged = merge_adapter(model, fused, adapter, weights, buffers, patterns=patterns, label=label)
    targets = {**weights, **buffers}
    with torch.no_grad():
        for name, tensor in merged.changed.items():
            targets[name].copy_(tensor)
    return fused, merged


@dataclass(frozen=True, eq=False)
class MergedAdapter:
    """A LoRA adapter applied to a model's base weights (:func:`merge_adapter`).

    ``changed`` are the tensors that differ from the base (W_base + ΔW of the adapted weights,
    the saved modules' tensors), ``alignment`` pairs the selected ``layers`` with the base
    weights (v_i = ΔW_i exactly where adapted), ``deltas`` and ``distances`` are the exact
    float64 changes and their norms, ``adapted`` the adapter's default layers.
    """

    changed: dict[str, Tensor]
    layers: list[str]
    alignment: Alignment
    deltas: dict[str, Tensor]
    distances: dict[str, float]
    adapted: list[str]


def merge_adapter(
    model: nn.Module,
    fused: tuple[FusedParameter, ...],
    adapter: LoraAdapter,
    weights: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    *,
    patterns: Sequence[str],
    label: str,
) -> MergedAdapter:
    """``adapter`` applied to the base ``weights`` and ``buffers`` of ``model`` (by their names
    in memory, ``fused`` parameters split into their layers), without changing them; the layers
    are ``patterns`` (``--layers``), else the adapter's; ``label`` names the base in messages.
    The base weights of the changed layers are copied (so the caller may load ``changed`` into
    the model)."""
    _check_adapter_names(adapter, weights, buffers, type(model))
    merged, deltas, distances, adapted = adapter.merged(weights, f"checkpoint {adapter.directory}")
    layers = select_layers(model, patterns or adapted, fused_parts(fused))
    changed = {name: merged[name] for name in [*deltas, *adapter.saved]}
    alignment = align_loaded(
        {name: changed.get(name, tensor) for name, tensor in weights.items()},
        {name: changed.get(name, tensor) for name, tensor in buffers.items()},
        {name: weights[name].clone() if name in changed else weights[name] for name in layers},
        layers=layers,
        exact={name: (delta, distances[name]) for name, delta in deltas.items()},
        labels=(f"checkpoint {adapter.directory}", label),
    )
    return MergedAdapter(changed, layers, alignment, deltas, distances, adapted)


def _check_adapter_names(
    adapter: LoraAdapter,
    weights: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    model_class: type[nn.Module],
) -> None:
    """Every tensor the adapter changes is one of the model's in memory; else one line naming
    the cause (names of transformers 4, or another base) and the fix."""
    import transformers

    changed = [f"{factor.module}.weight" for factor in adapter.factors] + list(adapter.saved)
    unknown = [name for name in changed if name not in weights and name not in buffers]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], list(weights), n=1, cutoff=0.0)
    raise InputError(
        f"checkpoint {adapter.directory}: the adapter changes {unknown[0]!r}, which "
        f"{model_class.__name__} as transformers {transformers.__version__} builds it does not "
        f"have (its names look like {close[0]!r}); an adapter saved under transformers 4 names "
        "the modules of then, which peft cannot apply to this model either: merge it with "
        "merge_and_unload() under the transformers it was trained with and measure the merged "
        "model, or pass --reference the base model it was trained on"
    )


def _config(spec: str, directory: Path | None, model_kwargs: Mapping[str, Any]) -> Any:
    """The config of the model: from ``hf:DIR``'s directory, else the model directory's."""
    named = spec.strip().partition(":")[2]
    where = Path(named).expanduser() if named else directory
    if where is None:
        raise InputError(f"--model {spec}: no Hugging Face directory to read config.json from")
    return hf_config(spec, where, dict(model_kwargs))


def _from_pretrained(
    model_class: type[nn.Module],
    source: Path,
    config: Any,
    dtype: torch.dtype,
    label: str,
    trust: bool,
    *,
    state: Mapping[str, Tensor] | None = None,
    partial: bool = False,
) -> tuple[nn.Module, Mapping[str, Any]]:
    """``model_class.from_pretrained`` of the directory ``source`` (or of ``state``, the
    tensors of the file ``source``) in eval mode, and its loading report.

    Unless ``partial``, a parameter the files lack or hold with another shape is an error.
    """
    try:
        model, info = model_class.from_pretrained(
            None if state is not None else str(source),
            config=config,
            state_dict=None if state is None else dict(state),
            local_files_only=True,
            trust_remote_code=False,
            dtype=dtype,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            weights_only=not trust,
            **hf_implementations(config),
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise InputError(
            f"{label}: transformers cannot load it ({one_line(err)[:300]}); check that it is the "
            "model's directory and that --model and --model-kwargs describe it"
        ) from None
    if not partial:
        _check_complete(model, info, label)
    return model.eval(), info


def _check_complete(model: nn.Module, info: Mapping[str, Any], label: str) -> None:
    """Every parameter of ``model`` was loaded, with its shape; else one line."""
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        name, found, expected = mismatched[0]
        raise InputError(
            f"{label}: layer {name!r} has shape {tuple(found)} but the model's is "
            f"{tuple(expected)}; match --model and --model-kwargs (e.g. num_labels) to it"
        )
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(key for key in info["missing_keys"] if key in params)
    if missing:
        raise InputError(
            f"{label} lacks {len(missing)} of the model's parameters (first: {missing[0]!r}); "
            "check that --model and --model-kwargs describe this checkpoint"
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings (its loading report) and progress bars off, then as they were."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
