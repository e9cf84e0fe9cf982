"""Tests of figures/: drawing from synthetic result tables, without torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hessfine.analysis import schema
from hessfine.figures import plots, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ("robust", "plain", "l2-sp")  # deliberately not in display order


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def synthetic_tables(directory: Path, *, epochs=(1, 4, 8)) -> Path:
    """comparison.csv, layers.csv and noise_stability.csv of three methods and a few epochs."""
    rng = np.random.default_rng(1)
    rows, layers, noise = [], [], []
    for m, method in enumerate(METHODS):
        for e in epochs:
            key = {
                "measurement": f"/runs/{method}/{e}/measurement.json",
                "checkpoint": f"/runs/{method}/epoch_{e}.safetensors",
                "method": method,
                "epoch": e,
                "seed": 0,
                "noise_rate": 0.3,
            }
            hdm = 0.05 * e / (m + 1)
            rows.append(
                {
                    **key,
                    "train_loss": 0.2,
                    "eval_loss": 0.2 + hdm * (1 + 0.1 * rng.random()),
                    "generalization_gap_loss": hdm * (1 + 0.1 * rng.random()) - 0.01,
                    "hessian_distance_measure": hdm,
                    "theorem_2_1": 0.2 + hdm,
                    "trace_corollary": 0.2 + 3 * hdm,
                    "trace_distance_measure": 3 * hdm,
                    "distance_measure_frobenius": 40 * hdm,
                }
            )
            for i in range(3):
                h = (i + 1) * hdm**2
                layers.append(
                    {
                        **key,
                        "index": i,
                        "layer": f"conv{i}.weight",
                        "distance": 0.3 * (i + 1),
                        "quadratic_form_max": h,
                        "sqrt_quadratic_form_max": h**0.5,
                    }
                )
            for s in (1e-3, 1e-2, 1e-1):
                noise.append(
                    {
                        **key,
                        "sigma": s,
                        "mean": s * s * (1 + m) * (1 + 0.05 * rng.random()),
                        "stderr": 0.05 * s * s,
                        "draws": 16,
                        "trace_prediction": s * s * (1 + m),
                    }
                )
    write_csv(directory / schema.LAYERS_TABLE, layers)
    write_csv(directory / schema.NOISE_TABLE, noise)
    return write_csv(directory / "comparison.csv", rows)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 300 and height >= 300
    assert len(data) > 10_000


def test_draw_all_writes_every_figure(tmp_path: Path) -> None:
    table = synthetic_tables(tmp_path)
    out = tmp_path / "figs"
    written = plots.draw_all(table, out)
    names = {p.name for p in written}
    for stem in (
        "gap_vs_bounds",
        "bounds_by_method",
        "layers",
        "noise_stability",
        "epochs",
        "overview",
    ):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    for path in written:
        if path.suffix == ".png":
            assert_png(path)
        else:
            assert path.read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temporary files left


def test_minimal_table_draws_only_what_it_supports(tmp_path: Path) -> None:
    table = write_csv(
        tmp_path / "comparison.csv",
        [
            {
                "method": "plain",
                "epoch": 3,
                "generalization_gap_loss": 0.3,
                "hessian_distance_measure": 0.2,
            },
            {
                "method": "robust",
                "epoch": 3,
                "generalization_gap_loss": 0.1,
                "hessian_distance_measure": 0.05,
            },
        ],
    )
    names = {p.name for p in plots.draw_all(table, tmp_path, formats=("png",))}
    assert names == {"gap_vs_bounds.png", "bounds_by_method.png", "overview.png"}


def test_table_without_bounds_draws_nothing(tmp_path: Path) -> None:
    table = write_csv(
        tmp_path / "comparison.csv", [{"method": "plain", "generalization_gap_loss": 0.3}]
    )
    assert plots.draw_all(table, tmp_path / "figs", formats=("png",)) == []


def _document(forms: list[float], sigmas: list[float]) -> dict:
    return {
        "layers": [
            {"name": f"l{i}.weight", "numel": 4, "distance": 1.0, "quadratic_form": {"max": h}}
            for i, h in enumerate(forms)
        ],
        "noise_stability": [
            {"sigma": s, "mean": s * s, "stderr": 0.0, "draws": 2, "trace_prediction": s * s}
            for s in sigmas
        ],
    }


def test_measurements_argument_joins_json_files_by_path(tmp_path: Path) -> None:
    paths = []
    rows = []
    for m, method in enumerate(("plain", "robust")):
        path = tmp_path / method / "measurement.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_document([0.04 / (m + 1), 0.09], [0.01, 0.1])))
        paths.append(path)
        rows.append(
            {
                "measurement": str(path),
                "method": method,
                "epoch": 5,
                "generalization_gap_loss": 0.1 * (2 - m),
                "hessian_distance_measure": 0.2 / (m + 1),
            }
        )
    table = write_csv(tmp_path / "comparison.csv", rows)
    layers, noise = tables.measurement_tables(paths, tables.read_table(table))
    assert [r["method"] for r in layers] == ["plain", "plain", "robust", "robust"]
    assert layers[0]["sqrt_quadratic_form_max"] == pytest.approx(0.2)
    assert [r["sigma"] for r in noise] == [0.01, 0.1, 0.01, 0.1]
    names = {
        p.name for p in plots.draw_all(table, tmp_path / "f", measurements=paths, formats=("png",))
    }
    assert {"layers.png", "noise_stability.png"} <= names
    for name in names:
        assert_png(tmp_path / "f" / name)


def test_layer_rows_positive_part_and_missing_fields() -> None:
    rows = tables.layer_rows(
        {"layers": [{"name": "a", "quadratic_form": {"max": -0.5}}, {"name": "b"}]}, {"method": "x"}
    )
    assert rows[0]["sqrt_quadratic_form_max"] is None and rows[0]["quadratic_form_max"] == -0.5
    assert rows[1]["quadratic_form_max"] is None and rows[1]["method"] == "x"
    assert tables.noise_rows({"noise_stability": None}, {}) == []


def test_parse_cell_types() -> None:
    parsed = [tables.parse_cell(t) for t in ("", "3", "2.5", "1e-3", "plain")]
    assert parsed == [None, 3, 2.5, 1e-3, "plain"]
    assert isinstance(parsed[1], int)
    assert np.isnan(tables.parse_cell("nan"))


def test_style_orders_methods_and_labels_noise_rates() -> None:
    rows = [{"method": m, "noise_rate": 0.2} for m in ("robust", "mystery", "plain", "l2-sp")]
    assert plots.Style.of(rows).labels == ["plain", "l2-sp", "robust", "mystery"]
    mixed = plots.Style.of(
        [{"method": "plain", "noise_rate": 0.2}, {"method": "plain", "noise_rate": 0.4}]
    )
    assert mixed.labels == ["plain (noise 0.2)", "plain (noise 0.4)"]
    assert plots.Style.of([{"method": None}]).labels == [plots.UNLABELLED]


def test_bound_columns_need_positive_values() -> None:
    rows = [
        {
            "hessian_distance_measure": 0.1,
            "trace_distance_measure": None,
            "distance_measure_b": 2.0,
        },
        {"distance_measure_a": -1.0, "distance_measure_c": 0.5, "generalization_gap_loss": 0.3},
        {"theorem_2_1": 0.7, "trace_corollary": 0.8, "distance_measure_b_log10": 0.3},
        {"trace_distance_measure": 0.2},
    ]
    assert plots.bound_columns(rows) == [
        "hessian_distance_measure",
        "trace_distance_measure",
        "distance_measure_b",
        "distance_measure_c",
    ]


def test_figures_import_neither_torch_nor_analysis() -> None:
    code = (
        "import sys, hessfine.figures, hessfine.figures.plots, hessfine.figures.tables; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'analysis')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
