"""``report.md``: the studies in docs/finetune.md#the-demos-study written up from a comparison's
numbers.

:func:`write_report` splits the ``comparison.csv`` rows into the radius sweep, the methods on
clean labels and the label-noise runs (:mod:`hessfine.figures.studies`), writes a table per
study (``study_radius.csv``, ``correlations_methods.csv``, ``study_noise.csv``), draws the study
figures and writes ``report.md`` with the settings, the tables, the correlations with their
run-resampled intervals, the figures inline, and a list of the claims of Ju, Li & Zhang (ICML
2022) each checked against a criterion stated beside it. A verdict is computed from the numbers
of this comparison only; a claim whose study is absent is reported as not tested.

Claims and criteria (the thresholds are constants of this module):

1. *The Hessian distance measure is on the scale of the gap* (the bound is not vacuous): the
   median of measure/gap over the sweep's runs with a positive gap lies in
   [1/:data:`SCALE_RATIO`, :data:`SCALE_RATIO`].
2. *Prior distance measures are orders of magnitude larger than the gap*: the median of
   prior/gap is at least :data:`PRIOR_RATIO`, for each prior measure.
3. *The Hessian measure grows with the gap as the radius grows*: Spearman's ρ between measure
   and gap over the sweep's runs has a 95% run-bootstrap interval above zero.
4. *The Hessian measure correlates with the gap across methods and epochs*: the same for the
   methods study's checkpoints, on the measure at one loss bound C for all of them (the
   theorem's; ``hessian_distance_measure_common_c``).
5. *It does so better than the plain distance* Σ_i‖v_i‖_F: the measure's Spearman ρ exceeds the
   distance's (the intervals are quoted: overlap means the difference is not resolved).

4b and 5b judge the same on the measure with 𝓗_i estimated on held-out examples
(``hessian_distance_measure_heldout``, docs/bounds.md, "Held-out curvature"), not tested when
the checkpoints were not measured on held-out examples. The methods study also gives ρ with C
per checkpoint; the report lists the hyperparameters each run's selection chose.
6. *Under label noise the paper's algorithm (``robust``, F known) has the highest test
   accuracy*, per noise setting: its mean is the largest of all methods.
7. *It ends with a smaller Hessian measure than plain fine-tuning*, per noise setting.

Example:
    >>> from hessfine.analysis.report import scale_verdict
    >>> scale_verdict(3.2), scale_verdict(40.0)
    ('holds', 'does not hold')
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hessfine.analysis.correlation import correlations
from hessfine.analysis.results import write_csv, write_text_atomic
from hessfine.analysis.schema import GAP, HDM, HDM_COMMON, HDM_HELDOUT, SUM_DISTANCE
from hessfine.figures.plots import prior_name
from hessfine.figures.studies import (
    ACCURACY,
    draw_studies,
    method_label,
    method_rows,
    noise_rows,
    noise_setting,
    noise_summary,
    prior_columns,
    radius_profile,
    sweep_rows,
)
from hessfine.figures.tables import Row, finite

__all__ = ["PRIOR_RATIO", "REPORT", "SCALE_RATIO", "scale_verdict", "write_report"]

REPORT = "report.md"
SCALE_RATIO = 10.0
PRIOR_RATIO = 100.0
#: A method whose test accuracy has a larger standard deviation over seeds is listed as unstable.
UNSTABLE_STD = 0.1
#: A final test accuracy at most this far above chance (1/num_classes) is flagged.
CHANCE_MARGIN = 0.05
HOLDS, FAILS, UNTESTED = "holds", "does not hold", "not tested"


def scale_verdict(ratio: float | None) -> str:
    """Claim 1's verdict for a median measure/gap ratio."""
    if ratio is None or not math.isfinite(ratio):
        return UNTESTED
    return HOLDS if 1 / SCALE_RATIO <= ratio <= SCALE_RATIO else FAILS


def _median_ratio(rows: Sequence[Row], column: str) -> tuple[float | None, int]:
    """Median of column/gap over rows with a positive gap; and how many rows that is."""
    ratios = [
        r[column] / r[GAP]
        for r in rows
        if finite(r.get(column)) and finite(r.get(GAP)) and r[GAP] > 0
    ]
    return (statistics.median(ratios) if ratios else None), len(ratios)


def _number(value: object, digits: int = 3) -> str:
    if not finite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _mean_std(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "–"
    return f"{_number(stats['mean'])} ± {_number(stats['std'], 2)}"


def _interval(row: Row, key: str) -> str:
    value, low, high = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if not finite(value):
        return "–"
    if finite(low) and finite(high):
        return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"
    return f"{value:+.2f}"


def _find(table: Sequence[Row], measure: str, group: str = "all") -> Row | None:
    for row in table:
        if row["measure"] == measure and row["group"] == group:
            return row
    return None


def _positive_interval(row: Row | None) -> str:
    if row is None or not finite(row.get("spearman_rho_ci_low")):
        return UNTESTED
    return HOLDS if row["spearman_rho_ci_low"] > 0 else FAILS


def _figure(written: Sequence[Path], stem: str, caption: str) -> list[str]:
    for path in written:
        if path.stem == stem and path.suffix == ".png":
            return [f"![{caption}]({path.name})", ""]
    return []


def _settings_section(settings: Mapping[str, Any], rows: Sequence[Row]) -> list[str]:
    lines = ["## Settings", ""]
    for key, value in settings.items():
        lines.append(f"- **{key}**: {value}")
    models = sorted({str(r["model"]) for r in rows if r.get("model")})
    estimators = sorted({str(r["estimator"]) for r in rows if r.get("estimator")})
    n = sorted({r["n"] for r in rows if finite(r.get("n"))})
    lines += [
        f"- **measurements**: {len(rows)} checkpoints of "
        f"{len({r.get('run') or r.get('measurement') for r in rows})} runs",
        f"- **model**: {', '.join(models) or '–'}; **estimator**: {', '.join(estimators) or '–'}; "
        f"**n** (training examples in the bound): {', '.join(map(str, n)) or '–'}",
        "- **gap**: test loss − training loss; under label noise the training loss is stated as "
        "`hessfine measure` states it (against the run's clean training labels when it records "
        "them)",
        "",
    ]
    return lines


def _sweep_section(
    sweep: Sequence[Row], written: Sequence[Path], bootstrap: int
) -> tuple[list[str], list[Row], list[tuple[str, str, str, str]]]:
    lines = ["## Study 1: the distance constraint at several radii (Fig. 1)", ""]
    claims: list[tuple[str, str, str, str]] = []
    if not sweep:
        lines += ["No radius sweep in these measurements.", ""]
        claims.append(("1. Hessian measure on the scale of the gap", "", "–", UNTESTED))
        claims.append(("2. prior measures orders of magnitude above the gap", "", "–", UNTESTED))
        claims.append(("3. measure grows with the gap across radii", "", "–", UNTESTED))
        return lines, [], claims
    profile = radius_profile(sweep)
    priors = prior_columns(sweep)
    header = ["radius", "runs", "Hessian measure", "gap", "test accuracy"]
    header += [prior_name(c) for c in priors]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table: list[Row] = []
    for entry in profile:
        cells = [_number(entry["radius"]), str(entry.get(HDM, {}).get("count", 0))]
        cells += [_mean_std(entry.get(c)) for c in (HDM, GAP, ACCURACY, *priors)]
        lines.append("| " + " | ".join(cells) + " |")
        flat: Row = {"radius": entry["radius"]}
        for column in (HDM, GAP, ACCURACY, *priors):
            for stat, value in (entry.get(column) or {}).items():
                flat[f"{column}_{stat}"] = value
        table.append(flat)
    lines += ["", "Mean ± standard deviation over seeds (final checkpoints, clean labels).", ""]
    lines += _figure(written, "fig1_radius", "Fig. 1: measures against the radius")
    ratio, count = _median_ratio(sweep, HDM)
    lines.append(
        f"Median Hessian measure / gap over the {count} runs with a positive gap: "
        f"**{_number(ratio)}** ({len(sweep) - count} runs with gap ≤ 0 left out)."
    )
    claims.append(
        (
            "1. Hessian measure on the scale of the gap",
            f"median measure/gap in [{1 / SCALE_RATIO:g}, {SCALE_RATIO:g}]",
            _number(ratio),
            scale_verdict(ratio),
        )
    )
    for column in priors:
        prior_ratio, _ = _median_ratio(sweep, column)
        lines.append(f"Median {prior_name(column)} / gap: **{_number(prior_ratio)}**.")
        verdict = (
            UNTESTED if prior_ratio is None else HOLDS if prior_ratio >= PRIOR_RATIO else FAILS
        )
        claims.append(
            (
                f"2. {prior_name(column)} orders of magnitude above the gap",
                f"median prior/gap ≥ {PRIOR_RATIO:g}",
                _number(prior_ratio),
                verdict,
            )
        )
    table_corr = correlations(list(sweep), bootstrap=bootstrap)
    hdm = _find(table_corr, HDM)
    lines += [
        "",
        f"Across the sweep's runs, Spearman ρ(measure, gap) = {_interval(hdm or {}, 'spearman_rho')}"
        " (95% interval, runs resampled).",
        "",
    ]
    claims.append(
        (
            "3. measure grows with the gap across radii",
            "Spearman ρ interval above 0 (sweep runs)",
            _interval(hdm or {}, "spearman_rho"),
            _positive_interval(hdm),
        )
    )
    return lines, table, claims


def _methods_section(
    methods: Sequence[Row], written: Sequence[Path], table_corr: Sequence[Row]
) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    lines = ["## Study 2: every method on clean labels, checkpoints over epochs", ""]
    if not methods:
        lines += ["No clean-label runs measured at several epochs.", ""]
        return lines, [
            ("4. measure correlates with the gap across methods and epochs", "", "–", UNTESTED),
            ("5. better than the plain distance Σ‖v_i‖", "", "–", UNTESTED),
        ]
    runs = len({r.get("run") or r.get("measurement") for r in methods})
    lines += [
        f"{len(methods)} checkpoints of {runs} runs. Correlation with the gap (test − train "
        "loss); 95% intervals from bootstrap replicates that resample runs, not checkpoints.",
        "",
    ]
    common = [r["C_common"] for r in methods if finite(r.get("C_common"))]
    if common:
        lines += [
            f"The theorem's C bounds the loss of every checkpoint: `{HDM_COMMON}` uses one C for "
            f"all of them (C = {common[0]:.3g}, the largest loss seen, or `compare "
            "--loss-bound`) and is the theorem's measure; `hessian_distance_measure` uses each "
            "checkpoint's own largest loss, which falls as a run fits its data. Claims 4 and 5 "
            "are judged on the former. `hessian_distance_measure_heldout` takes 𝓗_i, the "
            "maximum over examples, on held-out examples instead of the training examples "
            "(an estimate of the maximum over the distribution that a network fitted to its "
            'training examples does not bias low; docs/bounds.md, "Held-out curvature"); '
            "claims 4b and 5b are judged on it.",
            "",
        ]
    lines += _readings_table(table_corr)
    lines += [
        "| measure | group | n | runs | Pearson r | Spearman ρ | Kendall τ |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = [
        HDM_COMMON,
        HDM,
        HDM_HELDOUT,
        SUM_DISTANCE,
        "trace_distance_measure",
        *prior_columns(methods),
    ]
    for row in table_corr:
        if row["measure"] not in shown or not finite(row.get("spearman_rho")):
            continue
        name = (
            prior_name(row["measure"])
            if row["measure"].startswith("distance_measure_")
            else (row["measure"].replace("_", " "))
        )
        lines.append(
            f"| {name} | {row['group'].removeprefix('method=')} | {row['n']} | {row['runs']} | "
            f"{_interval(row, 'pearson_r')} | {_interval(row, 'spearman_rho')} | "
            f"{_interval(row, 'kendall_tau')} |"
        )
    lines.append("")
    lines += _figure(written, "measure_vs_gap", "Hessian measure against the gap")
    ratio, count = _median_ratio(methods, HDM)
    lines += [
        f"Median Hessian measure / gap over {count} checkpoints with a positive gap: "
        f"**{_number(ratio)}**.",
        "",
    ]
    distance = _find(table_corr, SUM_DISTANCE)
    claims = []
    for number, what, row in (
        ("", "", _find(table_corr, HDM_COMMON) or _find(table_corr, HDM)),
        ("b", " (𝓗_i from held-out examples)", _find(table_corr, HDM_HELDOUT)),
    ):
        claims += _correlation_claims(number, what, row, distance)
    return lines, claims


def _correlation_claims(
    number: str, what: str, hdm: Row | None, distance: Row | None
) -> list[tuple[str, str, str, str]]:
    """Claims 4 and 5 (or 4b and 5b) on the correlation row ``hdm`` of one measure."""
    claims = [
        (
            f"4{number}. measure{what} correlates with the gap across methods and epochs",
            "Spearman ρ interval above 0 (all checkpoints)",
            _interval(hdm or {}, "spearman_rho"),
            _positive_interval(hdm),
        )
    ]
    name = f"5{number}. measure{what} better than the plain distance Σ‖v_i‖"
    if (
        hdm
        and distance
        and finite(hdm.get("spearman_rho"))
        and finite(distance.get("spearman_rho"))
    ):
        better = hdm["spearman_rho"] > distance["spearman_rho"]
        measured = f"{_interval(hdm, 'spearman_rho')} vs {_interval(distance, 'spearman_rho')}"
        claims.append(
            (
                name,
                "Spearman ρ of the measure > that of Σ‖v_i‖_F",
                measured,
                HOLDS if better else FAILS,
            )
        )
    else:
        claims.append((name, "", "–", UNTESTED))
    return claims


#: The methods study's readings of the theorem's measure: (what, column).
READINGS = (
    ("𝓗_i on the training examples, C of each checkpoint", HDM),
    ("𝓗_i on the training examples, one C for all (the theorem's)", HDM_COMMON),
    ("𝓗_i on held-out examples, one C for all", HDM_HELDOUT),
    ("Σ_i ‖v_i‖_F (no curvature)", SUM_DISTANCE),
)


def _readings_table(table_corr: Sequence[Row]) -> list[str]:
    """ρ, r and τ of the gap with each reading of the measure (:data:`READINGS`), all
    checkpoints, with their run-bootstrap intervals."""
    lines = [
        "| reading of the measure | column | Spearman ρ | Pearson r | Kendall τ |",
        "|---|---|---|---|---|",
    ]
    for what, column in READINGS:
        row = _find(table_corr, column)
        cells = (
            ["–"] * 3
            if row is None
            else [_interval(row, key) for key in ("spearman_rho", "pearson_r", "kendall_tau")]
        )
        lines.append(f"| {what} | `{column}` | {' | '.join(cells)} |")
    return [*lines, "", "By method and for the prior measures:", ""]


def _noise_section(
    noisy: Sequence[Row], written: Sequence[Path]
) -> tuple[list[str], list[Row], list[tuple[str, str, str, str]]]:
    lines = ["## Study 3: fine-tuning under label noise", ""]
    if not noisy:
        lines += ["No runs with label noise.", ""]
        return (
            lines,
            [],
            [
                ("6. robust has the highest test accuracy under noise", "", "–", UNTESTED),
                ("7. robust ends with a smaller Hessian measure than plain", "", "–", UNTESTED),
            ],
        )
    summary = noise_summary(noisy)
    settings = sorted({s for s, _ in summary})
    extra = [
        c
        for c in ("hessian_distance_measure_noisy_labels",)
        if any(finite(r.get(c)) for r in noisy)
    ]
    lines += [
        "Final checkpoints; mean ± standard deviation over seeds. `robust` is the paper's "
        "algorithm (consistent loss + distance constraint); `(Dual-T F)` marks the noise matrix "
        "estimated by Dual-T instead of given.",
        "",
    ]
    table: list[Row] = []
    claims: list[tuple[str, str, str, str]] = []
    for setting in settings:
        labels = sorted(m for s, m in summary if s == setting)
        lines += [
            f"**{setting}**",
            "",
            "| method | seeds | test accuracy | Hessian measure | gap |"
            + "".join(" noisy-label measure |" for _ in extra),
            "|---|---|---|---|---|" + "---|" * len(extra),
        ]
        for label in labels:
            group = [r for r in noisy if noise_setting(r) == setting and method_label(r) == label]
            stats = summary[(setting, label)]
            gap = _stats_of([r[GAP] for r in group if finite(r.get(GAP))])
            cells = [
                label,
                str(len(group)),
                _mean_std(stats.get(ACCURACY)),
                _mean_std(stats.get(HDM)),
                _mean_std(gap),
            ]
            cells += [
                _mean_std(_stats_of([r[c] for r in group if finite(r.get(c))])) for c in extra
            ]
            lines.append("| " + " | ".join(cells) + " |")
            table.append(
                {
                    "setting": setting,
                    "method": label,
                    "seeds": len(group),
                    **{f"{c}_{k}": v for c, s in stats.items() for k, v in s.items()},
                }
            )
        lines.append("")
        accuracy = {m: summary[(setting, m)].get(ACCURACY, {}).get("mean") for m in labels}
        measure = {m: summary[(setting, m)].get(HDM, {}).get("mean") for m in labels}
        if finite(accuracy.get("robust")):
            best = max((m for m in labels if finite(accuracy.get(m))), key=lambda m: accuracy[m])
            claims.append(
                (
                    f"6. robust has the highest test accuracy ({setting})",
                    "largest mean test accuracy of all methods",
                    f"robust {accuracy['robust']:.3f}; best {best} {accuracy[best]:.3f}",
                    HOLDS if best == "robust" else FAILS,
                )
            )
        if finite(measure.get("robust")) and finite(measure.get("plain")):
            claims.append(
                (
                    f"7. robust ends with a smaller Hessian measure than plain ({setting})",
                    "mean measure of robust < that of plain",
                    f"{measure['robust']:.3g} vs {measure['plain']:.3g}",
                    HOLDS if measure["robust"] < measure["plain"] else FAILS,
                )
            )
    unstable = sorted(
        f"{label} ({setting}: ± {stats[ACCURACY]['std']:.2f})"
        for (setting, label), stats in summary.items()
        if ACCURACY in stats and stats[ACCURACY]["std"] > UNSTABLE_STD
    )
    if unstable:
        lines += [
            f"Test accuracy varies by more than {UNSTABLE_STD:g} (standard deviation) across "
            f"seeds for: {', '.join(unstable)}.",
            "",
        ]
    lines += _figure(written, "noise_study", "Test accuracy and Hessian measure under label noise")
    return lines, table, claims


def _selection_section(rows: Sequence[Row]) -> list[str]:
    """The options each selection chose: one line per method and label setting, from the run
    that made the choice (the others reuse it)."""
    made: dict[tuple[str, str], Row] = {}
    reused: dict[tuple[str, str], set[object]] = {}
    for row in rows:
        if not row.get("selected"):
            continue
        key = (_setting(row), method_label(row))
        if row.get("selection_taken_from"):
            reused.setdefault(key, set()).add(row.get("run"))
        else:
            made.setdefault(key, row)
    if not made:
        return []
    lines = [
        "## Selected hyperparameters",
        "",
        "Each method's learning rate and own option, chosen by validation accuracy on held-out "
        "examples (with noisy labels under label noise) on the first seed; the other seeds "
        "reuse the choice (`selection` in each run's `hessfine.json`).",
        "",
        "| labels | method | chosen | validation accuracy | grid points | runs reusing it |",
        "|---|---|---|---|---|---|",
    ]
    for (setting, label), row in sorted(made.items()):
        points = row.get("selection_points")
        lines.append(
            f"| {setting} | {label} | {row['selected']} | "
            f"{_number(row.get('selection_validation_accuracy'))} | "
            f"{int(points) if finite(points) else '–'} | "
            f"{len(reused.get((setting, label), ()))} |"
        )
    return [*lines, ""]


def _setting(row: Row) -> str:
    """The run's label setting: its noise (``symmetric 40%``) or clean labels."""
    return noise_setting(row) if finite(row.get("noise_rate")) else "clean labels"


def _caution_section(rows: Sequence[Row]) -> list[str]:
    """The runs to read with care: final checkpoints within :data:`CHANCE_MARGIN` of chance
    accuracy (1/num_classes) or below, and runs whose estimated noise matrix the κ rule shrank
    (docs/bounds.md, "Label noise")."""
    near_chance = sorted(
        f"{method_label(r)} (seed {r.get('seed')}, {_setting(r)}): test accuracy "
        f"{r['eval_accuracy']:.3f}, chance {1 / r['num_classes']:.3f}"
        for r in rows
        if r.get("final_checkpoint") in (1, None)
        and finite(r.get("eval_accuracy"))
        and finite(r.get("num_classes"))
        and r["eval_accuracy"] <= 1 / r["num_classes"] + CHANCE_MARGIN
    )
    shrunk = sorted(
        {
            f"{method_label(r)} (seed {r.get('seed')}, {_setting(r)}): κ(F̂) = "
            f"{r['confusion_estimate_kappa']:.3g}, shrunk by λ = {r['confusion_shrinkage']:g}"
            for r in rows
            if finite(r.get("confusion_shrinkage")) and r["confusion_shrinkage"] > 0
        }
    )
    if not near_chance and not shrunk:
        return []
    lines = ["## Runs to read with care", ""]
    if near_chance:
        lines += [
            f"Final test accuracy within {CHANCE_MARGIN:g} of chance or below (the model learned "
            "little; its measure says little about generalization):",
            "",
            *(f"- {entry}" for entry in near_chance),
            "",
        ]
    if shrunk:
        lines += [
            "Dual-T estimates of the noise matrix shrunk to meet κ = ‖F̂⁻¹‖_∞ ≤ 10 before training "
            '(docs/bounds.md, "Label noise"):',
            "",
            *(f"- {entry}" for entry in shrunk),
            "",
        ]
    return lines


def _stats_of(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def write_report(
    rows: Sequence[Row],
    out: Path,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    bootstrap: int = 1000,
    settings: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write the study tables, figures and ``report.md`` into ``out``; return the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep, methods, noisy = sweep_rows(rows), method_rows(rows), noise_rows(rows)
    table_corr = correlations(methods, bootstrap=bootstrap) if methods else []
    overall = _find(table_corr, HDM)
    summary = (
        f"Spearman ρ {_interval(overall, 'spearman_rho')}, Kendall τ "
        f"{_interval(overall, 'kendall_tau')} (95% run bootstrap)"
        if overall
        else ""
    )
    written = draw_studies(rows, out, formats=formats, summary=summary)
    lines = ["# hessfine study report", ""]
    lines += [
        "Ju, Li & Zhang (ICML 2022) bound the generalization gap of fine-tuning by the Hessian "
        "distance measure Σ_i sqrt(C·𝓗_i/n), 𝓗_i = max_x v_iᵀ H_i⁺(x) v_i. This report checks "
        "their claims on the measurements below; every verdict is computed from these numbers "
        "with the criterion stated beside it.",
        "",
    ]
    lines += _settings_section(settings or {}, rows)
    sweep_lines, sweep_table, claims = _sweep_section(sweep, written, bootstrap)
    method_lines, method_claims = _methods_section(methods, written, table_corr)
    noise_lines, noise_table, noise_claims = _noise_section(noisy, written)
    claims += method_claims + noise_claims
    lines += [
        "## The paper's claims in this run",
        "",
        "| claim | criterion | measured | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c} | {k} | {m} | **{v}** |" for c, k, m, v in claims]
    lines.append("")
    lines += _selection_section(rows)
    lines += sweep_lines + method_lines + noise_lines + _caution_section(rows)
    if timings:
        lines += ["## Time", ""]
        lines += [f"- {name}: {value:.0f} s" for name, value in timings.items()]
        lines.append("")
    files = list(written)
    if sweep_table:
        files.append(write_csv(sweep_table, out / "study_radius.csv"))
    if table_corr:
        files.append(write_csv(table_corr, out / "correlations_methods.csv"))
    if noise_table:
        files.append(write_csv(noise_table, out / "study_noise.csv"))
    report = out / REPORT
    write_text_atomic(report, "\n".join(lines))
    files.append(report)
    return files
