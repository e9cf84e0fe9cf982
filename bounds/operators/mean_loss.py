"""Hessian-vector products of the mean loss with respect to selected layers (double backward).

For examples (x_n, y_n), n = 1..N, split into batches, and selected weights w = (w_1, …, w_L),
the mean-loss Hessian is H = (1/N) Σ_n ∇²_w ℓ(f_w(x_n), y_n). :func:`mean_loss_hvp` returns the
map u ↦ H u computed batch by batch by double backward (the gradient of g · u), weighting each
batch by its size; it accepts a leading "probe" dimension so that many vectors share one forward
and backward pass per batch (Pearlmutter, Neural Computation 1994). Restricting u and the output
to one layer gives the diagonal block H_ii, which is what the per-layer traces and spectra use;
:func:`block_diagonal_hvp` gives the products H̄_ii u_i of several diagonal blocks together, each
one double-backward pass that reaches back to its own layer only. :func:`flat_operator` turns
either into a map on flat (P, D) vectors, the form :mod:`hessfine.bounds.linalg` works on.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> fm, params = FunctionalModel.from_module(torch.nn.Linear(3, 2))
    >>> batch = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    >>> hvp = mean_loss_hvp(fm, params, ["weight"], [batch])
    >>> hvp({"weight": torch.ones(4, 2, 3)})["weight"].shape
    torch.Size([4, 2, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    slice_inputs,
)
from hessfine.bounds.linalg.memory import MemoryPlan
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from torch import Tensor

ProbeMap = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


def mean_loss_hvp(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Sequence[Batch],
    *,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> ProbeMap:
    """u ↦ H u for the mean-loss Hessian over ``layers``; u maps each layer to (P, *shape).

    Pearlmutter's double-backward product (Neural Computation 1994): per batch, one forward and
    one backward pass with ``create_graph`` give the gradient g(W); then each of the P probes
    costs one backward pass through that graph, H u = ∇_W (g · u). The graph of one batch is held
    at a time; a ``memory`` plan splits a batch into calls of as many examples as it allows
    (:mod:`hessfine.bounds.linalg.memory`; H u is a sum over examples). With a ``shard`` over
    several processes the batches are this process's share and the products and the example
    count are summed over processes (every process gets H u). ``progress`` is called with
    1/len(batches) per probe and batch (one unit per vector).
    """
    layers = list(layers)
    total = shard.total(sum(y.shape[0] for _, y in batches))
    calls = (memory if memory is not None else MemoryPlan()).calls("mean-loss")

    def add(x: Inputs, y: Tensor, u: Mapping[str, Tensor], out: dict[str, Tensor], share: float):
        """Σ over the examples (x, y) of ∇²ℓ_n u, added to ``out`` (``share``: of the batch)."""
        probes = next(iter(u.values())).shape[0]
        weights = [params[name].detach().requires_grad_(True) for name in layers]
        with torch.enable_grad():
            selected = dict(zip(layers, weights, strict=True))
            loss = fmodel.losses({**params, **selected}, x, y).sum()
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for p in range(probes):
                hv = torch.autograd.grad(
                    grads,
                    weights,
                    [u[name][p] for name in layers],
                    retain_graph=p < probes - 1,
                    allow_unused=True,
                )
                for name, h in zip(layers, hv, strict=True):
                    if h is not None:
                        out[name][p] += h.detach()
                if progress is not None:
                    progress(share / len(batches))

    def apply(u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {name: torch.zeros_like(u[name]) for name in layers}
        for x, y in batches:
            n = batch_size(x)
            calls.run(
                lambda a, b, x=x, y=y, n=n: add(slice_inputs(x, a, b), y[a:b], u, out, (b - a) / n),
                n,
                retry=False,  # it adds to ``out``
            )
        if shard.world_size > 1:
            summed = shard.sum(flatten(out, layers))
            out = unflatten(summed, {name: out[name].shape[1:] for name in layers})
        return {name: out[name] / total for name in layers}

    return apply


def block_diagonal_hvp(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Sequence[Batch],
    *,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """u ↦ (H̄_ii u_i)_i for any subset of ``layers``: the diagonal blocks' products together.

    Per batch one forward and one backward pass with ``create_graph`` give g(W); then layer i
    costs one double-backward pass ∇_{W_i}(g_i · u_i), which only reaches back to W_i (cheaper
    than a full product for late layers). u maps some layers to vectors shaped like the weight.
    A ``memory`` plan splits batches into calls as for :func:`mean_loss_hvp`.
    """
    layers = list(layers)
    total = shard.total(sum(y.shape[0] for _, y in batches))
    calls = (memory if memory is not None else MemoryPlan()).calls("mean-loss")

    def add(x: Inputs, y: Tensor, u: Mapping[str, Tensor], out: dict[str, Tensor], share: float):
        """Σ over the examples (x, y) of ∇²_{W_i}ℓ_n u_i, added to ``out``."""
        weights = {name: params[name].detach().requires_grad_(True) for name in layers}
        with torch.enable_grad():
            loss = fmodel.losses({**params, **weights}, x, y).sum()
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
            grads = dict(zip(layers, grads, strict=True))
            for j, name in enumerate(out):
                if grads[name].requires_grad:
                    (h,) = torch.autograd.grad(
                        grads[name],
                        weights[name],
                        u[name],
                        retain_graph=j < len(out) - 1,
                        allow_unused=True,
                    )
                    if h is not None:
                        out[name] += h.detach()
                if progress is not None:
                    progress(share / len(batches))

    def apply(u: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = [name for name in layers if name in u]
        out = {name: torch.zeros_like(u[name]) for name in names}
        for x, y in batches:
            n = batch_size(x)
            calls.run(
                lambda a, b, x=x, y=y, n=n: add(slice_inputs(x, a, b), y[a:b], u, out, (b - a) / n),
                n,
                retry=False,  # it adds to ``out``
            )
        if shard.world_size > 1:
            summed = shard.sum(torch.cat([out[name].reshape(-1) for name in names]))
            out = {
                name: part.view_as(out[name])
                for name, part in zip(
                    names, summed.split([out[n].numel() for n in names]), strict=True
                )
            }
        return {name: out[name] / total for name in names}

    return apply


def flatten(u: Mapping[str, Tensor], layers: Sequence[str]) -> Tensor:
    """(P, *shape) per layer → (P, D) with the layers concatenated in order."""
    return torch.cat([u[name].reshape(u[name].shape[0], -1) for name in layers], dim=1)


def unflatten(flat: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """(P, D) → per-layer (P, *shape), inverse of :func:`flatten`."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = flat[:, offset : offset + size].reshape(flat.shape[0], *shape)
        offset += size
    return out


def flat_operator(hvp: ProbeMap, shapes: Mapping[str, torch.Size]) -> Callable[[Tensor], Tensor]:
    """The Hessian (or one of its diagonal blocks, when ``shapes`` has one layer) on flat
    vectors."""
    layers = list(shapes)

    def matvec(flat: Tensor) -> Tensor:
        return flatten(hvp(unflatten(flat, shapes)), layers)

    return matvec
