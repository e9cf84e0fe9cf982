"""The tasks a measurement knows (docs/inputs.md, "Tasks"): each one's per-example loss, the labels
it reads and how it is chosen for a model.

======================  ==============================  ===========================================
task                    loss (:mod:`hessfine.bounds.losses`)  labels ``y``
======================  ==============================  ===========================================
classification          :class:`CrossEntropy`           (N,) integers 0..C−1
token-classification    :class:`TokenCrossEntropy`      (N, T) integers, −100 ignored
regression              :class:`SquaredError`           (N,), (N, 1) or (N, L) numbers → (N, L)
multi-label             :class:`BinaryCrossEntropy`     (N, L) of 0/1, integers or floats
causal-lm               :class:`CausalLMLoss`           (N, T) unshifted, −100 ignored (default:
                                                        ``input_ids``, −100 off ``attention_mask``)
seq2seq-lm              :class:`Seq2SeqLMLoss`          (N, T_dec) decoder labels, −100 ignored
======================  ==============================  ===========================================

Token labels are shaped like ``input_ids``; one example is one sequence. For ``seq2seq-lm`` the
decoder inputs are made from the labels as the model makes them
(``prepare_decoder_input_ids_from_labels``: the labels shifted right behind
``decoder_start_token_id``, −100 replaced by ``pad_token_id``) and passed with the inputs
(:func:`with_decoder_inputs`). Each loss is the model's ``.loss`` for the example alone.

**Choosing the task** (:func:`choose_task`). A task given (``--task``, ``MeasureSettings.task``)
is used. Otherwise, for a Hugging Face model (``--model hf``): the config's ``problem_type``
(``regression``, ``single_label_classification``, ``multi_label_classification``); else
``regression`` when ``num_labels`` is 1; else by the model class — ``…ForTokenClassification``:
token-classification, ``…ForConditionalGeneration``: seq2seq-lm for an encoder-decoder config (a
decoder-only one, e.g. a vision-language model, trains on causal-lm), ``…ForCausalLM`` and
``…LMHeadModel``: causal-lm; else classification. Other models are classified. The source is
recorded (``settings.task_source``).

Example:
    >>> task_loss("regression")
    SquaredError()
    >>> task_labels("regression", "--data d.pt", None, torch.tensor([0.5, 2.0])).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.sources.files import one_line
from hessfine.bounds.losses import (
    IGNORE_INDEX,
    BinaryCrossEntropy,
    CausalLMLoss,
    CrossEntropy,
    ExampleLoss,
    Seq2SeqLMLoss,
    SquaredError,
    TokenCrossEntropy,
)
from torch import Tensor, nn

Task = Literal[
    "classification", "token-classification", "regression", "multi-label", "causal-lm", "seq2seq-lm"
]
TASKS: tuple[str, ...] = get_args(Task)
LOSSES: dict[str, type] = {
    "classification": CrossEntropy,
    "token-classification": TokenCrossEntropy,
    "regression": SquaredError,
    "multi-label": BinaryCrossEntropy,
    "causal-lm": CausalLMLoss,
    "seq2seq-lm": Seq2SeqLMLoss,
}
PROBLEM_TYPES = {
    "regression": "regression",
    "single_label_classification": "classification",
    "multi_label_classification": "multi-label",
}
"""Hugging Face's ``config.problem_type`` → task."""

NOTES = {
    "regression": (
        "The squared error is unbounded: Theorem 2.1 and the trace corollary assume a loss bounded "
        "by C, and bounds.C is the largest loss seen on the Hessian examples (or --loss-bound), "
        "so the bounds hold only as far as the loss stays below it."
    ),
}
"""What ``measurement.json → notes`` says of a task."""


@dataclass(frozen=True)
class TaskChoice:
    """The task measured and how it was chosen: ``given``, ``config.problem_type``,
    ``config.num_labels``, ``model class`` or ``default`` (a Hugging Face model with none of
    these); ``None`` for another model whose task was not given (classification)."""

    task: Task
    source: str | None


def task_loss(task: str) -> ExampleLoss:
    """The per-example loss of ``task``."""
    return LOSSES[task]()


def choose_task(given: str | None, module: nn.Module, *, hugging_face: bool) -> TaskChoice:
    """The task: ``given``, else for a Hugging Face model (``hugging_face``) the one its config
    and class say (module docs), else classification."""
    if given is not None:
        if given not in TASKS:
            raise InputError(f"--task {given!r} is unknown; use one of {', '.join(TASKS)}")
        return TaskChoice(given, "given")
    config = getattr(module, "config", None)
    if not hugging_face or config is None:
        return TaskChoice("classification", None)
    problem = getattr(config, "problem_type", None)
    if problem is not None:
        if problem not in PROBLEM_TYPES:
            raise InputError(
                f"--model hf: config.json's problem_type {problem!r} is none of "
                f"{', '.join(PROBLEM_TYPES)}; pass --task ({', '.join(TASKS)})"
            )
        return TaskChoice(PROBLEM_TYPES[problem], "config.problem_type")
    if getattr(config, "num_labels", None) == 1:
        return TaskChoice("regression", "config.num_labels")
    name = type(module).__name__
    if name.endswith("ForTokenClassification"):
        return TaskChoice("token-classification", "model class")
    if name.endswith("ForConditionalGeneration"):
        encoder_decoder = getattr(config, "is_encoder_decoder", False) is True
        return TaskChoice("seq2seq-lm" if encoder_decoder else "causal-lm", "model class")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return TaskChoice("causal-lm", "model class")
    return TaskChoice("classification", "default")


# --------------------------------------------------------------------------- labels as read
def task_labels(task: str, where: str, x: object, y: object) -> Tensor:
    """The labels ``y`` of ``task`` checked against the table of the module docs (``x``: the
    inputs, for the shapes of token labels; ``where`` names the data in errors): int64 class and
    token labels, float32 (N, L) targets and multi-labels."""
    if task == "classification":
        return _class_labels(where, y)
    if task in ("regression", "multi-label"):
        return _targets(task, where, y)
    ids = x.get("input_ids") if isinstance(x, Mapping) else None
    if task != "token-classification" and (
        not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point()
    ):
        raise InputError(
            f"{where}: --task {task} needs x to be a dict with integer 'input_ids' of shape "
            "(N, T) (and 'attention_mask'); save it with torch.save({'x': {...}, 'y': labels}, "
            "PATH)"
        )
    if task == "causal-lm" and y is None:
        mask = x.get("attention_mask")
        y = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    wanted = "(N, T_dec)" if task == "seq2seq-lm" else "shaped like input_ids"
    like = ids if task != "seq2seq-lm" and isinstance(ids, Tensor) else None
    if (
        not isinstance(y, Tensor)
        or y.ndim != 2
        or y.is_floating_point()
        or y.dtype == torch.bool
        or (like is not None and tuple(y.shape) != tuple(like.shape))
    ):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        expected = f"{wanted} {tuple(like.shape)}" if like is not None else wanted
        raise InputError(
            f"{where}: --task {task} needs integer labels y {expected}, one per position with "
            f"-100 at ignored ones, got {shape}"
            + ("; give unshifted labels" if task == "causal-lm" else "")
        )
    _not_empty(where, y)
    y = y.to(torch.int64)
    if bool(((y < 0) & (y != IGNORE_INDEX)).any()):
        raise InputError(f"{where}: {task} labels must be ids ≥ 0 or -100 (ignored)")
    return y


def _class_labels(where: str, y: object) -> Tensor:
    """``y`` as int64 class labels, checked: 1-D, not empty, integers ≥ 0."""
    if not isinstance(y, Tensor) or y.ndim != 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise InputError(
            f"{where}: y must be a 1-D tensor of class labels (N,), got {shape}; for labels per "
            "token pass --task token-classification, for several targets per example --task "
            "regression or multi-label"
        )
    _not_empty(where, y)
    if y.dtype == torch.bool or y.is_complex():
        raise InputError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    if y.is_floating_point() and not bool((torch.isfinite(y) & (y == y.round())).all()):
        raise InputError(
            f"{where}: y must hold integer class labels, got non-integer values; for real-valued "
            "targets pass --task regression"
        )
    y = y.to(torch.int64)
    if int(y.min()) < 0:
        raise InputError(f"{where}: labels must be class indices 0..k-1, found {int(y.min())}")
    return y


def _targets(task: str, where: str, y: object) -> Tensor:
    """Regression targets or multi-labels as float32 (N, L)."""
    regression = task == "regression"
    wanted = "(N,), (N, 1) or (N, L) numbers" if regression else "(N, L) of 0/1"
    if (
        not isinstance(y, Tensor)
        or y.ndim not in ((1, 2) if regression else (2,))
        or y.dtype == torch.bool
        or y.is_complex()
    ):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        got = f"{shape}" if not isinstance(y, Tensor) else f"{shape} {y.dtype}"
        raise InputError(f"{where}: --task {task} needs labels y {wanted}, got {got}")
    _not_empty(where, y)
    y = y.to(torch.float32).reshape(y.shape[0], -1)
    if not bool(torch.isfinite(y).all()):
        raise InputError(f"{where}: --task {task} labels must be finite numbers")
    if not regression and not bool(((y == 0) | (y == 1)).all()):
        raise InputError(f"{where}: --task multi-label needs labels 0 or 1, one column per label")
    return y


def _not_empty(where: str, y: Tensor) -> None:
    if int(y.shape[0]) == 0:
        raise InputError(f"{where}: the data set is empty; pass data with at least one example")


# --------------------------------------------------------------------------- against the model
def check_labels(data: LabeledData, num_classes: int, *, option: str) -> None:
    """Raise :class:`InputError` unless every label lies in [0, num_classes).

    Sequence labels (N, T) are token ids checked against the vocabulary; −100 is ignored.
    """
    labels = data.y if data.y.ndim == 1 else data.y[data.y != IGNORE_INDEX]
    if labels.numel() == 0:
        raise InputError(f"{option} {data.name}: every label is -100; give at least one label")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise InputError(
            f"{option} {data.name}: labels range over {low}..{high} but the model has "
            f"{num_classes} outputs; use data with labels 0..{num_classes - 1} or a model with "
            "more classes (--model-kwargs)"
        )


def check_task_labels(data: LabeledData, task: str, logits: torch.Size, *, option: str) -> None:
    """Raise :class:`InputError` unless the labels of ``data`` fit the model's ``logits`` shape:
    class and token ids within the outputs, token labels as long as the logits' sequences,
    one target or 0/1 label per output."""
    outputs = logits[-1]
    if task in ("regression", "multi-label"):
        if data.y.shape[1] != outputs:
            wanted = (
                "targets (N,), (N, 1) or (N, L)" if task == "regression" else "0/1 labels (N, L)"
            )
            raise InputError(
                f"{option} {data.name}: --task {task} needs {wanted} for the model's "
                f"L = {outputs} outputs, got {tuple(data.y.shape)}; give one per output"
            )
        return
    if task in ("token-classification", "seq2seq-lm") and data.y.shape[1] != logits[1]:
        raise InputError(
            f"{option} {data.name}: --task {task} needs labels (N, {logits[1]}), one per "
            f"position of the model's logits, got {tuple(data.y.shape)}"
        )
    check_labels(data, outputs, option=option)


def task_data(data: LabeledData, task: str, module: nn.Module, *, option: str) -> LabeledData:
    """``data`` as the task's model takes it: for seq2seq-lm with the decoder inputs made from
    its labels (:func:`with_decoder_inputs`), else as it is."""
    if task != "seq2seq-lm":
        return data
    return with_decoder_inputs(data, module, option=option)


def with_decoder_inputs(data: LabeledData, module: nn.Module, *, option: str) -> LabeledData:
    """``data`` with ``decoder_input_ids`` made from its labels by the model's own
    ``prepare_decoder_input_ids_from_labels`` (kept when ``x`` holds them already)."""
    if not isinstance(data.x, Mapping) or "decoder_input_ids" in data.x:
        return data
    prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise InputError(
            f"--task seq2seq-lm: {type(module).__name__} makes no decoder inputs from labels "
            "(prepare_decoder_input_ids_from_labels); measure an encoder-decoder model such as "
            "T5 or BART, or give decoder_input_ids in x"
        )
    try:
        with torch.no_grad():
            decoder = prepare(labels=data.y)
    except (AttributeError, ValueError, TypeError) as err:
        raise InputError(
            f"{option} {data.name}: the model cannot make its decoder inputs from the labels "
            f"({one_line(err)}); set decoder_start_token_id and pad_token_id in config.json"
        ) from None
    return replace(data, x={**data.x, "decoder_input_ids": decoder})
