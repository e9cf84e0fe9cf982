"""Top eigenvalues and the eigenvalue density of the mean-loss Hessian.

* :func:`top_eigenvalues`: the K largest eigenvalues of each layer's diagonal block H̄_ii of the
  mean-loss Hessian over the measured examples, by Lanczos with full reorthogonalisation
  (:mod:`hessfine.bounds.linalg.lanczos`) from a Rademacher start. Each Ritz value θ_j comes with
  the residual bound |β_k s_kj| ≥ min_λ |θ_j − λ| (Parlett, "The Symmetric Eigenvalue Problem",
  Thm 11.4.1) as its convergence report.
* :func:`whole_top_eigenvalues`: the same for the Hessian of all selected layers together
  (cross-layer blocks included) — what PyHessian's ``eigenvalues`` computes by power iteration.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019;
  Ubaru, Chen & Saad, SIMAX 2017): for R random unit starts, the Ritz values θ and squared first
  components w of the eigenvectors of T form a discrete spectral measure; their average, smoothed
  with a Gaussian kernel of width ``bandwidth`` (relative to the spectral range), estimates the
  eigenvalue density φ(λ) = (1/D) Σ_j δ(λ − λ_j).

Example:
    >>> import torch
    >>> from hessfine.bounds.functional import FunctionalModel
    >>> fm, params = FunctionalModel.from_module(torch.nn.Linear(3, 2))
    >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> e = whole_top_eigenvalues(fm, params, ["weight"], [batch], k=2)
    >>> len(e.values)
    2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from hessfine.bounds.estimates import Eigenvalues, SpectralDensity
from hessfine.bounds.functional import Batch, FunctionalModel
from hessfine.bounds.linalg.lanczos import LanczosResult, lanczos, lanczos_many, ritz_values
from hessfine.bounds.linalg.memory import MemoryPlan
from hessfine.bounds.linalg.probes import rademacher
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.operators.mean_loss import block_diagonal_hvp, flat_operator, mean_loss_hvp
from hessfine.bounds.safe_autodiff import differentiable
from torch import Tensor


def _top(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: list[Batch],
    k: int,
    steps: int | None,
    generator: torch.Generator,
    shard: Shard,
    progress: Callable[[float], None] | None,
    memory: MemoryPlan | None,
) -> Eigenvalues:
    shapes = {name: params[name].shape for name in layers}
    hvp = mean_loss_hvp(
        fmodel, params, layers, batches, shard=shard, progress=progress, memory=memory
    )
    matvec = flat_operator(hvp, shapes)
    first = params[layers[0]]
    dim = sum(params[name].numel() for name in layers)
    steps = min(dim, steps if steps is not None else max(2 * k + 20, 40))
    start = rademacher((1, dim), generator=generator, like=first)
    return _eigenvalues(lanczos(matvec, start, steps=steps), k)


def _eigenvalues(result: LanczosResult, k: int) -> Eigenvalues:
    """The top-k Ritz values of a one-member Lanczos run with their residual bounds."""
    used = int(result.steps[0])
    theta, bounds = ritz_values(result)
    take = min(k, used)
    return Eigenvalues(
        values=[float(t) for t in theta[0, :take]],
        residuals=[float(b) for b in bounds[0, :take]],
        steps=used,
        exhausted=bool(result.exhausted[0]),
    )


def top_eigenvalues(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    k: int,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> dict[str, Eigenvalues]:
    """The k largest eigenvalues of every layer's diagonal block of the mean-loss Hessian.

    The layers' Lanczos runs go in lockstep (:func:`hessfine.bounds.linalg.lanczos.lanczos_many`):
    at each step the block products H_ii q_i of all running layers share one forward and one
    backward pass per batch, each then costing one double-backward pass that reaches back to
    its own layer only (:func:`hessfine.bounds.operators.mean_loss.block_diagonal_hvp`). With a
    ``shard`` the Hessian products are summed over processes (every process runs the same
    Lanczos); ``progress`` counts Lanczos steps; ``memory`` sizes the examples per call
    (:mod:`hessfine.bounds.linalg.memory`).
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = list(batches)
    layers = list(layers)
    starts = [
        rademacher((1, params[n].numel()), generator=generator, like=params[n]) for n in layers
    ]
    hvp = block_diagonal_hvp(
        fmodel, params, layers, batches, shard=shard, progress=progress, memory=memory
    )

    def blocks(running: list[int], qs: list[Tensor]) -> list[Tensor]:
        u = {layers[i]: q[0].view_as(params[layers[i]]) for i, q in zip(running, qs, strict=True)}
        out = hvp(u)
        return [out[layers[i]].reshape(1, -1) for i in running]

    default = max(2 * k + 20, 40)
    with differentiable():
        results = lanczos_many(blocks, starts, steps=steps if steps is not None else default)
    return {name: _eigenvalues(result, k) for name, result in zip(layers, results, strict=True)}


def whole_top_eigenvalues(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    k: int,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> Eigenvalues:
    """The k largest eigenvalues of the mean-loss Hessian of all selected layers together."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    batches = list(batches)
    with differentiable():
        return _top(
            fmodel, params, list(layers), batches, k, steps, generator, shard, progress, memory
        )


def spectral_density(
    fmodel: FunctionalModel,
    params: Mapping[str, Tensor],
    layers: Sequence[str],
    batches: Iterable[Batch],
    *,
    runs: int = 4,
    steps: int = 64,
    points: int = 512,
    bandwidth: float = 0.01,
    generator: torch.Generator | None = None,
    shard: Shard = LOCAL,
    progress: Callable[[float], None] | None = None,
    memory: MemoryPlan | None = None,
) -> SpectralDensity:
    """SLQ estimate of the eigenvalue density of the selected-layer mean-loss Hessian.

    With a ``shard`` the Hessian products are summed over processes; ``progress`` counts
    Lanczos steps times runs; ``memory`` sizes the examples per call.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    layers = list(layers)
    batches = list(batches)
    shapes = {name: params[name].shape for name in layers}
    dim = sum(params[name].numel() for name in layers)
    with differentiable():
        hvp = mean_loss_hvp(
            fmodel, params, layers, batches, shard=shard, progress=progress, memory=memory
        )
        matvec = flat_operator(hvp, shapes)
        start = rademacher((runs, dim), generator=generator, like=params[layers[0]])
        result = lanczos(matvec, start, steps=steps)
    theta, vectors = torch.linalg.eigh(result.tridiagonal().double())
    weights = vectors[:, 0, :] ** 2
    low, high = float(theta.min()), float(theta.max())
    margin = max(high - low, 1e-12) * 0.05
    grid = torch.linspace(
        low - margin, high + margin, points, dtype=torch.float64, device=theta.device
    )
    sigma = bandwidth * max(high - low, 1e-12)
    kernel = torch.exp(-((grid[:, None, None] - theta[None]) ** 2) / (2 * sigma**2))
    kernel = kernel / (sigma * (2 * torch.pi) ** 0.5)
    density = (kernel * weights[None]).sum(dim=2).mean(dim=1)
    return SpectralDensity(
        grid=grid.tolist(),
        density=density.tolist(),
        nodes=theta.tolist(),
        weights=weights.tolist(),
        steps=int(result.steps.max()),
        runs=runs,
        bandwidth=bandwidth,
    )
