"""Per-example Gauss–Newton forms v_iᵀ G_i(x) v_i and traces Tr[G_i(x)] of selected layers.

With z = f_W(x) the logits, J_i = ∂z/∂W_i and ∇²_z ℓ the loss's curvature in the logits
(diag p − p pᵀ for cross-entropy; ``fmodel.loss.curvature``), the Gauss–Newton block of layer i
for one example is G_i(x) = J_iᵀ ∇²_z ℓ J_i (Martens, ICML 2010; Schraudolph, Neural Computation
2002). It is positive semi-definite, and equals the Hessian block H_i(x) when the logits are
piecewise linear in W_i (:mod:`hessfine.bounds.operators.certification`). Two quantities:

* the form v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' with z' = J_i v_i, from one JVP of the logits
  (:func:`ggn_forms`);
* the trace Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖², where the r_k factor the curvature,
  Σ_k r_k r_kᵀ = ∇²_z ℓ (``fmodel.loss.curvature_factors``; for cross-entropy the columns of
  M = diag(√p) − p √pᵀ, for a causal language model the same per label position, scaled by
  1/√m), from one VJP per factor and example, vmapped over both
  (:func:`vjp_gauss_newton_traces`).

Each has a second back end for ``nn.Linear`` and ``nn.Conv`` weights that shares one forward
pass and a few backward passes of the batch among all layers
(:mod:`hessfine.bounds.operators.layer_io`), and the forms a third, for any logits: one retained
graph of the batch whose backward pass, transposed, gives every layer's z'
(:mod:`hessfine.bounds.operators.output_graph`). The fronts :class:`GaussNewtonForms` and
:func:`gauss_newton_traces` use them for the layers they can do and the JVP/VJP back end for
the others; all back ends give the same values to round-off.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net.double())
    >>> v = {name: torch.randn_like(params[name]) for name in ("0.weight", "2.weight")}
    >>> x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    >>> forms = GaussNewtonForms(fm, params, v)
    >>> values = forms(x, y)
    >>> forms.products
    {'0.weight': 'layer-io', '2.weight': 'layer-io'}
    >>> torch.allclose(values["0.weight"], ggn_forms(fm, params, "0.weight", v["0.weight"], x, y))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.autograd.forward_ad as fwAD
from hessfine.bounds.functional import FunctionalModel, Inputs, unsqueeze_inputs, with_layer
from hessfine.bounds.operators.layer_io import layer_io_gauss_newton_traces, layer_io_ggn_forms
from hessfine.bounds.operators.output_graph import transposed_ggn_forms
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor
from torch.func import vjp, vmap


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
        z, z1 = fwAD.unpack_dual(fmodel.logits(with_layer(params, name, dual), x))
    return fmodel.loss.curvature(z, z1, y)


class GaussNewtonForms:
    """x, y ↦ per-example v_iᵀ G_i(x) v_i, shape (B,), for every layer of ``directions``.

    Three back ends, chosen per layer on the first batch and kept for the run:

    * ``"layer-io"``: with (B, C) logits (not a sequence loss), C backward passes of a shared
      forward pass serve all L Linear/Conv layers when C ≤ 2L
      (:func:`hessfine.bounds.operators.layer_io.layer_io_ggn_forms`);
    * ``"transposed-vjp"``: for the other Linear, Conv and ``Conv1D`` layers when there are at
      least two of them (sequence losses such as a causal LM's, many classes): one forward and
      one backward pass with ``create_graph`` shared by all, then one backward pass per layer
      through the part of the network after it, and the (tokens × vocabulary) tangent of a
      language model's head formed a few examples at a time
      (:func:`hessfine.bounds.operators.output_graph.transposed_ggn_forms`);
    * ``"jvp"``: one JVP per layer (:func:`ggn_forms`), for the rest.

    A layer a shared back end leaves out of a batch is left to :func:`ggn_forms` for the rest of
    the run. ``products`` says, per layer, which back end gave the last batch's values.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        params: Mapping[str, Tensor],
        directions: Mapping[str, Tensor],
    ) -> None:
        self.fmodel, self.params, self.directions = fmodel, params, directions
        self.shared = [] if fmodel.loss.sequence else list(directions)
        self.transposed: list[str] | None = None
        self.products: dict[str, str] = {}

    def __call__(self, x: Inputs, y: Tensor | None = None) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        if self.shared:
            values = layer_io_ggn_forms(
                self.fmodel,
                self.params,
                {name: self.directions[name] for name in self.shared},
                x,
                y,
                max_backward=2 * len(self.shared),
            )
            self.shared = [name for name in self.shared if name in values]
        if self.transposed is None:
            rest = [name for name in self.directions if name not in values]
            self.transposed = rest if len(rest) >= 2 else []
        transposed = {}
        if self.transposed:
            chosen = {name: self.directions[name] for name in self.transposed}
            transposed = transposed_ggn_forms(self.fmodel, self.params, chosen, x, y)
            self.transposed = [name for name in self.transposed if name in transposed]
        for name, v in self.directions.items():
            if name in values:
                self.products[name] = "layer-io"
            elif name in transposed:
                self.products[name] = "transposed-vjp"
                values[name] = transposed[name]
            else:
                self.products[name] = "jvp"
                values[name] = ggn_forms(self.fmodel, self.params, name, v, x, y)
        return {name: values[name] for name in self.directions}


def gauss_newton_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Exact per-example Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖² for every layer, shape (B,) each.

    The r_k factor the loss's curvature in the logits, Σ_k r_k r_kᵀ = ∇²_z ℓ
    (``fmodel.loss.curvature_factors``). J_iᵀ r_k is the gradient of r_k · z with respect to W_i,
    so the value is a sum of squared per-example gradient norms. For ``nn.Linear`` and
    ``nn.Conv2d`` (groups 1, zero padding) weights and losses with one logit vector per example
    (not ``fmodel.loss.sequence``: classification, regression, multi-label) these are formed
    without per-example gradients, from one backward pass of the batch per factor
    (:func:`hessfine.bounds.operators.layer_io.layer_io_gauss_newton_traces`: the "ghost norm"
    of Goodfellow, arXiv:1510.01799, and Li, Tramèr, Liang & Hashimoto, ICLR 2022). Other layers
    (and other losses) use one VJP per factor and example, vmapped over both
    (:func:`vjp_gauss_newton_traces`).
    """
    traces: dict[str, Tensor] = {}
    if not fmodel.loss.sequence:
        with differentiable():
            traces = layer_io_gauss_newton_traces(fmodel, params, layers, x, y)
    rest = [name for name in layers if name not in traces]
    if rest:
        traces.update(vjp_gauss_newton_traces(fmodel, params, rest, x, y))
    return {name: traces[name] for name in layers}


def vjp_gauss_newton_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Exact per-example Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖² for every layer, shape (B,) each.

    The general route of :func:`gauss_newton_traces`: one VJP per factor r_k per example,
    vmapped over both; ``y`` is needed by losses whose curvature depends on the labels (causal
    LM).
    """
    selected = {name: params[name] for name in layers}

    def one(xi: Inputs, yi: Tensor | None) -> dict[str, Tensor]:
        def logits(sel: dict[str, Tensor]) -> Tensor:
            return fmodel.logits({**params, **sel}, unsqueeze_inputs(xi))

        z, pull = vjp(logits, selected)
        factors = fmodel.loss.curvature_factors(z, None if yi is None else yi[None])
        grads = vmap(pull)(factors)[0]
        return {name: grads[name].pow(2).sum() for name in layers}

    with differentiable():
        return vmap(one, in_dims=(0, None if y is None else 0))(x, y)
