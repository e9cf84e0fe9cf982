"""Per-method hyperparameter selection on a validation split (docs/finetune.md, "Selection").

Ju, Li & Zhang (ICML 2022) chose each method's hyperparameters by validation accuracy. Here a
:class:`SelectionGrid` names a few values of some :class:`~hessfine.finetune.methods.FinetuneConfig`
options: the optimiser's (``lr``, ``weight_decay``, ..., which every method has) and a method's own
(:attr:`~hessfine.finetune.method_registry.FinetuneMethod.options`: the radius of the
constrained methods, L2-SP's α, SAM's ρ, NSO's σ, label smoothing's ε, mixup's α, early
stopping's patience). :func:`select` fine-tunes a copy of the model at every point of the grid
(the Cartesian product of its axes, in axis order) on the training examples, scores each on the
validation examples and keeps the best:

    choice = argmax over the grid of (validation accuracy, −validation loss), first point on ties.

The validation examples are held out of the training set (so out of the n of the bounds), and
their labels are drawn the way the training labels are: noisy when those are. Under
class-conditional noise with F[y, y] > max_{z≠y} F[y, z] (every noise setting of the demo) the
accuracy on noisy labels ranks models as the clean accuracy does in expectation — for symmetric
noise at rate ρ it is (1 − ρ)·a + ρ/(k−1)·(1 − a), increasing in the clean accuracy a — so a
user's noisy validation split is usable for selection as it stands. A point whose training
diverges (non-finite loss) or whose Dual-T estimate is singular gets no score and is never
chosen.

:class:`Selection` holds the grid, every point's scores and the choice, and its ``to_json`` is
the ``selection`` entry of a run's manifest; a run that reuses a choice made elsewhere (the demo's
later seeds) records it with :meth:`Selection.reused`, naming where it was taken from.

Example:
    >>> import torch
    >>> from hessfine.finetune.digit_networks import digits_cnn
    >>> _ = torch.manual_seed(0)
    >>> net = digits_cnn(width=4)
    >>> reference = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head")}
    >>> x, y = torch.randn(80, 1, 8, 8), torch.randint(0, 10, (80,))
    >>> grid = SelectionGrid.parse(["lr=0.01,0.05", "radius=0.3,1"])
    >>> chosen = select(net, reference, train_x=x[:60], train_y=y[:60], val_x=x[60:],
    ...                 val_y=y[60:], config=FinetuneConfig("distance-constraint", epochs=1),
    ...                 grid=grid)
    >>> len(chosen.scores), sorted(chosen.choice)
    (4, ['lr', 'radius'])
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from hessfine.finetune.method_registry import REGISTRY
from hessfine.finetune.methods import FinetuneConfig, evaluate, finetune, held_out_split
from torch import Tensor, nn

__all__ = [
    "RULE",
    "SELECTABLE",
    "Adjust",
    "Score",
    "Selection",
    "SelectionGrid",
    "candidate_configs",
    "choose",
    "method_options",
    "score_point",
    "select",
    "validation_split",
]

#: How the choice is made, as recorded in every ``selection`` entry.
RULE = "largest validation accuracy; ties: lower validation loss, then grid order"

_SPLIT_TAG = 0x53454C  # "SEL": the validation split's stream differs from the batch order's
_NOT_SELECTABLE = frozenset({"method", "seed", "save_every", "confusion", "estimate_confusion"})
_TYPES = {f.name: f.type for f in fields(FinetuneConfig)}
#: The options a grid may name: every numeric field of FinetuneConfig but the seed and
#: ``save_every`` (which change what is written, not what is learned).
SELECTABLE: tuple[str, ...] = tuple(
    name
    for name, kind in _TYPES.items()
    if kind in ("float", "int") and name not in _NOT_SELECTABLE
)
#: The options some method owns (the others belong to every method).
_METHOD_OWNED = frozenset(name for method in REGISTRY.values() for name in method.options)

Labels = Literal["clean", "noisy"]


def method_options(method: str) -> tuple[str, ...]:
    """The options a grid may name for ``method``: its own (registry) options and the options
    that belong to every method (the optimiser's, the schedule's, epochs and batch size).

    Example:
        >>> "radius" in method_options("robust"), "radius" in method_options("plain")
        (True, False)
    """
    own = REGISTRY[method].options
    return tuple(n for n in SELECTABLE if n in own or n not in _METHOD_OWNED)


def _number(name: str, text: object) -> float | int:
    shown = name.replace("_", "-")
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{shown}={text} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{shown}={text} is not a finite number")
    if _TYPES[name] == "int":
        if not value.is_integer():
            raise ValueError(f"{shown}={text} must be a whole number")
        return int(value)
    return value


@dataclass(frozen=True)
class SelectionGrid:
    """The values to try of each option: ``axes`` is ((option, (value, ...)), ...), option
    names as :class:`~hessfine.finetune.methods.FinetuneConfig` fields, each named once, each
    with at least one value. Its points are the Cartesian product of the axes, in axis order.

    Example:
        >>> grid = SelectionGrid.from_mapping({"lr": [0.01, 0.05], "sam-rho": [0.05]})
        >>> grid.points()
        [{'lr': 0.01, 'sam_rho': 0.05}, {'lr': 0.05, 'sam_rho': 0.05}]
    """

    axes: tuple[tuple[str, tuple[float | int, ...]], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.axes]
        if not names:
            raise ValueError("the grid is empty; name at least one option, e.g. lr=0.01,0.05")
        for name, values in self.axes:
            if name not in SELECTABLE:
                raise ValueError(
                    f"{name.replace('_', '-')} cannot be selected; choose among "
                    f"{', '.join(n.replace('_', '-') for n in SELECTABLE)}"
                )
            if names.count(name) > 1:
                raise ValueError(f"{name.replace('_', '-')} is named twice; give it once")
            if not values:
                raise ValueError(f"{name.replace('_', '-')} has no values")
            if len(set(values)) != len(values):
                raise ValueError(f"{name.replace('_', '-')} repeats a value")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Sequence[object]]) -> SelectionGrid:
        """A grid from {option: [values]} (``-`` in names read as ``_``); raises ValueError
        naming what is wrong."""
        axes = []
        for key, values in mapping.items():
            name = str(key).strip().replace("-", "_")
            if name not in SELECTABLE:
                SelectionGrid(((name, (0.0,)),))  # raises the message naming the choices
            if isinstance(values, str | bytes) or not isinstance(values, Sequence):
                values = [values]
            axes.append((name, tuple(_number(name, v) for v in values)))
        return cls(tuple(axes))

    @classmethod
    def parse(cls, texts: Sequence[str]) -> SelectionGrid:
        """A grid from ``NAME=V1,V2,...`` items (several per text separated by ``;``), as the
        command line's ``--select`` takes them."""
        mapping: dict[str, list[str]] = {}
        for text in texts:
            for item in str(text).split(";"):
                if not item.strip():
                    continue
                name, sign, values = item.partition("=")
                name = name.strip().replace("-", "_")
                if not sign or not name:
                    raise ValueError(f"{item.strip()!r} is not NAME=V1,V2,... (e.g. lr=0.01,0.05)")
                if name in mapping:
                    raise ValueError(f"{name.replace('_', '-')} is named twice; give it once")
                parts = [v.strip() for v in values.split(",")]
                if not values.strip() or any(not v for v in parts):
                    raise ValueError(f"{item.strip()!r}: give values separated by commas")
                mapping[name] = parts
        return cls.from_mapping(mapping)

    def names(self) -> tuple[str, ...]:
        """The options of the grid, in axis order."""
        return tuple(name for name, _ in self.axes)

    def for_method(self, method: str) -> SelectionGrid | None:
        """The axes that apply to ``method`` (:func:`method_options`), or None if none do:
        a grid shared by several methods, each taking what it has."""
        allowed = method_options(method)
        axes = tuple((n, v) for n, v in self.axes if n in allowed)
        return SelectionGrid(axes) if axes else None

    def check_method(self, method: str) -> None:
        """Raise ValueError if an axis names an option ``method`` does not have."""
        allowed = method_options(method)
        foreign = [n.replace("_", "-") for n in self.names() if n not in allowed]
        if foreign:
            own = ", ".join(n.replace("_", "-") for n in REGISTRY[method].options) or "none"
            raise ValueError(
                f"method {method} does not use {', '.join(foreign)} (its own options: {own}; "
                "the optimiser's apply to every method)"
            )

    def points(self) -> list[dict[str, float | int]]:
        """Every point of the grid, as {option: value}, axes varying last-fastest."""
        names = self.names()
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*(v for _, v in self.axes))
        ]

    def to_json(self) -> dict[str, list[float | int]]:
        """{option: [values]}."""
        return {name: list(values) for name, values in self.axes}


@dataclass(frozen=True)
class Score:
    """One point of a grid with its full options (the point and what ``adjust`` derived from
    it) and its validation accuracy and loss, or the error that left it without a score."""

    options: dict[str, float | int]
    validation_accuracy: float | None
    validation_loss: float | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "options": dict(self.options),
            "validation_accuracy": self.validation_accuracy,
            "validation_loss": self.validation_loss,
            "error": self.error,
        }


def choose(scores: Sequence[Score]) -> int:
    """The index of the chosen score (:data:`RULE`); ValueError when none has a score.

    Example:
        >>> s = [Score({"lr": 0.1}, 0.8, 0.7), Score({"lr": 0.2}, 0.8, 0.5),
        ...      Score({"lr": 0.3}, None, None, "diverged")]
        >>> choose(s)
        1
    """
    scored = [
        (i, s)
        for i, s in enumerate(scores)
        if s.validation_accuracy is not None and math.isfinite(s.validation_accuracy)
    ]
    if not scored:
        reasons = "; ".join(sorted({s.error or "no score" for s in scores}))
        raise ValueError(f"no point of the grid could be trained ({reasons})")

    def key(item: tuple[int, Score]) -> tuple[float, float, int]:
        i, s = item
        loss = s.validation_loss if s.validation_loss is not None else math.inf
        return -float(s.validation_accuracy or 0.0), loss, i

    return min(scored, key=key)[0]


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection for one method: the grid, every point's :class:`Score`, the
    chosen options (a point of the grid with what ``adjust`` derived) and the validation
    split (``n`` examples, ``labels`` clean or noisy, and what the caller adds)."""

    method: str
    grid: SelectionGrid
    scores: tuple[Score, ...]
    choice: dict[str, float | int]
    validation: dict[str, Any]

    @classmethod
    def from_scores(
        cls,
        method: str,
        grid: SelectionGrid,
        scores: Sequence[Score],
        validation: Mapping[str, Any],
    ) -> Selection:
        """The selection made from ``scores`` (one per point of ``grid``, in its order)."""
        if len(scores) != len(grid.points()):
            raise ValueError(f"{len(scores)} scores for {len(grid.points())} points of the grid")
        index = choose(scores)
        return cls(method, grid, tuple(scores), dict(scores[index].options), dict(validation))

    def config(self, base: FinetuneConfig) -> FinetuneConfig:
        """``base`` with the chosen options."""
        return replace(base, **self.choice)

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``selection`` entry of the run that made the choice."""
        return {
            "rule": RULE,
            "grid": self.grid.to_json(),
            "validation": dict(self.validation),
            "scores": [s.to_json() for s in self.scores],
            "choice": dict(self.choice),
            "taken_from": None,
        }

    def reused(self, taken_from: str) -> dict[str, Any]:
        """The ``selection`` entry of a run that reuses this choice: the grid and the choice,
        and ``taken_from`` saying where the selection (with its scores) is recorded."""
        return {
            "rule": RULE,
            "grid": self.grid.to_json(),
            "validation": None,
            "scores": None,
            "choice": dict(self.choice),
            "taken_from": taken_from,
        }


Adjust = Callable[[dict[str, float | int]], dict[str, float | int]]


def validation_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(trained, held out): sorted indices of n examples, ``round(fraction·n)`` of them (at
    least one, leaving at least two) held out, drawn with ``seed`` through a stream of its own
    (not the batch order's of the same seed).

    Example:
        >>> kept, held = validation_split(10, 0.2, seed=0)
        >>> len(kept), len(held), sorted(kept.tolist() + held.tolist()) == list(range(10))
        (8, 2, True)
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction {fraction} must lie in (0, 1)")
    state = np.random.SeedSequence([seed, _SPLIT_TAG]).generate_state(1, dtype=np.uint64)[0]
    return held_out_split(n, fraction, torch.Generator().manual_seed(int(state)))


def candidate_configs(
    config: FinetuneConfig, grid: SelectionGrid, adjust: Adjust | None = None
) -> list[tuple[dict[str, float | int], FinetuneConfig]]:
    """The options and config of every point of ``grid``: the point, with what
    ``adjust(point)`` returns in its place (e.g. the point and a head radius in proportion to
    its radius), and ``config`` with those options. Checked before anything is trained:
    ValueError for an option the method does not use or a value out of range."""
    grid.check_method(config.method)
    out = []
    for point in grid.points():
        options = dict(point) if adjust is None else adjust(dict(point))
        try:
            out.append((options, replace(config, **options)))
        except ValueError as err:
            shown = ", ".join(f"{k.replace('_', '-')}={v:g}" for k, v in point.items())
            raise ValueError(f"at {shown}: {err}") from None
    return out


def score_point(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    *,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    config: FinetuneConfig,
    options: Mapping[str, float | int],
    train_y_clean: Tensor | None = None,
) -> Score:
    """Fine-tune a copy of ``model`` with ``config`` on the training examples and score it on
    the validation examples (accuracy and cross-entropy against ``val_y``, in eval mode; the
    best epoch for a method that stops early). ``options`` is what the score records. A
    divergence or a singular noise-matrix estimate gives a score with its ``error``."""
    candidate = copy.deepcopy(model)
    try:
        finetune(
            candidate,
            reference,
            train_x=train_x,
            train_y=train_y,
            train_y_clean=train_y_clean,
            config=config,
        )
    except (FloatingPointError, ValueError) as err:
        return Score(dict(options), None, None, " ".join(str(err).split()))
    loss, accuracy = evaluate(candidate, val_x, val_y)
    return Score(dict(options), accuracy, loss if math.isfinite(loss) else None)


def select(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    *,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    config: FinetuneConfig,
    grid: SelectionGrid,
    labels: Labels = "clean",
    train_y_clean: Tensor | None = None,
    adjust: Adjust | None = None,
    validation: Mapping[str, Any] | None = None,
    on_point: Callable[[int, Score], None] | None = None,
) -> Selection:
    """Choose ``config.method``'s options from ``grid`` by validation accuracy (module docs).

    Every point trains a copy of ``model`` (left untouched) from ``reference`` on
    (``train_x``, ``train_y``) with ``config`` and the point's options (and ``adjust``'s), and
    is scored on (``val_x``, ``val_y``). ``labels`` says whether the validation labels are
    ``clean`` or ``noisy`` (drawn as the training labels were); ``validation`` adds to the
    record (e.g. the examples' source). ``on_point(i, score)`` is called after each point.
    Raises ValueError for a grid that does not fit the method or a value out of range (before
    training) and when no point could be trained.
    """
    scores = []
    for i, (options, candidate) in enumerate(candidate_configs(config, grid, adjust)):
        score = score_point(
            model,
            reference,
            train_x=train_x,
            train_y=train_y,
            val_x=val_x,
            val_y=val_y,
            config=candidate,
            options=options,
            train_y_clean=train_y_clean,
        )
        scores.append(score)
        if on_point is not None:
            on_point(i, score)
    record = {"n": len(val_x), "labels": labels, **dict(validation or {})}
    return Selection.from_scores(config.method, grid, scores, record)
