"""Fine-tuning (docs/finetune.md): one training loop for the paper's robust algorithm and the
baselines.

Every method minimises an average loss over mini-batches, starting from the pretrained
(reference) weights W^(s), with the optimiser and learning-rate schedule of the config
(:func:`make_optimizer`, :func:`learning_rate`):

* ``optimizer="sgd"`` — SGD with heavy-ball momentum and *coupled* weight decay (the decay is
  added to the gradient: g ← g + λ·W), as :class:`torch.optim.SGD`.
* ``optimizer="adamw"`` — AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
  ICLR 2019) as :class:`torch.optim.AdamW`: W ← W − η·λ·W, then
  m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², W ← W − η·(m/(1−β₁ᵗ))/(sqrt(v/(1−β₂ᵗ)) + eps).
* Schedules (per epoch e = 1..E, base rate η₀): ``constant`` η_e = η₀; ``step``
  η_e = η₀·γ^⌊(e−1)/s⌋ (``lr_gamma`` γ, ``lr_step_size`` s epochs); ``cosine``
  η_e = η_min + ½(η₀ − η_min)(1 + cos(π(e−1)/E)) (Loshchilov & Hutter, "SGDR", ICLR 2017,
  without restarts). The rate used in each epoch is the ``lr`` column of the metrics.

The methods (:data:`METHODS`: the paper's algorithm ``robust`` and the baselines it is compared
with) are objects of :data:`REGISTRY`, defined in :mod:`hessfine.finetune.method_registry`,
whose docs state each method's math and say how to add one. :func:`finetune` asks the method's
object for its batch loss, penalty and gradient rule, whether it projects onto distance balls
after each step (radii: :func:`layer_radii`), whether it holds out a validation split and keeps
the best epoch, and whether it needs the label-noise matrix F. :data:`METHODS`,
:data:`CONSISTENT_METHODS`, :data:`CONSTRAINED_METHODS` and the methods' building blocks are
re-exported from there.

Determinism. Batches are index permutations from a :class:`torch.Generator` seeded with
``config.seed``; mixup's λ comes from ``numpy.random.default_rng(config.seed)``; NSO's ε from its
own CPU :class:`torch.Generator` seeded from ``config.seed`` (:func:`noise_generator`); the global torch
RNG (dropout) is seeded inside :func:`torch.random.fork_rng`, so the caller's state is untouched.
The same seed, model and data give bitwise-identical weights (on the same machine and threads).

Example:
    >>> import torch
    >>> from hessfine.finetune.digit_networks import digits_cnn
    >>> _ = torch.manual_seed(0)
    >>> net = digits_cnn(width=4)
    >>> reference = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head")}
    >>> x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    >>> result = finetune(net, reference, train_x=x, train_y=y,
    ...                   config=FinetuneConfig("distance-constraint", epochs=2, radius=0.5))
    >>> radii = result.radii
    >>> [m["epoch"] for m in result.metrics], radii["conv1.weight"], radii["head.weight"]
    ([1, 2], 0.5, 10.0)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as nnf
from hessfine.bounds.generalization import usable_noise_matrix
from hessfine.finetune.confusion import (
    check_confusion,
    estimate_confusion_dual_t,
    inverse_confusion,
)
from hessfine.finetune.method_registry import (
    CONSISTENT_METHODS,
    CONSTRAINED_METHODS,
    METHODS,
    REGISTRY,
    FinetuneMethod,
    TrainingRun,
    l2sp_penalty,
    layer_radii,
    noise_generator,
    nso_gradient,
    project_to_balls,
    sam_gradient,
    trainable_parameters,
)
from torch import Tensor, nn

__all__ = [
    "CONSTRAINED_METHODS",
    "CONSISTENT_METHODS",
    "METHODS",
    "METRIC_COLUMNS",
    "OPTIMIZERS",
    "REGISTRY",
    "SCHEDULES",
    "FinetuneConfig",
    "FinetuneMethod",
    "FinetuneResult",
    "Method",
    "Optimizer",
    "Schedule",
    "evaluate",
    "finetune",
    "held_out_split",
    "l2sp_penalty",
    "layer_radii",
    "learning_rate",
    "load_reference",
    "make_optimizer",
    "noise_generator",
    "nso_gradient",
    "predict_probs",
    "project_to_balls",
    "sam_gradient",
]

#: The name of a method: a key of :data:`REGISTRY` (the built-in ones are :data:`METHODS`).
Method = str
Optimizer = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Schedule = Literal["constant", "step", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)

#: Columns of ``metrics.csv`` and keys of every per-epoch metrics dict. Train metrics are on the
#: examples trained on (without the validation split), in eval mode, with plain cross-entropy;
#: ``val_*`` are empty (None) unless the method holds out a validation split; ``objective`` is
#: the mean over the epoch's batches of the minimised loss (penalty included; for ``sam`` the
#: loss at W, for ``nso`` the mean loss at the perturbed weights); ``lr`` the epoch's learning rate.
METRIC_COLUMNS = (
    "epoch",
    "train_loss_noisy",
    "train_acc_noisy",
    "train_loss_clean",
    "train_acc_clean",
    "eval_loss",
    "eval_acc",
    "val_loss",
    "val_acc",
    "objective",
    "lr",
)

_EVAL_BATCH = 1024


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run (see the module docs for the methods and radii).

    ``confusion`` is the k×k noise matrix F for the consistent loss (``consistent``/``robust``);
    with ``estimate_confusion`` F is instead estimated by Dual-T from a model first fine-tuned on
    the noisy labels with early stopping. ``save_every`` is used by :mod:`hessfine.finetune.run_directory`.
    ``momentum`` is SGD's, ``adam_beta1``/``adam_beta2``/``adam_eps`` AdamW's; ``lr_step_size``
    and ``lr_gamma`` belong to the ``step`` schedule and ``lr_min`` to ``cosine``; ``sam_rho`` to
    ``sam``; ``nso_sigma`` and ``nso_draws`` to ``nso``.
    """

    method: Method
    epochs: int = 30
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    schedule: Schedule = "constant"
    lr_step_size: int = 10
    lr_gamma: float = 0.1
    lr_min: float = 0.0
    batch_size: int = 32
    weight_decay: float = 0.0
    l2sp_alpha: float = 0.01
    radius: float = 1.0
    head_radius: float = 10.0
    depth_scaling: float = 1.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2
    validation_fraction: float = 0.2
    patience: int = 5
    sam_rho: float = 0.05
    nso_sigma: float = 0.01
    nso_draws: int = 1
    confusion: tuple[tuple[float, ...], ...] | None = None
    estimate_confusion: bool = False
    seed: int = 0
    save_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in REGISTRY:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(REGISTRY)}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r} is out of range: it must be one of "
                    f"{', '.join(allowed)}"
                )
        rules = {
            "epochs": (self.epochs >= 1, "≥ 1"),
            "lr": (self.lr > 0, "> 0"),
            "momentum": (0 <= self.momentum < 1, "in [0, 1)"),
            "adam_beta1": (0 <= self.adam_beta1 < 1, "in [0, 1)"),
            "adam_beta2": (0 <= self.adam_beta2 < 1, "in [0, 1)"),
            "adam_eps": (self.adam_eps > 0, "> 0"),
            "lr_step_size": (self.lr_step_size >= 1, "≥ 1"),
            "lr_gamma": (0 < self.lr_gamma <= 1, "in (0, 1]"),
            "lr_min": (0 <= self.lr_min <= self.lr, "in [0, lr]"),
            "batch_size": (self.batch_size >= 2, "≥ 2"),
            "weight_decay": (self.weight_decay >= 0, "≥ 0"),
            "l2sp_alpha": (self.l2sp_alpha >= 0, "≥ 0"),
            "radius": (self.radius > 0, "> 0"),
            "head_radius": (self.head_radius > 0, "> 0"),
            "depth_scaling": (self.depth_scaling > 0, "> 0"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "mixup_alpha": (self.mixup_alpha > 0, "> 0"),
            "validation_fraction": (0 < self.validation_fraction < 1, "in (0, 1)"),
            "patience": (self.patience >= 1, "≥ 1"),
            "sam_rho": (self.sam_rho > 0, "> 0"),
            "nso_sigma": (self.nso_sigma > 0, "> 0"),
            "nso_draws": (self.nso_draws >= 1, "≥ 1"),
            "save_every": (self.save_every >= 1, "≥ 1"),
        }
        for name, (ok, rule) in rules.items():
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{name} = {value!r} is out of range: it must be {rule}")
        if self.confusion is not None:
            matrix = check_confusion(torch.tensor(self.confusion, dtype=torch.float64))
            object.__setattr__(self, "confusion", tuple(tuple(row) for row in matrix.tolist()))
        if (
            REGISTRY[self.method].needs_confusion
            and self.confusion is None
            and not self.estimate_confusion
        ):
            raise ValueError(
                f"method {self.method!r} needs the noise matrix: give confusion=... or "
                "estimate_confusion=True"
            )

    def confusion_matrix(self) -> Tensor | None:
        """``confusion`` as a float64 tensor (or None)."""
        return None if self.confusion is None else torch.tensor(self.confusion, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-ready (``confusion`` as nested lists)."""
        out = asdict(self)
        if self.confusion is not None:
            out["confusion"] = [list(row) for row in self.confusion]
        return out


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run produced besides the trained model.

    ``metrics``: one dict per finished epoch with the keys :data:`METRIC_COLUMNS`.
    ``best_epoch`` and ``best_state`` (a CPU copy of the state dict): the best validation epoch of
    a method with early stopping (None otherwise). ``radii``: per-layer ball radii of the
    constrained methods. ``confusion``: the F used by the consistent loss, ``confusion_source``
    whether it was ``"given"`` or estimated by ``"dual-t"``, and for an estimate
    ``confusion_rule``, how the κ rule treated it
    (:func:`hessfine.bounds.generalization.usable_noise_matrix`).
    ``validation_indices``: the held-out examples.
    """

    metrics: list[dict[str, float | None]]
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)
    radii: dict[str, float] | None = None
    confusion: list[list[float]] | None = None
    confusion_source: Literal["given", "dual-t"] | None = None
    confusion_rule: dict[str, float] | None = None
    validation_indices: list[int] | None = None


def load_reference(model: nn.Module, reference: Mapping[str, Tensor]) -> list[str]:
    """Copy every reference entry whose name and shape match into ``model``; return their names.

    Entries the model lacks or has with another shape (a new classification head) are left at the
    model's current values — the fresh head keeps its initialisation.
    """
    state = model.state_dict()
    loaded = []
    with torch.no_grad():
        for name, target in state.items():
            source = reference.get(name)
            if source is not None and tuple(source.shape) == tuple(target.shape):
                target.copy_(source.to(device=target.device, dtype=target.dtype))
                loaded.append(name)
    return loaded


def learning_rate(config: FinetuneConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (1-based) under ``config.schedule`` (module docs).

    Example:
        >>> c = FinetuneConfig("plain", epochs=4, lr=0.1, schedule="cosine")
        >>> [round(learning_rate(c, e), 4) for e in range(1, 5)]
        [0.1, 0.0854, 0.05, 0.0146]
        >>> s = FinetuneConfig("plain", lr=1.0, schedule="step", lr_step_size=2, lr_gamma=0.5)
        >>> [learning_rate(s, e) for e in range(1, 6)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if not 1 <= epoch <= config.epochs:
        raise ValueError(f"epoch must lie in 1..{config.epochs}, got {epoch}")
    if config.schedule == "step":
        return config.lr * config.lr_gamma ** ((epoch - 1) // config.lr_step_size)
    if config.schedule == "cosine":
        phase = math.pi * (epoch - 1) / config.epochs
        return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1.0 + math.cos(phase))
    return config.lr


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: FinetuneConfig
) -> torch.optim.Optimizer:
    """SGD (momentum, coupled weight decay) or AdamW (decoupled weight decay) from ``config``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = _EVAL_BATCH) -> Tensor:
    device = _device(model)
    was_training = model.training
    model.eval()
    out = [model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(out)


def predict_probs(model: nn.Module, x: Tensor, *, batch_size: int = _EVAL_BATCH) -> Tensor:
    """Softmax outputs (N, k) of ``model`` in eval mode, computed in batches, on the CPU."""
    return torch.softmax(_logits(model, x, batch_size), dim=-1)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = _EVAL_BATCH
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on (x, y)."""
    logits = _logits(model, x, batch_size)
    return _loss_acc(logits, y)


def _loss_acc(logits: Tensor, y: Tensor) -> tuple[float, float]:
    y = y.cpu()
    loss = nnf.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return loss, accuracy


def _check_data(x: Tensor, y: Tensor, label: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"{label}: inputs and labels must be tensors")
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"{label}: labels must be 1-D with one per input, got {tuple(y.shape)} for "
            f"{len(x)} inputs"
        )


def held_out_split(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(kept, held out): sorted indices of n examples, ``round(fraction·n)`` of them (at least
    one, leaving at least two) held out in the order of a permutation drawn from ``generator``;
    ValueError for fewer than 3 examples. Early stopping's validation split and a selection's
    (:func:`hessfine.finetune.selection.validation_split`)."""
    held = min(max(1, round(fraction * n)), n - 2)
    if held < 1:
        raise ValueError(f"a validation split needs at least 3 training examples, got {n}")
    order = torch.randperm(n, generator=generator)
    return order[held:].sort().values, order[:held].sort().values


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    chunks = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()  # a batch of one breaks BatchNorm in train mode
    return chunks


def _estimate_confusion(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    config: FinetuneConfig,
) -> Tensor:
    """Dual-T from a copy of ``model`` fine-tuned on the noisy labels with early stopping."""
    estimator = copy.deepcopy(model)
    plain = replace(config, method="early-stopping", confusion=None, estimate_confusion=False)
    result = finetune(estimator, reference, train_x=x, train_y=y, config=plain)
    if result.best_state is not None:
        estimator.load_state_dict(result.best_state)
    return estimate_confusion_dual_t(predict_probs(estimator, x), y)


def _noise_matrix(
    model: nn.Module,
    centres: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    config: FinetuneConfig,
) -> tuple[Tensor, Literal["given", "dual-t"], dict[str, float] | None]:
    """F for a method that needs it — the config's, or the Dual-T estimate made usable by the
    κ rule (:func:`hessfine.bounds.generalization.usable_noise_matrix`) — its source, checked
    against the model's number of classes, and the rule's record for an estimate."""
    if not config.estimate_confusion:
        confusion = config.confusion_matrix()
        check_confusion(confusion, _logits(model, x[:2]).shape[1])
        return confusion, "given", None
    estimate = _estimate_confusion(model, centres, x, y, config)
    check_confusion(estimate, _logits(model, x[:2]).shape[1])
    usable = usable_noise_matrix(estimate)
    return usable.matrix, "dual-t", usable.to_json()


def _train_epoch(
    method: FinetuneMethod,
    run: TrainingRun,
    optimizer: torch.optim.Optimizer,
    batches: list[Tensor],
    x: Tensor,
    y: Tensor,
    radii: Mapping[str, float] | None,
) -> float:
    """One pass over ``batches`` (indices into x, y) in train mode; the mean objective."""
    device = _device(run.model)
    run.model.train()
    total, count = 0.0, 0
    for index in batches:
        closure = method.closure(run, x[index].to(device), y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss = method.backward(run, closure)
        optimizer.step()
        if radii is not None:
            project_to_balls(run.model, run.centres, radii)
        total += loss.item() * len(index)
        count += len(index)
    return total / max(count, 1)


def _epoch_metrics(
    model: nn.Module,
    train: tuple[Tensor, Tensor, Tensor],
    fit: Tensor,
    validation: Tensor | None,
    eval_data: tuple[Tensor, Tensor] | None,
) -> dict[str, float | None]:
    """The loss and accuracy columns of :data:`METRIC_COLUMNS` (the others None) after an epoch;
    ``train`` is (inputs, labels trained on, clean labels)."""
    x, noisy, clean = train
    logits = _logits(model, x)
    row: dict[str, float | None] = dict.fromkeys(METRIC_COLUMNS)
    row["train_loss_noisy"], row["train_acc_noisy"] = _loss_acc(logits[fit], noisy[fit])
    row["train_loss_clean"], row["train_acc_clean"] = _loss_acc(logits[fit], clean[fit])
    if validation is not None:
        row["val_loss"], row["val_acc"] = _loss_acc(logits[validation], noisy[validation])
    if eval_data is not None:
        row["eval_loss"], row["eval_acc"] = evaluate(model, *eval_data)
    return row


def finetune(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    *,
    train_x: Tensor,
    train_y: Tensor,
    config: FinetuneConfig,
    train_y_clean: Tensor | None = None,
    eval_x: Tensor | None = None,
    eval_y: Tensor | None = None,
    on_epoch: Callable[[int, nn.Module, dict[str, float | None]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place from ``reference`` with the method ``config.method``.

    ``reference`` maps the model's state-dict names to pretrained tensors; matching entries are
    first copied into the model (:func:`load_reference`), the rest (a new head) keep their values.
    ``train_y`` are the labels trained on (noisy, if any); ``train_y_clean`` the clean ones, for
    the clean-label metrics only (defaults to ``train_y``). ``on_epoch(epoch, model, metrics)``
    is called after every epoch (1-based), e.g. to save a checkpoint. The model trains on the
    device its parameters are on; inputs are moved there batch by batch. On return the model is
    in eval mode — for a method with early stopping at its best validation epoch.

    The loop asks the method's object (``REGISTRY[config.method]``) for F, the validation split
    and the distance constraint once, then per batch for the objective and its gradient.
    """
    _check_data(train_x, train_y, "training data")
    clean = train_y if train_y_clean is None else train_y_clean
    _check_data(train_x, clean, "clean training labels")
    if (eval_x is None) != (eval_y is None):
        raise ValueError("give both eval_x and eval_y, or neither")
    if eval_x is not None:
        _check_data(eval_x, eval_y, "evaluation data")
    method = REGISTRY[config.method]
    device = _device(model)
    load_reference(model, reference)
    state = model.state_dict()
    centres = {
        name: tensor.detach().to(device=device, dtype=state[name].dtype).clone()
        for name, tensor in reference.items()
        if name in state and tuple(tensor.shape) == tuple(state[name].shape)
    }
    generator = torch.Generator().manual_seed(config.seed)
    noisy, clean = train_y.long().cpu(), clean.long().cpu()

    confusion, inverse, source, rule = config.confusion_matrix(), None, None, None
    if method.needs_confusion:
        confusion, source, rule = _noise_matrix(model, centres, train_x, noisy, config)
        inverse = inverse_confusion(confusion).to(device)
    fit, validation = torch.arange(len(train_x)), None
    if method.early_stopping:
        fit, validation = held_out_split(len(train_x), config.validation_fraction, generator)
    radii = None
    if method.constrained:
        radii = layer_radii(
            model,
            centres,
            radius=config.radius,
            head_radius=config.head_radius,
            depth_scaling=config.depth_scaling,
        )
        project_to_balls(model, centres, radii)

    run = TrainingRun(model, config, centres, generator, confusion, inverse)
    optimizer = make_optimizer(trainable_parameters(model), config)
    eval_data = None if eval_x is None else (eval_x, eval_y)
    metrics: list[dict[str, float | None]] = []
    best_loss, best_epoch, best_state, stale = math.inf, None, None, 0
    forked = [device.index or 0] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else None):
        torch.manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            rate = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            batches = [fit[chunk] for chunk in _batches(len(fit), config.batch_size, generator)]
            objective = _train_epoch(method, run, optimizer, batches, train_x, noisy, radii)
            if not math.isfinite(objective):
                raise FloatingPointError(
                    f"{config.method} fine-tuning diverged in epoch {epoch} (non-finite loss); "
                    "lower the learning rate"
                )
            row = _epoch_metrics(model, (train_x, noisy, clean), fit, validation, eval_data)
            row.update(epoch=epoch, objective=objective, lr=rate)
            metrics.append(row)
            if on_epoch is not None:
                on_epoch(epoch, model, row)
            if validation is not None:
                if row["val_loss"] < best_loss:
                    best_loss, best_epoch, stale = row["val_loss"], epoch, 0
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
                else:
                    stale += 1
                if stale >= config.patience:
                    break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FinetuneResult(
        metrics=metrics,
        best_epoch=best_epoch,
        best_state=best_state,
        radii=radii,
        confusion=None if confusion is None else confusion.cpu().tolist(),
        confusion_source=source,
        confusion_rule=rule,
        validation_indices=None if validation is None else validation.tolist(),
    )
