"""Per-example Gauss–Newton forms and traces of Linear and Conv layers from their inputs and
output gradients.

For a layer whose weight W enters the network only as ``out = layer(inp; W) + b`` (``nn.Linear``,
``nn.Conv1d/2d/3d``, the ``Conv1D`` of transformers' GPT-2), the per-example derivative of any
scalar s(x_n) along a weight direction v is, by linearity of the layer in W and the chain rule,

    ⟨∇_W s(x_n), v⟩ = Σ_calls ⟨∂s/∂out_n, layer(inp_n; v)⟩,

the layer applied with weight v and no bias to its recorded input, paired with the gradient at its
output (summed over the module's calls, so tied weights count once per use). Per-example output
gradients come from one backward pass of the whole batch, because in evaluation mode the examples
do not interact. This is the "ghost" idea of Goodfellow (arXiv:1510.01799) and Li, Tramèr, Liang
& Hashimoto (ICLR 2022), used there for per-example gradient norms; here it gives the JVP of the
logits without forward-mode AD, and the per-example Gauss–Newton traces.

:func:`layer_io_ggn_forms` uses it for v_iᵀ G_i(x) v_i = z'ᵀ ∇²_z ℓ z' with z' = J_i v_i: one
forward pass of the batch records every selected layer's input and output, one backward pass per
logit (C of them, reusing the graph) gives every layer's output gradient of z_c, and
z'_c = ⟨∂z_c/∂out, layer(inp; v_i)⟩. All L layers together cost about 1 + C·(backward) + 1
forward units instead of L JVPs of about two forward units each — the shared primal pass of
issue 10, item 7.

:func:`layer_io_gauss_newton_traces` gives Tr[G_i(x_n)] = Σ_k ‖J_iᵀ r_k‖², where the r_k factor
the loss's curvature in the logits, Σ_k r_k r_kᵀ = ∇²_z ℓ: J_iᵀ r_k is the gradient of r_k · z
with respect to W_i, and for ``nn.Linear`` and ``nn.Conv2d`` (groups 1, numeric padding) weights
it is formed from one backward pass of the batch per factor: with a_nt the layer's (unfolded)
inputs and g_nt the gradients at its outputs over positions t,
‖Σ_t g_nt a_ntᵀ‖² = Σ_{t,t'} (a_ntᵀ a_nt')(g_ntᵀ g_nt') (the "ghost norm" of Goodfellow and Li et
al.), or by forming Σ_t g_nt a_ntᵀ when that is smaller.

Both are back ends of :mod:`hessfine.bounds.operators.gauss_newton`, which falls back to JVPs and
VJPs for the layers (and losses) they cannot do.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> v = {"0.weight": torch.randn(8, 4), "2.weight": torch.randn(3, 8)}
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> forms = layer_io_ggn_forms(fm, params, v, x, y)
    >>> sorted(forms), forms["0.weight"].shape
    (['0.weight', '2.weight'], torch.Size([5]))
    >>> layer_io_gauss_newton_traces(fm, params, ["2.weight"], x, y)["2.weight"].shape
    torch.Size([5])
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


def is_conv1d(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` is the ``Conv1D`` of transformers (GPT-2's projections): out = x W + b
    with W of shape (fan_in, fan_out), a Linear layer with its weight transposed."""
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers")
        and hasattr(module, "nf")
    )


def linear_conv_modules(
    fmodel: FunctionalModel, layers: Sequence[str]
) -> dict[str, torch.nn.Module]:
    """The selected weights that are the ``weight`` of an ``nn.Linear``, a zero-padded
    ``nn.ConvNd`` or a transformers ``Conv1D`` (:func:`is_conv1d`)."""
    modules = dict(fmodel.module.named_modules())
    out = {}
    for name in layers:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        if leaf != "weight":
            continue
        if (
            type(module) is torch.nn.Linear
            or is_conv1d(module)
            or (type(module) in _CONV and module.padding_mode == "zeros")
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
    if is_conv1d(module):
        return inp @ weight
    conv = _CONV[type(module)]
    return conv(inp, weight, None, module.stride, module.padding, module.dilation, module.groups)


def layer_io_ggn_forms(
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
    :func:`linear_conv_modules`, :class:`LayerCalls`); the others are simply absent from the result.
    The logits must be (B, C): their C per-example directional derivatives z' = J_i v_i come from
    one backward pass per logit. ``max_backward``: return ``{}`` after the forward pass
    when C exceeds it (then per-layer JVPs are cheaper). The values equal
    :func:`hessfine.bounds.operators.gauss_newton.ggn_forms` to round-off.
    """
    modules = linear_conv_modules(fmodel, list(directions))
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


def _unfoldable_modules(
    fmodel: FunctionalModel, layers: Sequence[str]
) -> dict[str, torch.nn.Module]:
    """The selected Linear and Conv2d (groups 1, numeric padding) weights, whose inputs unfold."""
    return {
        name: module
        for name, module in linear_conv_modules(fmodel, layers).items()
        if type(module) is torch.nn.Linear
        or (
            type(module) is torch.nn.Conv2d
            and module.groups == 1
            and not isinstance(module.padding, str)
        )
    }


def layer_io_gauss_newton_traces(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    x: Inputs,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-example Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖², shape (B,), for every layer this route can do.

    Layers: the Linear and Conv2d (groups 1, numeric padding) weights used in the forward pass;
    the others are absent from the result. From the recorded layer inputs and one backward pass
    of the batch per curvature factor r_k (see the module docstring); for losses with one logit
    vector per example (not ``fmodel.loss.sequence``), whose factors are per-example (K, B, C).
    """
    modules = _unfoldable_modules(fmodel, layers)
    if not modules:
        return {}
    record = record_layer_calls(fmodel, params, modules, x)
    z, calls = record.logits, record.calls
    used = list(calls)
    if not used:
        return {}
    factors = fmodel.loss.curvature_factors(z.detach(), y)
    inputs = {name: _positions_in(modules[name], calls[name]) for name in used}
    outputs = [out for name in used for _, out in calls[name]]
    totals = {name: torch.zeros(z.shape[0], dtype=torch.float64, device=z.device) for name in used}
    for k in range(factors.shape[0]):
        grads = torch.autograd.grad(
            z, outputs, factors[k], retain_graph=k < factors.shape[0] - 1, allow_unused=True
        )
        offset = 0
        for name in used:
            count = len(calls[name])
            parts = [
                torch.zeros_like(out) if g is None else g
                for g, (_, out) in zip(grads[offset : offset + count], calls[name], strict=True)
            ]
            offset += count
            totals[name] += _squared_norms(inputs[name], _positions_out(parts)).double()
    return totals


def _positions_in(module, calls) -> Tensor:
    """(B, T, fan_in) inputs over all positions of all calls of the module."""
    parts = []
    for inp, _ in calls:
        if isinstance(module, torch.nn.Conv2d):
            cols = torch.nn.functional.unfold(
                inp,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )
            parts.append(cols.transpose(1, 2))
        else:
            parts.append(inp.reshape(inp.shape[0], -1, inp.shape[-1]))
    return torch.cat(parts, dim=1)


def _positions_out(grads: list[Tensor]) -> Tensor:
    """(B, T, fan_out) output gradients over all positions of all calls (channels last)."""
    parts = []
    for g in grads:
        if g.dim() == 4:  # Conv2d: (B, C_out, H, W)
            parts.append(g.flatten(2).transpose(1, 2))
        else:
            parts.append(g.reshape(g.shape[0], -1, g.shape[-1]))
    return torch.cat(parts, dim=1)


def _squared_norms(a: Tensor, g: Tensor) -> Tensor:
    """‖Σ_t g_t a_tᵀ‖²_F per example, by Gram matrices or by the per-example gradient."""
    positions, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
    if positions * positions <= fan_in * fan_out:
        return ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
    return torch.einsum("bto,bti->boi", g, a).pow(2).sum(dim=(1, 2))
