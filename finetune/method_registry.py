"""The fine-tuning methods (docs/finetune.md, "Methods") as a registry of small objects, one per
method.

:func:`hessfine.finetune.methods.finetune` runs one training loop for every method and asks the
method's object, ``REGISTRY[config.method]`` (a :class:`FinetuneMethod`), what to do at each
point of it:

* **batch loss** (:class:`BatchLoss`) — the loss of one mini-batch: :class:`CrossEntropy`,
  :class:`LabelSmoothing`, :class:`Mixup` or the backward-corrected :class:`ConsistentLoss`;
* **penalty** (:class:`Penalty`, optional) — a term added to every batch loss: :class:`L2SP`;
* **gradient rule** (:class:`GradientRule`) — how the loss becomes the gradient the optimiser
  steps with: :class:`Backward` (plain backpropagation), :class:`SharpnessAware` (SAM's ascent)
  or :class:`NoiseStability` (NSO's average over perturbed weights);
* **distance constraint** (``constrained``) — whether every selected layer is projected onto its
  Frobenius ball around the pretrained weights after each optimiser step (and once before
  training); radii from :func:`layer_radii`, projection :func:`project_to_balls`;
* **early stopping** (``early_stopping``) — whether a validation split is held out, training
  stops after ``patience`` epochs without a lower validation loss and the model ends at the best
  epoch;
* **noise matrix** (``needs_confusion``, declared by the batch loss) — whether the method needs
  the label-noise matrix F, given in the config or estimated by Dual-T.

The methods, as compositions of these parts (the classes' docstrings state the math):

=======================  ==========================================================
``plain``                cross-entropy on the (possibly noisy) labels
``early-stopping``       cross-entropy, early stopping
``l2-sp``                cross-entropy + L2-SP penalty
``distance-constraint``  cross-entropy, distance constraint
``label-smoothing``      label-smoothed cross-entropy
``mixup``                mixup loss
``consistent``           consistent loss (needs F)
``robust``               consistent loss + distance constraint: the paper's algorithm
                         (Ju, Li & Zhang, ICML 2022, Algorithm 1)
``sam``                  cross-entropy, SAM gradient rule
``nso``                  cross-entropy, NSO gradient rule
=======================  ==========================================================

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

Adding a method. Compose a :class:`FinetuneMethod` from the existing parts, or write a new part
first — a small frozen dataclass subclassing :class:`BatchLoss`, :class:`Penalty` or
:class:`GradientRule`, whose docstring states its math and source, reading its options from
``run.config`` (:class:`TrainingRun`) and naming them in its ``options`` (the hyperparameters
that :mod:`hessfine.finetune.selection` may choose for the method), drawing any randomness from
the run's streams in a fixed order — and add it to :data:`REGISTRY` under its name. A built-in method is an entry of the
literal below: :data:`METHODS`, :data:`CONSISTENT_METHODS` and :data:`CONSTRAINED_METHODS` (and so
the command line's ``--method`` choices) follow from it; a new option becomes a field of
:class:`~hessfine.finetune.methods.FinetuneConfig` (with its range check) and of
:class:`MethodSettings`, and ``tests/test_pinned_results.py`` pins the new method's numbers once
it is rerun. An entry added at run time (``REGISTRY["name"] = FinetuneMethod(...)``) is accepted
by :class:`~hessfine.finetune.methods.FinetuneConfig` and :func:`~hessfine.finetune.methods.finetune`
too, but not offered by the command line.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import numpy as np
import torch
import torch.nn.functional as nnf
from hessfine.finetune.confusion import consistent_loss
from torch import Tensor, nn

__all__ = [
    "CONSISTENT_METHODS",
    "CONSTRAINED_METHODS",
    "CONSTRAINT_OPTIONS",
    "EARLY_STOPPING_OPTIONS",
    "METHODS",
    "REGISTRY",
    "L2SP",
    "Backward",
    "BatchLoss",
    "ConsistentLoss",
    "CrossEntropy",
    "FinetuneMethod",
    "GradientRule",
    "LabelSmoothing",
    "MethodSettings",
    "Mixup",
    "NoiseStability",
    "Penalty",
    "SharpnessAware",
    "TrainingRun",
    "l2sp_penalty",
    "layer_radii",
    "noise_generator",
    "nso_gradient",
    "project_to_balls",
    "sam_gradient",
    "trainable_parameters",
]


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


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients, in ``model.parameters()`` order."""
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
    params = trainable_parameters(model)
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
    params = trainable_parameters(model)
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


class MethodSettings(Protocol):
    """The options the parts of the built-in methods read from ``run.config``.

    :class:`~hessfine.finetune.methods.FinetuneConfig` has them all (with their range checks);
    the parts only read them.
    """

    seed: int
    label_smoothing: float
    mixup_alpha: float
    l2sp_alpha: float
    sam_rho: float
    nso_sigma: float
    nso_draws: int


@dataclass(frozen=True)
class TrainingRun:
    """What the training loop hands to a method's parts during one run.

    ``model`` is trained in place; ``centres`` are the reference tensors it shares (same name and
    shape), on its device — the pretrained weights W^(s). ``generator`` is the run's CPU stream of
    batch orders (and validation split, mixup permutations), seeded with ``config.seed``;
    ``confusion`` and ``inverse`` are F and F⁻¹ (float64, ``inverse`` on the model's device) for
    a method that needs F, else None (``confusion`` may then still hold a given F).
    """

    model: nn.Module
    config: MethodSettings
    centres: Mapping[str, Tensor]
    generator: torch.Generator
    confusion: Tensor | None = None
    inverse: Tensor | None = None

    @cached_property
    def mixing(self) -> np.random.Generator:
        """mixup's stream of λ: ``numpy.random.default_rng(config.seed)``, made on first use."""
        return np.random.default_rng(self.config.seed)

    @cached_property
    def perturbations(self) -> torch.Generator:
        """NSO's stream of ε (:func:`noise_generator` of ``config.seed``), made on first use."""
        return noise_generator(self.config.seed)


class BatchLoss(ABC):
    """The loss of one mini-batch (x, y), y the labels trained on (noisy, if any)."""

    #: Whether the loss needs the label-noise matrix F (``run.confusion``, ``run.inverse``).
    needs_confusion: ClassVar[bool] = False
    #: The config fields the loss reads (its hyperparameters), the main one first.
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        """The batch's loss as a function of the model's current weights, for the gradient rule
        (which may call it several times). Any random draw of the batch is made here, once."""


@dataclass(frozen=True)
class CrossEntropy(BatchLoss):
    """ℓ = −log softmax(f(x))_y, the mean over the batch."""

    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        return lambda: nnf.cross_entropy(run.model(x), y)


@dataclass(frozen=True)
class LabelSmoothing(BatchLoss):
    """Cross-entropy against (1−ε)·onehot(y) + ε/k, ε = ``label_smoothing`` (Szegedy et al.,
    "Rethinking the Inception architecture for computer vision", CVPR 2016)."""

    options: ClassVar[tuple[str, ...]] = ("label_smoothing",)

    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        epsilon = run.config.label_smoothing
        return lambda: nnf.cross_entropy(run.model(x), y, label_smoothing=epsilon)


@dataclass(frozen=True)
class Mixup(BatchLoss):
    """mixup (Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond empirical risk minimization",
    ICLR 2018): the loss λ·ℓ(f(x̃), y) + (1−λ)·ℓ(f(x̃), y_π) of the mixed inputs
    x̃ = λx + (1−λ)x_π, ℓ the cross-entropy.

    Per batch, λ ~ Beta(α, α) (α = ``mixup_alpha``) is drawn from ``run.mixing``, then the
    permutation π from ``run.generator``.
    """

    options: ClassVar[tuple[str, ...]] = ("mixup_alpha",)

    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        alpha = run.config.mixup_alpha
        lam = float(run.mixing.beta(alpha, alpha))
        perm = torch.randperm(len(y), generator=run.generator).to(x.device)

        def loss() -> Tensor:
            logits = run.model(lam * x + (1.0 - lam) * x[perm])
            return lam * nnf.cross_entropy(logits, y) + (1.0 - lam) * nnf.cross_entropy(
                logits, y[perm]
            )

        return loss


@dataclass(frozen=True)
class ConsistentLoss(BatchLoss):
    """The backward-corrected loss ℓ̄(f(x), ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(f(x), j), unbiased for the
    clean loss (Patrini et al., CVPR 2017; :func:`hessfine.finetune.confusion.consistent_loss`),
    with F given or estimated by Dual-T (Yao et al., NeurIPS 2020); the mean over the batch."""

    needs_confusion: ClassVar[bool] = True

    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        return lambda: consistent_loss(run.model(x), y, run.confusion, inverse=run.inverse).mean()


class Penalty(ABC):
    """A term added to every batch loss."""

    #: The config fields the penalty reads (its hyperparameters), the main one first.
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def __call__(self, run: TrainingRun) -> Tensor:
        """The penalty at the model's current weights (differentiable)."""


@dataclass(frozen=True)
class L2SP(Penalty):
    """(α/2)·Σ ‖W − W^(s)‖²_F over every parameter the reference has with the same shape,
    α = ``l2sp_alpha`` (Li, Grandvalet & Davoine, "Explicit inductive bias for transfer learning
    with convolutional networks", ICML 2018); a new head is regularised by ``weight_decay`` only
    (:func:`l2sp_penalty`)."""

    options: ClassVar[tuple[str, ...]] = ("l2sp_alpha",)

    def __call__(self, run: TrainingRun) -> Tensor:
        return l2sp_penalty(run.model, run.centres, run.config.l2sp_alpha)


class GradientRule(ABC):
    """How a batch's loss becomes the gradient the optimiser steps with."""

    #: The config fields the rule reads (its hyperparameters), the main one first.
    options: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def backward(self, run: TrainingRun, closure: Callable[[], Tensor]) -> Tensor:
        """Leave the gradient in every ``.grad`` (empty on entry) with the weights at W; return
        the loss value that enters the ``objective`` metric."""


@dataclass(frozen=True)
class Backward(GradientRule):
    """∇L(W) by backpropagation; the loss at W."""

    def backward(self, run: TrainingRun, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        loss.backward()
        return loss


@dataclass(frozen=True)
class SharpnessAware(GradientRule):
    """Sharpness-aware minimisation (Foret, Kleiner, Mobahi & Neyshabur, ICLR 2021): with
    g = ∇L(W), the gradient at W + ρ·g/‖g‖ (‖·‖ over all trainable parameters, ρ = ``sam_rho``),
    the step taken from W; the loss at W (:func:`sam_gradient`)."""

    options: ClassVar[tuple[str, ...]] = ("sam_rho",)

    def backward(self, run: TrainingRun, closure: Callable[[], Tensor]) -> Tensor:
        return sam_gradient(run.model, closure, rho=run.config.sam_rho)


@dataclass(frozen=True)
class NoiseStability(GradientRule):
    """Noise-stability optimisation (H. R. Zhang, D. Li, H. Ju et al., "Noise stability
    optimization for finding flat minima: a Hessian-based regularization approach", the paper's
    authors' follow-up): the gradient averaged at W + ε_j and W − ε_j for ``nso_draws`` draws
    ε_j ~ N(0, σ²I) (σ = ``nso_sigma``) from ``run.perturbations``. Its expectation is the
    gradient of E_ε[L(W+ε)] ≈ L(W) + (σ²/2)·Tr ∇²L(W), so it penalises the Hessian trace; the
    pairing ±ε cancels the first-order noise exactly. The loss is the mean over the perturbed
    weights (:func:`nso_gradient`)."""

    options: ClassVar[tuple[str, ...]] = ("nso_sigma", "nso_draws")

    def backward(self, run: TrainingRun, closure: Callable[[], Tensor]) -> Tensor:
        config = run.config
        return nso_gradient(
            run.model,
            closure,
            sigma=config.nso_sigma,
            draws=config.nso_draws,
            generator=run.perturbations,
        )


@dataclass(frozen=True)
class FinetuneMethod:
    """One fine-tuning method: what it does at each point of the training loop (module docs).

    The minimised objective of a batch is ``loss`` plus ``penalty`` (if any); ``gradient`` turns
    it into the optimiser's gradient. ``constrained``: project onto the distance balls before
    training and after every step. ``early_stopping``: hold out a validation split, stop after
    ``patience`` stale epochs and end at the best epoch.
    """

    loss: BatchLoss = CrossEntropy()
    penalty: Penalty | None = None
    gradient: GradientRule = Backward()
    constrained: bool = False
    early_stopping: bool = False

    @property
    def needs_confusion(self) -> bool:
        """Whether the method needs the label-noise matrix F (its loss does)."""
        return self.loss.needs_confusion

    @property
    def options(self) -> tuple[str, ...]:
        """The config fields of this method's own hyperparameters, the main ones first: its
        loss's, penalty's and gradient rule's, then :data:`CONSTRAINT_OPTIONS` if it is
        constrained and :data:`EARLY_STOPPING_OPTIONS` if it stops early. The optimiser's
        options (learning rate, momentum, ...) belong to every method and are not listed.

        Example:
            >>> REGISTRY["robust"].options
            ('radius', 'head_radius', 'depth_scaling')
        """
        parts = [self.loss.options, self.gradient.options]
        if self.penalty is not None:
            parts.insert(1, self.penalty.options)
        if self.constrained:
            parts.append(CONSTRAINT_OPTIONS)
        if self.early_stopping:
            parts.append(EARLY_STOPPING_OPTIONS)
        return tuple(name for part in parts for name in part)

    def closure(self, run: TrainingRun, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
        """The batch's objective (loss + penalty) as a function of the current weights."""
        loss, penalty = self.loss.closure(run, x, y), self.penalty
        if penalty is None:
            return loss
        return lambda: loss() + penalty(run)

    def backward(self, run: TrainingRun, closure: Callable[[], Tensor]) -> Tensor:
        """Leave the step's gradient in ``.grad`` (:class:`GradientRule`); return the loss."""
        return self.gradient.backward(run, closure)


#: The config fields of the distance constraint (:func:`layer_radii`).
CONSTRAINT_OPTIONS: tuple[str, ...] = ("radius", "head_radius", "depth_scaling")
#: The config fields of early stopping.
EARLY_STOPPING_OPTIONS: tuple[str, ...] = ("validation_fraction", "patience")

#: Every method by name (the order of :data:`METHODS` and of the command line's choices). A plain
#: dict: an entry added to it is a method (module docs, "Adding a method").
REGISTRY: dict[str, FinetuneMethod] = {
    "plain": FinetuneMethod(),
    "early-stopping": FinetuneMethod(early_stopping=True),
    "l2-sp": FinetuneMethod(penalty=L2SP()),
    "distance-constraint": FinetuneMethod(constrained=True),
    "label-smoothing": FinetuneMethod(loss=LabelSmoothing()),
    "mixup": FinetuneMethod(loss=Mixup()),
    "consistent": FinetuneMethod(loss=ConsistentLoss()),
    "robust": FinetuneMethod(loss=ConsistentLoss(), constrained=True),
    "sam": FinetuneMethod(gradient=SharpnessAware()),
    "nso": FinetuneMethod(gradient=NoiseStability()),
}
#: The built-in methods' names, in registry order.
METHODS: tuple[str, ...] = tuple(REGISTRY)
#: The built-in methods that project onto distance balls.
CONSTRAINED_METHODS = frozenset(name for name, method in REGISTRY.items() if method.constrained)
#: The built-in methods that need the noise matrix F (the consistent loss).
CONSISTENT_METHODS = frozenset(name for name, method in REGISTRY.items() if method.needs_confusion)
