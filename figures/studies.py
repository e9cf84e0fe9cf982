"""The three studies in docs/finetune.md#the-demos-study read from a ``comparison.csv`` table, and
their figures.

The rows of one comparison are split by what they hold, so that a user's own runs fall into
the same studies as the demo's:

* **radius sweep** (:func:`sweep_rows`) — final checkpoints of clean-label runs of a
  constrained method (a finite ``radius``) when that method was run at two or more radii;
* **methods** (:func:`method_rows`) — clean-label checkpoints of runs measured at two or more
  epochs (trajectories);
* **label noise** (:func:`noise_rows`) — final checkpoints of runs with a noise rate > 0,
  grouped by noise setting (kind and rate).

Figures (``.png`` and ``.pdf`` unless ``formats`` says otherwise):

* ``fig1_radius`` — Ju, Li & Zhang (ICML 2022) Fig. 1: the Hessian distance measure, the
  measured gap and each prior distance measure (divided by a power of ten, stated in the legend,
  so that it shares the axis) against the radius, mean ± one standard deviation over seeds;
* ``measure_vs_gap`` — the gap against the Hessian distance measure, one point per checkpoint,
  one colour per method, a least-squares line per method, the line gap = measure dashed;
* ``noise_study`` — test accuracy and Hessian distance measure per method and noise setting,
  mean ± one standard deviation over seeds; one colour per method (a Dual-T variant included,
  :func:`label_colors`), one hatching per noise setting.

Example:
    >>> rows = [{"method": "distance-constraint", "radius": r, "seed": s, "final_checkpoint": 1,
    ...          "noise_rate": None, "run": f"{r}-{s}", "epoch": 9,
    ...          "hessian_distance_measure": r, "generalization_gap_loss": r / 2}
    ...         for r in (0.1, 1.0) for s in (0, 1)]
    >>> [round(p["hessian_distance_measure"]["mean"], 2) for p in radius_profile(sweep_rows(rows))]
    [0.1, 1.0]
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
from hessfine.analysis.schema import DISTANCE_PREFIX, GAP, HDM
from hessfine.figures.plots import (
    METHOD_COLORS,
    METHOD_ORDER,
    _log_axis,
    _log_tick,
    _save,
    method_color,
    prior_name,
)
from hessfine.figures.tables import Row, finite
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

__all__ = [
    "draw_studies",
    "label_colors",
    "method_label",
    "method_rows",
    "noise_rows",
    "noise_setting",
    "prior_columns",
    "radius_profile",
    "rescale_factor",
    "sweep_rows",
]

ACCURACY = "eval_accuracy"


def _clean(row: Row) -> bool:
    rate = row.get("noise_rate")
    return not finite(rate) or rate == 0


def _run(row: Row) -> object:
    return row.get("run") or row.get("measurement")


def _final(row: Row) -> bool:
    return row.get("final_checkpoint") in (1, None)


def sweep_rows(rows: Sequence[Row]) -> list[Row]:
    """Final clean-label checkpoints of constrained runs, for methods run at ≥ 2 radii."""
    chosen = [r for r in rows if _clean(r) and finite(r.get("radius")) and _final(r)]
    radii: dict[Any, set[float]] = defaultdict(set)
    for row in chosen:
        radii[row.get("method")].add(row["radius"])
    return [r for r in chosen if len(radii[r.get("method")]) >= 2]


def method_rows(rows: Sequence[Row]) -> list[Row]:
    """Clean-label checkpoints of runs measured at two or more epochs."""
    clean = [r for r in rows if _clean(r) and finite(r.get(HDM)) and finite(r.get(GAP))]
    epochs: dict[object, set[Any]] = defaultdict(set)
    for row in clean:
        epochs[_run(row)].add(row.get("epoch"))
    return [r for r in clean if len(epochs[_run(r)]) >= 2]


def noise_rows(rows: Sequence[Row]) -> list[Row]:
    """Final checkpoints of runs trained on noisy labels (noise rate > 0)."""
    return [r for r in rows if not _clean(r) and _final(r)]


def method_label(row: Row) -> str:
    """The method, marked when the consistent loss used a Dual-T estimate of F."""
    method = str(row.get("method") or "unlabelled")
    return f"{method} (Dual-T F)" if row.get("confusion_source") == "dual-t" else method


def noise_setting(row: Row) -> str:
    """E.g. ``symmetric 40%``."""
    kind = row.get("noise_kind") or "noise"
    return f"{kind} {100 * row['noise_rate']:.0f}%"


def _method_order(labels: set[str]) -> list[str]:
    def key(label: str) -> tuple[int, str]:
        base = label.split(" (")[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return rank, label

    return sorted(labels, key=key)


def label_colors(labels: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """A colour of its own for every method label of one figure.

    Plain method labels come first and keep their method's colour
    (:func:`hessfine.figures.plots.method_color`, from seaborn's colour-blind-safe
    ``colorblind`` palette). A label whose method's colour is taken (a variant such as
    ``robust (Dual-T F)``, or a method hashed onto a used entry) gets an unused entry of that
    palette: one that no method of :data:`~hessfine.figures.plots.METHOD_COLORS` owns if there
    is one, and of those the farthest (in RGB) from its method's colour, so that it is not read
    as its method or as another one. Past ten labels it is its method's colour blended towards
    white until unused.

    Example:
        >>> colors = label_colors(["robust", "robust (Dual-T F)", "plain"])
        >>> len(set(colors.values())), colors["robust"] == method_color("robust")
        (3, True)
    """
    palette = [tuple(c) for c in sns.color_palette("colorblind", 10)]
    owned = {palette[i] for i in METHOD_COLORS.values()}
    colors: dict[str, tuple[float, float, float]] = {}
    for label in sorted(labels, key=lambda label: " (" in label):
        taken = set(colors.values())
        base = tuple(method_color(label.split(" (")[0]))
        free = [c for c in palette if c not in taken]
        color = base if base not in taken else None
        if color is None and free:
            color = min(free, key=lambda c: (c in owned, -math.dist(c, base)))
        mix = 0.0
        while color is None or color in taken:
            mix = 0.5 + mix / 2
            color = tuple(c + mix * (1.0 - c) for c in base)
        colors[label] = color
    return {label: colors[label] for label in labels}


def prior_columns(rows: Sequence[Row]) -> list[str]:
    """The prior distance measure columns (not their ``_log10`` companions) present in rows."""
    present = {c for row in rows for c, v in row.items() if finite(v) and v > 0}
    return sorted(c for c in present if c.startswith(DISTANCE_PREFIX) and not c.endswith("_log10"))


def _stats(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "count": len(array)}


def radius_profile(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per radius (ascending): mean, standard deviation (ddof 1) and count over seeds of the
    Hessian distance measure, the gap, the test accuracy and every prior distance measure."""
    by_radius: dict[float, list[Row]] = defaultdict(list)
    for row in rows:
        by_radius[row["radius"]].append(row)
    columns = [HDM, GAP, ACCURACY, *prior_columns(rows)]
    profile = []
    for radius in sorted(by_radius):
        entry: dict[str, Any] = {"radius": radius}
        for column in columns:
            values = [r[column] for r in by_radius[radius] if finite(r.get(column))]
            if values:
                entry[column] = _stats(values)
        profile.append(entry)
    return profile


def rescale_factor(values: Sequence[float], target: Sequence[float]) -> float:
    """The power of ten nearest to median(values)/median(|target|): dividing by it brings a
    prior measure to the scale of the gap and the Hessian measure."""
    top = float(np.median([v for v in values if finite(v)]))
    bottom = float(np.median([abs(t) for t in target if finite(t)] or [1.0])) or 1.0
    return 10.0 ** round(math.log10(top / bottom)) if top > 0 else 1.0


def _band(ax: Any, xs: list[float], stats: list[dict[str, float]], scale: float, **style: Any):
    mean = np.array([s["mean"] for s in stats]) / scale
    std = np.array([s["std"] for s in stats]) / scale
    (line,) = ax.plot(xs, mean, marker="o", markersize=4, **style)
    ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def figure_radius(rows: Sequence[Row]) -> Figure | None:
    """``fig1_radius`` (module docs); None without a sweep."""
    profile = radius_profile(rows)
    if len(profile) < 2:
        return None
    fig = Figure(figsize=(5.4, 3.9), layout="constrained")
    ax = fig.subplots()
    palette = sns.color_palette("colorblind", 10)
    scale_to = [e[c]["mean"] for e in profile for c in (HDM, GAP) if c in e]
    series = [
        (HDM, "Hessian distance measure", palette[3], "-", 1.0),
        (GAP, "measured gap (test − train loss)", "black", "-", 1.0),
    ]
    for k, column in enumerate(prior_columns(rows)):
        factor = rescale_factor([e[column]["mean"] for e in profile if column in e], scale_to)
        series.append(
            (
                column,
                f"{prior_name(column)} ÷ {_log_tick(factor)}",
                palette[(0, 2, 4)[k % 3]],
                "--",
                factor,
            )
        )
    for column, label, color, linestyle, factor in series:
        points = [(e["radius"], e[column]) for e in profile if column in e]
        if points:
            xs, stats = zip(*points, strict=True)
            _band(ax, list(xs), list(stats), factor, color=color, linestyle=linestyle, label=label)
    radii = [e["radius"] for e in profile]
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(radii))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    seeds = max(e[HDM]["count"] for e in profile if HDM in e)
    method = rows[0].get("method", "")
    ax.set_xlabel(f"{method} radius (extractor layers; head radius in proportion)")
    ax.set_ylabel("value (mean ± std over seeds)")
    ax.set_title(f"Generalization measures against the radius ({seeds} seeds, clean labels)")
    ax.legend(fontsize="small", loc="upper left", frameon=False)
    return fig


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    if len(xs) < 2 or np.ptp(xs) == 0:
        return None
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope), float(intercept)


def figure_measure_vs_gap(rows: Sequence[Row], summary: str = "") -> Figure | None:
    """``measure_vs_gap`` (module docs); ``summary`` (e.g. the correlations) goes in the title."""
    if len(rows) < 2:
        return None
    fig = Figure(figsize=(5.8, 4.4), layout="constrained")
    ax = fig.subplots()
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[method_label(row)].append(row)
    xs_all = [r[HDM] for r in rows]
    labels = _method_order(set(groups))
    colors = label_colors(labels)
    for label in labels:
        xs = [r[HDM] for r in groups[label]]
        ys = [r[GAP] for r in groups[label]]
        color = colors[label]
        ax.scatter(xs, ys, s=16, color=color, alpha=0.8, label=label)
        fit = _fit(xs, ys)
        if fit is not None:
            grid = np.linspace(min(xs), max(xs), 20)
            ax.plot(grid, fit[0] * grid + fit[1], color=color, linewidth=1.4)
    low, high = min(xs_all), max(xs_all)
    ys_all = [r[GAP] for r in rows]
    grid = np.linspace(low, high, 50)
    inside = (grid >= min(ys_all)) & (grid <= max(ys_all))
    if inside.mean() >= 0.1:  # the line gap = measure crosses a tenth of the frame or more
        ax.plot(grid[inside], grid[inside], "--", color="0.4", linewidth=1, label="gap = measure")
    ax.set_xlabel(r"Hessian distance measure $\sum_i\sqrt{C\,\mathcal{H}_i/n}$")
    ax.set_ylabel("generalization gap (test − train loss)")
    ax.set_title(
        "Measure vs gap, one point per checkpoint" + (f"\n{summary}" if summary else ""),
        fontsize="small",
    )
    ax.legend(fontsize="x-small", ncols=2, frameon=False, loc="best")
    return fig


def noise_summary(rows: Sequence[Row]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(setting, method label) → statistics over seeds of test accuracy and Hessian measure."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[(noise_setting(row), method_label(row))].append(row)
    summary = {}
    for key, group in groups.items():
        summary[key] = {
            c: _stats([r[c] for r in group if finite(r.get(c))])
            for c in (ACCURACY, HDM)
            if any(finite(r.get(c)) for r in group)
        }
    return summary


def figure_noise(rows: Sequence[Row]) -> Figure | None:
    """``noise_study`` (module docs); None without noisy-label runs."""
    summary = noise_summary(rows)
    if not summary:
        return None
    settings = sorted({s for s, _ in summary})
    labels = _method_order({m for _, m in summary})
    colors = label_colors(labels)
    fig = Figure(
        figsize=(max(6.0, 0.55 * len(labels) * len(settings) + 2), 5.6), layout="constrained"
    )
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(settings)
    hatches = ("", "//", "..", "xx")
    for ax, column, name in zip(
        axes, (ACCURACY, HDM), ("test accuracy", "Hessian distance measure"), strict=True
    ):
        for k, setting in enumerate(settings):
            for i, label in enumerate(labels):
                stats = summary.get((setting, label), {}).get(column)
                if stats is None:
                    continue
                ax.bar(
                    i - 0.4 + width * (k + 0.5),
                    stats["mean"],
                    width=width,
                    yerr=stats["std"],
                    capsize=2,
                    color=colors[label],
                    hatch=hatches[k % len(hatches)],
                    edgecolor="black",
                    linewidth=0.4,
                )
        ax.set_ylabel(f"{name}\n(mean ± std over seeds)")
    axes[0].set_ylim(0, 1)
    handles = [
        Patch(facecolor="white", edgecolor="black", hatch=hatches[k % len(hatches)], label=setting)
        for k, setting in enumerate(settings)
    ]
    axes[0].legend(
        handles=handles,
        fontsize="small",
        ncols=len(settings),
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
    )
    measures = [s[HDM]["mean"] for s in summary.values() if HDM in s and s[HDM]["mean"] > 0]
    if measures and max(measures) / min(measures) > 50:
        axes[1].set_yscale("log")
        axes[1].autoscale_view()
        _log_axis(axes[1].yaxis)
    axes[1].set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes[0].set_title("Fine-tuning under label noise (final checkpoints)", loc="left")
    return fig


def draw_studies(
    rows: Sequence[Row],
    out_dir: Path,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    summary: str = "",
) -> list[Path]:
    """Draw the figures of the studies the rows hold; return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figures = [
            ("fig1_radius", figure_radius(sweep_rows(rows))),
            ("measure_vs_gap", figure_measure_vs_gap(method_rows(rows), summary)),
            ("noise_study", figure_noise(noise_rows(rows))),
        ]
        for stem, fig in figures:
            if fig is not None:
                written.extend(_save(fig, out_dir, stem, formats))
    return written
