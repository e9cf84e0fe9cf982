"""What the estimators return: small frozen results with their JSON form, their merge across
processes and their form for a layer the model does not use.

Every estimator of :mod:`hessfine.bounds.estimators` returns one of these types (per layer, or
one for all layers). Each type owns three things, so that the code that runs a measurement never
needs to know how a result is built:

* ``to_json()`` — the entries it contributes to ``measurement.json`` (the schema's names;
  ``docs/schema.md``);
* ``merge(parts)`` — the result of all processes of a ``torchrun`` job from each process's result
  on its share of the examples (maxima with their global example index, count-weighted means);
  results that every process already holds whole (the estimators sum their Hessian products
  over processes) merge to the first part;
* ``unused(...)`` — the exact value for a layer the loss does not depend on (its Hessian blocks
  are zero).

The word *route* names how a value was computed (``ggn-certified``, ``lanczos``, ``hutchinson``…);
``measurement.json`` keeps the name ``method`` for it (schema version 1).

Example:
    >>> import torch
    >>> r = RunningReduction()
    >>> r.update(torch.tensor([0.5, 2.0])); r.update(torch.tensor([1.0]))
    >>> form = r.form("fc.weight", "ggn", {})
    >>> form.max, form.argmax, form.count, form.to_json()["mean"]
    (2.0, 1, 3, 1.1666666666666667)
    >>> QuadraticForm.merge([form, QuadraticForm.unused("fc.weight", 0)]) == form
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from torch import Tensor

UNUSED = "unused"
"""The route of a layer the model does not use in eval mode (its Hessian blocks are zero)."""

R = TypeVar("R")


def _deprecated_method(result: Any) -> str:
    warnings.warn(
        f"{type(result).__name__}.method is deprecated: use .route (renamed in hessfine 0.2.0; "
        "the old name goes in 0.3.0)",
        DeprecationWarning,
        stacklevel=3,
    )
    return result.route


def _best(parts: Sequence[Any]) -> Any:
    """The part with the largest ``max`` (the smallest ``argmax`` on ties)."""
    return max(parts, key=lambda p: (p.max, -p.argmax))


def _weighted_mean(parts: Sequence[Any]) -> tuple[float, int]:
    count = sum(p.count for p in parts)
    return sum(p.mean * p.count for p in parts) / max(count, 1), count


@dataclass(frozen=True)
class QuadraticForm:
    """Per-layer reduction of v_iᵀ M(x) v_i over examples (M = H_i, G_i or H_i⁺).

    ``argmax`` is the index (in iteration order) of the example attaining ``max`` — of the
    batch for ``reference-code``. ``route`` says how the values were computed;
    ``diagnostics`` carries what a reader needs to trust them (Lanczos convergence, the
    certification residual). Where the values are not exact (the ``lanczos`` route: each is the
    midpoint of a rigorous per-example bracket, docs/mathematics.md, "The positive part by
    Lanczos quadrature"), ``mean_lower`` and ``mean_upper`` are the means of the brackets'
    ends, an interval that holds the exact mean; None where the values are exact (then the
    interval is the mean alone).
    """

    name: str
    max: float
    mean: float
    argmax: int
    count: int
    route: str
    diagnostics: Mapping[str, float | int | bool | str] = field(default_factory=dict)
    mean_lower: float | None = None
    mean_upper: float | None = None

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`route`."""
        return _deprecated_method(self)

    @property
    def max_error_estimate(self) -> float:
        """How far the true maximum may lie from :attr:`max` (absolute, ≥ 0).

        Lanczos routes record max_x U_x over the examples not pruned and max_x R_x over all
        (``diagnostics["max_plus_error"]``, ``["max_minus_error"]``), with [R_x, U_x] an
        example's rigorous bracket of v_iᵀH_i⁺(x)v_i and :attr:`max` the largest value; the
        maximum lies between them (up to round-off, and as far as the change rule that pruned
        the others holds), so the value is the larger distance of either from :attr:`max`.
        Exact routes (the Gauss–Newton forms, the raw block, certified layers, Krylov spaces
        exhausted) record none: 0.
        """
        d = self.diagnostics
        if "max_plus_error" not in d:
            return 0.0
        return max(
            float(d["max_plus_error"]) - self.max, self.max - float(d["max_minus_error"]), 0.0
        )

    def to_json(self) -> dict[str, Any]:
        """``layers[].quadratic_form`` of ``measurement.json`` (without ``argmax_index``, which
        needs the sample's indices)."""
        return {
            "max": self.max,
            "mean": self.mean,
            "mean_lower": self.mean if self.mean_lower is None else self.mean_lower,
            "mean_upper": self.mean if self.mean_upper is None else self.mean_upper,
            "argmax": self.argmax,
        }

    @classmethod
    def merge(cls, parts: Sequence[QuadraticForm]) -> QuadraticForm:
        """The global max (smallest global argmax on ties), mean, count and diagnostics."""
        if len(parts) == 1:
            return parts[0]
        held = [p for p in parts if p.count > 0] or list(parts[:1])
        mean, count = _weighted_mean(held)
        ends = {}
        for end in ("mean_lower", "mean_upper"):
            if any(getattr(p, end) is not None for p in held):
                total = sum(
                    (p.mean if getattr(p, end) is None else getattr(p, end)) * p.count for p in held
                )
                ends[end] = total / max(count, 1)
        return replace(
            _best(held),
            mean=mean,
            mean_lower=ends.get("mean_lower"),
            mean_upper=ends.get("mean_upper"),
            count=count,
            route=held[0].route,
            diagnostics=merge_diagnostics([p.diagnostics for p in held], [p.count for p in held]),
        )

    @classmethod
    def unused(cls, name: str, count: int) -> QuadraticForm:
        """Zero forms over ``count`` examples for a layer the model does not use."""
        return cls(name, 0.0, 0.0, 0, count, UNUSED, {"used_in_eval": False})


def merge_diagnostics(parts: Sequence[Mapping[str, Any]], counts: Sequence[int]) -> dict:
    """Per key: ``*_fraction`` and ``*_mean`` by count-weighted mean, other numbers by max (worst
    case), everything else (flags, names: equal on every process) from the first process."""
    out: dict[str, Any] = {}
    total = max(sum(counts), 1)
    for key in parts[0]:
        values = [p[key] for p in parts if key in p]
        first = values[0]
        if isinstance(first, bool) or not isinstance(first, int | float):
            out[key] = first
        elif key.endswith(("_fraction", "_mean")):
            out[key] = sum(v * c for v, c in zip(values, counts, strict=False)) / total
        else:
            out[key] = max(values)
    return out


class RunningReduction:
    """Streaming max, argmax and mean of a sequence of value blocks (O(1) memory), and the means
    of lower and upper bounds of the exact values where the values are not exact
    (``mean_lower``, ``mean_upper``)."""

    def __init__(self) -> None:
        self.max = float("-inf")
        self.argmax = -1
        self.total = 0.0
        self.count = 0
        self.ends: dict[str, float] | None = None

    def update(
        self,
        values: Tensor,
        *,
        start: int | None = None,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
    ) -> None:
        """Fold in the next block of per-example values; ``start`` is the global index of the
        first (default: the number of values seen so far); ``lower``, ``upper``: bounds of the
        exact values (both or neither; none: the values are exact)."""
        values = values.detach().double()
        if values.numel() == 0:
            return
        bounds = {"lower": lower, "upper": upper}
        if lower is not None or self.ends is not None:
            if self.ends is None:
                self.ends = {"lower": self.total, "upper": self.total}
            for end, bound in bounds.items():
                ends = values if bound is None else bound.detach().double()
                self.ends[end] += float(ends.sum())
        best = int(values.argmax())
        if float(values[best]) > self.max:
            self.max = float(values[best])
            self.argmax = (self.count if start is None else start) + best
        self.total += float(values.sum())
        self.count += values.numel()

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    def form(self, name: str, route: str, diagnostics: Mapping) -> QuadraticForm:
        """The reduction as a :class:`QuadraticForm`."""
        lower = upper = None
        if self.ends is not None:
            count = max(self.count, 1)
            lower, upper = self.ends["lower"] / count, self.ends["upper"] / count
        return QuadraticForm(
            name, self.max, self.mean, self.argmax, self.count, route, diagnostics, lower, upper
        )


@dataclass(frozen=True)
class TraceEstimate:
    """Estimate of the mean over examples of Tr[H_i(x)] with its standard error.

    Every process holds the whole estimate (the Hessian products are summed over processes).
    """

    mean: float
    stderr: float
    probes: int
    route: str

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`route`."""
        return _deprecated_method(self)

    def to_json(self) -> dict[str, Any]:
        """The mean-trace entries of ``layers[].trace``."""
        return {
            "mean": self.mean,
            "stderr": self.stderr,
            "probes": self.probes,
            "method": self.route,
        }

    @classmethod
    def merge(cls, parts: Sequence[TraceEstimate]) -> TraceEstimate:
        """Every process holds the whole estimate: the first."""
        return parts[0]

    @classmethod
    def unused(cls, probes: int) -> TraceEstimate:
        """The zero trace of a layer the model does not use."""
        return cls(0.0, 0.0, probes, UNUSED)


@dataclass(frozen=True)
class PositiveTrace:
    """max over examples of Tr[H_i⁺(x)], where it is attained, and how it was computed.

    ``stderr`` is the standard error of the maximising example's estimate (0 when exact);
    ``count`` the number of examples reduced.
    """

    max: float
    argmax: int
    mean: float
    stderr: float
    route: str
    count: int = 0

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`route`."""
        return _deprecated_method(self)

    def to_json(self) -> dict[str, Any]:
        """The positive-part entries of ``layers[].trace``."""
        return {
            "positive_max": self.max,
            "positive_max_stderr": self.stderr,
            "positive_method": self.route,
        }

    @classmethod
    def merge(cls, parts: Sequence[PositiveTrace]) -> PositiveTrace:
        """The global max (with its standard error) and the count-weighted mean."""
        if len(parts) == 1:
            return parts[0]
        held = [p for p in parts if p.count > 0] or list(parts[:1])
        mean, count = _weighted_mean(held)
        return replace(_best(held), mean=mean, count=count)

    @classmethod
    def unused(cls) -> PositiveTrace:
        """The zero positive trace of a layer the model does not use."""
        return cls(0.0, 0, 0.0, 0.0, UNUSED)


@dataclass(frozen=True)
class Eigenvalues:
    """Top Ritz values (descending) with residual bounds and the Lanczos steps used.

    Every process holds the whole result (the Hessian products are summed over processes).
    """

    values: list[float]
    residuals: list[float]
    steps: int
    exhausted: bool

    def to_json(self) -> dict[str, Any]:
        """``top_eigenvalues_all_layers`` of ``measurement.json``."""
        return {"values": self.values, "residuals": self.residuals}

    @classmethod
    def merge(cls, parts: Sequence[Eigenvalues]) -> Eigenvalues:
        """Every process holds the whole result: the first."""
        return parts[0]

    def with_zeros(self, zeros: int, k: int) -> Eigenvalues:
        """The k largest of these values and ``zeros`` exact zero eigenvalues.

        A block-diagonal Hessian's spectrum is the union of the blocks' spectra, so this is
        exact for the Hessian of used and unused layers whenever ``values`` holds the k largest
        eigenvalues of the used layers' block.
        """
        pairs = [*zip(self.values, self.residuals, strict=True), *[(0.0, 0.0)] * min(zeros, k)]
        pairs = sorted(pairs, key=lambda pair: -pair[0])[:k]
        return Eigenvalues(
            [value for value, _ in pairs], [res for _, res in pairs], self.steps, self.exhausted
        )

    @classmethod
    def unused(cls, numel: int, k: int) -> Eigenvalues:
        """The k largest eigenvalues of a zero block of ``numel`` weights: min(k, numel) zeros."""
        return cls([], [], 0, True).with_zeros(numel, k)


@dataclass(frozen=True)
class SpectralDensity:
    """Smoothed eigenvalue density on ``grid`` and the raw SLQ nodes and weights per run."""

    grid: list[float]
    density: list[float]
    nodes: list[list[float]]
    weights: list[list[float]]
    steps: int
    runs: int
    bandwidth: float

    def to_json(self) -> dict[str, Any]:
        """The entries of ``spectrum.json``."""
        return {
            "grid": self.grid,
            "density": self.density,
            "nodes": self.nodes,
            "weights": self.weights,
            "steps": self.steps,
            "runs": self.runs,
            "bandwidth": self.bandwidth,
        }

    @classmethod
    def merge(cls, parts: Sequence[SpectralDensity]) -> SpectralDensity:
        """Every process holds the whole result: the first."""
        return parts[0]


@dataclass(frozen=True)
class NoiseStability:
    """Estimate of I(σ) = E_U[ℓ̄(W+U)] − ℓ̄(W) with its Monte Carlo uncertainty.

    ``draws`` counts independent noise vectors U; with ``antithetic`` each is evaluated at ±U, so
    ``evaluations`` (perturbed passes over the data) is 2·draws, else draws. ``samples`` holds the
    per-draw (per-pair) values whose mean is ``mean``; ``base_loss`` is ℓ̄(W). Every process
    holds the whole estimate (sums are added over processes).
    """

    sigma: float
    mean: float
    stderr: float
    draws: int
    evaluations: int
    relative: bool
    antithetic: bool
    ci95: tuple[float, float]
    base_loss: float
    examples: int
    samples: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """The fields of ``measurement.json → noise_stability[]`` plus diagnostics (no samples)."""
        return {
            "sigma": self.sigma,
            "mean": self.mean,
            "stderr": self.stderr,
            "draws": self.draws,
            "evaluations": self.evaluations,
            "relative": self.relative,
            "antithetic": self.antithetic,
            "ci95": list(self.ci95),
            "base_loss": self.base_loss,
            "examples": self.examples,
        }

    @classmethod
    def merge(cls, parts: Sequence[NoiseStability]) -> NoiseStability:
        """Every process holds the whole estimate: the first."""
        return parts[0]


def merge_layers(parts: Sequence[Mapping[str, R]]) -> dict[str, R]:
    """Per layer, the merge (by each result's type) of every process's per-layer results."""
    first = parts[0]
    return {name: type(first[name]).merge([p[name] for p in parts]) for name in first}
