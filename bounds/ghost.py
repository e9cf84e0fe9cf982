"""Per-example Gauss–Newton quantities of Linear and Conv layers from their inputs and output gradients.

For a layer whose weight W enters the network only as ``out = layer(inp; W) + b`` (``nn.Linear``,
``nn.Conv1d/2d/3d``), the per-example derivative of any scalar s(x_n) along a weight direction v
is, by linearity of the layer in W and the chain rule,

    ⟨∇_W s(x_n), v⟩ = Σ_calls ⟨∂s/∂out_n, layer(inp_n; v)⟩,

the layer applied with weight v and no bias to its recorded input, paired with the gradient at its
output (summed over the module's calls, so tied weights count once per use). Per-example output
gradients come from one backward pass of the whole batch, because in evaluation mode the examples
do not interact. This is the "ghost" idea of Goodfellow (arXiv:1510.01799) and Li, Tramèr, Liang
& Hashimoto (ICLR 2022), used there for per-example gradient norms; here it gives the JVP of the
logits without forward-mode AD.

:func:`ghost_ggn_forms` uses it for v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' with z' = J_i v_i: one forward
pass of the batch records every selected layer's input and output, one backward pass per logit
(C of them, reusing the graph) gives every layer's output gradient of z_c, and
z'_c = ⟨∂z_c/∂out, layer(inp; v_i)⟩. All L layers together cost about 1 + C·(backward) + 1
forward units instead of L JVPs of about two forward units each — the shared primal pass of
issue 10, item 7.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> v = {"0.weight": torch.randn(8, 4), "2.weight": torch.randn(3, 8)}
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> forms = ghost_ggn_forms(fm, params, v, x, y)
    >>> sorted(forms), forms["0.weight"].shape
    (['0.weight', '2.weight'], torch.Size([5]))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hessfine.bounds.functional import FunctionalModel, Inputs
from torch import Tensor

_CONV = {
    torch.nn.Conv1d: F.conv1d,
    torch.nn.Conv2d: F.conv2d,
    torch.nn.Conv3d: F.conv3d,
}


def ghost_modules(fmodel: FunctionalModel, layers: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The selected weights that are the ``weight`` of an ``nn.Linear`` or zero-padded ``nn.ConvNd``."""
    modules = dict(fmodel.module.named_modules())
    out = {}
    for name in layers:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight":
            continue
        if type(module) is torch.nn.Linear or (
            type(module) in _CONV and module.padding_mode == "zeros"
        ):
            out[name] = module
    return out


@dataclass(frozen=True)
class LayerCalls:
    """One recorded forward pass: the logits and, per layer, its (input, output) at every call.

    ``outputs`` are part of the autograd graph of ``logits`` (the selected weights require
    gradients), so ``torch.autograd.grad(logits, outputs, ...)`` gives per-example output
    gradients. The network continues from a copy of each recorded output, so that an in-place
    operation after the layer (``ReLU(inplace=True)`` in VGG) cannot overwrite it — the gradient
    at an overwritten tensor would be the in-place operation's output gradient. Layers never
    called are left out.
    """

    logits: Tensor
    modules: dict[str, torch.nn.Module]
    calls: dict[str, list[tuple[Tensor, Tensor]]]


def record_layer_calls(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    modules: Mapping[str, torch.nn.Module],
    x: Inputs,
) -> LayerCalls:
    """Run the forward pass of ``x`` recording each module's inputs and outputs (forward hooks)."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}

    def recorder(name):
        def hook(module, inputs, output):
            calls[name].append((inputs[0].detach(), output))
            return output.clone()

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items()]
    try:
        weights = {name: params[name].detach().requires_grad_(True) for name in modules}
        with torch.enable_grad():
            z = fmodel.logits({**params, **weights}, x)
    finally:
        for handle in handles:
            handle.remove()
    kept = {
        name: made
        for name, made in calls.items()
        if made and all(out.requires_grad for _, out in made)
    }
    return LayerCalls(z, {name: modules[name] for name in kept}, kept)


def layer_with_weight(module: torch.nn.Module, inp: Tensor, weight: Tensor) -> Tensor:
    """The module's output on ``inp`` with ``weight`` in place of its weight and no bias."""
    if type(module) is torch.nn.Linear:
        return F.linear(inp, weight)
    conv = _CONV[type(module)]
    return conv(inp, weight, None, module.stride, module.padding, module.dilation, module.groups)


def ghost_ggn_forms(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    x: Inputs,
    y: Tensor | None = None,
    *,
    max_backward: int | None = None,
) -> dict[str, Tensor]:
    """Per-example v_iᵀ G_i(x) v_i, shape (B,), for every layer this route can do.

    Layers: the ``directions`` that are Linear/ConvNd weights used in the forward pass (see
    :func:`ghost_modules`, :class:`LayerCalls`); the others are simply absent from the result.
    The logits must be (B, C): their C per-example directional derivatives z' = J_i v_i come from
    one backward pass per logit. ``max_backward``: return ``{}`` after the forward pass
    when C exceeds it (then per-layer JVPs are cheaper). The values equal
    :func:`hessfine.bounds.quadratic_forms.ggn_forms` to round-off.
    """
    modules = ghost_modules(fmodel, list(directions))
    if not modules:
        return {}
    record = record_layer_calls(fmodel, params, modules, x)
    z = record.logits
    if not record.calls or z.dim() != 2 or (max_backward is not None and z.shape[1] > max_backward):
        return {}
    names = list(record.calls)
    outputs = [out for name in names for _, out in record.calls[name]]
    with torch.no_grad():
        tangents = [
            layer_with_weight(record.modules[name], inp, directions[name].to(inp.dtype))
            for name in names
            for inp, _ in record.calls[name]
        ]
    classes = z.shape[1]
    z1 = torch.zeros(len(outputs), *z.shape, dtype=z.dtype, device=z.device)
    for c in range(classes):
        cotangent = torch.zeros_like(z)
        cotangent[:, c] = 1
        grads = torch.autograd.grad(
            z, outputs, cotangent, retain_graph=c < classes - 1, allow_unused=True
        )
        for index, (g, t) in enumerate(zip(grads, tangents, strict=True)):
            if g is not None:
                z1[index, :, c] = (g * t).flatten(1).sum(dim=1)
    z = z.detach()
    forms = {}
    start = 0
    for name in names:
        stop = start + len(record.calls[name])
        forms[name] = fmodel.loss.curvature(z, z1[start:stop].sum(dim=0), y)
        start = stop
    return forms


def joint_certification(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[str], float]:
    """One test that the logits are piecewise linear in each of several layers' weights.

    For a Linear/Conv weight W_i called once, out_i = layer(inp_i; W_i) + b with inp_i independent
    of W_i, so along a direction u_i the logits' second derivative is t_iᵀ ∇²_{δ_i} z t_i with
    t_i = layer(inp_i; u_i) and δ_i an additive perturbation of out_i. If every operation after
    these layers is piecewise linear (ReLU, max-pooling, eval-mode BatchNorm, residual addition,
    and the layers themselves, linear in their inputs), then φ = rᵀz is piecewise linear in all
    the δ_i jointly, so the whole Hessian ∇²_δ φ — cross-layer blocks included — vanishes. With
    the t_i scaled so that each first derivative ⟨∂φ/∂δ_i, t_i⟩ is ±1, this computes
    Q = Σ_ij t_iᵀ ∇²_{δ_i δ_j} φ t_j (one forward, one backward with ``create_graph`` and ONE
    double backward for all layers, instead of one double backward per layer) and returns the
    layers tested and |Q|. Q = 0 certifies every one of them: Q is a quadratic form in the
    Gaussian (u_i), zero almost surely only if the form is, and then each diagonal block — the
    per-layer certificate of ``certify_piecewise_linear`` — is zero. A |Q| of order one says that
    at least one layer is not piecewise linear, not which one. Layers that are not single-call
    Linear/Conv weights, or whose first derivative is 0, are not tested (the returned list omits
    them).
    """
    modules = ghost_modules(fmodel, layers)
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}

    def injector(name):
        def hook(module, inputs, output):
            delta = torch.zeros_like(output, requires_grad=True)
            calls[name].append((inputs[0].detach(), delta))
            return output + delta

        return hook

    handles = [m.register_forward_hook(injector(n)) for n, m in modules.items()]
    try:
        with torch.enable_grad():
            z = fmodel.logits(params, x)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name in modules if len(calls[name]) == 1]
    if not names:
        return [], 0.0
    r = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    deltas = [calls[name][0][1] for name in names]
    with torch.enable_grad():
        grads = torch.autograd.grad((r * z).sum(), deltas, create_graph=True, allow_unused=True)
        tested, used, tangents, terms = [], [], [], []
        for name, g in zip(names, grads, strict=True):
            inp, _ = calls[name][0]
            u = torch.randn(params[name].shape, generator=generator, dtype=inp.dtype).to(inp.device)
            if g is None:
                continue
            t = layer_with_weight(modules[name], inp, u)
            first = (g * t).sum()
            if not first.requires_grad:  # ∂φ/∂δ_i is constant: its row of ∇²_δ φ is zero
                tested.append(name)
                continue
            if float(first.detach()) == 0.0:
                continue
            scale = 1.0 / abs(float(first.detach()))
            tested.append(name)
            used.append(deltas[names.index(name)])
            tangents.append(t * scale)
            terms.append(first * scale)
        if not terms:
            return tested, 0.0
        second = torch.autograd.grad(sum(terms), used, allow_unused=True)
    q = sum(float((h * t).sum()) for h, t in zip(second, tangents, strict=True) if h is not None)
    return tested, abs(q)
