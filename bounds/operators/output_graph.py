"""Per-example curvature of Linear-like layers from one retained graph of the batch.

A selected weight W_i that enters the network only as out_i = layer(inp_i; W_i) + b
(``nn.Linear``, zero-padded ``nn.ConvNd``, the ``Conv1D`` of transformers' GPT-2:
:func:`hessfine.bounds.operators.layer_io.linear_conv_modules`) moves the logits along v_i only
through the tangent τ_i = layer(inp_i; v_i) at its output, because out_i is linear in W_i. When
the layer is called once, inp_i does not depend on W_i, and with ℓ the loss of one example

    z' = J_i v_i = (∂z/∂out_i) τ_i,        v_iᵀ H_i v_i = τ_iᵀ ∇²_{out_i} ℓ τ_i,
    H_ii u = inp_iᵀ ∇²_{out_i} ℓ · layer(inp_i; u)    (u a weight-shaped vector).

Examples do not interact in evaluation mode, so per-example values come from passes over the
whole batch. This module computes all three from ONE forward pass of the batch that records
every selected layer's input and output and ONE backward pass with ``create_graph``, shared by
every layer (and, for Lanczos, by every step); each layer then costs one more backward pass
through that retained graph, which reaches only the part of the network after the layer and
runs no primal pass of its own:

* :func:`transposed_ggn_forms` — the Gauss–Newton form v_iᵀ G_i v_i = z'ᵀ ∇²_z ℓ z'. The backward
  pass takes a cotangent u of the logits that itself requires a gradient: g_i = (∂z/∂out_i)ᵀ u
  is linear in u, so ∇_u ⟨g_i, τ_i⟩ = (∂z/∂out_i) τ_i = z' — the JVP as the transpose of a VJP,
  exact (reverse-over-reverse). Calls of a module add up (z' = Σ_calls (∂z/∂out_c) τ_c), so
  tied weights are allowed. When the logits are the output of the model's output embedding
  (``get_output_embeddings()``, an ``nn.Linear``: a language model's head, z = h W_headᵀ), u is
  the cotangent of the head's input h instead, and z' = h' W_headᵀ is formed a chunk at a time
  together with the curvature (for a token loss only at the positions with a label), so no
  (tokens × vocabulary) tangent is held for the batch.
* :func:`output_block_forms` — v_iᵀ H_i(x) v_i: the backward pass gives g_i = ∇_{out_i} Σ_b ℓ_b,
  and ∇_{out_i} ⟨g_i, τ_i⟩ = (∇²_{out_i} ℓ_b τ_{i,b})_b (no cross-example terms), paired with τ_i
  per example (exact for every operation, like the vmapped forward-over-reverse products of
  :mod:`hessfine.bounds.operators.per_example`, which it replaces for these layers).
* :class:`OutputPairHVP` — the per-example products H_ii(x_b) u_p of a Lanczos run (the
  :class:`hessfine.bounds.operators.per_example.PairHVP` interface) for ``nn.Linear`` and
  ``Conv1D`` weights: τ_p = inp_b U_p with U_p the vector as a weight, the same double backward,
  and the image inp_bᵀ (∇²_{out} ℓ_b τ_p). No per-example weight copies and no ``vmap``; the
  graph is rebuilt on the examples still running once at most half of its examples run.

The second-derivative routes need the layer called once (a second call's input would depend on
W_i, adding terms that a perturbation of the outputs does not see); other layers are left to the
general routes. Memory: the retained graph of the batch, about three times the activations of
a forward pass (one forward and one backward pass with ``create_graph``), independent of the
number of layers and of the layers' sizes.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> from hessfine.bounds.operators.gauss_newton import ggn_forms
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net.double())
    >>> v = {name: torch.randn_like(params[name]) for name in ("0.weight", "2.weight")}
    >>> x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    >>> forms = transposed_ggn_forms(fm, params, v, x, y)
    >>> torch.allclose(forms["0.weight"], ggn_forms(fm, params, "0.weight", v["0.weight"], x, y))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from hessfine.bounds.functional import (
    FunctionalModel,
    Inputs,
    TokenCrossEntropy,
    batch_size,
    index_inputs,
    probability_curvature,
)
from hessfine.bounds.operators.layer_io import (
    is_conv1d,
    layer_with_weight,
    linear_conv_modules,
    record_layer_calls,
)
from torch import Tensor

_CURVATURE_CHUNK = 2**25
"""Logit entries (examples × positions × vocabulary) whose tangent is formed at once."""


def _output_head(fmodel: FunctionalModel) -> torch.nn.Linear | None:
    """The model's output embedding when it is an ``nn.Linear`` (a language model's head)."""
    get = getattr(fmodel.module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is torch.nn.Linear else None


def transposed_ggn_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Inputs,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-example v_iᵀ G_i(x) v_i, shape (B,), for every layer this route can do.

    Layers: the ``directions`` that are Linear, zero-padded ConvNd or ``Conv1D`` weights used in
    the forward pass; the others are absent from the result. Any logits shape and any loss of
    ``fmodel`` (its ``curvature``); one forward and one backward pass of the batch with
    ``create_graph``, then one backward pass per layer through the part of the network after it
    (module docstring). Equals :func:`hessfine.bounds.operators.gauss_newton.ggn_forms` to
    round-off.
    """
    modules = linear_conv_modules(fmodel, list(directions))
    if not modules:
        return {}
    head = _output_head(fmodel)
    seen: list[tuple[Tensor, Tensor, Tensor]] = []
    handle = None
    if head is not None and head not in modules.values():
        handle = head.register_forward_hook(lambda m, i, o: seen.append((i[0], o, m.weight)))
    try:
        record = record_layer_calls(fmodel, params, modules, x)
    finally:
        if handle is not None:
            handle.remove()
    names = list(record.calls)
    if not names:
        return {}
    z = record.logits
    through_head = len(seen) == 1 and seen[0][1] is z and seen[0][0].requires_grad
    start = seen[0][0] if through_head else z
    outputs = [out for name in names for _, out in record.calls[name]]
    with torch.enable_grad():
        u = torch.zeros_like(start, requires_grad=True)
        grads = torch.autograd.grad(start, outputs, u, create_graph=True, allow_unused=True)
    z = z.detach()
    forms: dict[str, Tensor] = {}
    heads: dict[str, Tensor] = {}
    index = 0
    for name in names:
        total = None
        for inp, _ in record.calls[name]:
            g = grads[index]
            index += 1
            if g is None:
                continue
            with torch.no_grad():
                tangent = layer_with_weight(
                    record.modules[name], inp, directions[name].to(inp.dtype)
                )
            term = (g * tangent).sum()
            total = term if total is None else total + term
        if total is None or not total.requires_grad:
            forms[name] = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
            continue
        with torch.enable_grad():
            (image,) = torch.autograd.grad(total, u, retain_graph=True, allow_unused=True)
        image = torch.zeros_like(start) if image is None else image
        if through_head:
            heads[name] = image
        else:
            forms[name] = fmodel.loss.curvature(z, image, y)
    if heads:
        forms.update(_head_curvatures(fmodel, z, heads, seen[0][2].detach(), y))
    return {name: forms[name] for name in names}


def _head_curvatures(
    fmodel: FunctionalModel,
    z: Tensor,
    tangents: Mapping[str, Tensor],
    weight: Tensor,
    y: Tensor | None,
) -> dict[str, Tensor]:
    """z'ᵀ ∇²_z ℓ z' per example and layer, with z' = h' W_headᵀ for each layer's tangent h' of
    the head's input, formed a chunk at a time.

    For a token loss (:class:`hessfine.bounds.losses.TokenCrossEntropy`: ∇²_z ℓ is block
    diagonal over the positions, w_t (diag p_t − p_t p_tᵀ) with w_t = 0 at positions without a
    label) only at the positions with w_t > 0, a few thousand tokens at a time, each chunk's
    softmax p_t computed once for all layers; else a few examples at a time.
    """
    loss = fmodel.loss
    head = weight.to(z.dtype)
    out = {name: torch.zeros(z.shape[0], dtype=z.dtype, device=z.device) for name in tangents}
    if isinstance(loss, TokenCrossEntropy) and y is not None:
        w = loss.position_weights(y, z.dtype)
        rows, steps = w.nonzero(as_tuple=True)
        tokens = max(1, _CURVATURE_CHUNK // z.shape[-1])
        for s in range(0, rows.numel(), tokens):
            n, t = rows[s : s + tokens], steps[s : s + tokens]
            p = torch.softmax(z[n, t], dim=-1)
            for name, h1 in tangents.items():
                curvature = probability_curvature(p, F.linear(h1[n, t], head))
                out[name].index_add_(0, n, w[n, t] * curvature)
        return out
    rows = max(1, _CURVATURE_CHUNK // max(z[0].numel(), 1))
    for s in range(0, z.shape[0], rows):
        labels = None if y is None else y[s : s + rows]
        for name, h1 in tangents.items():
            z1 = F.linear(h1[s : s + rows], head)
            out[name][s : s + rows] = loss.curvature(z[s : s + rows], z1, labels)
    return out


class LossGraph:
    """The retained graph of a batch's losses at the outputs of its single-call Linear-like
    layers: one forward pass and one backward pass with ``create_graph``.

    ``names`` are the layers it serves (of those asked for: Linear, zero-padded ConvNd or
    ``Conv1D`` weights called exactly once in the forward pass); ``inputs[name]`` is the layer's
    recorded input, ``modules[name]`` its module. :meth:`hessian_images` gives
    (∇²_{out_i} ℓ_b τ_b)_b for output tangents τ of the batch's examples.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        params: Mapping[str, Tensor],
        layers: Sequence[str],
        x: Inputs,
        y: Tensor,
    ) -> None:
        modules = linear_conv_modules(fmodel, layers)
        record = record_layer_calls(fmodel, params, modules, x)
        single = [name for name, made in record.calls.items() if len(made) == 1]
        self.modules = {name: record.modules[name] for name in single}
        self.inputs = {name: record.calls[name][0][0] for name in single}
        self.outputs = {name: record.calls[name][0][1] for name in single}
        self.names = single
        self.grads: dict[str, Tensor | None] = {}
        if single:
            with torch.enable_grad():
                total = fmodel.loss(record.logits, y).sum()
                grads = torch.autograd.grad(
                    total, [self.outputs[n] for n in single], create_graph=True, allow_unused=True
                )
            self.grads = dict(zip(single, grads, strict=True))

    def hessian_images(self, name: str, tangent: Tensor, rows: Tensor | None = None) -> Tensor:
        """(∇²_{out_i} ℓ_b τ_b)_b of layer ``name`` for the tangents ``tangent`` of the examples
        ``rows`` (all when None; distinct), in their order."""
        g = self.grads[name]
        if g is None:
            return torch.zeros_like(tangent)
        if rows is not None:
            g = g[rows]
        with torch.enable_grad():
            total = (g * tangent).sum()
            if not total.requires_grad:
                return torch.zeros_like(tangent)
            (image,) = torch.autograd.grad(
                total, self.outputs[name], retain_graph=True, allow_unused=True
            )
        if image is None:
            return torch.zeros_like(tangent)
        return image if rows is None else image[rows]


def output_block_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Inputs,
    y: Tensor,
) -> dict[str, Tensor]:
    """Exact per-example v_iᵀ H_i(x) v_i, shape (B,), for every layer this route can do.

    Layers: the ``directions`` that are Linear, zero-padded ConvNd or ``Conv1D`` weights called
    once in the forward pass (:class:`LossGraph`); the others are absent from the result. One
    forward and one backward pass of the batch with ``create_graph`` for all layers, then per
    layer one double-backward pass: τ_iᵀ ∇²_{out_i} ℓ τ_i with τ_i = layer(inp_i; v_i) (module
    docstring). Equals :func:`hessfine.bounds.operators.per_example.block_forms_hvp` to
    round-off.
    """
    graph = LossGraph(fmodel, params, list(directions), x, y)
    forms = {}
    for name in graph.names:
        inp = graph.inputs[name]
        with torch.no_grad():
            tangent = layer_with_weight(graph.modules[name], inp, directions[name].to(inp.dtype))
        image = graph.hessian_images(name, tangent)
        forms[name] = (image * tangent).flatten(1).sum(dim=1)
    return forms


class OutputPairHVP:
    """Per-example products H_ii(x_b) u_p of ``nn.Linear`` and ``Conv1D`` weights from a
    :class:`LossGraph`: a back end of :class:`hessfine.bounds.operators.per_example.PairHVP`.

    For pair p = (layer i, example b) with vector u_p viewed as a weight U_p,
    H_ii(x_b) u_p = inp_bᵀ ∇²_{out_i} ℓ_b (inp_b U_p) (module docstring): the layer's own
    products with the recorded input around one double-backward pass through the batch's retained
    graph per layer and call. The graph is built on the first call for the examples it asks for
    and rebuilt on the examples still running once at most half of its examples run (the
    double backward costs the whole graph's batch), or when a call asks for an example or layer
    it lacks. :meth:`__call__` returns ``None`` for a layer it cannot do (another module type,
    called more than once, or unused), which the caller computes otherwise.
    """

    def __init__(
        self, fmodel: FunctionalModel, params: Mapping[str, Tensor], x: Inputs, y: Tensor
    ) -> None:
        self.fmodel, self.params, self.x, self.y = fmodel, params, x, y
        modules = dict(fmodel.module.named_modules())
        self.candidates = {
            name
            for name in params
            if name.endswith(".weight")
            and (
                type(modules.get(name.rpartition(".")[0])) is torch.nn.Linear
                or is_conv1d(modules.get(name.rpartition(".")[0]))
            )
        }
        self.graph: LossGraph | None = None
        self.examples: Tensor | None = None
        self.layers: set[str] = set()
        self.refused: set[str] = set()

    def supports(self, name: str) -> bool:
        """Whether the layer may come from this back end (its module type; use is checked when
        the graph is built)."""
        return name in self.candidates and name not in self.refused

    def __call__(
        self, names: Sequence[str], blocks: Sequence[Tensor], members: Sequence[Tensor]
    ) -> list[Tensor | None]:
        """The images [H_ii(x_b) u_b] layer by layer, ``None`` for the layers it cannot do."""
        wanted = [name for name in names if self.supports(name)]
        if not wanted:
            return [None] * len(names)
        asked = [m for name, m in zip(names, members, strict=True) if name in wanted]
        running = torch.unique(torch.cat(asked))
        self._prepare(wanted, running)
        assert self.graph is not None and self.examples is not None
        position = torch.full((batch_size(self.x),), -1, dtype=torch.long)
        position[self.examples.cpu()] = torch.arange(self.examples.numel())
        images: list[Tensor | None] = []
        for name, block, m in zip(names, blocks, members, strict=True):
            if name not in self.graph.names:
                images.append(None)
                continue
            rows = position[m.cpu()].to(block.device)
            images.append(self._images(name, block, rows))
        return images

    def input_span_starts(self, blocks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Lanczos start vectors for the layers this back end does: each example's row u_b of
        ``blocks[name]`` (B, d), with the weight-input directions outside the span of that
        example's recorded inputs removed.

        For example b with inputs inp_b (N_b rows of width n: tokens, or one row) and Q_b an
        orthonormal basis of their span, the products H_ii(x_b) U = inp_bᵀ(…) of this back end
        lie in the subspace {U : U = U Q_b Q_bᵀ} (Linear; Q_b Q_bᵀ U for ``Conv1D``), and
        H_ii(x_b) vanishes on its orthogonal complement. So for any f with f(0) = 0,
        uᵀ f(H) u = (Pu)ᵀ f(H) (Pu) with P that projection: the positive part, the form and its
        absolute value are unchanged. Lanczos from Pu sees no mass at the eigenvalue 0 of the
        complement, which a Krylov space can separate from small eigenvalues only slowly, so
        the compression bound tightens several times faster (docs/mathematics.md, "The positive
        part by Lanczos quadrature"). Builds the graph on every example of the batch (as the
        first product call would). Layers whose N_b ≥ n (no reduction) get a copy of their
        block; layers it cannot do are absent.
        """
        wanted = [name for name in blocks if self.supports(name)]
        if not wanted:
            return {}
        self._prepare(wanted, torch.arange(batch_size(self.x)))
        assert self.graph is not None
        starts = {}
        for name in wanted:
            if name not in self.graph.names:
                continue
            block, inp = blocks[name], self.graph.inputs[name]
            flat = inp.reshape(inp.shape[0], -1, inp.shape[-1])
            if flat.shape[1] >= flat.shape[2]:
                starts[name] = block.clone()
                continue
            with torch.no_grad():
                basis, _ = torch.linalg.qr(flat.transpose(1, 2))  # (B, n, N): Householder
                u = block.reshape(block.shape[0], *self.params[name].shape).to(basis.dtype)
                if is_conv1d(self.graph.modules[name]):  # W: n × out, inputs on the left
                    projected = basis @ (basis.transpose(1, 2) @ u)
                else:  # W: out × n
                    projected = (u @ basis) @ basis.transpose(1, 2)
            starts[name] = projected.reshape(block.shape).to(block.dtype)
        return starts

    def _prepare(self, wanted: list[str], running: Tensor) -> None:
        """Build the graph on ``running`` unless the current one holds every wanted layer and
        example and at least half of its examples still run."""
        if self.graph is not None and self.examples is not None:
            held = torch.isin(running.cpu(), self.examples.cpu()).all()
            if (
                bool(held)
                and set(wanted) <= self.layers
                and 2 * running.numel() > self.examples.numel()
            ):
                return
        self.graph = None  # the old graph is freed before the next is built
        self.examples = running
        self.layers = set(wanted) | self.layers
        index = running.to(self.y.device)
        self.graph = LossGraph(
            self.fmodel,
            self.params,
            sorted(self.layers),
            index_inputs(self.x, index),
            self.y[index],
        )
        self.refused |= set(wanted) - set(self.graph.names)

    def _images(self, name: str, block: Tensor, rows: Tensor) -> Tensor:
        assert self.graph is not None
        module, inp = self.graph.modules[name], self.graph.inputs[name][rows]
        weight = self.params[name]
        u = block.reshape(block.shape[0], *weight.shape).to(inp.dtype)
        conv1d = is_conv1d(module)
        with torch.no_grad():
            # Linear: out = inp Wᵀ (W: out × in); Conv1D: out = inp W (W: in × out).
            flat = inp.reshape(inp.shape[0], -1, inp.shape[-1])
            tangent = flat @ u if conv1d else flat @ u.transpose(1, 2)
        image = self.graph.hessian_images(name, tangent.reshape(*inp.shape[:-1], -1), rows)
        image = image.reshape(image.shape[0], -1, image.shape[-1])
        with torch.no_grad():
            product = flat.transpose(1, 2) @ image if conv1d else image.transpose(1, 2) @ flat
        return product.reshape(block.shape[0], -1).to(block.dtype)
