"""Paper-style figures of a comparison, drawn from the result tables of :mod:`hessfine.figures.tables`.

The figures follow Ju, Li & Zhang (ICML 2022): the Hessian distance measure
Σ_i sqrt(C·𝓗_i/n) is set against the measured generalization gap (test − train loss) across
fine-tuning methods and epochs, and against the distance-based bounds of prior work, on a log
scale where the bounds span orders of magnitude (their Fig. 1); the per-layer quantities show
which layers carry the measure (their Fig. 2); noise stability I(σ) = E_U[ℓ(W+U)] − ℓ(W) is
compared with its second-order prediction (σ²/2)·Σ_i mean_x Tr[H_i(x)].

Files (each ``.png``, and ``.pdf`` unless ``formats`` says otherwise), drawn when the tables
hold what they need:

* ``gap_vs_bounds`` — one panel per bound column (Hessian distance measure, trace corollary,
  each distance measure): gap against the bound, one colour per method, epochs of one run
  joined by a line, the line gap = measure dashed where it crosses the frame (Theorem 2.1 says
  the gap lies below the Hessian distance measure, up to ε·L̂ and ξ = O(n^(-3/4))); the title
  gives Spearman's ρ, Pearson's r and how many checkpoints lie below the line;
* ``bounds_by_method`` — final checkpoint of every method: the measured gap and every bound on
  one log axis;
* ``layers`` — √𝓗_i and ‖v_i‖_F per layer and method (final checkpoints);
* ``noise_stability`` — I(σ) ± 2 standard errors against σ (log–log; non-positive estimates
  cannot be drawn there and are left out) with the trace prediction dashed;
* ``epochs`` — gap, Hessian distance measure and the Theorem 2.1 bound (with the measured test
  loss dotted) against the epoch, one line per run;
* ``overview`` — the four most informative panels of the above in one picture.

Nothing here imports torch; matplotlib draws through its Agg canvas without touching pyplot's
global state, styled by seaborn's ``whitegrid``/``paper`` context.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "comparison.csv").write_text(
    ...     "method,epoch,seed,generalization_gap_loss,hessian_distance_measure\\n"
    ...     "plain,1,0,0.2,0.9\\nplain,2,0,0.4,1.5\\nrobust,2,0,0.1,0.5\\n")
    >>> [p.name for p in draw_all(d / "comparison.csv", d, formats=("png",))][:2]
    ['gap_vs_bounds.png', 'bounds_by_method.png']
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
from hessfine.analysis.schema import (
    DISTANCE_PREFIX,
    GAP,
    HDM,
    LAYERS_TABLE,
    NOISE_TABLE,
    TRACE_MEASURE,
)
from hessfine.figures.tables import (
    Row,
    finite,
    measurement_tables,
    read_table,
)
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from scipy import stats

METHOD_ORDER = (
    "plain",
    "early-stopping",
    "l2-sp",
    "label-smoothing",
    "mixup",
    "consistent",
    "distance-constraint",
    "robust",
)
#: Fixed colours (indices into seaborn's ten-colour ``colorblind`` palette) so that a method keeps
#: its colour across figures and studies; the paper's algorithm gets the strong vermilion.
METHOD_COLORS = {
    "plain": 0,
    "early-stopping": 4,
    "l2-sp": 2,
    "robust": 3,
    "distance-constraint": 5,
    "label-smoothing": 7,
    "mixup": 8,
    "consistent": 9,
}
UNLABELLED = "unlabelled"


def method_color(method: str) -> tuple[float, float, float]:
    """The colour of a method, the same in every figure: a fixed entry of seaborn's
    colour-blind-safe ``colorblind`` palette for the methods of :data:`METHOD_COLORS`, the two
    unused entries (orange, pink) for the next methods in alphabetical order of name (a stable
    hash for the rest), grey for unlabelled rows."""
    palette = sns.color_palette("colorblind", 10)
    if method in METHOD_COLORS:
        return palette[METHOD_COLORS[method]]
    if method == UNLABELLED:
        return (0.3, 0.3, 0.3)
    spare = [i for i in range(len(palette)) if i not in METHOD_COLORS.values()]
    extra = {"sam": spare[0], "nso": spare[1]}
    if method in extra:
        return palette[extra[method]]
    return palette[sum(map(ord, method)) % len(palette)]


LABELS = {
    GAP: "generalization gap (test − train loss)",
    HDM: r"Hessian distance measure $\sum_i\sqrt{C\mathcal{H}_i/n}$",
    "theorem_2_1": "Theorem 2.1 bound",
    "trace_corollary": "trace corollary bound",
    "hessian_distance_measure_noisy_labels": "Hessian distance measure, noisy-label C",
    TRACE_MEASURE: r"trace measure $\sum_i\alpha_i\sqrt{C\,\max\,\mathrm{Tr}H_i^+/n}$",
    "eval_loss": "test loss",
}


#: How the prior distance measures of ``bounds.distance_measures`` are written; other keys are
#: written by :func:`prior_name`'s rule.
PRIOR_NAMES = {
    "li_zhang_2021": "Li & Zhang 2021",
    "neyshabur_2018": "Neyshabur et al. 2018",
    "neyshabur_2018_complexity": "Neyshabur et al. 2018 (complexity term)",
    "spectral_product_distance": "spectral-product distance (Gouk et al. 2021 style)",
}


def prior_name(key: str) -> str:
    """A prior distance measure's key written as a citation: ``li_zhang_2021`` → "Li & Zhang
    2021"; an unknown key ending in a year keeps its words, capitalised, e.g.
    ``spectral_product_gouk_2021`` → "Spectral product (Gouk 2021)".

    Example:
        >>> prior_name("neyshabur_2018"), prior_name("spectral_product_gouk_2021")
        ('Neyshabur et al. 2018', 'Spectral product (Gouk 2021)')
    """
    key = key.removeprefix(DISTANCE_PREFIX)
    if key in PRIOR_NAMES:
        return PRIOR_NAMES[key]
    words = key.split("_")
    if len(words) >= 3 and words[-1].isdigit():
        *what, author, year = words
        return f"{' '.join(what).capitalize()} ({author.capitalize()} {year})"
    if len(words) >= 2 and words[-1].isdigit():
        return f"{' '.join(words[:-1]).title()} {words[-1]}"
    return key.replace("_", " ")


def label_of(column: str) -> str:
    """Axis label of a table column."""
    if column in LABELS:
        return LABELS[column]
    if column.startswith(DISTANCE_PREFIX):
        return "distance measure: " + prior_name(column)
    return column.replace("_", " ")


@dataclass(frozen=True)
class Style:
    """Series labels (method, plus the noise rate when several occur) and their colours."""

    colors: dict[str, Any]
    several_rates: bool

    @classmethod
    def of(cls, rows: Sequence[Row]) -> Style:
        rates = {row.get("noise_rate") for row in rows if finite(row.get("noise_rate"))}
        several = len(rates) > 1
        labels = {_label(row, several) for row in rows}

        def order(label: str) -> tuple[int, str]:
            method = label.split(" (noise")[0]
            rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
            return rank, label

        ordered = sorted(labels, key=order)
        if several:
            colors = sns.color_palette("colorblind", max(len(ordered), 1))
            return cls(dict(zip(ordered, colors, strict=False)), several)
        colors = {label: method_color(label.split(" (")[0]) for label in ordered}
        return cls(colors, several)

    def label(self, row: Row) -> str:
        return _label(row, self.several_rates)

    @property
    def labels(self) -> list[str]:
        return list(self.colors)


def _label(row: Row, several_rates: bool) -> str:
    method = row.get("method")
    name = method if isinstance(method, str) and method else UNLABELLED
    rate = row.get("noise_rate")
    if several_rates and finite(rate):
        return f"{name} (noise {rate:g})"
    return name


def _epoch(row: Row) -> float:
    epoch = row.get("epoch")
    return epoch if finite(epoch) else -1.0


def _series(rows: Sequence[Row], style: Style) -> dict[tuple[str, Any], list[Row]]:
    """Rows of one run, sorted by epoch: keyed by label and run directory (label and seed when
    the run is unknown), so runs of one method at other radii or noise rates stay apart."""
    runs: dict[tuple[str, Any], list[Row]] = defaultdict(list)
    for row in rows:
        runs[(style.label(row), row.get("run") or row.get("seed"))].append(row)
    return {key: sorted(value, key=_epoch) for key, value in runs.items()}


def _final(rows: Sequence[Row], style: Style) -> dict[str, list[Row]]:
    """For every label, the final row of each of its runs (seeds): the one marked
    ``final_checkpoint`` = 1 (e.g. the best epoch of early stopping), else the last epoch."""
    finals: dict[str, list[Row]] = defaultdict(list)
    for (label, _), run in _series(rows, style).items():
        marked = [row for row in run if row.get("final_checkpoint") == 1]
        finals[label].append(marked[-1] if marked else run[-1])
    return {label: finals[label] for label in style.labels if label in finals}


def _values(rows: Sequence[Row], column: str) -> list[float]:
    return [row[column] for row in rows if finite(row.get(column))]


HESSIAN_BOUNDS = (HDM, "hessian_distance_measure_noisy_labels", TRACE_MEASURE)


def bound_columns(rows: Sequence[Row]) -> list[str]:
    """Columns comparable with the generalization gap (complexity terms, not test-loss bounds
    such as ``theorem_2_1``) with a positive finite value, in display order; the ``_log10``
    companions of the distance measures are logarithms and are left out."""
    present = {c for row in rows for c, v in row.items() if finite(v) and v > 0}
    distance = sorted(
        c for c in present if c.startswith(DISTANCE_PREFIX) and not c.endswith("_log10")
    )
    return [c for c in HESSIAN_BOUNDS if c in present] + distance


def _correlation_text(xs: Sequence[float], ys: Sequence[float]) -> str:
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return f"n = {len(xs)}"
    rho = stats.spearmanr(xs, ys).statistic
    r = stats.pearsonr(xs, ys).statistic
    return f"Spearman ρ {rho:.2f}, Pearson r {r:.2f}, n = {len(xs)}"


def panel_gap_vs(ax: Axes, rows: Sequence[Row], column: str, style: Style) -> bool:
    """Generalization gap against one bound column (log x); False when nothing to draw."""
    xs_all: list[float] = []
    ys_all: list[float] = []
    for (label, _), run in _series(rows, style).items():
        points = [
            (row[column], row[GAP])
            for row in run
            if finite(row.get(column)) and row[column] > 0 and finite(row.get(GAP))
        ]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        color = style.colors[label]
        ax.plot(xs, ys, "-", color=color, alpha=0.5, linewidth=1)
        ax.scatter(xs[:-1], ys[:-1], color=color, s=18, alpha=0.7)
        ax.scatter(xs[-1:], ys[-1:], color=color, s=45, edgecolors="black", linewidths=0.6)
        xs_all.extend(xs)
        ys_all.extend(ys)
    if not xs_all:
        return False
    ax.set_xscale("log")
    y_lo, y_hi = _padded(ys_all)
    ax.set_ylim(y_lo, y_hi)
    grid = np.geomspace(min(xs_all) / 1.5, max(xs_all) * 1.5, 200)
    if np.any((grid >= y_lo) & (grid <= y_hi)):
        ax.plot(grid, grid, "--", color="0.4", linewidth=1, label="gap = measure")
        ax.legend(loc="upper left", fontsize="x-small")
    below = sum(y <= x for x, y in zip(xs_all, ys_all, strict=True))
    ax.set_xlim(min(xs_all) / 1.3, max(xs_all) * 1.3)
    _log_axis(ax.xaxis)
    ax.set_xlabel(label_of(column))
    ax.set_ylabel(label_of(GAP))
    ax.set_title(
        f"gap vs {_short_label(column)}\n{_correlation_text(xs_all, ys_all)}\n"
        f"{below} of {len(xs_all)} checkpoints below the line",
        fontsize="small",
    )
    return True


def _log_axis(axis: Any) -> None:
    """Log-scale ticks that never crowd: at 1, 2 and 5 per decade when the axis spans at most
    one decade, at 1 and 3 up to two decades, else at powers of ten only (every k-th decade
    beyond six); plain numbers between 0.001 and 10⁴, powers of ten outside. Reads the axis's
    current limits, so call it after setting them."""
    low, high = sorted(axis.get_view_interval())
    decades = math.log10(high / low) if low > 0 and high > low else 1.0
    if decades <= 1.0:
        subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    elif decades <= 2.0:
        subs = (1.0, 3.0)
    else:
        subs = (1.0,)
    axis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=7))
    axis.set_major_formatter(FuncFormatter(_log_tick))
    axis.set_minor_formatter(NullFormatter())


def _log_tick(value: float, _: object = None) -> str:
    if value <= 0:
        return ""
    if 1e-3 <= value < 1e4:
        return f"{value:g}"
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return f"$10^{{{round(exponent)}}}$"
    return f"{value:.0e}"


def _padded(values: Sequence[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = 0.15 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-3)
    return lo - pad, hi + pad


def panel_bounds_by_method(ax: Axes, rows: Sequence[Row], style: Style) -> bool:
    """Final checkpoints: measured gap and every bound per method on one log axis."""
    columns = bound_columns(rows)
    finals = _final(rows, style)
    if not columns or not finals:
        return False
    labels = list(finals)
    markers = "osD^v<>ph*"
    palette = sns.color_palette("dark", len(columns))
    offsets = np.linspace(-0.25, 0.25, len(columns) + 1)
    for j, column in enumerate([GAP, *columns]):
        xs, ys, errs = [], [], []
        for i, label in enumerate(labels):
            values = [v for v in _values(finals[label], column) if v > 0]
            if values:
                xs.append(i + offsets[j])
                ys.append(float(np.mean(values)))
                errs.append(float(np.std(values)) if len(values) > 1 else 0.0)
        if not xs:
            continue
        if column == GAP:
            ax.scatter(
                xs,
                ys,
                marker="_",
                s=400,
                color="black",
                linewidths=2,
                label="measured gap (if > 0)",
            )
        else:
            ax.errorbar(
                xs,
                ys,
                yerr=errs,
                fmt=markers[(j - 1) % len(markers)],
                color=palette[j - 1],
                markersize=6,
                capsize=2,
                linestyle="none",
                label=label_of(column),
            )
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("value (log scale)")
    ax.set_title("final checkpoints: measured gap and bounds")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return True


def panel_layers(ax: Axes, layers: Sequence[Row], style: Style, column: str) -> bool:
    """Grouped bars of a per-layer column by method (final checkpoints, mean over seeds)."""
    finals = _final(layers, style)
    if not finals:
        return False
    names: list[str] = []
    for row in layers:
        if row.get("layer") not in names:
            names.append(row["layer"])
    width = 0.8 / len(finals)
    drew = False
    for k, (label, final_rows) in enumerate(finals.items()):
        keys = {(r.get("measurement"), r.get("epoch")) for r in final_rows}
        values: dict[str, list[float]] = defaultdict(list)
        for row in layers:
            if (
                style.label(row) == label
                and (row.get("measurement"), row.get("epoch")) in keys
                and finite(row.get(column))
            ):
                values[row["layer"]].append(row[column])
        heights = [float(np.mean(values[n])) if values[n] else np.nan for n in names]
        if all(math.isnan(h) for h in heights):
            continue
        positions = np.arange(len(names)) - 0.4 + width * (k + 0.5)
        ax.bar(positions, heights, width=width, color=style.colors[label], label=label)
        drew = True
    if not drew:
        return False
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30, ha="right")
    positive = [v for r in layers if finite(r.get(column)) and (v := r[column]) > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
        ax.autoscale_view()
        _log_axis(ax.yaxis)
    if column == "sqrt_quadratic_form_max":
        ax.set_ylabel(r"$\sqrt{\mathcal{H}_i}$")
        ax.set_title(r"per-layer $\sqrt{\mathcal{H}_i}$ (final checkpoints)")
    elif column == "distance":
        ax.set_ylabel(r"$\|W_i - W_i^{(s)}\|_F$")
        ax.set_title("per-layer distance from the reference")
    else:
        ax.set_ylabel(label_of(column))
    return True


def _short(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def panel_noise(ax: Axes, noise: Sequence[Row], style: Style) -> bool:
    """Noise stability I(σ) ± 2 s.e. against σ (log–log) with the trace prediction dashed."""
    finals = _final(_noise_as_runs(noise), style)
    drew = False
    for label, final_rows in finals.items():
        keys = {r.get("measurement") for r in final_rows}
        rows = sorted(
            (r for r in noise if style.label(r) == label and r.get("measurement") in keys),
            key=lambda r: r.get("sigma") or 0.0,
        )
        color = style.colors[label]
        pts = [
            r for r in rows if finite(r.get("sigma")) and finite(r.get("mean")) and r["mean"] > 0
        ]
        if pts:
            sig = [r["sigma"] for r in pts]
            err = [2 * r["stderr"] if finite(r.get("stderr")) else 0.0 for r in pts]
            ax.errorbar(
                sig,
                [r["mean"] for r in pts],
                yerr=err,
                fmt="o-",
                color=color,
                capsize=2,
                label=label,
            )
            drew = True
        pred = [r for r in rows if finite(r.get("trace_prediction")) and r["trace_prediction"] > 0]
        if pred:
            ax.plot(
                [r["sigma"] for r in pred], [r["trace_prediction"] for r in pred], "--", color=color
            )
            drew = True
    if not drew:
        return False
    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel(r"noise scale $\sigma$")
    ax.set_ylabel(r"$E_U[\ell(W+U)]-\ell(W)$")
    ax.set_title("noise stability (dashed: trace prediction)")
    proxies = [
        Line2D([], [], color="0.2", marker="o", label="measured ± 2 s.e."),
        Line2D([], [], color="0.2", linestyle="--", label=r"$\frac{\sigma^2}{2}\sum_i$ Tr $H_i$"),
    ]
    ax.legend(handles=proxies, fontsize="x-small", loc="upper left")
    return True


def panel_noise_ratio(ax: Axes, noise: Sequence[Row], style: Style) -> bool:
    """Measured I(σ) over the trace prediction against σ (1 where the expansion holds)."""
    finals = _final(_noise_as_runs(noise), style)
    drew = False
    for label, final_rows in finals.items():
        keys = {r.get("measurement") for r in final_rows}
        pts = sorted(
            (
                r
                for r in noise
                if style.label(r) == label
                and r.get("measurement") in keys
                and finite(r.get("sigma"))
                and finite(r.get("mean"))
                and finite(r.get("trace_prediction"))
                and r["trace_prediction"] > 0
            ),
            key=lambda r: r["sigma"],
        )
        if not pts:
            continue
        ratio = [r["mean"] / r["trace_prediction"] for r in pts]
        err = [
            2 * r["stderr"] / r["trace_prediction"] if finite(r.get("stderr")) else 0.0 for r in pts
        ]
        ax.errorbar(
            [r["sigma"] for r in pts],
            ratio,
            yerr=err,
            fmt="o-",
            color=style.colors[label],
            capsize=2,
        )
        drew = True
    if not drew:
        return False
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xlabel(r"noise scale $\sigma$")
    ax.set_ylabel("measured / trace prediction")
    ax.set_title("second-order accuracy")
    return True


def _noise_as_runs(noise: Sequence[Row]) -> list[Row]:
    """One row per measurement of the noise table (for picking final checkpoints)."""
    seen: dict[Any, Row] = {}
    for row in noise:
        seen.setdefault(row.get("measurement"), row)
    return list(seen.values())


def panel_epochs(
    ax: Axes, rows: Sequence[Row], column: str, style: Style, *, dotted: str | None = None
) -> bool:
    """A column against the epoch, one line per run; ``dotted`` adds a second column dotted."""
    drew = False
    for (label, _), run in _series(rows, style).items():
        points = [r for r in run if finite(r.get("epoch")) and finite(r.get(column))]
        if len(points) < 2:
            continue
        color = style.colors[label]
        ax.plot(
            [r["epoch"] for r in points],
            [r[column] for r in points],
            "o-",
            color=color,
            markersize=3,
            label=label,
        )
        if dotted is not None:
            extra = [r for r in points if finite(r.get(dotted))]
            ax.plot([r["epoch"] for r in extra], [r[dotted] for r in extra], ":", color=color)
        drew = True
    if not drew:
        return False
    ax.set_xlabel("epoch")
    ax.set_title(
        _short_label(column) + " vs epoch"
        if dotted is None
        else f"{_short_label(column)} (solid) and {_short_label(dotted)} (dotted)"
    )
    ax.set_ylabel(_short_label(column) if dotted is None else "value")
    return True


def _short_label(column: str) -> str:
    return {HDM: "Hessian distance measure", GAP: "gap"}.get(
        column, label_of(column).removeprefix("distance measure: ")
    )


def _legend_for_methods(fig: Figure, style: Style, labels: Sequence[str]) -> None:
    handles = [Line2D([], [], marker="o", linestyle="-", color=style.colors[x]) for x in labels]
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 5),
        fontsize="small",
        frameon=False,
    )


def _save(fig: Figure, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    FigureCanvasAgg(fig)
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        handle, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{stem}.", suffix=f".{fmt}")
        os.close(handle)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a figure is as readable as any file
        try:
            fig.savefig(tmp, format=fmt, dpi=150)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths


Panel = Callable[[Axes], bool]
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _figure_of_panels(
    panels: Sequence[Panel], *, ncols: int, size: tuple[float, float], title: str | None
) -> tuple[Figure, int]:
    """A figure with one axes per panel that draws; returns it and how many drew."""
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(size[0] * min(ncols, len(panels)), size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, min(ncols, len(panels)), squeeze=False).ravel()
    drawn = 0
    for ax, panel in zip(axes, panels, strict=False):
        if panel(ax):
            drawn += 1
        else:
            ax.remove()
    for ax in axes[len(panels) :]:
        ax.remove()
    if title:
        fig.suptitle(title)
    return fig, drawn


def draw_all(
    table_csv: Path,
    out_dir: Path,
    *,
    measurements: list[Path] | None = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> list[Path]:
    """Draw every figure the tables support; return the files written.

    ``table_csv`` is a ``comparison.csv``. Per-layer and noise-stability figures use
    ``layers.csv``/``noise_stability.csv`` beside it, or, when ``measurements`` (paths of
    ``measurement.json`` files) are given, those files joined to the table by path.
    """
    table_csv, out_dir = Path(table_csv), Path(out_dir)
    rows = read_table(table_csv)
    if measurements is not None:
        layers, noise = measurement_tables(measurements, rows)
    else:
        layers = _sibling(table_csv, LAYERS_TABLE)
        noise = _sibling(table_csv, NOISE_TABLE)
    out_dir.mkdir(parents=True, exist_ok=True)
    style = Style.of([*rows, *layers, *noise])
    columns = bound_columns(rows)
    written: list[Path] = []
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        figures: list[tuple[str, list[Panel], int, tuple[float, float], str | None]] = [
            (
                "gap_vs_bounds",
                [lambda ax, c=c: panel_gap_vs(ax, rows, c, style) for c in columns],
                3,
                (4.0, 3.4),
                "Measured generalization gap vs. bounds (large marker: final epoch)",
            ),
            (
                "bounds_by_method",
                [lambda ax: panel_bounds_by_method(ax, rows, style)],
                1,
                (max(5.0, 1.0 + 0.9 * len(style.labels)), 4.0),
                None,
            ),
            (
                "layers",
                [
                    lambda ax: panel_layers(ax, layers, style, "sqrt_quadratic_form_max"),
                    lambda ax: panel_layers(ax, layers, style, "distance"),
                ],
                2,
                (5.0, 3.6),
                "Per-layer Hessian quantity and distance (final checkpoints)",
            ),
            (
                "noise_stability",
                [
                    lambda ax: panel_noise(ax, noise, style),
                    lambda ax: panel_noise_ratio(ax, noise, style),
                ],
                2,
                (4.6, 3.8),
                None,
            ),
            (
                "epochs",
                [
                    lambda ax: panel_epochs(ax, rows, GAP, style),
                    lambda ax: panel_epochs(ax, rows, HDM, style),
                    lambda ax: panel_epochs(ax, rows, "theorem_2_1", style, dotted="eval_loss"),
                ],
                3,
                (4.0, 3.4),
                "Across fine-tuning epochs",
            ),
        ]
        for stem, panels, ncols, size, title in figures:
            if not panels:
                continue
            fig, drawn = _figure_of_panels(panels, ncols=ncols, size=size, title=title)
            if drawn:
                if stem in ("gap_vs_bounds", "layers", "noise_stability", "epochs"):
                    _legend_for_methods(fig, style, style.labels)
                written.extend(_save(fig, out_dir, stem, formats))
        written.extend(_overview(rows, layers, noise, style, out_dir, formats))
    return written


def _sibling(table_csv: Path, name: str) -> list[Row]:
    path = table_csv.with_name(name)
    return read_table(path) if path.is_file() else []


def overview_panels(
    rows: Sequence[Row], layers: Sequence[Row], noise: Sequence[Row], style: Style
) -> list[Panel]:
    """Candidate panels of the overview figure, most informative first."""
    return [
        lambda ax: panel_gap_vs(ax, rows, HDM, style),
        lambda ax: panel_bounds_by_method(ax, rows, style),
        lambda ax: panel_layers(ax, layers, style, "sqrt_quadratic_form_max"),
        lambda ax: panel_epochs(ax, rows, HDM, style, dotted=GAP),
        lambda ax: panel_noise(ax, noise, style),
    ]


def _overview(
    rows: Sequence[Row],
    layers: Sequence[Row],
    noise: Sequence[Row],
    style: Style,
    out_dir: Path,
    formats: Sequence[str],
) -> list[Path]:
    probe = Figure()
    usable = [p for p in overview_panels(rows, layers, noise, style) if p(probe.add_subplot())][:4]
    if not usable:
        return []
    legend_cell = len(usable) == 3
    panels = [*usable, lambda ax: _legend_panel(ax, style)] if legend_cell else usable
    fig, _ = _figure_of_panels(panels, ncols=min(len(panels), 2), size=(5.0, 3.8), title=None)
    for letter, ax in zip("abcd", fig.axes[: len(usable)], strict=False):
        ax.set_title(f"({letter}) {ax.get_title()}", loc="left", fontsize="small")
        ax.set_title("")
    if not legend_cell:
        _legend_for_methods(fig, style, style.labels)
    return _save(fig, out_dir, "overview", formats)


def _legend_panel(ax: Axes, style: Style) -> bool:
    """An empty cell of a panel grid used for the legend of the methods."""
    handles = [Line2D([], [], marker="o", color=style.colors[x]) for x in style.labels]
    ax.legend(handles, style.labels, loc="center", title="fine-tuning method", frameon=False)
    ax.set_axis_off()
    return True
