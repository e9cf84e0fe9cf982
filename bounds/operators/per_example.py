"""Products with the per-example diagonal Hessian blocks H_ii(x_b), exact for every operation.

For example b with loss ℓ_b(W) = ℓ(f_W(x_b), y_b) and a selected layer i, H_ii(x_b) u is the
directional derivative of the per-example gradient,

    H_ii(x_b) u = d/dt ∇_{W_i} ℓ_b(W + t·u)|_{t=0}    (u zero outside W_i),

computed forward-over-reverse — the JVP of the gradient, Pearlmutter's R-operator (Neural
Computation 1994) — and vmapped over examples: exact for every operation, unlike nested forward
mode (docs/mathematics.md, "Known traps in PyTorch's automatic differentiation").

* :func:`per_example_hvp` — u_b ↦ H_ii(x_b) u_b for a (B, d_i) block, one vector per example;
* :func:`block_forms_hvp` — v_iᵀ H_ii(x_b) v_i for every example of a batch;
* :func:`layers_hvp` — one vmapped call over (layer, example) pairs of several layers;
* :func:`dense_example_blocks` — the dense (B, d_i, d_i) blocks, column by column.

**The pair interface.** A Lanczos run over many (layer i, example b) pairs needs, at each step,
[H_ii(x_b) u_p] for the pairs p still running: the :class:`PairHVP` protocol,
``products(names, blocks, members)`` with ``blocks[f]`` the (A_f, d_f) vectors of the pairs of
layer ``names[f]`` whose examples are ``members[f]`` (indices into the examples the products were
built for). It has two back ends: :class:`VmappedPairHVP` (vmapped forward-over-reverse calls of
:func:`layers_hvp`) and :class:`hessfine.bounds.operators.retained.RetainedTail` (retained
double-backward graphs, several times cheaper per step on the CPU, holding the graph of its
pairs). :class:`PerExampleHVP` is the front the estimators use: retained graphs while the
running pairs fit their budget (:func:`hessfine.bounds.operators.retained.retained_fits`), else
vmapped calls; both give the same products to round-off.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> fm, params = FunctionalModel.from_module(net.double())
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    >>> u, members = torch.randn(2, 8, dtype=torch.float64), torch.tensor([0, 4])
    >>> retained = PerExampleHVP(fm, params, x, y)(["2.weight"], [u], [members])[0]
    >>> vmapped = VmappedPairHVP(fm, params, x, y)(["2.weight"], [u], [members])[0]
    >>> torch.allclose(retained, vmapped)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from hessfine.bounds.functional import (
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
    with_layer,
)
from hessfine.bounds.linalg.memory import CallSize, MemoryPlan
from hessfine.bounds.operators.output_graph import OutputPairHVP
from hessfine.bounds.operators.retained import RetainedTail, retained_fits
from torch import Tensor
from torch.func import grad, jvp, vmap

_ELEMENT_BUDGET = 2**26
_LOCKSTEP_BUDGET = 2**28
_BASIS_COPIES = 2
"""Copies of its Lanczos basis a run may hold at once: the basis and its compacted copy."""


class PairHVP(Protocol):
    """[H_ii(x_b) u_p] for (layer i, example b) pairs p: the per-example products of a Lanczos run.

    ``names[f]`` is a layer, ``blocks[f]`` the (A_f, d_f) vectors u_p of its pairs and
    ``members[f]`` their examples (A_f indices into the examples the products were built for);
    the result holds the (A_f, d_f) images, layer by layer.
    """

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]: ...


def per_example_hvp(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], name: str, x: Inputs, y: Tensor
) -> Callable[[Tensor], Tensor]:
    """u_b ↦ H_i(x_b) u_b for a (B, d) block of vectors, one example each (vmapped, exact).

    Forward-over-reverse: the JVP of the per-example gradient with respect to W_i.
    """
    weight = params[name]

    def loss_one(w: Tensor, xi: Inputs, yi: Tensor) -> Tensor:
        return fmodel.losses(with_layer(params, name, w), unsqueeze_inputs(xi), yi[None])[0]

    def hvp_one(u: Tensor, xi: Inputs, yi: Tensor) -> Tensor:
        return jvp(lambda w: grad(loss_one)(w, xi, yi), (weight,), (u.view_as(weight),))[1]

    batched = vmap(hvp_one)

    def matvec(u: Tensor) -> Tensor:
        return batched(u, x, y).reshape(u.shape[0], -1)

    return matvec


def block_forms_hvp(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    name: str,
    v: Tensor,
    x: Inputs,
    y: Tensor,
) -> Tensor:
    """v_iᵀ H_i(x) v_i for every example from vmapped Hessian-vector products."""
    flat = v.reshape(1, -1).expand(batch_size(x), -1)
    return (per_example_hvp(fmodel, params, name, x, y)(flat) * flat).sum(dim=1)


def layers_hvp(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: Inputs,
    y: Tensor,
) -> Callable[[list[Tensor], list[Tensor]], list[Tensor]]:
    """([u_b] per layer, [example indices] per layer) ↦ [H_i(x_b) u_b] per layer, in one call.

    One vmapped forward-over-reverse graph over all (layer, example) pairs: pair p = (i, b)
    carries the tangent u_b in W_i and zero in the other layers' weights, and its image is the
    W_i-part of the JVP of the per-example gradient, H_ii(x_b) u_b (the zero tangents remove the
    cross-layer blocks). One call replaces one per layer, which matters when each call costs
    mostly its fixed overhead (few examples, small layers); the price is that every pair carries
    (and differentiates) all the layers' weights, so callers bound the group size.
    """
    weights = {name: params[name] for name in names}

    def loss_one(ws: dict[str, Tensor], xi: Inputs, yi: Tensor) -> Tensor:
        return fmodel.losses({**params, **ws}, unsqueeze_inputs(xi), yi[None])[0]

    def hvp_one(tangents: dict[str, Tensor], xi: Inputs, yi: Tensor) -> dict[str, Tensor]:
        return jvp(lambda ws: grad(loss_one)(ws, xi, yi), (weights,), (tangents,))[1]

    batched = vmap(hvp_one)

    def matvec(blocks: list[Tensor], members: list[Tensor]) -> list[Tensor]:
        sizes = [block.shape[0] for block in blocks]
        total = sum(sizes)
        tangents = {}
        offset = 0
        for name, block, size in zip(names, blocks, sizes, strict=True):
            t = block.new_zeros(total, *params[name].shape)
            t[offset : offset + size] = block.view(size, *params[name].shape)
            tangents[name] = t
            offset += size
        index = torch.cat(list(members))
        images = batched(tangents, index_inputs(x, index), y[index])
        out, offset = [], 0
        for name, size in zip(names, sizes, strict=True):
            out.append(images[name][offset : offset + size].reshape(size, -1))
            offset += size
        return out

    return matvec


class VmappedPairHVP:
    """The vmapped back end of :class:`PairHVP`: :func:`layers_hvp` calls on ``x``, ``y``.

    The layers of a call are split into as few :func:`layers_hvp` calls as keep each call's
    P · Σ_i d_i tangent entries within the element budget (:func:`_joint_groups`).
    """

    def __init__(
        self, fmodel: FunctionalModel, params: Mapping[str, Tensor], x: Inputs, y: Tensor
    ) -> None:
        self.fmodel, self.params, self.x, self.y = fmodel, params, x, y

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]:
        """The images [H_ii(x_b) u_b], layer by layer (see :class:`PairHVP`)."""
        images = []
        for group in _joint_groups([b.shape[0] for b in blocks], [b.shape[1] for b in blocks]):
            matvec = layers_hvp(self.fmodel, self.params, [names[g] for g in group], self.x, self.y)
            images += matvec([blocks[g] for g in group], [members[g] for g in group])
        return images


class PerExampleHVP:
    """The :class:`PairHVP` of the examples ``x``, ``y``, choosing its back end per layer and call.

    ``nn.Linear`` and ``Conv1D`` weights called once come from one retained graph of the
    examples at the layers' outputs, shared by all layers and steps
    (:class:`hessfine.bounds.operators.output_graph.OutputPairHVP`: a double backward per layer,
    no per-example weight copies). The other layers, while the P running pairs of a call fit
    the retained-graph budget (P · Σ_i d_i, see
    :func:`hessfine.bounds.operators.retained.retained_fits`), come from retained
    double-backward graphs with per-pair weights
    (:class:`hessfine.bounds.operators.retained.RetainedTail`: one per layer while the pairs are
    many, one joint graph for the tail; rebuilt as pairs and layers finish), which on the CPU
    are several times cheaper per step than vmapped forward-over-reverse calls
    (bench/BENCHMARKS.md, issue 10 item 3); otherwise from :class:`VmappedPairHVP`. All give the
    same products to round-off. ``planned``: the examples were chunked by a memory plan
    (:func:`lanczos_layout`), which sized them for retained graphs, so those are always used,
    one per layer while the pairs outnumber the examples. Building it costs nothing: graphs are
    built on the first call.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        params: Mapping[str, Tensor],
        x: Inputs,
        y: Tensor,
        *,
        planned: bool = False,
    ) -> None:
        joint = batch_size(x) if planned else None
        self.output = OutputPairHVP(fmodel, params, x, y)
        self.retained = RetainedTail(fmodel, params, x, y, joint_pairs=joint)
        self.vmapped = VmappedPairHVP(fmodel, params, x, y)
        self.planned = planned

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]:
        """The images [H_ii(x_b) u_b], layer by layer (see :class:`PairHVP`)."""
        images = self.output(names, blocks, members)
        rest = [f for f, image in enumerate(images) if image is None]
        if rest:
            chosen = (
                [names[f] for f in rest],
                [blocks[f] for f in rest],
                [members[f] for f in rest],
            )
            pairs = sum(b.shape[0] for b in chosen[1])
            fits = self.planned or retained_fits(pairs, sum(b.shape[1] for b in chosen[1]))
            others = (self.retained if fits else self.vmapped)(*chosen)
            for f, image in zip(rest, others, strict=True):
                images[f] = image
        return images  # type: ignore[return-value]

    def starts(self, blocks: Mapping[str, Tensor]) -> list[Tensor]:
        """Lanczos start vectors of the layers ``blocks`` (each (B, d), one row per example), in
        their order: each row projected on its example's input span where the output-graph back
        end does the layer
        (:meth:`hessfine.bounds.operators.output_graph.OutputPairHVP.input_span_starts`: the
        same value of every f with f(0) = 0, faster convergence), else a copy of the block."""
        projected = self.output.input_span_starts(blocks)
        return [projected[name] if name in projected else u.clone() for name, u in blocks.items()]

    def of_layer(self, name: str) -> Callable[[Tensor, Tensor], Tensor]:
        """(u, members) ↦ [H_ii(x_b) u_b] of one layer: a ``matvec`` of
        :func:`hessfine.bounds.linalg.positive_quadrature.positive_quadrature`."""
        return lambda u, members: self([name], [u], [members])[0]


def _joint_groups(rows: list[int], dims: list[int]) -> list[list[int]]:
    """Consecutive groups of layers for one :func:`layers_hvp` call each.

    A call over layers G with P pairs holds P · Σ_G d_i tangent and image entries (each pair
    carries every layer's weight shape), so a group is closed before that would exceed the
    element budget; a layer whose own block exceeds it is a group alone.
    """
    groups: list[list[int]] = []
    pairs = width = 0
    for f, (count, dim) in enumerate(zip(rows, dims, strict=True)):
        if groups and (pairs + count) * (width + dim) <= _ELEMENT_BUDGET:
            groups[-1].append(f)
            pairs, width = pairs + count, width + dim
        else:
            groups.append([f])
            pairs, width = count, dim
    return groups


def dense_example_blocks(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], name: str, x: Inputs, y: Tensor
) -> Tensor:
    """(B, d, d) per-example Hessian blocks H_i(x_n), columns from vmapped per-example HVPs."""
    matvec = per_example_hvp(fmodel, params, name, x, y)
    weight = params[name]
    d, n = weight.numel(), y.shape[0]
    eye = torch.eye(d, dtype=weight.dtype, device=weight.device)
    columns = max(1, min(d, _ELEMENT_BUDGET // max(4 * n * d, 1)))
    parts = []
    for start in range(0, d, columns):
        basis = eye[start : start + columns]
        parts.append(vmap(matvec)(basis[:, None, :].expand(-1, n, -1)))  # (c, B, d)
    blocks = torch.cat(parts).permute(1, 2, 0)
    return (blocks + blocks.transpose(1, 2)) / 2


def lanczos_layout(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: Inputs,
    y: Tensor,
    *,
    steps: int,
    memory: MemoryPlan,
    capped: bool = True,
) -> list[tuple[list[int], CallSize]]:
    """How Lanczos runs of the layers ``names`` on every example of ``x`` are split.

    The runs of each group of layers (indices into ``names``) go in lockstep over chunks of the
    examples, sized by the group's :class:`~hessfine.bounds.linalg.memory.CallSize`. With a
    measured ``memory`` plan an example of layer i costs b_i = g_i + 2·k_i·d_i·s bytes while it
    runs: g_i is the growth per example of a retained graph of layer i with one product,
    measured on the first examples of ``x`` (the probe calls of 1, 1 and 2 examples, built for
    this and discarded: a few products next to the run's k_i steps), and the Lanczos basis holds
    k_i = min(steps, d_i) vectors of d_i entries of s bytes, twice while it is compacted. With
    a the largest fixed part of the g_i, the chunk is n = ⌊(room − a)/max_i b_i⌋ examples
    (room: :meth:`~hessfine.bounds.linalg.memory.MemoryPlan.room`) and consecutive layers run
    in lockstep while n·Σ b_i ≤ room − a (each running layer holds its own graph,
    :class:`PerExampleHVP` with ``planned``); each group's chunks are then resized at every
    chunk from the headroom left, and learn from their measured growth. ``capped``: chunks hold
    at most the plan's ``cap`` examples (False when the examples are Lanczos members of their
    own, as the probes of stochastic Lanczos quadrature). Without a meter, the fixed element
    counts of earlier versions: chunks of 2²⁶ / max_i k_i·d_i examples, and lockstep while the
    chunk's bases hold at most 2²⁸ entries.
    """
    if not names:
        return []
    dims = [params[name].numel() for name in names]
    sizes = [min(steps, d) * d for d in dims]
    per = _member_costs(fmodel, params, names, x, y, sizes, memory) if memory.measured else None
    if per is None:
        chunk = max(1, _ELEMENT_BUDGET // max(sizes, default=1))
        groups = budget_groups([chunk * size for size in sizes], _LOCKSTEP_BUDGET)
        return [(group, CallSize("lanczos", None, chunk)) for group in groups]
    fixed, costs = per
    room = memory.room() - fixed
    chunk = max(1, min(batch_size(x), int(room // max(costs))))
    out = []
    for group in budget_groups([chunk * cost for cost in costs], room):
        key = "lanczos:" + ",".join(names[g] for g in group)
        per_item = sum(costs[g] for g in group)
        out.append((group, memory.calls(key, fixed=fixed, per_item=per_item, capped=capped)))
    return out


def _member_costs(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: Inputs,
    y: Tensor,
    sizes: Sequence[int],
    memory: MemoryPlan,
) -> tuple[int, list[float]] | None:
    """(a, [b_i]) of :func:`lanczos_layout` (None when the meter measures nothing)."""
    n = batch_size(x)
    fixed, costs = 0, []
    for name, size in zip(names, sizes, strict=True):
        weight = params[name]

        def graph(k: int, name: str = name, weight: Tensor = weight) -> None:
            u = weight.detach().reshape(1, -1).expand(k, -1)
            tail = RetainedTail(fmodel, params, slice_inputs(x, 0, k), y[:k])
            tail([name], [u], [torch.arange(k, device=y.device)])

        calls = memory.calls(f"graph:{name}", recorded=False)
        calls.fit(graph, n)
        if calls.per_item is None:
            return None
        fixed = max(fixed, calls.fixed)
        costs.append(calls.per_item + _BASIS_COPIES * size * weight.element_size())
    return fixed, costs


def budget_groups(costs: Sequence[float], budget: float) -> list[list[int]]:
    """Consecutive groups of indices whose costs add up to at most ``budget`` (or one alone)."""
    groups: list[list[int]] = []
    total = 0.0
    for f, cost in enumerate(costs):
        if groups and total + cost <= budget:
            groups[-1].append(f)
            total += cost
        else:
            groups.append([f])
            total = cost
    return groups
