"""Per-layer, per-example Hessian quadratic forms of the weight change (Ju, Li & Zhang, ICML 2022).

For a selected layer i with weight change v_i = W_i − W_i^(s) and one example (x, y), the paper's
generalization bound (Theorem 2.1) needs

    𝓗_i = max_(x, y) v_iᵀ H_i⁺(x) v_i,

where H_i(x) is the i-th diagonal block of the Hessian of ℓ(f_W(x), y) and H_i⁺ its positive part.
The estimators (SPEC §4):

* ``block``: v_iᵀ H_i(x) v_i exactly, the second derivative of t ↦ ℓ(f_{W+t·v_i}(x), y) at 0.
  On layers certified piecewise linear (see ``auto``) it equals the Gauss–Newton value from one
  JVP; elsewhere it comes from forward-over-reverse Hessian-vector products vmapped over the
  examples of the batch (exact for every operation, unlike nested forward mode, SPEC §1.3).
* ``ggn``: v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' with a single JVP (the Gauss–Newton block); ∇²_z ℓ is
  the model's loss's curvature in the logits (diag p − p pᵀ for cross-entropy). For Linear and
  Conv weights with (B, C) logits and C ≤ 2 × their number, z' of all of them comes instead from
  one shared forward pass and C backward passes (:mod:`hessfine.bounds.ghost`), recorded as
  ``diagnostics["ggn_products"] = "layer-io"`` (else ``"jvp"``).
* ``positive``: v_iᵀ H_i⁺(x) v_i by adaptive Lanczos quadrature started from v_i (the
  Gauss–Radau rule with a node at 0, :func:`hessfine.bounds.lanczos.positive_quadrature`), with
  per-example Hessian-vector products vmapped over the examples still running: each example
  stops once converged to ``positive_rtol`` of the layer's maximum or once it cannot attain the
  maximum; exact once its Krylov space is exhausted.
* ``auto``: the ``positive`` semantics. A layer whose logits are piecewise linear in W_i (every
  operation after it is ReLU, max-pooling, eval-mode BatchNorm, residual addition, pooling…) has
  z'' ≡ 0, so H_i(x) = G_i(x) is positive semi-definite and H_i⁺ = H_i: the single-JVP Gauss–Newton
  value is exact. This is certified numerically per layer: the second directional derivative of
  a random combination of the logits along a random probe of W_i vanishes on the first
  example(s) (:func:`certify_piecewise_linear`). Uncertified layers use Lanczos quadrature.
* ``reference-code``: the quantity of the authors' released scripts (SPEC §1.1): batches of
  ``reference_batch_size`` examples in order, Hessian of the batch-mean loss, v stacked over all
  selected layers, per layer v_iᵀ (H v)_i (cross-layer blocks included), maximum over batches.

All per-example values are reduced on the fly (running max, argmax and mean), so memory does not
grow with the number of examples.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> v = {"0.weight": 0.1 * torch.randn(8, 4), "2.weight": 0.1 * torch.randn(3, 8)}
    >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    >>> forms = quadratic_forms(fm, params, v, [batch], estimator="auto")
    >>> sorted(forms) == ["0.weight", "2.weight"] and forms["0.weight"].method
    'ggn-certified'
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.functional import with_layer as _with_layer
from hessfine.bounds.ghost import ghost_ggn_forms, joint_certification
from hessfine.bounds.lanczos import (
    PositiveQuadrature,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.safe_autodiff import differentiable
from hessfine.bounds.sharding import LOCAL, Shard
from torch import Tensor
from torch.func import grad, jvp, vmap

Estimator = Literal["auto", "block", "positive", "ggn", "reference-code"]
ESTIMATORS: tuple[str, ...] = ("auto", "block", "positive", "ggn", "reference-code")

_ELEMENT_BUDGET = 2**26
_LOCKSTEP_BUDGET = 2**28
_RETAINED_BUDGET = _ELEMENT_BUDGET
_PER_LAYER_ROWS = 8


@dataclass(frozen=True)
class QuadraticForm:
    """Per-layer reduction of v_iᵀ M(x) v_i over examples (M = H_i, G_i or H_i⁺).

    ``argmax`` is the index (in iteration order) of the example attaining ``max`` — of the
    batch for ``reference-code``. ``method`` says how the values were computed;
    ``diagnostics`` carries what a reader needs to trust them (Lanczos convergence, the
    certification residual).
    """

    name: str
    max: float
    mean: float
    argmax: int
    count: int
    method: str
    diagnostics: Mapping[str, float | int | bool | str] = field(default_factory=dict)


class RunningReduction:
    """Streaming max, argmax and mean of a sequence of value blocks (O(1) memory)."""

    def __init__(self) -> None:
        self.max = float("-inf")
        self.argmax = -1
        self.total = 0.0
        self.count = 0

    def update(self, values: Tensor, *, start: int | None = None) -> None:
        """Fold in the next block of per-example values; ``start`` is the global index of the
        first (default: the number of values seen so far)."""
        values = values.detach().double()
        if values.numel() == 0:
            return
        best = int(torch.argmax(values))
        if float(values[best]) > self.max:
            self.max = float(values[best])
            self.argmax = (self.count if start is None else start) + best
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def form(self, name: str, method: str, diagnostics: Mapping) -> QuadraticForm:
        """The reduction as a :class:`QuadraticForm`."""
        return QuadraticForm(
            name, self.max, self.mean, self.argmax, self.count, method, diagnostics
        )


def ggn_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    name: str,
    v: Tensor,
    x: Inputs,
    y: Tensor | None = None,
) -> Tensor:
    """v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' for every example of the batch, from one JVP of the logits.

    z' = J_i v_i; the curvature ∇²_z ℓ is the model's loss's (``fmodel.loss.curvature``), which
    depends on the labels ``y`` for causal language models (their label positions). Uses
    :mod:`torch.autograd.forward_ad` directly (a single dual level): the same first-order
    derivative as ``torch.func.jvp`` without the functorch wrapping of every operation.
    """
    with fwAD.dual_level():
        dual = fwAD.make_dual(params[name], v)
        z, z1 = fwAD.unpack_dual(fmodel.logits(_with_layer(params, name, dual), x))
    return fmodel.loss.curvature(z, z1, y)


def per_example_hvp(
    fmodel: FunctionalModel, params: Mapping[str, Tensor], name: str, x: Inputs, y: Tensor
) -> Callable[[Tensor], Tensor]:
    """u_b ↦ H_i(x_b) u_b for a (B, d) block of vectors, one example each (vmapped, exact).

    Forward-over-reverse: the JVP of the per-example gradient with respect to W_i.
    """
    weight = params[name]

    def loss_one(w: Tensor, xi: Inputs, yi: Tensor) -> Tensor:
        return fmodel.losses(_with_layer(params, name, w), unsqueeze_inputs(xi), yi[None])[0]

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


def positive_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    name: str,
    v: Tensor,
    x: Inputs,
    y: Tensor,
    *,
    steps: int,
    rtol: float = 1e-2,
    floor: float = float("-inf"),
) -> PositiveQuadrature:
    """v_iᵀ H_i⁺(x) v_i for every example by adaptive Lanczos quadrature started from v_i.

    :func:`hessfine.bounds.lanczos.positive_quadrature` with per-example HVPs of the examples
    still running: each example stops once its Gauss–Radau estimate has converged to ``rtol``
    times the largest value, or once it provably (up to its error estimate) cannot attain the
    maximum (within the batch, so that results do not depend on how batches are split over
    processes), or after ``steps`` steps. ``floor`` is a value already attained elsewhere.
    Examples are processed in chunks so that the Lanczos basis stays within memory. The
    products come from one retained double-backward graph per chunk (:class:`RetainedLayersHVP`,
    rebuilt as examples finish) when the chunk fits its budget, else from vmapped
    forward-over-reverse calls (:func:`per_example_hvp`).
    """
    dim = v.numel()
    steps = min(steps, dim)
    n = batch_size(x)
    chunk = max(1, min(n, _ELEMENT_BUDGET // max(steps * dim, 1)))
    parts = []
    for start in range(0, n, chunk):
        xs = slice_inputs(x, start, start + chunk)
        ys = y[start : start + chunk]

        tail = RetainedTail(fmodel, params, xs, ys)

        def matvec(
            q: Tensor,
            members: Tensor,
            xs: Inputs = xs,
            ys: Tensor = ys,
            tail: RetainedTail = tail,
        ) -> Tensor:
            if retained_fits(*q.shape):
                return tail([name], [q], [members])[0]
            return per_example_hvp(fmodel, params, name, index_inputs(xs, members), ys[members])(q)

        start_vectors = v.reshape(1, -1).expand(ys.shape[0], -1).clone()
        part = positive_quadrature(matvec, start_vectors, max_steps=steps, rtol=rtol, floor=floor)
        floor = max(floor, float((part.values - part.errors).max()))
        parts.append(part)
    return PositiveQuadrature(
        *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PositiveQuadrature))
    )


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


class RetainedLayersHVP:
    """u_p ↦ H_ii(x_b) u_p for a fixed set of (layer i, example b) pairs p, by double backward.

    Built once: one vmapped reverse pass over the pairs, in which pair p carries its own copy of
    the weights of all the set's layers, gives the per-pair gradients g_p = ∇_W ℓ(x_b) with
    ``create_graph``. Each product is then one reverse pass through that retained graph
    (reverse-over-reverse, Pearlmutter, Neural Computation 1994; exact for every operation, as
    the forward-over-reverse of :func:`layers_hvp` is): with s = Σ_p ⟨(g_p)_i, u_p⟩, the row-p part
    of ∂s/∂W_i is H_ii(x_b) u_p, because pair p's copy of the weights enters only its own loss
    and only layer i's part is read (no cross-layer blocks). A product runs no forward pass and
    no functorch transform, so on the CPU it costs a fraction of a :func:`layers_hvp` call (4–8
    ms against 30–35 ms for 1–9 pairs of the small ViT of bench/BENCHMARKS.md; 150–175 ms
    against 205–260 ms for all 288 pairs of its 32 examples and 9 layers). Memory: the graph of
    P examples' forward and backward passes plus P · Σ_i d_i weight copies, held as long as the
    object lives. Its peak (graph plus one product) stays below that of one :func:`layers_hvp`
    call over the same pairs, which holds the same passes and their tangents at once (measured
    peak resident growth on that ViT: 211 MB against 308 MB for 288 pairs, 32 against 52 MB for
    36), so callers give it the same per-call budget on P · Σ_i d_i.

    Example:
        >>> from hessfine.bounds.functional import FunctionalModel
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> fm, params = FunctionalModel.from_module(net)
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> members = [torch.tensor([0, 3]), torch.tensor([1])]
        >>> hvp = RetainedLayersHVP(fm, params, ["0.weight", "2.weight"], x, y, members)
        >>> [tuple(h.shape) for h in hvp(["0.weight"], [torch.randn(2, 12)], members[:1])]
        [(2, 12)]
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        params: Mapping[str, Tensor],
        names: Sequence[str],
        x: Inputs,
        y: Tensor,
        members: Sequence[Tensor],
    ) -> None:
        pairs = [(name, int(b)) for name, m in zip(names, members, strict=True) for b in m.tolist()]
        self.rows = {pair: row for row, pair in enumerate(pairs)}
        index = torch.tensor([b for _, b in pairs], dtype=torch.long, device=y.device)
        self.weights = {
            name: params[name].detach().expand(len(pairs), *params[name].shape).clone()
            for name in names
        }
        for w in self.weights.values():
            w.requires_grad_(True)

        def loss_one(ws: dict[str, Tensor], xi: Inputs, yi: Tensor) -> Tensor:
            return fmodel.losses({**params, **ws}, unsqueeze_inputs(xi), yi[None])[0]

        with torch.enable_grad():
            self.grads = vmap(grad(loss_one))(self.weights, index_inputs(x, index), y[index])

    @property
    def size(self) -> int:
        """The number of pairs the graph was built for."""
        return len(self.rows)

    def covers(self, names: Sequence[str], members: Sequence[Tensor]) -> bool:
        """Whether every (layer, example) pair asked for is in the graph."""
        return all(
            (name, b) in self.rows
            for name, m in zip(names, members, strict=True)
            for b in m.tolist()
        )

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]:
        """[H_ii(x_b) u_b] per layer for the (A_i, d_i) ``blocks`` of the ``members`` of ``names``."""
        rows = [
            torch.tensor(
                [self.rows[(name, b)] for b in m.tolist()],
                dtype=torch.long,
                device=self.grads[name].device,
            )
            for name, m in zip(names, members, strict=True)
        ]
        total = sum(
            (self.grads[name][r].reshape(r.numel(), -1) * block).sum()
            for name, r, block in zip(names, rows, blocks, strict=True)
        )
        inputs = [self.weights[name] for name in names]
        if not (isinstance(total, Tensor) and total.requires_grad):
            return [torch.zeros_like(block) for block in blocks]
        images = torch.autograd.grad(total, inputs, retain_graph=True, materialize_grads=True)
        return [image[r].reshape(r.numel(), -1) for image, r in zip(images, rows, strict=True)]


class RetainedTail:
    """The products of the running pairs of a Lanczos run, from retained graphs.

    Holds either one :class:`RetainedLayersHVP` for all running pairs or, while the pairs
    average at least ``_PER_LAYER_ROWS`` per layer, one per layer: a joint graph carries every
    layer's weights for every pair, so its cost grows with pairs × layers, while separate
    graphs cost a fixed overhead per layer (small ViT of bench/BENCHMARKS.md, 9 layers, per
    product: 1 pair per layer 10 ms joint against 23 ms separate, 8 pairs 36 against 34 ms,
    32 pairs 122 against 56 ms). The graphs are rebuilt when asked for a pair they lack or
    once at most half of their pairs, or of their layers, are still running (so that finished
    pairs and layers cost at most as much again as the running ones; a rebuild costs about two
    products). Memory: the graphs of the running pairs, as for one joint graph.
    """

    def __init__(
        self, fmodel: FunctionalModel, params: Mapping[str, Tensor], x: Inputs, y: Tensor
    ) -> None:
        self.fmodel, self.params, self.x, self.y = fmodel, params, x, y
        self.graphs: dict[str, RetainedLayersHVP] = {}

    @property
    def size(self) -> int:
        """The number of pairs the current graphs were built for."""
        return sum(g.size for g in {id(g): g for g in self.graphs.values()}.values())

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]:
        running = sum(block.shape[0] for block in blocks)
        if (
            2 * running <= self.size
            or 2 * len(names) <= len(self.graphs)
            or not all(
                name in self.graphs and self.graphs[name].covers([name], [m])
                for name, m in zip(names, members, strict=True)
            )
        ):
            self.graphs = {}  # the old graphs are freed before the next are built
            self.graphs = self._build(
                names, members, per_layer=running >= _PER_LAYER_ROWS * len(names)
            )
        groups: dict[int, list[int]] = {}
        for f, name in enumerate(names):
            groups.setdefault(id(self.graphs[name]), []).append(f)
        images: list[Tensor] = list(blocks)
        for chosen in groups.values():
            out = self.graphs[names[chosen[0]]](
                [names[f] for f in chosen],
                [blocks[f] for f in chosen],
                [members[f] for f in chosen],
            )
            for f, image in zip(chosen, out, strict=True):
                images[f] = image
        return images

    def _build(
        self, names: Sequence[str], members: Sequence[Tensor], *, per_layer: bool
    ) -> dict[str, RetainedLayersHVP]:
        if per_layer:
            return {
                name: RetainedLayersHVP(self.fmodel, self.params, [name], self.x, self.y, [m])
                for name, m in zip(names, members, strict=True)
            }
        graph = RetainedLayersHVP(self.fmodel, self.params, names, self.x, self.y, members)
        return dict.fromkeys(names, graph)


def retained_fits(pairs: int, width: int) -> bool:
    """Whether ``pairs`` pairs over layers of ``width`` weights in all go to retained graphs."""
    return pairs * width <= _RETAINED_BUDGET


def positive_forms_layers(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Inputs,
    y: Tensor,
    *,
    steps: int,
    rtol: float = 1e-2,
) -> dict[str, PositiveQuadrature]:
    """:func:`positive_forms` for several layers at once, their Lanczos steps in lockstep.

    :func:`hessfine.bounds.lanczos.positive_quadrature_many`: each step is one product call
    for the still-running examples of every layer, so the sequential tails of the
    layers (the maximising example may need many more steps than the rest) overlap. Each
    layer's stopping rule is its own; the values are those of :func:`positive_forms` up to
    round-off. Examples are processed in the chunks :func:`positive_forms` uses for the widest
    layer; layers run in lockstep as long as their Lanczos bases together stay within a larger
    budget (then the next set of layers runs). While the P running (layer, example) pairs of a
    step fit one call (P · Σ_i d_i within the per-call budget), the products come from retained
    double-backward graphs (:class:`RetainedLayersHVP`: one per layer while the pairs are many,
    one joint graph for the tail; rebuilt as pairs and layers finish), which on the CPU are
    several times cheaper per step than vmapped forward-over-reverse calls (bench/BENCHMARKS.md,
    issue 10 item 3); otherwise the layers of a step are split into as few :func:`layers_hvp`
    calls as keep P · Σ_i d_i within the budget.
    """
    names = list(directions)
    n = batch_size(x)
    sizes = [min(steps, v.numel()) * v.numel() for v in directions.values()]
    chunk = max(1, min(n, _ELEMENT_BUDGET // max(sizes, default=1)))
    parts: dict[str, list[PositiveQuadrature]] = {name: [] for name in names}
    for lockstep in _budget_groups([chunk * size for size in sizes], _LOCKSTEP_BUDGET):
        chosen = [names[f] for f in lockstep]
        floors = [float("-inf")] * len(chosen)
        for start in range(0, n, chunk):
            xs = slice_inputs(x, start, start + chunk)
            ys = y[start : start + chunk]
            starts = [directions[m].reshape(1, -1).expand(ys.shape[0], -1).clone() for m in chosen]
            tail = RetainedTail(fmodel, params, xs, ys)

            def matvec(
                families: list[int],
                blocks: list[Tensor],
                members: list[Tensor],
                xs: Inputs = xs,
                ys: Tensor = ys,
                chosen: list[str] = chosen,
                tail: RetainedTail = tail,
            ) -> list[Tensor]:
                rows = [b.shape[0] for b in blocks]
                if retained_fits(sum(rows), sum(b.shape[1] for b in blocks)):
                    return tail([chosen[f] for f in families], blocks, members)
                images = []
                for group in _joint_groups(rows, [b.shape[1] for b in blocks]):
                    images += layers_hvp(
                        fmodel, params, [chosen[families[g]] for g in group], xs, ys
                    )([blocks[g] for g in group], [members[g] for g in group])
                return images

            results = positive_quadrature_many(
                matvec, starts, max_steps=steps, rtol=rtol, floors=floors
            )
            for f, (name, part) in enumerate(zip(chosen, results, strict=True)):
                floors[f] = max(floors[f], float((part.values - part.errors).max()))
                parts[name].append(part)
    return {
        name: PositiveQuadrature(
            *(torch.cat([getattr(p, f.name) for p in chunks]) for f in fields(PositiveQuadrature))
        )
        for name, chunks in parts.items()
    }


def _budget_groups(costs: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of indices whose costs add up to at most ``budget`` (or one alone)."""
    groups: list[list[int]] = []
    total = 0
    for f, cost in enumerate(costs):
        if groups and total + cost <= budget:
            groups[-1].append(f)
            total += cost
        else:
            groups.append([f])
            total = cost
    return groups


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


def certify_piecewise_linear(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    *,
    examples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Per layer, the relative size of the logits' second derivative along a random probe.

    With φ = rᵀz (random Gaussian weights r on the logits of the first ``examples`` examples) and
    a Gaussian probe u_i per layer, returns |u_iᵀ ∇²_{W_i} φ u_i| / (∇_{W_i} φ · u_i)²: the second
    over the squared first directional derivative of a random combination of the logits. All
    layers share one forward and one backward pass (``create_graph``); each then costs one partial
    double-backward pass (reverse-over-reverse, exact for every operation). The value is exactly 0
    when the logits are piecewise linear in W_i — then H_i(x) = G_i(x) and the block is PSD — and
    of order one for smooth activations, softmax attention or LayerNorm after the layer. One probe
    suffices almost surely: uᵀAu = 0 for a Gaussian u only if A = 0.

    First, all single-call Linear/Conv layers are tested at once
    (:func:`hessfine.bounds.ghost.joint_certification`: one double backward for all of them);
    when that joint value is within :func:`certification_tolerance` every one of them is
    certified and reported with it. The layers it does not certify are tested one by one as
    above. On a ReLU CNN this replaces L double-backward passes by one; on a transformer, where
    the joint test fails, it adds one.
    """
    layers = list(layers)
    x = slice_inputs(x, 0, examples)
    ratios: dict[str, float] = {}
    if len(layers) > 1:
        tested, q = joint_certification(fmodel, params, layers, x, generator=generator)
        if len(tested) > 1 and q <= certification_tolerance(params[tested[0]].dtype):
            ratios = dict.fromkeys(tested, q)
    rest = [name for name in layers if name not in ratios]
    if rest:
        ratios.update(_certify_each(fmodel, params, rest, x, generator))
    return {name: ratios[name] for name in layers}


def _certify_each(fmodel, params, layers, x, generator) -> dict[str, float]:
    """The per-layer test of :func:`certify_piecewise_linear`: one double backward per layer."""
    weights = {name: params[name].detach().requires_grad_(True) for name in layers}
    with torch.enable_grad():
        z = fmodel.logits({**params, **weights}, x)
        r = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
        grads = torch.autograd.grad((r * z).sum(), list(weights.values()), create_graph=True)
        ratios = {}
        for name, g in zip(layers, grads, strict=True):
            u = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
            first = (g * u).sum()
            if not first.requires_grad:
                ratios[name] = 0.0
                continue
            (second,) = torch.autograd.grad(
                first, weights[name], retain_graph=True, allow_unused=True
            )
            curvature = 0.0 if second is None else float((second * u).sum())
            tiny = torch.finfo(g.dtype).tiny
            ratios[name] = abs(curvature) / max(float(first.detach()) ** 2, tiny)
    return ratios


def certification_tolerance(dtype: torch.dtype) -> float:
    """Residual ratio below which a layer counts as piecewise linear."""
    return 1e-6 if dtype == torch.float64 else 1e-4


def quadratic_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    *,
    estimator: Estimator = "auto",
    lanczos_steps: int = 128,
    positive_rtol: float = 1e-2,
    reference_batch_size: int = 4,
    check_examples: int = 1,
    generator: torch.Generator | None = None,
    certify_on: Inputs | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[int], None] | None = None,
) -> dict[str, QuadraticForm]:
    """Per-layer max / mean / argmax over examples of the chosen quadratic form.

    ``params`` is the full parameter dict of the fine-tuned network, ``directions`` maps each
    selected layer to v_i (same shape as the weight). ``batches`` yields (x, y) in example order.
    For the positive part, ``lanczos_steps`` caps the Lanczos steps per example and
    ``positive_rtol`` is the accuracy, relative to the layer's maximum, at which an example stops
    (0: always ``lanczos_steps`` steps); see :func:`positive_forms`.
    ``certify_on``: the inputs whose first example(s) certify the layers (default: the first
    batch). With a ``shard`` the batches are this process's share (whole batches of the global
    stream; for ``reference-code`` of exactly ``reference_batch_size``), ``argmax`` is global and
    the per-process results are merged by the caller. ``progress`` is called with 1 per layer
    and batch.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with differentiable():
        if estimator == "reference-code":
            stream = batches if shard.world_size > 1 else _rebatch(batches, reference_batch_size)
            return _reference_code_forms(fmodel, params, directions, stream, shard, progress)
        return _example_forms(
            fmodel,
            params,
            directions,
            batches,
            estimator=estimator,
            lanczos_steps=lanczos_steps,
            positive_rtol=positive_rtol,
            check_examples=check_examples,
            generator=generator,
            certify_on=certify_on,
            shard=shard,
            progress=progress,
        )


def _example_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    *,
    estimator: str,
    lanczos_steps: int,
    positive_rtol: float,
    check_examples: int,
    generator: torch.Generator,
    certify_on: Inputs | None,
    shard: Shard,
    progress: Callable[[int], None] | None,
) -> dict[str, QuadraticForm]:
    names = list(directions)
    reductions = {name: RunningReduction() for name in names}
    routes: dict[str, str] = {}
    diagnostics: dict[str, dict] = {name: {} for name in names}
    if certify_on is not None:
        routes = _choose_routes(
            fmodel, params, names, certify_on, estimator, check_examples, generator, diagnostics
        )
    ghost: list[str] | None = None
    for first, (x, y) in shard.indexed(batches):
        if not routes:
            routes = _choose_routes(
                fmodel, params, names, x, estimator, check_examples, generator, diagnostics
            )
        if ghost is None:
            ghost = [name for name in names if routes[name] in ("ggn", "ggn-certified")]
        positive = positive_forms_layers(
            fmodel,
            params,
            {name: directions[name] for name in names if routes[name] == "lanczos"},
            x,
            y,
            steps=lanczos_steps,
            rtol=positive_rtol,
        )
        shared = {}
        if ghost:
            shared = ghost_ggn_forms(
                fmodel,
                params,
                {name: directions[name] for name in ghost},
                x,
                y,
                max_backward=2 * len(ghost),
            )
            ghost = [name for name in ghost if name in shared]
        for name in names:
            v = directions[name]
            route = routes[name]
            if name in shared:
                values = shared[name]
                diagnostics[name]["ggn_products"] = "layer-io"
            elif route in ("ggn", "ggn-certified"):
                values = ggn_forms(fmodel, params, name, v, x, y)
                diagnostics[name]["ggn_products"] = "jvp"
            elif route == "hvp":
                values = block_forms_hvp(fmodel, params, name, v, x, y)
            else:
                result = positive[name]
                values = result.values
                _fold_lanczos_diagnostics(diagnostics[name], result, lanczos_steps, positive_rtol)
            reductions[name].update(values, start=first)
            if progress is not None:
                progress(1)
    return {
        name: reductions[name].form(
            name,
            routes.get(name, estimator),
            _finish_diagnostics(diagnostics[name]),
        )
        for name in names
    }


def _choose_routes(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    x: Inputs,
    estimator: str,
    check_examples: int,
    generator: torch.Generator,
    diagnostics: dict[str, dict],
) -> dict[str, str]:
    """Decide, on the first batch, how each layer is computed (and record why)."""
    if estimator in ("ggn", "positive"):
        return dict.fromkeys(names, "ggn" if estimator == "ggn" else "lanczos")
    ratios = certify_piecewise_linear(
        fmodel, params, names, x, examples=check_examples, generator=generator
    )
    routes = {}
    for name in names:
        certified = ratios[name] <= certification_tolerance(params[name].dtype)
        diagnostics[name]["certification_residual"] = ratios[name]
        diagnostics[name]["certified_psd"] = certified
        fallback = "lanczos" if estimator == "auto" else "hvp"
        routes[name] = "ggn-certified" if certified else fallback
    return routes


def _fold_lanczos_diagnostics(
    diagnostics: dict, result: PositiveQuadrature, cap: int, rtol: float
) -> None:
    """Accumulate the convergence report of the positive part over batches.

    Reported (per layer): the step cap and tolerance; Lanczos steps per example (mean, max);
    ``change_half_steps``, the largest error estimate |R_k − R_⌈k/2⌉| of a non-pruned example
    (absolute, in the units of the values: the reported max is within about this of the
    converged value); the fractions pruned and exhausted; and ``lower_bound_max`` =
    max_x max(vᵀH v, 0), a rigorous lower bound of the true 𝓗_i. Every entry is a max, a
    count-weighted mean or fraction, so that per-process reports merge exactly.
    """
    d = diagnostics
    d["lanczos_max_steps"] = cap
    d["positive_rtol"] = rtol
    kept = ~result.pruned
    d["_err"] = max(d.get("_err", 0.0), float(result.errors[kept].max()) if kept.any() else 0.0)
    d["_steps"] = d.get("_steps", 0) + int(result.steps.sum())
    d["_steps_max"] = max(d.get("_steps_max", 0), int(result.steps.max()))
    d["_pruned"] = d.get("_pruned", 0) + int(result.pruned.sum())
    d["_exhausted"] = d.get("_exhausted", 0) + int(result.exhausted.sum())
    d["_count"] = d.get("_count", 0) + result.values.numel()
    d["_lower"] = max(d.get("_lower", 0.0), float(result.lower.max()))


def _finish_diagnostics(diagnostics: dict) -> dict:
    out = {k: v for k, v in diagnostics.items() if not k.startswith("_")}
    if "_count" in diagnostics:
        count = diagnostics["_count"]
        out["lanczos_steps_mean"] = diagnostics["_steps"] / count
        out["lanczos_steps_max"] = diagnostics["_steps_max"]
        out["change_half_steps"] = diagnostics["_err"]
        out["pruned_fraction"] = diagnostics["_pruned"] / count
        out["krylov_exhausted_fraction"] = diagnostics["_exhausted"] / count
        out["lower_bound_max"] = diagnostics["_lower"]
    return out


def _reference_code_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batches: Iterable[Batch],
    shard: Shard,
    progress: Callable[[int], None] | None,
) -> dict[str, QuadraticForm]:
    """The authors' scripts' quantity: per layer v_iᵀ(H v)_i of the batch-mean loss, max over batches."""
    names = list(directions)
    reductions = {name: RunningReduction() for name in names}
    base = {name: params[name] for name in names}
    for index, (x, y) in enumerate(batches):
        global_index = index * shard.world_size + shard.rank

        def mean_loss(selected: dict[str, Tensor], x: Inputs = x, y: Tensor = y) -> Tensor:
            return fmodel.losses({**params, **selected}, x, y).mean()

        hv = jvp(lambda s: grad(mean_loss)(s), (base,), (dict(directions),))[1]
        for name in names:
            value = (hv[name] * directions[name]).sum().reshape(1)
            reductions[name].update(value, start=global_index)
        if progress is not None:
            progress(len(names))
    return {
        name: reductions[name].form(name, "reference-code", {"unit": "batch"}) for name in names
    }


def _cat_inputs(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _rebatch(batches: Iterable[Batch], size: int) -> Iterator[Batch]:
    """Regroup a stream of batches into consecutive batches of exactly ``size`` (last may be short)."""
    xs: list[Inputs] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        held += y.shape[0]
        while held >= size:
            x_all, y_all = _cat_inputs(xs), torch.cat(ys)
            yield slice_inputs(x_all, 0, size), y_all[:size]
            xs, ys = [slice_inputs(x_all, size, held)], [y_all[size:]]
            held -= size
    if held:
        yield _cat_inputs(xs), torch.cat(ys)
