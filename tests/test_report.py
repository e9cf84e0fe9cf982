"""Tests of hessfine.analysis.report: verdicts computed from the numbers, not written in."""

from __future__ import annotations

from pathlib import Path

import pytest
from hessfine.analysis import report
from hessfine.figures.plots import GAP, HDM

from tests.comparison_rows import comparison_row


def _row(method: str, seed: int, epoch: int, measure: float, gap: float, **extra: object) -> dict:
    values = {HDM: measure, GAP: gap, "sum_distance": 1.0 + epoch - measure}
    values["distance_measure_li_zhang_2021"] = 500 * gap
    return comparison_row(method, seed, epoch, **values, **extra)


def _rows(robust_accuracy: float, measure_scale: float = 2.0) -> list[dict]:
    rows = []
    for seed in range(3):
        for radius in (0.1, 0.3, 1.0):
            gap = radius / 10 + 0.001 * seed
            rows.append(
                _row("distance-constraint", seed, 10, measure_scale * gap, gap, radius=radius)
            )
        for method, slope in (("plain", 0.02), ("l2-sp", 0.01)):
            for epoch in (5, 10):
                gap = slope * epoch + 0.001 * seed
                rows.append(_row(method, seed, epoch, measure_scale * gap, gap))
        noisy = {"noise_rate": 0.4, "noise_kind": "symmetric"}
        rows.append(_row("plain", seed, 10, 1.0, 0.1, eval_accuracy=0.6, **noisy))
        rows.append(
            _row("robust", seed, 10, 0.5, 0.1, radius=1.0, eval_accuracy=robust_accuracy, **noisy)
        )
    return rows


def _claims(text: str) -> dict[str, str]:
    claims = {}
    for line in text.splitlines():
        if line.startswith("| ") and line[2].isdigit():
            cells = [c.strip() for c in line.strip("|").split("|")]
            claims[cells[0]] = cells[-1].strip("*")
    return claims


def test_verdicts_follow_the_numbers(tmp_path: Path) -> None:
    files = report.write_report(
        _rows(robust_accuracy=0.7), tmp_path, formats=("png",), bootstrap=50
    )
    text = (tmp_path / report.REPORT).read_text(encoding="utf-8")
    claims = _claims(text)
    assert claims["1. Hessian measure on the scale of the gap"] == "holds"  # ratio 2
    assert claims["2. Li & Zhang 2021 orders of magnitude above the gap"] == "holds"  # 500
    assert claims["3. measure grows with the gap across radii"] == "holds"
    assert claims["4. measure correlates with the gap across methods and epochs"] == "holds"
    assert claims["6. robust has the highest test accuracy (symmetric 40%)"] == "holds"
    assert (
        claims["7. robust ends with a smaller Hessian measure than plain (symmetric 40%)"]
        == "holds"
    )
    assert "![" in text and "fig1_radius.png" in text
    assert {p.name for p in files} >= {"report.md", "study_radius.csv", "study_noise.csv"}


def test_verdicts_turn_when_the_numbers_do(tmp_path: Path) -> None:
    report.write_report(
        _rows(robust_accuracy=0.5, measure_scale=30.0), tmp_path, bootstrap=50, formats=("png",)
    )
    claims = _claims((tmp_path / report.REPORT).read_text(encoding="utf-8"))
    assert claims["1. Hessian measure on the scale of the gap"] == "does not hold"  # ratio 30
    assert claims["6. robust has the highest test accuracy (symmetric 40%)"] == "does not hold"


def test_absent_studies_are_not_tested(tmp_path: Path) -> None:
    rows = [r for r in _rows(0.7) if r.get("noise_rate") is None and r.get("radius") is None]
    report.write_report(rows, tmp_path, formats=("png",), bootstrap=10, settings={"seed": 0})
    text = (tmp_path / report.REPORT).read_text(encoding="utf-8")
    claims = _claims(text)
    assert claims["1. Hessian measure on the scale of the gap"] == "not tested"
    assert claims["6. robust has the highest test accuracy under noise"] == "not tested"
    assert "- **seed**: 0" in text


@pytest.mark.parametrize(
    ("ratio", "verdict"),
    [
        (0.1, "holds"),
        (10.0, "holds"),
        (10.5, "does not hold"),
        (0.09, "does not hold"),
        (None, "not tested"),
    ],
)
def test_scale_verdict_thresholds(ratio: float | None, verdict: str) -> None:
    assert report.scale_verdict(ratio) == verdict


def test_runs_near_chance_and_shrunk_noise_estimates_are_flagged(tmp_path: Path) -> None:
    rows = _rows(robust_accuracy=0.7)
    for row in rows:
        row["num_classes"] = 10
    dual_t = {"noise_rate": 0.4, "noise_kind": "symmetric", "confusion_source": "dual-t"}
    near = {"eval_accuracy": 0.14, "confusion_estimate_kappa": 65.6, "confusion_shrinkage": 0.35}
    rows += [
        comparison_row("robust", seed, 10, num_classes=10, **dual_t, **near) for seed in (0, 1)
    ]
    rows.append(comparison_row("plain", 5, 10, num_classes=10, eval_accuracy=0.12))
    report.write_report(rows, tmp_path, formats=("png",), bootstrap=10)
    text = (tmp_path / report.REPORT).read_text(encoding="utf-8")
    section = text[text.index("## Runs to read with care") :]
    assert section.count("test accuracy 0.140, chance 0.100") == 2
    assert "κ(F̂) = 65.6, shrunk by λ = 0.35" in section
    assert "plain (seed 5, clean labels): test accuracy 0.120" in section
    report.write_report(_rows(robust_accuracy=0.7), tmp_path / "clean", formats=("png",))
    assert "read with care" not in (tmp_path / "clean" / report.REPORT).read_text("utf-8")
