"""Measuring a model held in memory: :func:`measure_model` (exported as ``hessfine.measure_model``).

The function turns a module, its reference and data in memory into a measurement's inputs
(:mod:`hessfine.analysis.in_memory_inputs`, :mod:`hessfine.analysis.in_memory_data`) and runs
the measuring core of ``hessfine measure`` on them
(:func:`hessfine.analysis.measure.measure_inputs`): the same examples for the same data and
seed, the same estimators, the same ``measurement.json``. The options are the fields of
:class:`~hessfine.analysis.measure.MeasureSettings`, under the command line's names with ``_``
for ``-`` and its defaults (:func:`measure_settings`); errors are a ``TypeError`` (a wrong kind
of argument) or a ``ValueError`` (a wrong value) of one line.

Example:
    >>> import torch
    >>> from hessfine.analysis.python_api import measure_model
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> pretrained = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> tuned = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> result = measure_model(tuned, reference=pretrained, data=(x, y), samples=16)
    >>> [layer.name for layer in result.layers], result.layers[0].route
    (['0.weight', '2.weight'], 'ggn-certified')
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import torch
from hessfine.analysis.distributed import Context
from hessfine.analysis.errors import InputError
from hessfine.analysis.in_memory_data import object_data
from hessfine.analysis.in_memory_inputs import (
    MeasuredModule,
    evaluating,
    forward_names,
    measured_module,
    model_task,
    object_inputs,
    pad_token_id,
)
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.measure import MeasureSettings, measure_inputs
from hessfine.analysis.measurement import Measurement
from hessfine.analysis.measurement_inputs import MeasurementInputs
from hessfine.analysis.model_specs import resolve_device
from hessfine.analysis.tasks import Task
from hessfine.bounds.estimators.quadratic_forms import Estimator
from torch import nn

SETTINGS = tuple(f.name for f in dataclasses.fields(MeasureSettings))
"""The names :func:`measure_model` and the training callbacks take as settings."""


def measure_model(
    model: nn.Module,
    *,
    reference: Any = None,
    data: Any,
    eval_data: Any = None,
    task: Task | None = None,
    estimator: Estimator = "auto",
    samples: int | Literal["all"] = 256,
    **settings: Any,
) -> Measurement:
    """Measure the Hessian quantities and bounds of ``model`` against ``reference``.

    The model is not modified: it is evaluated in eval mode (every submodule's mode restored
    after) with its own tensors, converted only where ``device`` or ``dtype`` differ from its own
    (a copy of its weights, then). A PeftModel is measured as base + adapter, exactly as its
    adapter directory is (its adapted layers, v_i = ΔW_i).

    Args:
        model: The fine-tuned network, an ``nn.Module`` whose forward returns the logits (or an
            output with ``.logits``); a ``peft.PeftModel`` is taken as base + adapter.
        reference: The pretrained weights W^(s): a module, a state dict, or a path (a weights
            file, a Hugging Face directory, … as ``hessfine measure --reference`` reads). Default:
            a PeftModel's base; required for other models.
        data: The training data: a ``DataLoader``, a map-style ``Dataset``, a
            ``datasets.Dataset``, an ``(x, y)`` pair of tensors (``x`` may be a dict of model
            inputs) or a path. Batches may be tensors, ``(inputs, labels)`` pairs or dicts with
            ``labels`` (−100 ignored for a causal LM). An indexable data set gives the seeded,
            class-stratified Hessian examples that files give; a ``DataLoader`` or iterable its
            first ``samples`` examples in iteration order (``data.hessian_sample.order`` is then
            ``iteration``).
        eval_data: Evaluation data in the same forms, for the measured generalization gap.
        task: One of ``classification``, ``token-classification``, ``regression``,
            ``multi-label``, ``causal-lm`` (one sequence is one example) or ``seq2seq-lm``.
            Default: for a transformers model the task its config and class say (as for a
            Hugging Face directory: ``problem_type``, ``num_labels == 1``, ``…ForTokenClassification``,
            ``…ForCausalLM``, ``…ForConditionalGeneration``), else ``classification``.
        estimator: The quadratic-form estimator (``auto``, ``positive``, ``block``, ``ggn``,
            ``reference-code``).
        samples: How many Hessian examples (an int, or ``"all"``).
        **settings: Any other field of :class:`~hessfine.analysis.measure.MeasureSettings`
            under the command line's name: ``trace``, ``eigen``, ``noise_sigma``,
            ``certificate``, ``layers``, ``device`` (``auto``: the model's device), ``dtype``,
            ``seed``, ``batch_size``, ``lanczos_steps``, …

    Returns:
        The frozen :class:`~hessfine.analysis.measurement.Measurement`: ``to_json()`` is the
        ``measurement.json`` document, ``save(dir)`` writes it; paths are recorded as
        ``"<in-memory>"`` and the measured tensors' SHA-256 in place of the files'.

    Raises:
        TypeError: an unknown setting (the message lists the valid ones) or an argument of the
            wrong kind.
        ValueError: a value that cannot work (bad data, a reference that does not fit, an
            option out of range), in one line.
    """
    chosen = measure_settings(task=task, estimator=estimator, samples=samples, **settings)
    measured = measured_module(model)
    return measure_objects(
        measured,
        reference=reference,
        data=data,
        eval_data=eval_data,
        settings=chosen,
        context=Context(device=model_device(chosen.device, measured.module)),
    )


def measure_objects(
    measured: MeasuredModule,
    *,
    reference: Any,
    data: Any,
    eval_data: Any,
    settings: MeasureSettings,
    context: Context,
    training: Mapping[str, Any] | None = None,
) -> Measurement:
    """:func:`measure_model` of a prepared module, as one process of a group.

    Args:
        measured: The module measured (:func:`measured_module`).
        reference: As for :func:`measure_model`.
        data: As for :func:`measure_model`, or already a :class:`LabeledData` (a training
            callback's fixed sample).
        eval_data: Likewise.
        settings: The settings (:func:`measure_settings`).
        context: This process's share of the work (under distributed training, of the
            training's process group).
        training: What ``measurement.json → training`` records (step, epoch, ...).

    Returns:
        The measurement.

    Raises:
        ValueError: bad inputs, in one line.
    """
    module = measured.module

    def load() -> MeasurementInputs:
        options = {
            "task": model_task(settings.task, module).task,
            "pad_token_id": pad_token_id(module),
            "input_names": forward_names(module),
            "image_size": settings.image_size,
        }
        train = (
            data if isinstance(data, LabeledData) else object_data(data, label="data", **options)
        )
        held = eval_data
        if held is not None and not isinstance(held, LabeledData):
            held = object_data(held, label="eval_data", **options)
        return object_inputs(
            measured,
            reference,
            train=train,
            eval=held,
            settings=settings,
            device=context.device,
            training=training,
        )

    try:
        # autograd on, also inside a validation loop's inference mode (Lightning's)
        with evaluating(module), torch.inference_mode(False), torch.enable_grad():
            return measure_inputs(load, settings, context)
    except InputError as err:
        raise ValueError(python_message(err)) from None


def measure_settings(**settings: Any) -> MeasureSettings:
    """The :class:`MeasureSettings` of keyword arguments named as the command line's options.

    Args:
        **settings: Fields of :class:`MeasureSettings`; ``samples`` may be ``"all"``,
            ``noise_sigma`` a number, ``layers`` one glob.

    Returns:
        The settings, checked.

    Raises:
        TypeError: an unknown name (the message lists the valid ones) or a value of the wrong
            type.
        ValueError: a value out of range or not among the choices.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(SETTINGS)}")
    hints = typing.get_type_hints(MeasureSettings)
    values = {
        name: _checked(name, _spelled(name, value), hints[name]) for name, value in settings.items()
    }
    chosen = MeasureSettings(**values)
    try:
        chosen.validate()
    except InputError as err:
        raise ValueError(python_message(err)) from None
    return chosen


def model_device(device: str, module: nn.Module) -> torch.device:
    """The device measured on.

    Args:
        device: The ``device`` setting; ``auto`` is the device of the module's first parameter
            (the CPU for a module without parameters).
        module: The module measured.

    Returns:
        The device.
    """
    if device != "auto":
        try:
            return resolve_device(device)
        except InputError as err:
            raise ValueError(python_message(err)) from None
    first = next(module.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def python_message(err: InputError) -> str:
    """The one-line message of ``err``, its options named as the Python API's arguments.

    Args:
        err: An error of the loading code, which names command-line options.

    Returns:
        The message, ``--noise-sigma`` written ``noise_sigma``.
    """
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), str(err))


def _spelled(name: str, value: Any) -> Any:
    """``value`` in the settings' own form.

    ``samples="all"`` is None; a number or a string is a one-element tuple where a tuple is
    wanted.
    """
    if name == "samples" and value == "all":
        return None
    if name == "noise_sigma" and isinstance(value, int | float):
        return (float(value),)
    if name == "layers" and isinstance(value, str):
        return (value,)
    if name in ("noise_sigma", "layers") and isinstance(value, list):
        return tuple(value)
    return value


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it is of the field's type (a float field takes an int); else the error."""
    if _accepts(hint, value):
        return float(value) if hint is float else value
    choices = _choices(hint)
    if choices and isinstance(value, str):
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    raise TypeError(f"{name}: expected {_describe(hint)}, got {value!r}")


def _accepts(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return isinstance(value, tuple) and all(_accepts(args[0], v) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        kinds = int if hint is int else int | float
        return isinstance(value, kinds) and not isinstance(value, bool)
    return isinstance(value, hint)


def _choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return tuple(c for arg in typing.get_args(hint) for c in _choices(arg))


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a sequence of {_describe(args[0])}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
