"""A numerical certificate that the logits are piecewise linear in a layer's weights.

If every operation after layer i is piecewise linear (ReLU, max-pooling, eval-mode BatchNorm,
residual addition, pooling…), the logits are piecewise linear in W_i: their second derivative
z'' vanishes, so the per-example Hessian block H_i(x) = J_iᵀ ∇²_z ℓ J_i + Σ_c (∂ℓ/∂z_c) ∇²_{W_i} z_c
equals the Gauss–Newton block G_i(x) — positive semi-definite, so H_i⁺ = H_i — and the
single-JVP Gauss–Newton value of :mod:`hessfine.bounds.operators.gauss_newton` is exact.

:func:`certify_piecewise_linear` tests this per layer: with φ = rᵀz (random Gaussian weights r on
the logits) and a Gaussian probe u_i, the ratio |u_iᵀ ∇²_{W_i} φ u_i| / (∇_{W_i} φ · u_i)² is
exactly 0 when the logits are piecewise linear in W_i and of order one for smooth activations,
softmax attention or LayerNorm after the layer; one probe suffices almost surely, since uᵀAu = 0
for a Gaussian u only if A = 0. :func:`joint_certification` tests all single-call Linear/Conv
layers at once from perturbations of their outputs (one double backward instead of one per
layer). A layer counts as certified when its ratio is within :func:`certification_tolerance`.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net)
    >>> certify_piecewise_linear(fm, params, ["0.weight", "2.weight"], torch.randn(2, 4))
    {'0.weight': 0.0, '2.weight': 0.0}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from hessfine.bounds.functional import FunctionalModel, Inputs, slice_inputs
from hessfine.bounds.operators.layer_io import layer_with_weight, linear_conv_modules
from torch import Tensor


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
    (:func:`joint_certification`: one double backward for all of them);
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
    per-layer certificate of :func:`certify_piecewise_linear` — is zero. A |Q| of order one says
    that at least one layer is not piecewise linear, not which one. Layers that are not
    single-call Linear/Conv weights, or whose first derivative is 0, are not tested (the returned
    list omits them).
    """
    modules = linear_conv_modules(fmodel, layers)
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
