"""Correlations of a measure with the generalization gap, with confidence intervals that respect runs.

Checkpoints of one fine-tuning run are not independent (they share the initial weights, the
batches and the trajectory), so the intervals resample **runs**, not checkpoints: a cluster
(block) bootstrap (Davison & Hinkley, "Bootstrap Methods and their Application", 1997, §3.8).
Each of ``bootstrap`` replicates draws as many runs as there are, with replacement, pools all
their checkpoints, and recomputes the statistic; the interval is the percentile interval of the
replicates (replicates where a column is constant are left out). The point estimates and
p-values are those of :mod:`scipy.stats` on all points (the p-values assume independent points,
so they are optimistic when runs contribute several checkpoints; the intervals do not).

Statistics: Pearson's r (linear), Spearman's ρ (rank; Pearson's r of the ranks) and Kendall's
τ-b (concordant minus discordant pairs, ties corrected). :func:`correlations` applies
:func:`correlate` to every measure column of a comparison (``correlations.csv``).

Example:
    >>> import numpy as np
    >>> x = np.arange(12.0); y = x + np.tile([0.0, 0.5, -0.5], 4)
    >>> result = correlate(x, y, runs=np.repeat(np.arange(4), 3), bootstrap=200, seed=0)
    >>> round(result["spearman"], 3), result["runs"], result["spearman_ci_low"] > 0.8
    (0.993, 4, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from hessfine.analysis.results import columns_of
from hessfine.analysis.schema import (
    DISTANCE_PREFIX,
    HDM,
    HDM_COMMON,
    HDM_HELDOUT,
    MEASURE_COLUMNS,
    MEASURE_PREFIXES,
    MEASURE_SUFFIXES,
    SUM_DISTANCE,
    TRACE_MEASURE,
)
from hessfine.figures.tables import Row, finite
from scipy import stats

__all__ = ["STATISTICS", "Statistic", "correlate"]

Statistic = Literal["pearson", "spearman", "kendall"]
STATISTICS: tuple[Statistic, ...] = ("pearson", "spearman", "kendall")


def _statistic(name: Statistic, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "pearson":
            result = stats.pearsonr(x, y)
        elif name == "spearman":
            result = stats.spearmanr(x, y)
        else:
            result = stats.kendalltau(x, y)
    return float(result.statistic), float(result.pvalue)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b = (concordant − discordant) / sqrt(pairs untied in x · pairs untied in y),
    from the signs of all pairwise differences at once (what ``scipy.stats.kendalltau``
    computes, without its per-call overhead, for the many small replicates)."""
    upper = np.triu_indices(len(x), k=1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    return float((dx * dy).sum() / np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy)))


def _replicate(name: Statistic, x: np.ndarray, y: np.ndarray) -> float:
    if name == "pearson":
        return _pearson(x, y)
    if name == "spearman":
        return _pearson(stats.rankdata(x), stats.rankdata(y))
    return _kendall_tau_b(x, y)


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
    return len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0


def correlate(
    x: Sequence[float],
    y: Sequence[float],
    *,
    runs: Sequence[Any],
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Pearson, Spearman and Kendall correlation of ``x`` with ``y`` and run-resampled
    percentile intervals (module docs); ``runs[k]`` names the run of point k.

    Returns ``n`` (points), ``runs`` (distinct runs) and, for each statistic s, ``s``, ``s_p``,
    ``s_ci_low``, ``s_ci_high`` (None where undefined: fewer than 3 points, a constant column,
    fewer than 2 runs or no defined replicate for an interval).
    """
    x_all, y_all = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    labels = [str(r) for r in runs]
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    members = [np.array(v) for v in groups.values()]
    out: dict[str, Any] = {"n": len(x_all), "runs": len(members)}
    defined = _defined(x_all, y_all)
    for name in STATISTICS:
        value, p = _statistic(name, x_all, y_all) if defined else (None, None)
        out[name], out[f"{name}_p"] = value, p
        out[f"{name}_ci_low"] = out[f"{name}_ci_high"] = None
    if not defined or len(members) < 2 or bootstrap < 1:
        return out
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in STATISTICS}
    for _ in range(bootstrap):
        chosen = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        xb, yb = x_all[chosen], y_all[chosen]
        if not _defined(xb, yb):
            continue
        for name in STATISTICS:
            draws[name].append(_replicate(name, xb, yb))
    tail = 100 * (1 - level) / 2
    for name, values in draws.items():
        if values:
            low, high = np.percentile(values, [tail, 100 - tail])
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(low), float(high)
    return out


def measure_columns(rows: Sequence[Row]) -> list[str]:
    """The bound and measure columns present in ``rows`` that correlations are computed for."""
    present = columns_of(rows)
    fixed = [c for c in MEASURE_COLUMNS if c in present]
    return fixed + [
        c for c in present if c.startswith(MEASURE_PREFIXES) or c.endswith(MEASURE_SUFFIXES)
    ]


#: Measures whose correlation with the gap is also given within each method.
WITHIN_METHOD = (HDM, HDM_COMMON, HDM_HELDOUT, SUM_DISTANCE, TRACE_MEASURE)
_NAMES = {"pearson": "pearson_r", "spearman": "spearman_rho", "kendall": "kendall_tau"}


def _run_of(row: Row) -> object:
    return row.get("run") or row.get("measurement")


def correlations(
    rows: Sequence[Row],
    target: str = "generalization_gap_loss",
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> list[Row]:
    """Pearson, Spearman and Kendall correlation of every measure column with ``target``, over
    all rows (``group`` = ``all``) and, for :data:`WITHIN_METHOD` and the prior distance
    measures, within each method (``group`` = ``method=NAME``).

    Each result: ``measure``, ``target``, ``group``, ``n`` (pairs with both values finite),
    ``runs`` (distinct runs among them), ``pearson_r``, ``spearman_rho``, ``kendall_tau`` with
    their two-sided p-values (``*_p``) and, for the measures that are also given per method, 95%
    intervals (``*_ci_low``, ``*_ci_high``) from ``bootstrap`` replicates that resample runs
    (:func:`correlate`); None when n < 3, a column is constant or
    (intervals) fewer than 2 runs.
    """
    results = []
    columns = measure_columns(rows)
    methods = sorted({str(r["method"]) for r in rows if r.get("method")})
    groups: list[tuple[str, list[str], Sequence[Row]]] = [("all", columns, rows)]
    within = [
        c
        for c in columns
        if c in WITHIN_METHOD or (c.startswith(DISTANCE_PREFIX) and not c.endswith("_log10"))
    ]
    if len(methods) > 1:
        for method in methods:
            subset = [r for r in rows if r.get("method") == method]
            groups.append((f"method={method}", within, subset))
    for group, group_columns, subset in groups:
        for column in group_columns:
            points = [
                (float(row[column]), float(row[target]), _run_of(row))
                for row in subset
                if finite(row.get(column)) and finite(row.get(target))
            ]
            found = correlate(
                [p[0] for p in points],
                [p[1] for p in points],
                runs=[p[2] for p in points],
                bootstrap=bootstrap if column in within else 0,
                seed=seed,
            )
            result: Row = {"measure": column, "target": target, "group": group}
            result["n"], result["runs"] = found["n"], found["runs"]
            for name, key in _NAMES.items():
                result[key] = found[name]
                result[f"{name}_p"] = found[f"{name}_p"]
                result[f"{key}_ci_low"] = found[f"{name}_ci_low"]
                result[f"{key}_ci_high"] = found[f"{name}_ci_high"]
            results.append(result)
    return results
