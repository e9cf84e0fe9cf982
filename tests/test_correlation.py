"""Tests of hessfine.analysis.correlation: point estimates and run-resampled intervals."""

from __future__ import annotations

import numpy as np
import pytest
from hessfine.analysis.correlation import STATISTICS, correlate
from scipy import stats


def _data(n: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, n)
    return x, x + rng.normal(0, 0.3, n)


def test_point_estimates_are_scipy_on_all_points() -> None:
    x, y = _data()
    result = correlate(x, y, runs=range(len(x)), bootstrap=0)
    assert result["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert result["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert result["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert result["kendall_p"] == pytest.approx(stats.kendalltau(x, y).pvalue, rel=1e-9)
    assert result["pearson_ci_low"] is None  # no replicates asked for


def test_duplicated_checkpoints_do_not_narrow_the_interval() -> None:
    """A run contributing k identical checkpoints carries no more information than one: with
    runs resampled, the interval equals that of one point per run (same draws). Resampling
    checkpoints instead would shrink it by about sqrt(k)."""
    x, y = _data()
    once = correlate(x, y, runs=range(len(x)), bootstrap=300, seed=4)
    k = 5
    repeated = correlate(
        np.repeat(x, k),
        np.repeat(y, k),
        runs=np.repeat(np.arange(len(x)), k),
        bootstrap=300,
        seed=4,
    )
    for name in STATISTICS:
        assert repeated[f"{name}_ci_low"] == pytest.approx(once[f"{name}_ci_low"], abs=1e-9)
        assert repeated[f"{name}_ci_high"] == pytest.approx(once[f"{name}_ci_high"], abs=1e-9)
    naive = correlate(
        np.repeat(x, k), np.repeat(y, k), runs=range(k * len(x)), bootstrap=300, seed=4
    )
    width = once["pearson_ci_high"] - once["pearson_ci_low"]
    assert naive["pearson_ci_high"] - naive["pearson_ci_low"] < 0.7 * width
    assert repeated["runs"] == len(x) and repeated["n"] == k * len(x)


def test_interval_covers_the_estimate_and_shrinks_with_more_runs() -> None:
    small, large = _data(10, seed=1), _data(200, seed=1)
    a = correlate(*small, runs=range(10), bootstrap=400, seed=0)
    b = correlate(*large, runs=range(200), bootstrap=400, seed=0)
    for r in (a, b):
        assert r["spearman_ci_low"] <= r["spearman"] <= r["spearman_ci_high"]
    assert (b["spearman_ci_high"] - b["spearman_ci_low"]) < (
        a["spearman_ci_high"] - a["spearman_ci_low"]
    )


def test_undefined_cases() -> None:
    one_run = correlate([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], runs=["a"] * 3, bootstrap=50)
    assert one_run["pearson"] == pytest.approx(0.5) and one_run["pearson_ci_low"] is None
    constant = correlate([1.0, 1.0, 1.0], [1.0, 2.0, 3.0], runs=range(3), bootstrap=50)
    assert constant["spearman"] is None and constant["runs"] == 3
    assert correlate([], [], runs=[], bootstrap=10)["n"] == 0


def test_replicate_statistics_match_scipy_with_ties() -> None:
    from hessfine.analysis.correlation import _replicate

    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 40).astype(float)
    assert _replicate("kendall", x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert _replicate("spearman", x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert _replicate("pearson", x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
