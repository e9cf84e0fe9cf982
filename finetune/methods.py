"""Fine-tuning methods (SPEC §5): the paper's robust algorithm and the baselines it compares with.

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

The methods (the objective, and for ``sam``/``nso`` the gradient rule):

* ``plain`` — cross-entropy on the (possibly noisy) labels, no early stopping.
* ``early-stopping`` — the same, with a validation split (``validation_fraction`` of the training
  examples, noisy labels) held out; training stops after ``patience`` epochs without a lower
  validation loss and the model ends at the best epoch.
* ``l2-sp`` — cross-entropy + (α/2)·Σ ‖W − W^(s)‖²_F over every parameter the reference has
  with the same shape (Li, Grandvalet & Davoine, "Explicit inductive bias for transfer learning
  with convolutional networks", ICML 2018); a new head is regularised by ``weight_decay`` only.
* ``distance-constraint`` — cross-entropy, with every selected layer projected back onto a
  Frobenius ball around its pretrained weights after each optimiser step
  (:func:`project_to_balls`; radii from :func:`layer_radii`).
* ``label-smoothing`` — cross-entropy against (1−ε)·onehot(y) + ε/k (Szegedy et al., 2016).
* ``mixup`` — convex combinations λx + (1−λ)x_π of a batch and a permutation of it, loss
  λ·ℓ(·, y) + (1−λ)·ℓ(·, y_π), λ ~ Beta(α, α) per batch (Zhang et al., "mixup", ICLR 2018).
* ``consistent`` — the backward-corrected loss Σ_j (F⁻¹)[ỹ, j]·ℓ(f(x), j), unbiased for the
  clean loss (:func:`hessfine.finetune.confusion.consistent_loss`), with F given or estimated by Dual-T.
* ``robust`` — the paper's algorithm (Ju, Li & Zhang, ICML 2022, Algorithm 1): the consistent
  loss *and* the layer-wise distance constraint.
* ``sam`` — sharpness-aware minimisation (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021) of the
  cross-entropy: with g = ∇L(W) on the batch, ascend to W + ρ·g/‖g‖ (‖·‖ over all trainable
  parameters, ρ = ``sam_rho``), take the gradient there and step from W
  (:func:`sam_gradient`).
* ``nso`` — noise-stability optimisation (H. R. Zhang, D. Li, H. Ju et al., "Noise stability
  optimization for finding flat minima: a Hessian-based regularization approach", the paper's
  authors' follow-up): the gradient averaged at W + ε_j and W − ε_j for ``nso_draws`` Gaussian
  draws ε_j ~ N(0, σ²I) (σ = ``nso_sigma``). Its expectation is the gradient of
  E_ε[L(W+ε)] ≈ L(W) + (σ²/2)·Tr ∇²L(W), so it penalises the Hessian trace; the pairing ±ε
  cancels the first-order noise exactly (:func:`nso_gradient`).

BatchNorm statistics under ``sam``/``nso``: running statistics are updated by one forward pass
per step at W, as in plain training (for ``nso`` an extra forward pass without gradients); the
ascent pass and the perturbed passes leave them untouched.

Layers and radii. The constrained layers are those the analysis measures by default
(:func:`hessfine.analysis.checkpoints.select_layers`: the ≥2-D weights of Linear, Conv and attention
projections — the same selection as the authors' code, which constrains 2-D and 4-D non-bias
weights). A layer the reference has with the same shape belongs to the feature extractor; the
others form the new head. Extractor layer i (0-based, model order, L of them) gets radius
``radius · depth_scaling^(i/(L−1))``: log-radii grow linearly with depth and the deepest layer's
radius is ``depth_scaling`` times the first's. This is the continuous form of the authors' code,
which multiplies the radius of ResNet stage s = 1..4 by γ^max(0, s−2) (radii λ, λ, λγ, λγ²).
Head layers get ``head_radius`` and are projected around **zero** — the authors' code constrains
the head's own norm, and the analysis measures a new head's distance from zero by default, so
the trace corollary's α_i for the head is exactly ``head_radius``.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as nnf
from hessfine.finetune.confusion import (
    check_confusion,
    consistent_loss,
    estimate_confusion_dual_t,
    inverse_confusion,
)
from torch import Tensor, nn

__all__ = [
    "CONSTRAINED_METHODS",
    "CONSISTENT_METHODS",
    "METHODS",
    "METRIC_COLUMNS",
    "OPTIMIZERS",
    "SCHEDULES",
    "FinetuneConfig",
    "FinetuneResult",
    "Method",
    "Optimizer",
    "Schedule",
    "evaluate",
    "finetune",
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

Method = Literal[
    "plain",
    "early-stopping",
    "l2-sp",
    "distance-constraint",
    "label-smoothing",
    "mixup",
    "consistent",
    "robust",
    "sam",
    "nso",
]
METHODS: tuple[str, ...] = get_args(Method)
Optimizer = Literal["sgd", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Schedule = Literal["constant", "step", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
CONSTRAINED_METHODS = frozenset({"distance-constraint", "robust"})
CONSISTENT_METHODS = frozenset({"consistent", "robust"})

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
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
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
            self.method in CONSISTENT_METHODS
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
    ``early-stopping`` (None otherwise). ``radii``: per-layer ball radii of the constrained
    methods. ``confusion``: the F used by the consistent loss and ``confusion_source`` whether it
    was ``"given"`` or estimated by ``"dual-t"``. ``validation_indices``: the held-out examples.
    """

    metrics: list[dict[str, float | None]]
    best_epoch: int | None = None
    best_state: dict[str, Tensor] | None = field(default=None, repr=False)
    radii: dict[str, float] | None = None
    confusion: list[list[float]] | None = None
    confusion_source: Literal["given", "dual-t"] | None = None
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


def _selected_layers(model: nn.Module) -> list[str]:
    from hessfine.analysis.checkpoints import select_layers

    return select_layers(model)


def _shared(model: nn.Module, reference: Mapping[str, Tensor], name: str) -> bool:
    parameter = model.get_parameter(name)
    source = reference.get(name)
    return source is not None and tuple(source.shape) == tuple(parameter.shape)


def layer_radii(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    *,
    radius: float,
    head_radius: float,
    depth_scaling: float = 1.0,
) -> dict[str, float]:
    """Frobenius radius of every selected layer (module docs): extractor layer i of L gets
    ``radius · depth_scaling^(i/(L−1))``, head layers (absent from ``reference`` or with another
    shape) get ``head_radius``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 4))
        >>> ref = {k: v for k, v in net.state_dict().items() if not k.startswith("3.")}
        >>> layer_radii(net, ref, radius=1.0, head_radius=5.0, depth_scaling=4.0)
        {'0.weight': 1.0, '2.weight': 4.0, '3.weight': 5.0}
    """
    layers = _selected_layers(model)
    extractor = [name for name in layers if _shared(model, reference, name)]
    steps = max(len(extractor) - 1, 1)
    radii = {name: radius * depth_scaling ** (i / steps) for i, name in enumerate(extractor)}
    return {name: radii.get(name, head_radius) for name in layers}


def project_to_balls(
    model: nn.Module, reference: Mapping[str, Tensor], radii: Mapping[str, float]
) -> dict[str, float]:
    """Project each layer of ``radii`` onto its Frobenius ball; return the distances afterwards.

    W_i ← C_i + (W_i − C_i)·min(1, r_i/‖W_i − C_i‖_F), with centre C_i = ``reference[name]`` when
    the reference has that layer with the same shape, else zero (a new head: the paper's head
    constraint, see the module docs). A layer already inside its ball is left bit-for-bit
    untouched.

    Example:
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> _ = nn.init.constant_(lin.weight, 3.0)  # ‖W − 0‖_F = 6
        >>> project_to_balls(lin, {}, {"weight": 1.5})
        {'weight': 1.5}
        >>> lin.weight.tolist()
        [[0.75, 0.75], [0.75, 0.75]]
    """
    distances = {}
    with torch.no_grad():
        for name, limit in radii.items():
            weight = model.get_parameter(name)
            centre = reference.get(name)
            if centre is not None and tuple(centre.shape) == tuple(weight.shape):
                centre = centre.to(device=weight.device, dtype=weight.dtype)
                delta = weight - centre
            else:
                centre = None
                delta = weight.detach().clone()
            norm = torch.linalg.vector_norm(delta).item()
            if norm > limit:
                delta.mul_(limit / norm)
                weight.copy_(delta if centre is None else centre + delta)
                norm = torch.linalg.vector_norm(delta).item()
            distances[name] = norm
    return distances


def l2sp_penalty(model: nn.Module, reference: Mapping[str, Tensor], alpha: float) -> Tensor:
    """L2-SP penalty (α/2)·Σ ‖W − W^(s)‖²_F over the parameters the reference has (same shape).

    Its gradient with respect to such a W is α·(W − W^(s)); other parameters get none.
    """
    terms = []
    for name, parameter in model.named_parameters():
        source = reference.get(name)
        if source is not None and tuple(source.shape) == tuple(parameter.shape):
            centre = source.to(device=parameter.device, dtype=parameter.dtype)
            terms.append((parameter - centre).square().sum())
    if not terms:
        return next(model.parameters()).new_zeros(())
    return 0.5 * alpha * torch.stack(terms).sum()


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


def noise_generator(seed: int) -> torch.Generator:
    """The CPU generator of NSO's perturbations for a run seeded with ``seed``.

    Its stream is derived from ``seed`` by :class:`numpy.random.SeedSequence` with a fixed tag,
    so it differs from the batch-order generator seeded with ``seed`` itself.
    """
    state = np.random.SeedSequence([seed, 0x4E534F]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@contextmanager
def _buffers_kept(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics, counters) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sam_gradient(model: nn.Module, closure: Callable[[], Tensor], *, rho: float) -> Tensor:
    """SAM's gradient (Foret et al., ICLR 2021) of ``closure()`` at the model's weights W.

    g = ∇L(W); ε = ρ·g/‖g‖ (‖·‖ the Euclidean norm over all trainable parameters; ε = 0 when
    g = 0); leaves ∇L(W + ε) in every ``.grad`` with the weights back at W, and returns L(W)
    (detached). Buffers are updated by the pass at W only. ``.grad`` must be empty (zeroed) on
    entry.

    Example (L = ½wᵀAw with A = diag(1, 3), w = (1, 1), ρ = 0.5):
        >>> w = nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
        >>> A = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> loss = sam_gradient(nn.ParameterList([w]), lambda: 0.5 * (A * w * w).sum(), rho=0.5)
        >>> [round(v, 6) for v in w.grad.tolist()]  # A(w + ρ·Aw/‖Aw‖)
        [1.158114, 4.423025]
    """
    params = _trainable(model)
    loss = closure()
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / norm.item() if norm.item() > 0 else 0.0
    with torch.no_grad():
        steps = [g * scale for g in grads]
        for p, e in zip(params, steps, strict=True):
            p.add_(e)
            p.grad = None
    try:
        with _buffers_kept(model):
            closure().backward()
    finally:
        with torch.no_grad():
            for p, e in zip(params, steps, strict=True):
                p.sub_(e)
    return loss.detach()


def nso_gradient(
    model: nn.Module,
    closure: Callable[[], Tensor],
    *,
    sigma: float,
    draws: int,
    generator: torch.Generator,
) -> Tensor:
    """NSO's gradient: (1/2k)·Σ_j [∇L(W + ε_j) + ∇L(W − ε_j)], ε_j ~ N(0, σ²I), k = ``draws``.

    ε_j is drawn on the CPU from ``generator``, parameter by parameter in
    ``model.parameters()`` order (trainable ones), as ``sigma * torch.randn(shape,
    generator=generator)``, then moved to the parameter's device and dtype. Leaves the average in
    every ``.grad`` with the weights back at W, and returns the mean of the 2k perturbed losses
    (detached). A model with buffers (BatchNorm) first runs one forward pass at W without
    gradients, which updates its running statistics; the perturbed passes leave them untouched
    (as the authors' code does). ``.grad`` must be empty on entry.

    Expected value: ∇E_ε[L(W+ε)] = ∇[L(W) + (σ²/2)·Tr ∇²L(W)] + O(σ⁴) — noise stability with
    the trace penalty of Ju, Li & Zhang (2022); antithetic pairs cancel the first-order term.

    Example (L = ¼Σw⁴, so the average is w³ + 3w·ε² elementwise for one draw):
        >>> w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        >>> gen = torch.Generator().manual_seed(0)
        >>> eps = 0.1 * torch.randn(2, generator=torch.Generator().manual_seed(0))
        >>> _ = nso_gradient(nn.ParameterList([w]), lambda: 0.25 * (w**4).sum(), sigma=0.1,
        ...                  draws=1, generator=gen)
        >>> torch.allclose(w.grad, w.detach() ** 3 + 3 * w.detach() * eps.double() ** 2)
        True
    """
    params = _trainable(model)
    if any(True for _ in model.buffers()):
        with torch.no_grad():
            closure()  # running statistics from the weights W themselves, as in plain training
    total = torch.zeros((), dtype=torch.float64)
    sums = [torch.zeros_like(p) for p in params]
    with _buffers_kept(model):
        for _ in range(draws):
            noise = [
                (sigma * torch.randn(p.shape, generator=generator)).to(p.device, p.dtype)
                for p in params
            ]
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, e in zip(params, noise, strict=True):
                        p.add_(e, alpha=sign)
                try:
                    loss = closure()
                    loss.backward()
                finally:
                    with torch.no_grad():
                        for p, e in zip(params, noise, strict=True):
                            p.sub_(e, alpha=sign)
                total += loss.detach().double().cpu()
                with torch.no_grad():
                    for acc, p in zip(sums, params, strict=True):
                        if p.grad is not None:
                            acc.add_(p.grad)
                            p.grad = None
    count = 2 * draws
    for p, acc in zip(params, sums, strict=True):
        p.grad = acc / count
    return total / count


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


def _split(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
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
    estimate = estimate_confusion_dual_t(predict_probs(estimator, x), y)
    try:
        inverse_confusion(estimate)
    except ValueError:
        raise ValueError(
            "the Dual-T estimate of the noise matrix is singular (the noisy-label model predicts "
            "too few classes); give the confusion matrix or noise rate instead"
        ) from None
    return estimate


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
    """Fine-tune ``model`` in place from ``reference`` with ``config.method``.

    ``reference`` maps the model's state-dict names to pretrained tensors; matching entries are
    first copied into the model (:func:`load_reference`), the rest (a new head) keep their values.
    ``train_y`` are the labels trained on (noisy, if any); ``train_y_clean`` the clean ones, for
    the clean-label metrics only (defaults to ``train_y``). ``on_epoch(epoch, model, metrics)``
    is called after every epoch (1-based), e.g. to save a checkpoint. The model trains on the
    device its parameters are on; inputs are moved there batch by batch. On return the model is
    in eval mode — for ``early-stopping`` at its best validation epoch.
    """
    _check_data(train_x, train_y, "training data")
    clean = train_y if train_y_clean is None else train_y_clean
    _check_data(train_x, clean, "clean training labels")
    if (eval_x is None) != (eval_y is None):
        raise ValueError("give both eval_x and eval_y, or neither")
    if eval_x is not None:
        _check_data(eval_x, eval_y, "evaluation data")
    device = _device(model)
    load_reference(model, reference)
    state = model.state_dict()
    centres = {
        name: tensor.detach().to(device=device, dtype=state[name].dtype).clone()
        for name, tensor in reference.items()
        if name in state and tuple(tensor.shape) == tuple(state[name].shape)
    }
    generator = torch.Generator().manual_seed(config.seed)
    train_y = train_y.long().cpu()
    clean = clean.long().cpu()

    confusion = config.confusion_matrix()
    source: Literal["given", "dual-t"] | None = None
    if config.method in CONSISTENT_METHODS:
        if config.estimate_confusion:
            confusion, source = (
                _estimate_confusion(model, centres, train_x, train_y, config),
                "dual-t",
            )
        else:
            source = "given"
        check_confusion(confusion, _logits(model, train_x[:2]).shape[1])
        inverse = inverse_confusion(confusion).to(device)

    fit = torch.arange(len(train_x))
    validation = None
    if config.method == "early-stopping":
        fit, validation = _split(len(train_x), config.validation_fraction, generator)

    radii = None
    if config.method in CONSTRAINED_METHODS:
        radii = layer_radii(
            model,
            centres,
            radius=config.radius,
            head_radius=config.head_radius,
            depth_scaling=config.depth_scaling,
        )
        project_to_balls(model, centres, radii)

    optimizer = make_optimizer(_trainable(model), config)
    mix_rng = np.random.default_rng(config.seed)
    perturbations = noise_generator(config.seed) if config.method == "nso" else None
    metrics: list[dict[str, float | None]] = []
    best_loss, best_epoch, best_state, stale = math.inf, None, None, 0
    forked = [device.index or 0] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else None):
        torch.manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            rate = learning_rate(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = rate
            model.train()
            total, count = 0.0, 0
            for chunk in _batches(len(fit), config.batch_size, generator):
                index = fit[chunk]
                xb = train_x[index].to(device)
                yb = train_y[index].to(device)
                if config.method == "mixup":
                    lam = float(mix_rng.beta(config.mixup_alpha, config.mixup_alpha))
                    perm = torch.randperm(len(index), generator=generator).to(device)

                    def closure(xb=xb, yb=yb, lam=lam, perm=perm) -> Tensor:
                        logits = model(lam * xb + (1.0 - lam) * xb[perm])
                        return lam * nnf.cross_entropy(logits, yb) + (
                            1.0 - lam
                        ) * nnf.cross_entropy(logits, yb[perm])
                else:

                    def closure(xb=xb, yb=yb) -> Tensor:
                        logits = model(xb)
                        if config.method in CONSISTENT_METHODS:
                            loss = consistent_loss(logits, yb, confusion, inverse=inverse).mean()
                        elif config.method == "label-smoothing":
                            loss = nnf.cross_entropy(
                                logits, yb, label_smoothing=config.label_smoothing
                            )
                        else:
                            loss = nnf.cross_entropy(logits, yb)
                        if config.method == "l2-sp":
                            loss = loss + l2sp_penalty(model, centres, config.l2sp_alpha)
                        return loss

                optimizer.zero_grad(set_to_none=True)
                if config.method == "sam":
                    loss = sam_gradient(model, closure, rho=config.sam_rho)
                elif config.method == "nso":
                    loss = nso_gradient(
                        model,
                        closure,
                        sigma=config.nso_sigma,
                        draws=config.nso_draws,
                        generator=perturbations,
                    )
                else:
                    loss = closure()
                    loss.backward()
                optimizer.step()
                if radii is not None:
                    project_to_balls(model, centres, radii)
                total += loss.item() * len(index)
                count += len(index)
            if not math.isfinite(total):
                raise FloatingPointError(
                    f"{config.method} fine-tuning diverged in epoch {epoch} (non-finite loss); "
                    "lower the learning rate"
                )

            logits = _logits(model, train_x)
            row: dict[str, float | None] = dict.fromkeys(METRIC_COLUMNS)
            row["epoch"] = epoch
            row["train_loss_noisy"], row["train_acc_noisy"] = _loss_acc(logits[fit], train_y[fit])
            row["train_loss_clean"], row["train_acc_clean"] = _loss_acc(logits[fit], clean[fit])
            if validation is not None:
                row["val_loss"], row["val_acc"] = _loss_acc(logits[validation], train_y[validation])
            if eval_x is not None:
                row["eval_loss"], row["eval_acc"] = evaluate(model, eval_x, eval_y)
            row["objective"] = total / max(count, 1)
            row["lr"] = rate
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
        validation_indices=None if validation is None else validation.tolist(),
    )
