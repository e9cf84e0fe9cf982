"""Noise stability of the loss under Gaussian weight perturbations, and its Hessian prediction.

For selected layers W_1..W_L and examples (x_n, y_n), n = 1..N, the noise stability is

    I(σ) = E_U[ ℓ̄(W + U) ] − ℓ̄(W),    ℓ̄(W) = (1/N) Σ_n ℓ(f_W(x_n), y_n),

with U Gaussian on the selected weights only (Ju, Li & Zhang, ICML 2022, Sec. 2):

* isotropic: U_i ~ N(0, σ² I);
* relative (magnitude-scaled): U_i = σ·|W_i| ⊙ Z_i, Z_i ~ N(0, I), i.e. Var(U_ij) = σ² W_ij².

Second-order expansion (exact constants — the paper drops the ½). With g the gradient and H the
Hessian of ℓ̄ over the selected weights, E[gᵀU] = 0 and E[UᵀHU] = Tr[H Cov(U)]; independent
zero-mean noise across layers makes the cross-layer blocks vanish, so

    I(σ) = ½ Σ_i Tr[Cov(U_i) H_ii] + O(σ⁴)
         = (σ²/2) Σ_i mean_x Tr[H_i(x)]               (isotropic)
         = (σ²/2) Σ_i Σ_j W_ij² (H_ii)_jj              (relative).

The odd orders vanish in expectation because U and −U have the same law (the O(σ³) term is zero).

Estimator. Plain Monte Carlo averages ℓ̄(W + U_d) − ℓ̄(W) over D draws; its variance is dominated
by the first-order term, Var ≈ σ² gᵀ Cov(Z) g / D. Antithetic pairs (U_d, −U_d) average
½[ℓ̄(W + U_d) + ℓ̄(W − U_d)] − ℓ̄(W), which cancels every odd order exactly, so the per-pair
variance drops to Var(½ UᵀHU) = O(σ⁴): at small σ, orders of magnitude below plain Monte Carlo
at equal numbers of loss evaluations (see ``bench/noise_stability.py``). The reported standard
error is the sample standard deviation over independent draws (pairs) divided by √D, and the
95 % interval uses Student's t with D − 1 degrees of freedom.

The per-example differences ℓ(W ± U; x) − ℓ(W; x) are formed before averaging (and accumulated
in float64), so the small second-order signal is not lost to cancellation against ℓ̄(W).
Draws are batched: a chunk of noise vectors goes through one ``vmap`` of the functional forward
pass per call on a chunk of examples (never a Python loop per draw per example). Batches are
streamed, and each noise vector has its own keyed generator (:mod:`hessfine.bounds.linalg.probes`),
so memory stays flat in the number of examples and the result does not depend on how the work is
split. Under a memory plan (:mod:`hessfine.bounds.linalg.memory`, kind ``noise``) the examples of
a call are sized from its measured memory (2·chunk perturbed forward passes per example), and the
draws of a ``vmap`` are at most what fits in half the room at the measured growth of one draw on
one example (a probe call before the first batch, its value discarded); every draw is re-drawn
from its key in every call, so the chunks change nothing but round-off.

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> fm, params = FunctionalModel.from_module(net.double())
    >>> batch = (torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)))
    >>> est = noise_stability(fm, params, ["0.weight", "2.weight"], [batch], sigma=1e-3,
    ...                       draws=64, generator=torch.Generator().manual_seed(0))
    >>> est.draws, est.evaluations, est.antithetic
    (64, 128, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from hessfine.bounds.estimates import NoiseStability
from hessfine.bounds.functional import Batch, FunctionalModel, batch_size, slice_inputs
from hessfine.bounds.linalg.memory import MemoryPlan
from hessfine.bounds.linalg.probes import base_key, keyed_generator
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.safe_autodiff import differentiable
from scipy import stats
from torch import Tensor
from torch.func import vmap

_ELEMENT_BUDGET = 2**26
_MAX_CHUNK = 64


def noise_stability(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    sigma: float,
    draws: int,
    relative: bool = False,
    antithetic: bool = True,
    generator: torch.Generator,
    chunk: int | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> NoiseStability:
    """Monte Carlo estimate of I(σ) over all examples of ``batches`` (see the module docstring).

    Batches are streamed once (batch-outer, then the calls on a batch's examples, draw chunks
    inner; memory does not grow with the number of examples): noise vector d is re-drawn for
    every call from its own generator keyed by (one base draw of ``generator``, d)
    (:func:`hessfine.bounds.linalg.probes.keyed_generator`), so the result depends neither on the
    batching, nor on ``chunk`` or ``memory``, nor on the number of processes of ``shard``; the
    same base key gives the same unit noise at every σ (common random numbers).

    Args:
        fmodel, params: the network and its full parameter dict.
        layers: names of the perturbed weights (the selected layers).
        batches: (inputs, labels) pairs, consumed once.
        sigma: noise scale σ > 0 (absolute, or relative to |w| when ``relative``).
        draws: number of independent noise vectors U (≥ 2).
        relative: perturb with σ·|w| ⊙ N(0, I) instead of σ·N(0, I).
        antithetic: evaluate each U at ±U (pairs) instead of plain Monte Carlo.
        generator: source of the base key (one draw); the noise itself is drawn on the
            parameters' device.
        chunk: number of draws evaluated together in one ``vmap`` (memory ≈ a few chunk copies
            of the selected weights plus 2·chunk forward passes of the call's examples); default
            from an element budget, and under a measured ``memory`` plan at most what fits in
            half its room at the measured cost of one draw on one example.
        shard: this process's share of the examples; sums are added over processes.
        progress: called with the draws just evaluated on one batch (a fraction of them when the
            batch is split into calls).
        memory: the plan that sizes the examples of a call (kind ``noise``); default: no plan,
            one call per batch.
    """
    layers = list(layers)
    _check_inputs(params, layers, sigma, draws)
    memory = memory if memory is not None else MemoryPlan()
    probe = (
        memory.calls("noise:draw", recorded=False) if memory.measured and chunk is None else None
    )
    chunk = _draw_chunk(params, layers, draws, chunk)
    scale = {
        name: sigma * params[name].abs() if relative else torch.full_like(params[name], sigma)
        for name in layers
    }
    key = base_key(generator)
    calls = memory.calls("noise")
    sums = torch.zeros(draws, dtype=torch.float64)
    total, base_sum = 0, 0.0

    def differences(x, y, start: int, stop: int, wanted: range, size: int | None):
        """Σ_n ℓ(W; x_n) and, per draw of ``wanted`` (the others 0), Σ_n of the (antithetic)
        differences on examples ``start:stop`` of the batch; progress as a share of a batch of
        ``size`` (None: not reported)."""
        xs, ys = slice_inputs(x, start, stop), y[start:stop]
        base = fmodel.losses(params, xs, ys)
        part = torch.zeros(draws, dtype=torch.float64)
        for first in range(wanted.start, wanted.stop, chunk):
            k = min(chunk, wanted.stop - first)
            noise = _draw(params, layers, scale, key, range(first, first + k))
            if antithetic:
                noise = {name: torch.cat([u, -u]) for name, u in noise.items()}
            diff = (_perturbed_losses(fmodel, params, noise, xs, ys) - base).double()
            del noise
            values = 0.5 * (diff[:k] + diff[k:]) if antithetic else diff
            part[first : first + k] = values.sum(dim=1).cpu()
            if progress is not None and size is not None:
                progress(k * (stop - start) / size)
        return float(base.double().sum()), part

    every = range(draws)
    with torch.no_grad(), differentiable():
        for x, y in batches:
            size = batch_size(x)
            if probe is not None:  # once per σ; the probe call once per plan
                if not probe.made:
                    probe.measure(1, lambda x=x, y=y: differences(x, y, 0, 1, range(1), None))
                if probe.growth:  # one draw of one example: the most a draw may cost
                    one = max(probe.growth[-1][1], 1)
                    chunk = max(1, min(chunk, math.floor(memory.room() / (2 * one))))
                probe = None
            found = calls.run(
                lambda a, b, x=x, y=y, n=size: differences(x, y, a, b, every, n), size
            )
            for base_part, part in found:
                base_sum += base_part
                sums += part
            total += int(y.shape[0])
    sums = shard.sum(sums)
    total, base_sum = int(shard.total(total)), shard.total(base_sum)
    if total == 0:
        raise ValueError("noise_stability needs at least one example in `batches`")
    samples = sums / total
    mean = float(samples.mean())
    stderr = float(samples.std() / math.sqrt(draws))
    half = float(stats.t.ppf(0.975, draws - 1)) * stderr
    return NoiseStability(
        sigma=float(sigma),
        mean=mean,
        stderr=stderr,
        draws=draws,
        evaluations=2 * draws if antithetic else draws,
        relative=relative,
        antithetic=antithetic,
        ci95=(mean - half, mean + half),
        base_loss=base_sum / total,
        examples=total,
        samples=tuple(float(s) for s in samples),
    )


def trace_prediction(sigma: float, traces: Mapping[str, float]) -> float:
    """Second-order prediction (σ²/2)·Σ_i t_i of the noise stability I(σ).

    For isotropic noise pass t_i = mean_x Tr[H_i(x)] (``trace.mean`` of the engine); for relative
    noise pass t_i = Σ_j W_ij² (H_ii)_jj from
    :func:`hessfine.bounds.estimators.traces.relative_noise_traces` — the same formula then
    predicts the relative-noise stability, since Cov(U_i) = σ² diag(W_i²).

    Example:
        >>> trace_prediction(1e-2, {"a": 3.0, "b": 1.0})
        0.0002
    """
    return 0.5 * float(sigma) ** 2 * float(sum(traces.values()))


def _draw_chunk(
    params: Mapping[str, Tensor], layers: list[str], draws: int, chunk: int | None
) -> int:
    """The draws of one ``vmap``: ``chunk`` if given, else as many as the element budget
    allows, at most 64."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive integer, not {chunk}")
        return chunk
    numel = sum(params[name].numel() for name in layers)
    return max(1, min(draws, _MAX_CHUNK, _ELEMENT_BUDGET // max(numel, 1)))


def _check_inputs(params: Mapping[str, Tensor], layers: list[str], sigma: float, draws: int):
    if not layers:
        raise ValueError("noise_stability needs at least one layer to perturb")
    missing = [name for name in layers if name not in params]
    if missing:
        raise ValueError(f"unknown layers {missing}; choose among the parameter names")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, not {sigma}")
    if draws < 2:
        raise ValueError(f"draws must be at least 2 (for a standard error), not {draws}")


def _draw(
    params: Mapping[str, Tensor],
    layers: list[str],
    scale: Mapping[str, Tensor],
    key: int,
    indices: range,
) -> dict[str, Tensor]:
    """Scaled Gaussian noise vectors number ``indices``, each from its own keyed generator."""
    device = params[layers[0]].device
    per_draw = []
    for d in indices:
        g = keyed_generator(key, d, device=device)
        per_draw.append(
            {
                name: torch.randn(
                    params[name].shape, generator=g, dtype=params[name].dtype, device=device
                )
                for name in layers
            }
        )
    return {
        name: torch.stack([u[name] for u in per_draw]).to(params[name].device) * scale[name]
        for name in layers
    }


def _perturbed_losses(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    noise: Mapping[str, Tensor],
    x,
    y: Tensor,
) -> Tensor:
    """Per-example losses under W + U for every noise vector U: shape (draws, batch)."""

    def losses(u: dict[str, Tensor]) -> Tensor:
        return fmodel.losses({**params, **{name: params[name] + u[name] for name in u}}, x, y)

    return vmap(losses)(dict(noise))
