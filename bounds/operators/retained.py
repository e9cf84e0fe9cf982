"""Per-example Hessian-vector products from retained double-backward graphs.

For a set of (layer i, example b) pairs p, one vmapped reverse pass in which pair p carries its
own copy W^(p) of the weights gives the per-pair gradients g_p = ∇_W ℓ(f_{W^(p)}(x_b), y_b) with
``create_graph``. With s = Σ_p ⟨(g_p)_i, u_p⟩ for any vectors u_p,

    ∂s/∂W_i^(p) = H_ii(x_b) u_p,

because pair p's copy enters only its own loss and only layer i's part of its gradient is read:
each product H_ii(x_b) u_p is one reverse pass through the retained graph (reverse-over-reverse,
Pearlmutter, Neural Computation 1994; exact for every operation), with no forward pass and no
functorch transform. :class:`RetainedLayersHVP` holds one such graph; :class:`RetainedTail`
serves the running pairs of a Lanczos run from graphs it rebuilds as pairs finish — one back end
of the per-example products :class:`hessfine.bounds.operators.per_example.PairHVP`, which uses it
when :func:`retained_fits`.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    >>> tail = RetainedTail(fm, params, x, y)
    >>> [tuple(h.shape) for h in tail(["2.weight"], [torch.randn(2, 8)], [torch.tensor([0, 4])])]
    [(2, 8)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from hessfine.bounds.functional import FunctionalModel, Inputs, index_inputs, unsqueeze_inputs
from torch import Tensor
from torch.func import grad, vmap

_RETAINED_BUDGET = 2**26
_PER_LAYER_ROWS = 8


class RetainedLayersHVP:
    """u_p ↦ H_ii(x_b) u_p for a fixed set of (layer i, example b) pairs p, by double backward.

    Built once: one vmapped reverse pass over the pairs, in which pair p carries its own copy of
    the weights of all the set's layers, gives the per-pair gradients g_p = ∇_W ℓ(x_b) with
    ``create_graph``. Each product is then one reverse pass through that retained graph
    (reverse-over-reverse, Pearlmutter, Neural Computation 1994; exact for every operation, as
    the forward-over-reverse of :func:`hessfine.bounds.operators.per_example.layers_hvp` is):
    with s = Σ_p ⟨(g_p)_i, u_p⟩, the row-p part of ∂s/∂W_i is H_ii(x_b) u_p, because pair p's
    copy of the weights enters only its own loss and only layer i's part is read (no
    cross-layer blocks). A product runs no forward pass and no functorch transform, so on the
    CPU it costs a fraction of a ``layers_hvp`` call (4–8 ms against 30–35 ms for 1–9 pairs of
    the small ViT of bench/BENCHMARKS.md; 150–175 ms against 205–260 ms for all 288 pairs of its
    32 examples and 9 layers). Memory: the graph of P examples' forward and backward passes
    plus P · Σ_i d_i weight copies, held as long as the object lives. Its peak (graph plus one
    product) stays below that of one ``layers_hvp`` call over the same pairs, which holds the
    same passes and their tangents at once (measured peak resident growth on that ViT: 211 MB
    against 308 MB for 288 pairs, 32 against 52 MB for 36), so callers give it the same
    per-call budget on P · Σ_i d_i.

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
        """[H_ii(x_b) u_b] per layer for the (A_i, d_i) ``blocks`` of the ``members`` of
        ``names``."""
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
    products). Memory: the graphs of the running pairs, as for one joint graph. A joint graph
    carries every layer's weights for each pair, so ``joint_pairs`` (when given) bounds the
    pairs it may hold: with at most as many pairs as examples, its memory stays within that of
    one graph per layer over all the examples, which is what a memory plan measures
    (:func:`hessfine.bounds.operators.per_example.lanczos_layout`). ``x``, ``y`` are the
    examples; the members of a call index them. A back end of
    :class:`hessfine.bounds.operators.per_example.PairHVP`.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        params: Mapping[str, Tensor],
        x: Inputs,
        y: Tensor,
        *,
        joint_pairs: int | None = None,
    ) -> None:
        self.fmodel, self.params, self.x, self.y = fmodel, params, x, y
        self.joint_pairs = joint_pairs
        self.graphs: dict[str, RetainedLayersHVP] = {}

    @property
    def size(self) -> int:
        """The number of pairs the current graphs were built for."""
        return sum(g.size for g in {id(g): g for g in self.graphs.values()}.values())

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor]:
        """The images [H_ii(x_b) u_b], layer by layer (see ``PairHVP``)."""
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
            many = running >= _PER_LAYER_ROWS * len(names)
            over = self.joint_pairs is not None and running > self.joint_pairs
            self.graphs = self._build(names, members, per_layer=many or over)
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
