"""A network seen as a pure function of its parameters.

Every estimator in :mod:`bounds` works on a :class:`FunctionalModel`: the module supplies the
architecture, the parameters are passed explicitly as a ``dict`` and the forward pass goes through
:func:`torch.func.functional_call`. Inputs are a tensor or a ``dict`` of tensors (keyword inputs of
text models); outputs are logits (a tensor, the first element of a tuple, or ``.logits``).

Example:
    >>> import torch
    >>> fm, params = FunctionalModel.from_module(torch.nn.Linear(3, 2))
    >>> fm.logits(params, torch.zeros(4, 3)).shape
    torch.Size([4, 2])

**Per-example losses.** A :class:`FunctionalModel` carries its loss ℓ(z, y) (``fmodel.loss``), and
every estimator takes its per-example quantities from it: the loss itself, its curvature in the
logits z'ᵀ ∇²_z ℓ z' (the Gauss–Newton form, docs/mathematics.md, "Computing the quantities fast and
exactly") and a factorisation ∇²_z ℓ = Σ_k r_k r_kᵀ (for exact Gauss–Newton traces). Three losses
are provided:

* :class:`CrossEntropy` — classification, ℓ(z, y) = −log softmax(z)_y, ∇²_z ℓ = diag p − p pᵀ.
* :class:`CausalLMLoss` — causal language modelling (docs/inputs.md, "Tasks"): one example is one
  sequence with logits z ∈ ℝ^{T×V} and labels y ∈ ℤ^T given unshifted as Hugging Face takes them;
  the token at position t predicts label y_{t+1}, labels −100 are ignored, and
  ℓ = (1/m) Σ_{t ∈ S} −log softmax(z_t)_{y_{t+1}} over the m label positions S. Its Hessian in
  the logits is block diagonal over positions, (1/m)(diag p_t − p_t p_tᵀ) on each t ∈ S.
* :class:`ConsistentCrossEntropy` — the backward-corrected loss for class-conditional label noise
  (Patrini et al., CVPR 2017; docs/bounds.md, "Label noise"): ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(z, j).
  Because the rows of F⁻¹ sum to one, ℓ̄ = logsumexp(z) − (F⁻¹)[ỹ]·z, whose logit Hessian is that of
  cross-entropy; its weight-space Hessian differs through the gradient p − (F⁻¹)[ỹ] that multiplies
  z''.

**Hugging Face attention masks.** transformers ≥ 5 derives its 4-D attention mask from the 2-D
``attention_mask`` with data-dependent control flow (``masking_utils``), which ``vmap`` over
examples cannot trace. For a module with a Hugging Face ``config``, :meth:`FunctionalModel.logits`
therefore passes the mask already expanded: an additive (N, 1, T, T) float mask, 0 where query t
may attend key s (key not padding, and s ≤ t for causal models) and the dtype's most negative
value elsewhere — the mask transformers itself builds, which it then uses as given whatever the
attention implementation. The expansion is elementwise, so it is the same inside and outside
``vmap``, and it leaves the logits unchanged. It is full bidirectional or full causal
attention: a model with sliding-window layers (Mistral, Gemma 2) is reproduced exactly only for
sequences shorter than its window. Of the routes considered this one keeps every
estimator as it is (vmapped per-example products, exact for any operation); the vmap-free
alternative — per-example weight copies injected by forward hooks, out + op(x; U_n), so that one
forward-over-reverse pass over the batch yields H_n u_n — needs a hook per layer type (Linear,
Conv, Conv1D) and misses weights used any other way (``nn.MultiheadAttention``'s
``in_proj_weight``). The tests check the route against dense float64 Hessians of each example run
alone through transformers' own mask code, for BERT, RoBERTa, DistilBERT, GPT-2, ViT and a GPT-2
language model with padded batches.

**Fused parameters.** Some modules hold several layers in one tensor: transformers 5 stores the
experts of a mixture-of-experts block as 3-D parameters (Mixtral's ``experts.gate_up_proj`` of
shape (E, 2I, H) holds every expert's gate and up projections). A :class:`FusedParameter` names
the slices of such a tensor as parameters of their own; :meth:`FunctionalModel.from_module` puts
the slices in the parameter ``dict`` in place of the tensor, and :meth:`FunctionalModel.logits`
rebuilds the tensor from them inside the forward pass (``torch.cat`` and ``torch.stack``, which
autograd differentiates and ``vmap`` batches), so every estimator sees each slice as a layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Inputs = Tensor | Mapping[str, Tensor]
Batch = tuple[Inputs, Tensor]


def logits_of(output: object) -> Tensor:
    """The logits inside a model's output (tensor, tuple/list, or an object with ``.logits``)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def batch_size(x: Inputs) -> int:
    """Number of examples in a batch of inputs."""
    if isinstance(x, Tensor):
        return x.shape[0]
    return next(iter(x.values())).shape[0]


def unsqueeze_inputs(x: Inputs) -> Inputs:
    """Add a leading batch dimension of one (used inside ``vmap`` over examples)."""
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    return {k: v.unsqueeze(0) for k, v in x.items()}


def slice_inputs(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of a batch of inputs."""
    if isinstance(x, Tensor):
        return x[start:stop]
    return {k: v[start:stop] for k, v in x.items()}


def index_inputs(x: Inputs, index: Tensor) -> Inputs:
    """The examples at ``index`` (repeats allowed) of a batch of inputs."""
    if isinstance(x, Tensor):
        return x[index]
    return {k: v[index] for k, v in x.items()}


def to_device(x: Inputs, device: torch.device | str, dtype: torch.dtype | None = None) -> Inputs:
    """Move inputs to a device; floating tensors are cast to ``dtype`` when given."""

    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if isinstance(x, Tensor):
        return move(x)
    return {k: move(v) for k, v in x.items()}


def per_example_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """ℓ(z, y) = −log softmax(z)_y for every example (no reduction)."""
    return F.cross_entropy(logits, y, reduction="none")


def softmax_ce_curvature(z: Tensor, z1: Tensor) -> Tensor:
    """z1ᵀ (diag p − p pᵀ) z1 over the last dimension, p = softmax(z): the softmax CE Hessian."""
    p = torch.softmax(z, dim=-1)
    pz = (p * z1).sum(dim=-1)
    return (p * z1 * z1).sum(dim=-1) - pz * pz


def softmax_ce_curvature_factors(z: Tensor) -> Tensor:
    """Vectors r_c with Σ_c r_c r_cᵀ = diag p − p pᵀ over the last dimension: shape (C, *z.shape).

    r_c = √p_c (e_c − p) are the columns of M = diag(√p) − p √pᵀ, M Mᵀ = diag p − p pᵀ.
    """
    p = torch.softmax(z, dim=-1)
    classes = z.shape[-1]
    eye = torch.eye(classes, dtype=z.dtype, device=z.device).reshape(
        classes, *([1] * (z.dim() - 1)), classes
    )
    root = p.sqrt().movedim(-1, 0).unsqueeze(-1)
    return root * (eye - p.unsqueeze(0))


@dataclass(frozen=True)
class CrossEntropy:
    """Classification cross-entropy ℓ(z, y) = −log softmax(z)_y; z is (N, C), y is (N,).

    Example:
        >>> loss = CrossEntropy()
        >>> z, y = torch.zeros(2, 4), torch.tensor([0, 3])
        >>> loss(z, y)
        tensor([1.3863, 1.3863])
    """

    task = "classification"

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example losses, shape (N,)."""
        return per_example_cross_entropy(z, y)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ z1 per example (the labels do not enter), shape (N,)."""
        return softmax_ce_curvature(z, z1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_k with Σ_k r_k r_kᵀ = ∇²_z ℓ per example, shape (C, N, C)."""
        return softmax_ce_curvature_factors(z)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per example, the number of correct predictions and of predictions made (1 each)."""
        right = (z.argmax(dim=-1) == y).to(z.dtype)
        return right, torch.ones_like(right)


@dataclass(frozen=True)
class CausalLMLoss:
    """Mean next-token cross-entropy of each sequence over its label positions
    (docs/inputs.md, "Tasks").

    z is (N, T, V); y is (N, T), unshifted (position t predicts y[:, t+1]), −100 ignored. A
    sequence without any label position has loss 0 and no curvature.

    Example:
        >>> loss = CausalLMLoss()
        >>> z = torch.zeros(1, 3, 5)
        >>> loss(z, torch.tensor([[-100, 2, -100]]))  # one label position: log 5
        tensor([1.6094])
    """

    task = "causal-lm"
    ignore_index: int = -100

    def _shifted(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits z_t, targets y_{t+1} (ignored ones set to 0), weights 1/m on label positions."""
        if y is None:
            raise ValueError("the causal-LM curvature depends on the label positions: pass y")
        logits, labels = z[:, :-1], y[:, 1:]
        valid = labels != self.ignore_index
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        weights = valid.to(z.dtype) / count.to(z.dtype)
        return logits, labels.masked_fill(~valid, 0), weights

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sequence losses, shape (N,)."""
        logits, labels, weights = self._shifted(z, y)
        tokens = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        return (weights * tokens).sum(dim=1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ z1 = Σ_t w_t · z1_tᵀ (diag p_t − p_t p_tᵀ) z1_t per sequence, shape (N,)."""
        logits, _, weights = self._shifted(z, y)
        return (weights * softmax_ce_curvature(logits, z1[:, :-1])).sum(dim=1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_(t,c) = √w_t · √p_tc (e_c − p_t) placed at position t: shape ((T−1)·V, N, T, V)."""
        logits, _, weights = self._shifted(z, y)
        n, steps, vocab = logits.shape
        per_token = softmax_ce_curvature_factors(logits) * weights.sqrt().unsqueeze(-1)
        place = torch.eye(steps, steps + 1, dtype=z.dtype, device=z.device)
        factors = torch.einsum("cntv,ts->tcnsv", per_token, place)
        return factors.reshape(steps * vocab, n, steps + 1, vocab)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per sequence, the number of label positions predicted right and of label positions."""
        valid = y[:, 1:] != self.ignore_index
        right = (z[:, :-1].argmax(dim=-1) == y[:, 1:]) & valid
        return right.sum(dim=1).to(z.dtype), valid.sum(dim=1).to(z.dtype)


@dataclass(frozen=True, eq=False)
class ConsistentCrossEntropy:
    """Backward-corrected cross-entropy ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(z, j) (Patrini et al. 2017).

    ``inverse`` is F⁻¹ for the row-stochastic noise matrix F (F[y, z] = P(observed z | clean y));
    its rows sum to one, so ∇²_z ℓ̄ = diag p − p pᵀ as for cross-entropy. Unbiased for the clean
    loss: E_ỹ[ℓ̄(z, ỹ) | y] = ℓ(z, y).

    Example:
        >>> F_ = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
        >>> loss = ConsistentCrossEntropy(torch.linalg.inv(F_))
        >>> z = torch.tensor([[1.0, -1.0]])
        >>> clean = CrossEntropy()(z, torch.tensor([0]))
        >>> noisy = F_[0, 0] * loss(z, torch.tensor([0])) + F_[0, 1] * loss(z, torch.tensor([1]))
        >>> torch.allclose(noisy, clean)
        True
    """

    inverse: Tensor
    task = "classification"

    def __post_init__(self) -> None:
        rows = self.inverse.sum(dim=1)
        if self.inverse.dim() != 2 or self.inverse.shape[0] != self.inverse.shape[1]:
            raise ValueError(
                f"F⁻¹ must be a square matrix, not of shape {tuple(self.inverse.shape)}"
            )
        if not torch.allclose(rows, torch.ones_like(rows), atol=1e-6):
            raise ValueError("the rows of F⁻¹ must sum to one (F must be row-stochastic)")

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example ℓ̄ = −Σ_j (F⁻¹)[ỹ, j] log softmax(z)_j, shape (N,)."""
        weights = self.inverse.to(device=z.device, dtype=z.dtype)[y]
        return -(weights * torch.log_softmax(z, dim=-1)).sum(dim=-1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ̄ z1 = z1ᵀ (diag p − p pᵀ) z1 per example, shape (N,)."""
        return softmax_ce_curvature(z, z1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_k with Σ_k r_k r_kᵀ = ∇²_z ℓ̄ per example, shape (C, N, C)."""
        return softmax_ce_curvature_factors(z)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per example, agreement of the prediction with the observed label (1 prediction each)."""
        return CrossEntropy().correct(z, y)


ExampleLoss = CrossEntropy | CausalLMLoss | ConsistentCrossEntropy


def expanded_attention_mask(mask: Tensor, *, causal: bool, dtype: torch.dtype) -> Tensor:
    """(N, T) 0/1 key mask → additive (N, 1, T, T) mask: 0 where attending is allowed, else min.

    Query t may attend key s when s is not padding (and s ≤ t when ``causal``).
    """
    keep = mask[:, None, None, :].to(torch.bool)
    if causal:
        steps = mask.shape[-1]
        keep = keep & torch.ones(steps, steps, dtype=torch.bool, device=mask.device).tril()
    zeros = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~keep, torch.finfo(dtype).min)


def _mask_kind(module: nn.Module) -> str | None:
    """ "causal" / "bidirectional" for a Hugging Face model (a ``config`` naming its attention)."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return None
    causal = any(getattr(m, "is_causal", False) is True for m in module.modules())
    return "causal" if causal else "bidirectional"


@dataclass(frozen=True)
class FusedParameter:
    """A parameter held as slices along its first dimension, each slice a layer or a join of layers.

    ``parts[e]`` names the layers that make slice e: one name (the slice itself), or several
    joined along dimension ``dim`` of the slice — one after the other, or row by row when
    ``interleaved`` (part j is then every k-th row from row j, k parts).

    Example:
        >>> fused = FusedParameter("w", (("gate.0", "up.0"), ("gate.1", "up.1")))
        >>> w = torch.arange(8.0).reshape(2, 2, 2)
        >>> parts = fused.split(w)
        >>> parts["up.1"].tolist()
        [[6.0, 7.0]]
        >>> torch.equal(fused.join(parts), w)
        True
    """

    name: str
    parts: tuple[tuple[str, ...], ...]
    dim: int = 0
    interleaved: bool = False

    @property
    def names(self) -> list[str]:
        """Every layer's name, slice by slice."""
        return [name for group in self.parts for name in group]

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        """The layers of ``tensor`` (views, in the order of :attr:`names`)."""
        out: dict[str, Tensor] = {}
        for group, piece in zip(self.parts, tensor.unbind(0), strict=True):
            if self.interleaved:
                rows = piece.unflatten(self.dim, (-1, len(group))).unbind(self.dim + 1)
            else:
                rows = piece.chunk(len(group), dim=self.dim)
            out.update(zip(group, rows, strict=True))
        return out

    def join(self, layers: Mapping[str, Tensor]) -> Tensor:
        """The fused tensor rebuilt from its layers (differentiable, batched under ``vmap``)."""
        pieces = []
        for group in self.parts:
            rows = [layers[name] for name in group]
            if len(rows) == 1:
                pieces.append(rows[0])
            elif self.interleaved:
                pieces.append(torch.stack(rows, dim=self.dim + 1).flatten(self.dim, self.dim + 1))
            else:
                pieces.append(torch.cat(rows, dim=self.dim))
        return torch.stack(pieces)


def split_parameters(
    module: nn.Module, fused: tuple[FusedParameter, ...] = ()
) -> dict[str, Tensor]:
    """The detached parameters of ``module`` by name, each ``fused`` one replaced by its layers
    (views of it), in the module's order."""
    split = {f.name: f for f in fused}
    params: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        params.update(split[name].split(p.detach()) if name in split else {name: p.detach()})
    return params


@dataclass(frozen=True)
class FunctionalModel:
    """An ``nn.Module`` in eval mode with its buffers and its per-example loss.

    ``fused`` are the module's parameters that the parameter ``dict`` holds as named slices
    (module docs); ``whole`` are their tensors, used as they are while every slice is the one
    :meth:`from_module` made.
    """

    module: nn.Module
    buffers: Mapping[str, Tensor]
    loss: ExampleLoss = CrossEntropy()
    fused: tuple[FusedParameter, ...] = ()
    whole: Mapping[str, tuple[Tensor, tuple[Tensor, ...]]] = field(default_factory=dict)
    mask_kind: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask_kind", _mask_kind(self.module))

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        loss: ExampleLoss | None = None,
        fused: tuple[FusedParameter, ...] = (),
    ) -> tuple[FunctionalModel, dict[str, Tensor]]:
        """Put ``module`` in eval mode; return the functional model and a detached parameter dict
        (the slices of the ``fused`` parameters in place of each, in the module's order)."""
        module.eval()
        params = split_parameters(module, fused)
        whole = {
            f.name: (module.get_parameter(f.name).detach(), tuple(params[n] for n in f.names))
            for f in fused
        }
        buffers = {k: b.detach() for k, b in module.named_buffers()}
        chosen = loss if loss is not None else CrossEntropy()
        return cls(module, buffers, chosen, tuple(fused), whole), params

    def state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The module's parameters and buffers for ``params``: each fused parameter rebuilt from
        its slices (its own tensor while the slices are those :meth:`from_module` made)."""
        state = {**self.buffers, **params}
        for fused in self.fused:
            parts = tuple(state.pop(name) for name in fused.names)
            tensor, made = self.whole.get(fused.name, (None, ()))
            same = len(made) == len(parts) and all(a is b for a, b in zip(made, parts, strict=True))
            state[fused.name] = (
                tensor if same else fused.join(dict(zip(fused.names, parts, strict=True)))
            )
        return state

    def logits(self, params: Mapping[str, Tensor], x: Inputs) -> Tensor:
        """Logits of the batch ``x`` under ``params`` (a full parameter dict)."""
        state = self.state(params)
        if isinstance(x, Tensor):
            out = functional_call(self.module, state, (x,))
        else:
            kwargs = dict(x)
            mask = kwargs.get("attention_mask")
            if self.mask_kind is not None and mask is not None and mask.dim() == 2:
                dtype = next(iter(params.values())).dtype
                kwargs["attention_mask"] = expanded_attention_mask(
                    mask, causal=self.mask_kind == "causal", dtype=dtype
                )
            out = functional_call(self.module, state, (), kwargs)
        return logits_of(out)

    def losses(self, params: Mapping[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
        """Per-example losses ℓ(f(x_n), y_n) of the batch, shape (N,)."""
        return self.loss(self.logits(params, x), y)


def with_layer(params: Mapping[str, Tensor], name: str, value: Tensor) -> dict[str, Tensor]:
    """A copy of ``params`` with one entry replaced."""
    out = dict(params)
    out[name] = value
    return out


class NondeterministicModelError(ValueError):
    """Two forward passes of the same batch disagreed (dropout on, train-mode BatchNorm, …)."""


def check_deterministic(fmodel: FunctionalModel, params: Mapping[str, Tensor], x: Inputs) -> None:
    """Raise :class:`NondeterministicModelError` unless two forward passes of ``x`` agree.

    Every estimator assumes a fixed function of the weights; stochastic layers left active (or
    BatchNorm using batch statistics, which makes examples interact) would silently change it.
    Differences below 1e-4 of the logits' scale (non-deterministic GPU reductions) are accepted.
    """
    first = fmodel.logits(params, x)
    second = fmodel.logits(params, x)
    worst = float((first - second).abs().max())
    if worst > 1e-4 * (1.0 + float(first.abs().max())):
        raise NondeterministicModelError(
            f"two forward passes of the same batch differ (by up to {worst:.3g}); "
            "the model is not deterministic in eval mode (dropout or a stochastic layer is "
            "active): make its forward pass deterministic"
        )
