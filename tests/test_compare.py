"""Tests of hessfine.analysis.compare on synthetic measurement.json files (schema
in docs/schema.md)."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hessfine.analysis import compare
from hessfine.analysis.errors import InputError
from scipy import stats

METHODS = ("plain", "distance-constraint", "robust")
EPOCHS = (2, 5, 9)


def measurement(checkpoint: str, *, gap: float, forms: list[float], noise: bool = True) -> dict:
    """A schema-version-1 document with consistent bounds (n = 100, C = 2)."""
    n, c, train = 100, 2.0, 0.25
    layers = [
        {
            "name": f"block{i}.weight",
            "numel": 10 * (i + 1),
            "distance": 0.5 * (i + 1),
            "method": "exact-ggn",
            "quadratic_form": {"max": h, "mean": h / 2, "argmax": i},
            "trace": {"mean": 1.0 + i, "stderr": 0.01, "positive_max": 3.0 + i},
            "top_eigenvalues": [2.0 + i],
        }
        for i, h in enumerate(forms)
    ]
    hdm = sum(math.sqrt(c * h / n) for h in forms)
    return {
        "schema_version": 1,
        "checkpoint": checkpoint,
        "reference": "reference.safetensors",
        "model": "hessfine.finetune.digit_networks:digits_cnn",
        "settings": {"estimator": "auto", "samples": 64, "batch_size": 32, "seed": 0},
        "data": {"n_train": n, "n_eval": 50, "n_hessian_samples": 64},
        "layers": layers,
        "loss": {"train": train, "eval": train + gap, "max": c},
        "accuracy": {"train": 0.9, "eval": 0.8},
        "generalization_gap": {"loss": gap, "accuracy": 0.1},
        "bounds": {
            "C": c,
            "n": n,
            "epsilon": 0.0,
            "hessian_distance_measure": hdm,
            "theorem_2_1": train + hdm,
            "trace_corollary": train + 2 * hdm,
            "distance_measures": {
                "frobenius": 10 * hdm + gap,
                "spectral": 3.0,
                "spectral_log10": 0.477,
            },
            "hessian_distance_measure_noisy_labels": 3 * hdm,
            "noisy_label_factor": 9.0,
            "pac_bayes_certificate": {"bound": 0.9, "kl": 1.5},
        },
        "noise_stability": (
            [
                {
                    "sigma": s,
                    "mean": s * s,
                    "stderr": 0.1 * s * s,
                    "draws": 8,
                    "trace_prediction": s * s,
                }
                for s in (0.001, 0.01)
            ]
            if noise
            else []
        ),
        "provenance": {"timings": {"total_s": 1.25}},
    }


def write_json(path: Path, document: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """runs/METHOD/{hessfine.json, metrics.csv, epoch_XXX.safetensors} and
    measurements/METHOD/epoch_XXX/measurement.json pointing at the checkpoints."""
    for m, method in enumerate(METHODS):
        run = tmp_path / "runs" / method
        run.mkdir(parents=True)
        write_json(
            run / "hessfine.json",
            {
                "model": "hessfine.finetune.digit_networks:digits_cnn",
                "method": method,
                "seed": 7,
                "label_noise": {"kind": "symmetric", "rate": 0.3},
                "checkpoints": [{"file": f"epoch_{e:03d}.safetensors", "epoch": e} for e in EPOCHS],
            },
        )
        lines = ["epoch,train_loss_noisy,eval_acc"] + [
            f"{e},{1 / e},{0.5 + m / 10}" for e in EPOCHS
        ]
        (run / "metrics.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for e in EPOCHS:
            checkpoint = run / f"epoch_{e:03d}.safetensors"
            checkpoint.write_bytes(b"weights")
            forms = [0.01 * e / (m + 1), 0.02 * e / (m + 1)]
            write_json(
                tmp_path / "measurements" / method / f"epoch_{e:03d}" / "measurement.json",
                measurement(str(checkpoint), gap=0.05 * e / (m + 1), forms=forms),
            )
    return tmp_path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_collect_joins_manifest_metrics_and_sums(study: Path) -> None:
    rows = compare.collect([study / "measurements"])
    assert len(rows) == len(METHODS) * len(EPOCHS)
    assert [r["method"] for r in rows] == sorted(m for m in METHODS for _ in EPOCHS)
    robust = [r for r in rows if r["method"] == "robust"]
    assert [r["epoch"] for r in robust] == list(EPOCHS)
    row = robust[1]  # epoch 5, third method (m = 2)
    assert row["seed"] == 7 and row["noise_rate"] == 0.3
    assert [r["final_checkpoint"] for r in robust] == [0, 0, 1]
    assert row["run"] == str((study / "runs" / "robust").resolve())
    forms = [0.01 * 5 / 3, 0.02 * 5 / 3]
    assert row["sum_hessian_quadratic_form"] == pytest.approx(sum(forms))
    assert row["sum_sqrt_hessian_quadratic_form"] == pytest.approx(sum(map(math.sqrt, forms)))
    assert row["hessian_distance_measure"] == pytest.approx(
        sum(math.sqrt(2.0 * h / 100) for h in forms)
    )
    assert row["trace_distance_measure"] == pytest.approx(2 * row["hessian_distance_measure"])
    assert row["hessian_distance_measure_noisy_labels"] == pytest.approx(
        3 * row["hessian_distance_measure"]
    )
    assert row["noisy_label_factor"] == 9.0
    assert row["sum_distance"] == pytest.approx(1.5)
    assert row["sum_trace_mean"] == pytest.approx(3.0)
    assert row["num_layers"] == 2 and row["num_weights"] == 30
    assert row["generalization_gap_loss"] == pytest.approx(0.05 * 5 / 3)
    assert row["distance_measure_spectral"] == 3.0
    assert row["noise_stability_sigma_0.01"] == pytest.approx(1e-4)
    assert row["noise_trace_prediction_sigma_0.001"] == pytest.approx(1e-6)
    assert row["pac_bayes_bound"] == 0.9
    assert row["metrics_train_loss_noisy"] == pytest.approx(1 / 5)
    assert row["metrics_eval_acc"] == pytest.approx(0.7)
    assert row["total_s"] == 1.25


def test_comparison_csv_columns_and_values(study: Path, tmp_path: Path) -> None:
    rows = compare.collect([study / "measurements"])
    path = compare.write_comparison(rows, tmp_path / "out")
    assert path == tmp_path / "out" / "comparison.csv"
    table = read_csv(path)
    header = list(table[0])
    assert header[:7] == [
        "measurement",
        "checkpoint",
        "method",
        "epoch",
        "seed",
        "noise_rate",
        "final_checkpoint",
    ]
    for column in (
        "n",
        "train_loss",
        "eval_loss",
        "train_accuracy",
        "eval_accuracy",
        "generalization_gap_loss",
        "generalization_gap_accuracy",
        "hessian_distance_measure",
        "theorem_2_1",
        "trace_corollary",
        "distance_measure_frobenius",
        "sum_hessian_quadratic_form",
        "sum_distance",
        "noise_stability_sigma_0.001",
        "noise_stability_stderr_sigma_0.001",
    ):
        assert column in header
    assert len(table) == len(rows)
    assert float(table[0]["theorem_2_1"]) == rows[0]["theorem_2_1"]  # full precision round trip
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_manifest_found_in_parent_of_measurement_without_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_json(run / "hessfine.json", {"method": "mixup", "seed": 3, "label_noise": 0.2})
    write_json(
        run / "measure" / "epoch_004" / "measurement.json",
        measurement("/nonexistent/epoch_004.pt", gap=0.1, forms=[0.1]),
    )
    (row,) = compare.collect([tmp_path])
    assert (row["method"], row["seed"], row["noise_rate"], row["epoch"]) == ("mixup", 3, 0.2, 4)


def test_measurement_without_manifest_keeps_empty_run_columns(tmp_path: Path) -> None:
    path = write_json(tmp_path / "m.json", measurement("x.safetensors", gap=0.1, forms=[0.1]))
    (row,) = compare.collect([path, tmp_path / "m.json"])  # duplicates collapse
    assert row["method"] is None and row["epoch"] is None and row["run"] is None


def test_run_fields_recorded_in_the_measurement_are_the_fallback(tmp_path: Path) -> None:
    document = measurement("/gone/epoch_012.safetensors", gap=0.1, forms=[0.1])
    document["manifest"] = {"method": "robust", "seed": 4, "label_noise": {"rate": 0.4}}
    document["epoch"] = 12
    (row,) = compare.collect([write_json(tmp_path / "m" / "measurement.json", document)])
    assert (row["method"], row["seed"], row["noise_rate"], row["epoch"]) == ("robust", 4, 0.4, 12)
    assert row["final_checkpoint"] is None and row["run"] is None


def test_best_epoch_of_early_stopping_is_the_final_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpoints = [{"file": f"epoch_{e:03d}.pt", "epoch": e} for e in (5, 8, 10)]
    write_json(
        run / "hessfine.json",
        {"method": "early-stopping", "checkpoints": checkpoints, "best_epoch": 8},
    )
    for e in (5, 8, 10):
        (run / f"epoch_{e:03d}.pt").write_bytes(b"w")
        write_json(
            tmp_path / "m" / f"epoch_{e:03d}" / "measurement.json",
            measurement(str(run / f"epoch_{e:03d}.pt"), gap=0.1, forms=[0.1]),
        )
    rows = compare.collect([tmp_path / "m"])
    assert [(r["epoch"], r["final_checkpoint"]) for r in rows] == [(5, 0), (8, 1), (10, 0)]


def _known_rows(xs: np.ndarray, ys: np.ndarray) -> list[dict]:
    return [
        {"hessian_distance_measure": float(x), "generalization_gap_loss": float(y)}
        for x, y in zip(xs, ys, strict=True)
    ]


def test_correlations_match_scipy_and_closed_forms() -> None:
    rng = np.random.default_rng(0)
    xs = rng.uniform(0.1, 2.0, 25)
    ys = xs**3 + rng.normal(0, 0.3, 25)
    rows = _known_rows(xs, ys)
    rows.append({"hessian_distance_measure": None, "generalization_gap_loss": 1.0})
    rows.append({"hessian_distance_measure": 1.0, "generalization_gap_loss": float("nan")})
    (result,) = compare.correlations(rows)
    assert result["n"] == 25
    pearson, spearman = stats.pearsonr(xs, ys), stats.spearmanr(xs, ys)
    assert result["pearson_r"] == pytest.approx(pearson.statistic, abs=1e-12)
    assert result["pearson_p"] == pytest.approx(pearson.pvalue, rel=1e-9)
    assert result["spearman_rho"] == pytest.approx(spearman.statistic, abs=1e-12)
    assert result["spearman_p"] == pytest.approx(spearman.pvalue, rel=1e-9)
    kendall = stats.kendalltau(xs, ys)
    assert result["kendall_tau"] == pytest.approx(kendall.statistic, abs=1e-12)
    assert result["kendall_p"] == pytest.approx(kendall.pvalue, rel=1e-9)
    # independent oracles: numpy's correlation coefficient, and Pearson of the ranks (no ties)
    assert result["pearson_r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)
    ranks = np.argsort(np.argsort(xs)), np.argsort(np.argsort(ys))
    assert result["spearman_rho"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-12)


def test_correlation_of_monotone_and_linear_relations() -> None:
    xs = np.linspace(0.1, 3.0, 12)
    (monotone,) = compare.correlations(_known_rows(xs, np.exp(3 * xs)))
    assert monotone["spearman_rho"] == pytest.approx(1.0)
    assert monotone["pearson_r"] < 0.95
    (linear,) = compare.correlations(_known_rows(xs, 1.0 - 2.0 * xs))
    assert linear["pearson_r"] == pytest.approx(-1.0)
    assert linear["spearman_rho"] == pytest.approx(-1.0)


def test_correlations_undefined_for_few_or_constant_values() -> None:
    few = compare.correlations(_known_rows(np.array([1.0, 2.0]), np.array([0.1, 0.3])))
    constant = compare.correlations(_known_rows(np.ones(5), np.arange(5.0)))
    for (result,) in (few, constant):
        assert result["pearson_r"] is None and result["spearman_p"] is None
    assert few[0]["n"] == 2 and constant[0]["n"] == 5


def test_correlations_cover_every_measure_column(study: Path) -> None:
    rows = compare.collect([study / "measurements"])
    results = {r["measure"]: r for r in compare.correlations(rows)}
    for column in (
        "hessian_distance_measure",
        "theorem_2_1",
        "trace_corollary",
        "trace_distance_measure",
        "hessian_distance_measure_noisy_labels",
        "distance_measure_frobenius",
        "sum_hessian_quadratic_form",
        "noise_stability_sigma_0.01",
    ):
        assert column in results
    assert "noisy_label_factor" not in results and "C" not in results
    assert results["distance_measure_spectral"]["pearson_r"] is None  # constant 3.0
    gap = [r["generalization_gap_loss"] for r in rows]
    hdm = [r["hessian_distance_measure"] for r in rows]
    expected = stats.spearmanr(hdm, gap).statistic
    assert results["hessian_distance_measure"]["spearman_rho"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: [d / "missing"],
        lambda d: [d],  # a directory without measurements
        lambda d: [write_json(d / "bad.json", [1, 2])],
        lambda d: [
            write_json(d / "old.json", {**measurement("c", gap=0, forms=[1]), "schema_version": 0})
        ],
        lambda d: [(d / "broken.json", (d / "broken.json").write_text("{"))[0]],
        lambda d: [],
    ],
)
def test_bad_inputs_raise_one_line_input_error(tmp_path: Path, make) -> None:
    with pytest.raises(InputError) as info:
        compare.collect(make(tmp_path))
    assert "\n" not in str(info.value)


def test_write_comparison_refuses_empty_rows(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        compare.write_comparison([], tmp_path)


def _parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_compare_command_writes_tables_and_figures(study: Path, capsys) -> None:
    out = study / "cmp"
    args = _parse(
        compare.add_arguments, [str(study / "measurements"), "--out", str(out), "--format", "png"]
    )
    assert compare.run(args) == 0
    for name in ("comparison.csv", "layers.csv", "noise_stability.csv", "correlations.csv"):
        assert (out / name).is_file()
    layers = read_csv(out / "layers.csv")
    assert len(layers) == 2 * len(METHODS) * len(EPOCHS)
    assert {r["method"] for r in layers} == set(METHODS)
    correlations = read_csv(out / "correlations.csv")
    assert list(correlations[0])[:5] == ["measure", "target", "group", "n", "runs"]
    for name in ("pearson_r", "spearman_rho", "kendall_tau"):
        assert {name, f"{name}_ci_low", f"{name}_ci_high"} <= set(correlations[0])
    groups = {r["group"] for r in correlations}
    assert groups == {"all"} | {f"method={m}" for m in METHODS}
    assert (out / "gap_vs_bounds.png").stat().st_size > 0
    assert (out / "overview.png").is_file()
    assert "hessian_distance_measure" in capsys.readouterr().out


def test_figures_command_redraws_from_tables_and_measurements(study: Path) -> None:
    cmp = study / "cmp"
    compare.compare([study / "measurements"], cmp, figures=False)
    out = study / "figs"
    args = _parse(compare.figures_add_arguments, [str(cmp), "--out", str(out), "--format", "png"])
    assert compare.figures_run(args) == 0
    assert read_csv(out / "comparison.csv") == read_csv(cmp / "comparison.csv")
    assert (out / "layers.png").is_file() and (out / "noise_stability.png").is_file()
    out2 = study / "figs2"
    args = _parse(
        compare.figures_add_arguments,
        [str(study / "measurements" / "plain"), "--out", str(out2), "--format", "png"],
    )
    assert compare.figures_run(args) == 0
    assert len(read_csv(out2 / "comparison.csv")) == len(EPOCHS)
    with pytest.raises(InputError):
        compare.figures_run(
            _parse(compare.figures_add_arguments, [str(study / "nope"), "--out", str(out)])
        )


def test_compare_command_target_and_no_figures(study: Path) -> None:
    out = study / "cmp-eval-loss"
    target = "eval_loss"  # varies in the study (the accuracy gap is constant there)
    args = _parse(
        compare.add_arguments,
        [str(study / "measurements"), "--out", str(out), "--target", target] + ["--no-figures"],
    )
    assert compare.run(args) == 0
    assert not list(out.glob("*.png")) and not list(out.glob("*.pdf"))
    rows = read_csv(out / "comparison.csv")
    correlations = read_csv(out / "correlations.csv")
    assert correlations and {r["target"] for r in correlations} == {target}
    checked = 0
    for result in correlations:
        pairs = [
            (float(r[result["measure"]]), float(r[target]))
            for r in rows
            if r[result["measure"]] not in ("", "nan")
            and r[target] not in ("", "nan")
            and result["group"] in ("all", f"method={r['method']}")
        ]
        pairs = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
        assert int(result["n"]) == len(pairs)
        xs, ys = np.array(pairs).T if pairs else (np.array([]), np.array([]))
        if len(pairs) >= 3 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
            assert float(result["pearson_r"]) == pytest.approx(stats.pearsonr(xs, ys)[0], abs=1e-9)
            checked += 1
    assert checked > 0


def test_compare_report_writes_report_md(study: Path) -> None:
    out = study / "cmp-report"
    args = _parse(
        compare.add_arguments,
        [
            str(study / "measurements"),
            "--out",
            str(out),
            "--format",
            "png",
            "--report",
            "--bootstrap",
            "20",
            "--no-figures",
        ],
    )
    assert compare.run(args) == 0
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "## The paper's claims in this run" in text and "](noise_study.png)" in text
    assert (out / "study_noise.csv").is_file()  # the fixture's runs trained on noisy labels
    with pytest.raises(InputError, match="--bootstrap"):
        compare.run(
            _parse(compare.add_arguments, [str(study), "--out", str(out), "--bootstrap", "-1"])
        )


def test_common_loss_bound_over_all_compared_measurements(tmp_path: Path) -> None:
    low = measurement("a.safetensors", gap=0.1, forms=[0.04, 0.09])
    high = measurement("b.safetensors", gap=0.2, forms=[0.01, 0.16])
    low["loss"]["max"], high["loss"]["max"] = 0.5, 3.0
    write_json(tmp_path / "a" / "measurement.json", low)
    write_json(tmp_path / "b" / "measurement.json", high)
    for bound, expected in ((None, 3.0), (8.0, 8.0)):
        rows = {
            Path(r["checkpoint"]).stem: r for r in compare.collect([tmp_path], loss_bound=bound)
        }
        for name, forms in (("a", [0.04, 0.09]), ("b", [0.01, 0.16])):
            row = rows[name]
            assert row["C_common"] == expected
            hdm = sum(math.sqrt(expected * h / 100) for h in forms)
            assert row["hessian_distance_measure_common_c"] == pytest.approx(hdm, rel=1e-12)
            assert row["theorem_2_1_common_c"] == pytest.approx(0.25 + hdm, rel=1e-12)
        # the per-measurement measure keeps each measurement's own C (2 in the documents)
        assert rows["a"]["hessian_distance_measure"] == low["bounds"]["hessian_distance_measure"]
    args = _parse(compare.add_arguments, [str(tmp_path), "--out", str(tmp_path / "c")])
    assert args.loss_bound is None
    with pytest.raises(InputError, match="--loss-bound"):
        compare.run(
            _parse(compare.add_arguments, [str(tmp_path), "--out", "c", "--loss-bound", "0"])
        )
