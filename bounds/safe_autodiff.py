"""Making PyTorch's higher-order automatic differentiation trustworthy for the estimators.

Two classes of problems (docs/mathematics.md, "Known traps in PyTorch's automatic differentiation")
are handled here:

* **Nested forward mode is silently wrong for some fused kernels.** The second-order forward
  derivative (``jvp`` of ``jvp``) of ``F.layer_norm`` has a relative error of order 1e4 on random
  inputs (PyTorch issue #196700), and ``F.batch_norm`` with batch statistics is wrong too
  (#196699). First-order JVPs and forward-over-reverse products are correct, and so is the same
  normalisation written out from primitive operations (mean, subtraction, ``rsqrt``).
  :class:`PrimitiveKernels` is a :class:`torch.overrides.TorchFunctionMode` that reroutes the
  normalisation functions to such decompositions while a derivative is taken.
* **Attention kernels without forward mode.** ``nn.MultiheadAttention`` in eval mode takes a fused
  fast path with no forward-mode AD, and the flash kernel of ``scaled_dot_product_attention`` on
  the CPU has neither forward mode nor double backward. :func:`differentiable` switches the fast
  path off and selects the composite "math" attention kernel, which is differentiable in every
  mode and order.

Every estimator in :mod:`bounds` runs its derivatives inside :func:`differentiable`, and none
uses nested forward mode: second derivatives are forward-over-reverse Hessian-vector products
(the JVP of a gradient) or reverse-over-reverse (see :mod:`hessfine.bounds.operators`).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch.func import jvp
    >>> x, v = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> f = lambda t: F.layer_norm(x + t * v, (5,)).pow(3).sum()
    >>> one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    >>> with differentiable():
    ...     d2 = jvp(lambda s: jvp(f, (s,), (one,))[1], (zero,), (one,))[1]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dimensions, from primitives."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dim=dims, keepdim=True)
    var = (centred * centred).mean(dim=dims, keepdim=True)
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _channel_shape(input: Tensor) -> tuple[int, ...]:
    return (1, input.shape[1]) + (1,) * (input.dim() - 2)


def _channel_affine(out: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """out · weight + bias with per-channel (dimension 1) weight and bias."""
    shape = _channel_shape(out)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalisation from primitives (running statistics are read, never updated)."""
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        dims = (0,) + tuple(range(2, input.dim()))
        mean = input.mean(dim=dims, keepdim=True)
        centred = input - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
    else:
        centred = input - running_mean.reshape(shape)
        var = running_var.reshape(shape)
    return _channel_affine(centred * torch.rsqrt(var + eps), weight, bias)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalisation from primitives."""
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, -1)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    var = (centred * centred).mean(dim=-1, keepdim=True)
    return _channel_affine((centred * torch.rsqrt(var + eps)).reshape(input.shape), weight, bias)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Instance normalisation from primitives (statistics per example and channel)."""
    if not use_input_stats and running_mean is not None and running_var is not None:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    return group_norm(input, input.shape[1], weight, bias, eps)


def _signature_adapters() -> dict[Callable, Callable]:
    """The functions rerouted by :class:`PrimitiveKernels` and their decompositions."""
    table: dict[Callable, Callable] = {
        F.layer_norm: layer_norm,
        torch.layer_norm: layer_norm,
        F.batch_norm: batch_norm,
        F.group_norm: group_norm,
        torch.group_norm: group_norm,
        F.instance_norm: instance_norm,
    }
    table[torch.batch_norm] = lambda input, weight, bias, rm, rv, training, momentum, eps, *_: (
        batch_norm(input, rm, rv, weight, bias, training, momentum, eps)
    )
    return table


class PrimitiveKernels(TorchFunctionMode):
    """Reroute normalisation kernels to decompositions into primitive operations.

    Inside the mode, ``F.layer_norm``, ``F.batch_norm``, ``F.group_norm``, ``F.instance_norm``
    (and their ``torch.*`` aliases) compute the same values from ``mean``, subtraction and
    ``rsqrt``, whose derivatives of every order and mode are correct. All other functions run
    unchanged. The mode sees calls made by the model's own code; a normalisation called from
    inside another overridable ``torch`` function is not rerouted, which is one reason the
    estimators take second derivatives forward-over-reverse, never by nested forward mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self._table = _signature_adapters()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replacement = self._table.get(func)
        if replacement is not None:
            return replacement(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Context in which every derivative the estimators take is correct and supported.

    Switches off the fused ``nn.MultiheadAttention`` fast path, selects the math kernel of
    scaled-dot-product attention and activates :class:`PrimitiveKernels`; restores the previous
    state on exit.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), PrimitiveKernels():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
