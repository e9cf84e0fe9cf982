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
exactly") and a factorisation ∇²_z ℓ = Σ_k r_k r_kᵀ (for exact Gauss–Newton traces). The losses of
the tasks — :class:`CrossEntropy`, :class:`TokenCrossEntropy`, :class:`CausalLMLoss`,
:class:`Seq2SeqLMLoss`, :class:`SquaredError`, :class:`BinaryCrossEntropy` and
:class:`ConsistentCrossEntropy` — live in :mod:`hessfine.bounds.losses` and are importable from
here too.

**Hugging Face attention masks.** transformers ≥ 5 derives its 4-D attention mask from the 2-D
``attention_mask`` with data-dependent control flow (``masking_utils``), which ``vmap`` over
examples cannot trace. For a module with a Hugging Face ``config``, :meth:`FunctionalModel.logits`
therefore passes the masks already expanded, additive float masks with 0 where query t may attend
key s and the dtype's most negative value elsewhere — masks that transformers uses as given
whatever the attention implementation (a 4-D mask is returned as it is by its mask functions).
Three kinds (:attr:`FunctionalModel.mask_kind`):

* ``bidirectional`` (BERT, ViT…): (N, 1, 1, T), key s not padding, broadcast over the queries;
* ``causal`` (GPT-2, Llama…): (N, 1, T, T), key s not padding and s ≤ t;
* ``encoder-decoder`` (T5, BART; ``config.is_encoder_decoder``): the encoder self-attention and
  the decoder's cross-attention both attend to the encoder's keys, so ``attention_mask`` becomes
  the key-padding mask (N, 1, 1, T_enc), broadcast over the T_enc encoder queries and the T_dec
  decoder queries alike; the decoder self-attention gets its own causal mask (N, 1, T_dec, T_dec)
  as ``decoder_attention_mask`` (over the keys ``decoder_attention_mask`` leaves, all when it is
  absent, as the model does when it makes its decoder inputs from labels), and ``use_cache`` is
  off. The decoder inputs (``decoder_input_ids``) come with the inputs.

The expansion is elementwise, so it is the same inside and outside ``vmap``, and it leaves the
logits unchanged. It is full bidirectional or full causal attention: a model with
sliding-window layers (Mistral, Gemma 2) is reproduced exactly only for sequences shorter than
its window. Of the routes considered this one keeps every estimator as it is (vmapped
per-example products, exact for any operation); the vmap-free alternative — per-example weight
copies injected by forward hooks, out + op(x; U_n), so that one forward-over-reverse pass over
the batch yields H_n u_n — needs a hook per layer type (Linear, Conv, Conv1D) and misses weights
used any other way (``nn.MultiheadAttention``'s ``in_proj_weight``). The tests check the route
against dense float64 Hessians of each example run alone through transformers' own mask code,
for BERT, RoBERTa, DistilBERT, GPT-2, ViT, a GPT-2 language model, T5 and BART with padded
batches.

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
from hessfine.bounds.losses import (
    BinaryCrossEntropy,
    CausalLMLoss,
    ConsistentCrossEntropy,
    CrossEntropy,
    ExampleLoss,
    Seq2SeqLMLoss,
    SquaredError,
    TokenCrossEntropy,
    per_example_cross_entropy,
    probability_curvature,
    softmax_ce_curvature,
    softmax_ce_curvature_factors,
)
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "Batch",
    "BinaryCrossEntropy",
    "CausalLMLoss",
    "ConsistentCrossEntropy",
    "CrossEntropy",
    "ExampleLoss",
    "FunctionalModel",
    "FusedParameter",
    "Inputs",
    "NondeterministicModelError",
    "Seq2SeqLMLoss",
    "SquaredError",
    "TokenCrossEntropy",
    "batch_size",
    "check_deterministic",
    "expanded_attention_mask",
    "expanded_inputs",
    "index_inputs",
    "logits_of",
    "per_example_cross_entropy",
    "probability_curvature",
    "slice_inputs",
    "softmax_ce_curvature",
    "softmax_ce_curvature_factors",
    "split_parameters",
    "to_device",
    "unsqueeze_inputs",
    "with_layer",
]

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


def expanded_attention_mask(mask: Tensor, *, causal: bool, dtype: torch.dtype) -> Tensor:
    """(N, T) 0/1 key mask → additive mask, 0 where attending is allowed, else min: the
    key-padding mask (N, 1, 1, T), broadcast over the queries, or with ``causal`` the
    (N, 1, T, T) mask that also hides the keys s > t from query t.
    """
    keep = mask[:, None, None, :].to(torch.bool)
    if causal:
        steps = mask.shape[-1]
        keep = keep & torch.ones(steps, steps, dtype=torch.bool, device=mask.device).tril()
    zeros = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~keep, torch.finfo(dtype).min)


def expanded_inputs(kind: str, x: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The keyword inputs ``x`` of a Hugging Face model of mask ``kind`` with its 2-D masks
    expanded (module docs): ``attention_mask`` into the key-padding mask (causal for ``causal``
    models); for ``encoder-decoder`` models also the decoder's causal mask, from
    ``decoder_attention_mask`` or over every decoder position, and ``use_cache`` off."""
    kwargs: dict = dict(x)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = expanded_attention_mask(
            mask, causal=kind == "causal", dtype=dtype
        )
    if kind == "encoder-decoder":
        decoder = kwargs.get("decoder_input_ids")
        own = kwargs.get("decoder_attention_mask")
        if own is None and decoder is not None:
            own = torch.ones_like(decoder)
        if own is not None and own.dim() == 2:
            kwargs["decoder_attention_mask"] = expanded_attention_mask(
                own, causal=True, dtype=dtype
            )
        kwargs["use_cache"] = False
    return kwargs


def _mask_kind(module: nn.Module) -> str | None:
    """ "encoder-decoder" / "causal" / "bidirectional" for a Hugging Face model (a ``config``
    naming its attention), None for other modules."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return None
    if getattr(config, "is_encoder_decoder", False) is True:
        return "encoder-decoder"
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
            kwargs = (
                dict(x)
                if self.mask_kind is None
                else expanded_inputs(self.mask_kind, x, next(iter(params.values())).dtype)
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
