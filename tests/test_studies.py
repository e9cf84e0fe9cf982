"""Tests of hessfine.figures.studies: splitting a comparison into the studies, and their figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hessfine.figures import studies
from hessfine.figures.plots import GAP, HDM, METHOD_ORDER, method_color

from tests.comparison_rows import comparison_row


def _row(method: str, seed: int, epoch: int, **extra: object) -> dict:
    values = {HDM: 0.1 * epoch + seed, GAP: 0.01 * epoch, "eval_accuracy": 0.5 + 0.01 * seed}
    return comparison_row(method, seed, epoch, **{"noise_rate": None, **values, **extra})


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


def test_noise_study_gives_every_method_its_own_colour() -> None:
    # robust with F known and with a Dual-T estimate of F are two methods: two colours (the
    # hatching tells the noise settings apart, not the methods)
    rows = [*_rows(), _row("plain", 0, 10, noise_rate=0.2, noise_kind="pair")]
    fig = studies.figure_noise(studies.noise_rows(rows))
    labels = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert labels == ["plain", "robust", "robust (Dual-T F)"]
    for ax in fig.axes[:2]:
        colours: dict[str, set] = {}
        for bar in ax.patches:
            label = labels[round(bar.get_x() + bar.get_width() / 2)]
            colours.setdefault(label, set()).add(bar.get_facecolor())
        assert set(colours) == set(labels) and all(len(c) == 1 for c in colours.values())
        assert len({c for cs in colours.values() for c in cs}) == len(labels), colours
        assert colours["robust"] == {(*method_color("robust"), 1.0)}


def test_label_colors_are_distinct_beyond_the_palette() -> None:
    methods = [*METHOD_ORDER, "sam", "nso", "unlabelled"]
    labels = methods + [f"{m} (Dual-T F)" for m in methods]
    colors = studies.label_colors(labels)
    assert list(colors) == labels and len(set(colors.values())) == len(labels)
    assert all(colors[m] == tuple(method_color(m)) for m in methods)
