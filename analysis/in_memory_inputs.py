"""What a measurement reads when it is given a module in memory: the module, its reference.

:func:`object_inputs` builds the same
:class:`~hessfine.analysis.measurement_inputs.MeasurementInputs` that files give
(:func:`~hessfine.analysis.measurement_inputs.load_inputs`), so both go through one measuring
core (:func:`hessfine.analysis.measure.measure_inputs`):

- **the model** is used as it is, as the template of a functional model
  (:class:`~hessfine.bounds.functional.FunctionalModel`): its parameters and buffers are read,
  never written. They are measured where and as they are when the measurement's device and dtype
  are the module's (no copy); otherwise a converted copy of them is made (the module's size in
  the measurement's dtype, on its device). The module is put in eval mode while it is measured
  (:func:`evaluating` restores every submodule's mode); its ``requires_grad`` flags, device and
  dtype are untouched.
- **a PeftModel** is measured as base + adapter (:func:`measured_module`): the adapter's config
  and weights are read from the object (``peft_config``, ``get_peft_model_state_dict``: what
  ``save_pretrained`` would write) and applied to the base weights as for an adapter directory
  (:func:`hessfine.analysis.hf_loading.merge_adapter`), on a copy of the module tree whose
  LoRA layers are unloaded (``unload()``) and which shares every tensor with the model (module
  objects only; the adapted weights W_base + ΔW are new tensors). Its layers are then the
  adapted weights under the base model's names, v_i = ΔW_i exactly, ‖ΔW_i‖_F from the factors:
  the numbers of the adapter directory.
- **the reference** W^(s) is a module, a state dict, or a path (every form ``measure`` reads; a
  Hugging Face model directory loaded into the model's class by ``from_pretrained``); a key
  prefix (``module.``, ``model.``, the name of one of the model's children) or a wrapper's name
  is added or removed where that matches the model better. Without one, a PeftModel's base.

``measurement.json`` records :data:`~hessfine.analysis.in_memory_data.IN_MEMORY` in place of a
path, and the SHA-256 of the tensors measured (:func:`~hessfine.analysis.sources.files.tensors_digest`
of the parameters and buffers, after the adapter and the dtype; of the reference's selected
layers) in place of the files' hashes.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> measured = measured_module(net)
    >>> with evaluating(measured.module):  # doctest: +SKIP
    ...     inputs = object_inputs(measured, {"0.weight": torch.zeros(3, 4)}, train=..., eval=None,
    ...                            settings=MeasureSettings(), device=torch.device("cpu"))
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.checkpoints import (
    Checkpoint,
    align_loaded,
    load_checkpoint,
    load_head_reference,
    materialize,
    select_layers,
)
from hessfine.analysis.fused_experts import NOTE as EXPERTS_NOTE
from hessfine.analysis.fused_experts import fused_experts, fused_parts, fused_slices
from hessfine.analysis.hf_loading import merge_adapter, reference_weights
from hessfine.analysis.in_memory_data import IN_MEMORY
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.measurement_inputs import MeasurementInputs
from hessfine.analysis.sources.files import PREFIXES, tensors_digest
from hessfine.analysis.sources.hf import model_directory
from hessfine.analysis.sources.peft import LoraAdapter, lora_adapter
from hessfine.analysis.tasks import NOTES as TASK_NOTES
from hessfine.analysis.tasks import TaskChoice, choose_task, task_data, task_loss
from hessfine.bounds.functional import FunctionalModel, FusedParameter, split_parameters
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class MeasuredModule:
    """The module a measurement evaluates: the model, or a PeftModel's unloaded copy.

    ``module`` is what the functional model calls; ``peft`` is the PeftModel it comes from
    (None for another model).
    """

    module: nn.Module
    peft: nn.Module | None = None


def measured_module(model: nn.Module) -> MeasuredModule:
    """The module measured for ``model``: itself, or for a PeftModel a copy of its module tree
    with the LoRA layers unloaded that shares every tensor with it (module docs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not is_peft(model):
        return MeasuredModule(model)
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return MeasuredModule(copy.deepcopy(model.base_model, memo=shared).unload(), model)


def is_peft(model: object) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (peft is not imported to find out)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block; every submodule's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def forward_names(module: nn.Module) -> frozenset[str]:
    """The named arguments of ``module.forward``: the entries of dict data that are inputs (as
    the Trainer keeps the columns the model takes)."""
    parameters = inspect.signature(module.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def pad_token_id(module: nn.Module) -> int | None:
    """The ``pad_token_id`` of a Hugging Face model's config, else None."""
    return getattr(getattr(module, "config", None), "pad_token_id", None)


def selected_weights(measured: MeasuredModule, layers: tuple[str, ...] | None) -> dict[str, Tensor]:
    """A CPU copy of the selected layers' weights (``layers``: globs, else the default layers).

    The reference a training callback measures from when it is given none: the weights when
    training begins (it costs the selected weights' size in CPU memory).
    """
    module = measured.module
    fused = fused_experts(module)
    weights = split_parameters(module, fused)
    names = select_layers(module, layers or None, fused_parts(fused))
    return {name: weights[name].to("cpu", copy=True) for name in names}


def model_task(given: str | None, module: nn.Module) -> TaskChoice:
    """The task of a model in memory: ``given``, else, for a transformers model, the one its
    config and class say (as for a Hugging Face directory), else classification
    (:func:`hessfine.analysis.tasks.choose_task`)."""
    config = getattr(module, "config", None)
    return choose_task(given, module, hugging_face=hasattr(config, "_attn_implementation"))


def object_inputs(
    measured: MeasuredModule,
    reference: Any,
    *,
    train: LabeledData,
    eval: LabeledData | None,
    settings: Any,
    device: torch.device,
    training: Mapping[str, Any] | None = None,
) -> MeasurementInputs:
    """The inputs of a measurement of ``measured`` against ``reference`` (module docs).

    ``settings`` is the measurement's :class:`~hessfine.analysis.measure.MeasureSettings`
    (``task``, ``dtype``, ``layers``, ``head_reference``); ``training`` is what a training
    callback records of the step measured (``measurement.json → training``).
    """
    module = measured.module
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32

    def cast(tensor: Tensor) -> Tensor:
        tensor = tensor.detach()
        if tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device=device)

    fused = fused_experts(module)
    weights = {name: cast(t) for name, t in split_parameters(module, fused).items()}
    buffers = {name: cast(b) for name, b in module.named_buffers()}
    patterns = tuple(settings.layers or ())
    merged = None
    if measured.peft is not None:
        base = {**weights, **{name: cast(t) for name, t in _originals(measured.peft).items()}}
        merged = merge_adapter(
            module,
            fused,
            _adapter(measured.peft),
            base,
            buffers,
            patterns=patterns,
            label="the model's base",
        )
        weights = {name: merged.changed.get(name, t) for name, t in weights.items()}
        buffers = {name: merged.changed.get(name, t) for name, t in buffers.items()}
    if merged is not None and reference is None:  # the base: v_i = ΔW_i exactly
        alignment, layers = merged.alignment, merged.layers
        reference_path, reference_digest = Path(IN_MEMORY), None
    else:
        state, layers, reference_path, reference_digest = _reference(
            reference, module, fused, dtype, patterns
        )
        if merged is not None:
            layers = merged.layers
        children = tuple(f"{name}." for name, _ in module.named_children())
        alignment = align_loaded(
            weights,
            buffers,
            state,
            layers=layers,
            head_reference=load_head_reference(settings.head_reference or "zero", model=module),
            labels=("model", "reference"),
            prefixes=(*PREFIXES, *children),
        )
    config = getattr(module, "config", None)
    chosen = model_task(settings.task, module)
    notes = ((EXPERTS_NOTE,) if fused else ()) + (
        (TASK_NOTES[chosen.task],) if chosen.task in TASK_NOTES else ()
    )
    kind = type(measured.peft or module)
    train = task_data(train, chosen.task, module, option="data")
    held = None if eval is None else task_data(eval, chosen.task, module, option="eval_data")
    if reference_digest is None:
        reference_digest = tensors_digest(alignment.reference)
    return MeasurementInputs(
        checkpoint=Checkpoint(
            Path(IN_MEMORY),
            {},
            tensors_digest({**weights, **buffers}),
            {},
            None,
            training=dict(training or {}),
        ),
        reference=Checkpoint(reference_path, {}, reference_digest, {}, None),
        manifest={},
        model_spec=f"{IN_MEMORY} {kind.__module__}.{kind.__qualname__}",
        model_kwargs={},
        fmodel=FunctionalModel(module, buffers, task_loss(chosen.task), fused),
        params=weights,
        layers=layers,
        alignment=alignment,
        directions={
            name: alignment.directions[name].to(device=device, dtype=dtype) for name in layers
        },
        distances={row.name: row.distance for row in alignment.rows},
        attention=getattr(config, "_attn_implementation", None),
        experts=getattr(config, "_experts_implementation", None) if fused else None,
        task=chosen,
        notes=notes,
        train=train,
        noisy_train=train,
        eval=held,
        run_labels=None,
        noise=None,
        data_specs={
            "train": train.name,
            "eval": None if eval is None else eval.name,
            "input_columns": None,
            "label_column": None,
        },
        device=device,
        dtype=dtype,
    )


def _reference(
    reference: Any,
    module: nn.Module,
    fused: tuple[FusedParameter, ...],
    dtype: torch.dtype,
    patterns: tuple[str, ...],
) -> tuple[dict[str, Tensor], list[str], Path, str | None]:
    """The reference's tensors by name (fused parameters split), the selected layers, the
    reference's path (or :data:`IN_MEMORY`) and its files' SHA-256 (None: in memory)."""
    layers = select_layers(module, patterns or None, fused_parts(fused))
    if reference is None:
        raise ValueError(
            "reference is required for a model that is not a PeftModel; pass the pretrained "
            "module, its state dict or its path"
        )
    if isinstance(reference, nn.Module):
        if is_peft(reference):
            raise ValueError("reference is a PeftModel; pass its base model (get_base_model())")
        state = {**split_parameters(reference, fused_experts(reference))}
        state.update((name, b.detach()) for name, b in reference.named_buffers())
        return state, layers, Path(IN_MEMORY), None
    if isinstance(reference, Mapping):
        state = {str(k): v.detach() for k, v in reference.items() if isinstance(v, Tensor)}
        if not state:
            raise ValueError("reference: the state dict holds no tensors; pass model.state_dict()")
        return _split(state, module, fused), layers, Path(IN_MEMORY), None
    if not isinstance(reference, str | Path):
        raise TypeError(
            f"reference: expected a module, a state dict or a path, got {type(reference).__name__}"
        )
    config = getattr(module, "config", None)
    if config is not None and model_directory(reference) is not None:
        checkpoint, kept, layers = reference_weights(
            str(reference), type(module), config, dtype, patterns, False
        )
        return kept, layers, checkpoint.path, checkpoint.sha256
    checkpoint = load_checkpoint(reference, label="reference")
    if checkpoint.adapter is not None:
        raise ValueError(
            f"reference {checkpoint.directory} is a PEFT adapter; pass the pretrained model"
        )
    checkpoint = materialize(checkpoint, module)
    return _split(checkpoint.state, module, fused), layers, checkpoint.path, checkpoint.sha256


def _split(
    state: Mapping[str, Tensor], module: nn.Module, fused: tuple[FusedParameter, ...]
) -> dict[str, Tensor]:
    """``state`` with each fused parameter of the model's shape split into its layers (one of
    another shape is left out: its layers are new heads)."""
    shapes = {f.name: module.get_parameter(f.name).shape for f in fused}
    kept = {k: v for k, v in state.items() if k not in shapes or v.shape == shapes[k]}
    return fused_slices(kept, fused)


def _adapter(peft: nn.Module) -> LoraAdapter:
    """The active LoRA adapter of a PeftModel, as its adapter directory would give it."""
    from peft import get_peft_model_state_dict

    names = list(peft.active_adapters)
    if len(names) != 1:
        raise ValueError(
            f"model: a PeftModel with active adapters {names}; activate one with set_adapter"
        )
    # adapter_config.json's content: sets as lists, enums as their values
    config = json.loads(json.dumps(peft.peft_config[names[0]].to_dict(), default=list))
    tensors = get_peft_model_state_dict(peft, adapter_name=names[0])
    return lora_adapter(
        config, tensors, directory=Path(IN_MEMORY), file=Path(IN_MEMORY), label="model"
    )


def _originals(peft: nn.Module) -> dict[str, Tensor]:
    """The base tensors of a PeftModel's ``modules_to_save``, by the base model's names (the
    unloaded copy holds the trained copies under those names)."""
    from peft.utils import ModulesToSaveWrapper

    out: dict[str, Tensor] = {}
    for path, wrapper in peft.base_model.model.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper):
            original = wrapper.original_module
            tensors = itertools.chain(original.named_parameters(), original.named_buffers())
            out.update((f"{path}.{name}", t.detach()) for name, t in tensors)
    return out


__all__ = [
    "MeasuredModule",
    "evaluating",
    "forward_names",
    "is_peft",
    "measured_module",
    "object_inputs",
    "pad_token_id",
    "selected_weights",
]
