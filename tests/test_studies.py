"""Tests of hessfine.figures.studies: splitting a comparison into the studies, and their figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hessfine.figures import studies
from hessfine.figures.plots import GAP, HDM


def _row(method: str, seed: int, epoch: int, **extra: object) -> dict:
    run = f"{method}-{extra.get('radius')}-{extra.get('noise_rate')}-{extra.get('confusion_source')}-{seed}"
    return {
        "method": method,
        "seed": seed,
        "epoch": epoch,
        "final_checkpoint": int(epoch == 10),
        "run": run,
        "measurement": f"{run}/{epoch}",
        "noise_rate": None,
        HDM: 0.1 * epoch + seed,
        GAP: 0.01 * epoch,
        "eval_accuracy": 0.5 + 0.01 * seed,
        **extra,
    }


def _rows() -> list[dict]:
    rows = []
    for seed in (0, 1):
        for radius in (0.1, 1.0, 3.0):
            rows.append(
                _row(
                    "distance-constraint",
                    seed,
                    10,
                    radius=radius,
                    distance_measure_x_2020=50 * radius,
                )
            )
        rows += [_row("plain", seed, e) for e in (5, 10)]
        rows += [_row("distance-constraint", seed, 5, radius=1.0)]
        noisy = {"noise_rate": 0.4, "noise_kind": "symmetric"}
        rows += [_row("plain", seed, 10, **noisy), _row("robust", seed, 10, radius=1.0, **noisy)]
        rows.append(_row("robust", seed, 10, radius=1.0, confusion_source="dual-t", **noisy))
        rows.append(_row("plain", seed, 5, noise_rate=0.2, noise_kind="pair"))  # not final
    return rows


def test_rows_are_split_into_the_studies() -> None:
    rows = _rows()
    sweep = studies.sweep_rows(rows)
    assert {r["radius"] for r in sweep} == {0.1, 1.0, 3.0} and len(sweep) == 6
    assert all(r["final_checkpoint"] == 1 and r["noise_rate"] is None for r in sweep)
    methods = studies.method_rows(rows)
    assert {(r["method"], r.get("radius")) for r in methods} == {
        ("plain", None),
        ("distance-constraint", 1.0),
    }
    noisy = studies.noise_rows(rows)
    assert len(noisy) == 6 and {studies.noise_setting(r) for r in noisy} == {"symmetric 40%"}
    assert {studies.method_label(r) for r in noisy} == {"plain", "robust", "robust (Dual-T F)"}


def test_radius_profile_mean_and_sample_std() -> None:
    profile = studies.radius_profile(studies.sweep_rows(_rows()))
    assert [p["radius"] for p in profile] == [0.1, 1.0, 3.0]
    hdm = profile[0][HDM]  # seeds 0 and 1: 1.0 and 2.0
    assert hdm["mean"] == pytest.approx(1.5) and hdm["std"] == pytest.approx(2**-0.5)
    assert hdm["count"] == 2
    assert profile[2]["distance_measure_x_2020"]["mean"] == pytest.approx(150.0)


def test_rescale_factor_is_the_nearest_power_of_ten() -> None:
    assert studies.rescale_factor([400.0, 600.0], [0.5, -0.5]) == 1000.0
    assert studies.rescale_factor([0.3], [0.2]) == 1.0


def test_noise_summary_groups_by_setting_and_method() -> None:
    summary = studies.noise_summary(studies.noise_rows(_rows()))
    accuracy = summary[("symmetric 40%", "robust (Dual-T F)")]["eval_accuracy"]
    assert accuracy["mean"] == pytest.approx(0.505) and accuracy["count"] == 2


def test_draw_studies_writes_the_three_figures(tmp_path: Path) -> None:
    written = studies.draw_studies(_rows(), tmp_path, formats=("png", "pdf"))
    assert sorted(p.name for p in written) == sorted(
        f"{s}.{f}" for s in ("fig1_radius", "measure_vs_gap", "noise_study") for f in ("png", "pdf")
    )
    assert studies.draw_studies([_row("plain", 0, 10)], tmp_path / "none") == []
