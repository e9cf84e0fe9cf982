"""``hessfine compare`` and ``hessfine figures``: measurements side by side with the measured gaps.

Collects every ``measurement.json`` (docs/schema.md) under the given paths, joins each with the
manifest ``hessfine.json`` of its fine-tuning run (method, seed, label-noise rate, the epoch of
the checkpoint; docs/finetune.md#run-directories) and with that epoch's row of the run's
``metrics.csv``, and writes the tables below. The manifest is looked for beside the checkpoint, then
in the measurement's directory and its parents; without one, the run fields ``hessfine measure``
copied into the measurement (its ``manifest`` and ``epoch`` entries) are used. Written:

* ``comparison.csv`` — one row per checkpoint measured: a measurement of its curvature on
  held-out examples (``hessfine measure --hessian-split eval``) beside one on its training
  examples is joined to that row (:func:`fold_heldout`: ``hessian_distance_measure_heldout``);
* ``layers.csv``, ``noise_stability.csv`` — the per-layer and per-σ long tables of
  :mod:`hessfine.figures.tables`;
* ``correlations.csv`` — for every bound or measure column m and the target column g (by
  default the generalization gap in loss, test − train): Pearson's r, Spearman's ρ and
  Kendall's τ over the measurements where both are finite, with two-sided p-values, the number
  of pairs n and of runs, over all rows and, for the Hessian, trace and prior distance measures
  and Σ‖v_i‖_F, also within each method (column ``group``) and with 95% bootstrap intervals that
  resample runs, not checkpoints (:func:`hessfine.analysis.correlation.correlations`). A
  correlation needs n ≥ 3 and both columns non-constant; otherwise its cells are empty.
* the figures of :func:`hessfine.figures.plots.draw_all`;
* with ``--report``, the study figures and ``report.md`` of :mod:`hessfine.analysis.report`.

Ju, Li & Zhang (ICML 2022, Sec. 3 and Fig. 1) make this comparison to show that the Hessian
distance measure Σ_i sqrt(C·𝓗_i/n) correlates with the gap across methods and epochs and
matches its scale, while the distance-based bounds of prior work are orders of magnitude larger.

The columns of every table, with their units and meaning, are declared in
:mod:`hessfine.analysis.schema` (``docs/schema.md``); :func:`flat_row` builds a ``comparison.csv``
row from them, copying what a measurement holds and deriving the rest (the run's method, seed,
noise rate and radii from its manifest; sums over layers; the trace measure; families such as
``distance_measure_NAME``, ``noise_stability_sigma_σ``, ``pac_bayes_NAME``, ``trainer_NAME``,
``timm_COLUMN`` and ``metrics_COLUMN``).

All files are written atomically (a temporary file renamed over the target).

Example:
    >>> rows = collect(["runs/"])                                   # doctest: +SKIP
    >>> write_comparison(rows, Path("cmp"))                         # doctest: +SKIP
    PosixPath('cmp/comparison.csv')
    >>> [(c["measure"], round(c["spearman_rho"], 2)) for c in correlations(rows)][:1]  # doctest: +SKIP
    [('hessian_distance_measure', 0.93)]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hessfine.analysis.checkpoints import MANIFEST, read_manifest
from hessfine.analysis.correlation import correlations
from hessfine.analysis.errors import InputError
from hessfine.analysis.progress import add_quiet_option
from hessfine.analysis.report import write_report
from hessfine.analysis.results import write_csv
from hessfine.analysis.schema import (
    COMPARISON_COLUMNS,
    COMPARISON_TABLE,
    CORRELATIONS_TABLE,
    DISTANCE_PREFIX,
    HDM_COMMON,
    HDM_HELDOUT,
    KEY_COLUMNS,
    LAYERS_TABLE,
    LEADING_COLUMNS,
    MEASUREMENT,
    NOISE_PREFIX,
    NOISE_TABLE,
    RUN_METRICS,
    SCHEMA_VERSION,
    TRACE_MEASURE,
    value_at,
)
from hessfine.figures.tables import Row, finite, layer_rows, noise_rows, read_table

PARENT_LEVELS = 3
_BOUND_KEYS = frozenset(
    {"C", "n", "epsilon", "hessian_distance_measure", "theorem_2_1", "trace_corollary"}
)
_EPOCH = re.compile(r"epoch[_-]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One measurement with what is known about the checkpoint it measured."""

    path: Path
    measurement: dict[str, Any]
    manifest_path: Path | None
    manifest: dict[str, Any]
    epoch: int | float | None
    metrics: dict[str, Any]


def find_measurement_files(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """``(file, root)`` for every measurement file: given files, and ``measurement.json``
    found recursively under given directories (root = the directory given). Duplicates are
    dropped; the order is sorted by path."""
    found: dict[Path, tuple[Path, Path]] = {}
    given = list(paths)
    if not given:
        raise InputError("no RUNS given; pass measurement.json files or directories holding them")
    for entry in given:
        path = Path(entry).expanduser()
        if path.is_file():
            found.setdefault(path.resolve(), (path.resolve(), path.resolve().parent))
        elif path.is_dir():
            for file in sorted(path.rglob(MEASUREMENT)):
                if file.is_file() and not any(p.startswith(".") for p in file.parts[-3:]):
                    found.setdefault(file.resolve(), (file.resolve(), path.resolve()))
        else:
            raise InputError(f"{entry}: no such file or directory; check the path")
    if not found:
        raise InputError(
            f"no {MEASUREMENT} under {', '.join(map(str, given))}; run `hessfine measure` first"
        )
    return [found[k] for k in sorted(found)]


def read_measurement(path: Path) -> dict[str, Any]:
    """A ``measurement.json`` document, checked for the fields the comparison needs."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not a readable measurement JSON ({first})") from None
    if not isinstance(document, dict) or "bounds" not in document:
        raise InputError(f"{path}: not a hessfine measurement (no 'bounds'); pass measurement.json")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{path}: schema_version {version!r} is not {SCHEMA_VERSION}; "
            "re-run `hessfine measure` with this version"
        )
    return document


def _manifest_near(path: Path, checkpoint: Path | None, root: Path) -> Path | None:
    """The run manifest: beside the checkpoint, else in the measurement's directory or its
    parents (up to ``root`` or :data:`PARENT_LEVELS` levels, whichever is further)."""
    candidates: list[Path] = []
    if checkpoint is not None:
        candidates.append(checkpoint if checkpoint.is_dir() else checkpoint.parent)
    start = path.parent
    depth = len(start.relative_to(root).parts) if start.is_relative_to(root) else 0
    candidates += [start, *start.parents][: max(depth, PARENT_LEVELS) + 1]
    for candidate in candidates:
        if (candidate / MANIFEST).is_file():
            return candidate / MANIFEST
    return None


def _checkpoint_path(text: object, measurement_path: Path) -> Path | None:
    if not isinstance(text, str) or not text:
        return None
    path = Path(text).expanduser()
    for candidate in (path, measurement_path.parent / path):
        if candidate.exists():
            return candidate.resolve()
    return None


def _epoch(
    checkpoint_text: object, checkpoint: Path | None, manifest: Mapping[str, Any]
) -> int | None:
    name = checkpoint.name if checkpoint is not None else Path(str(checkpoint_text or "")).name
    for entry in manifest.get("checkpoints") or []:
        if isinstance(entry, Mapping) and Path(str(entry.get("file", ""))).name == name:
            epoch = entry.get("epoch")
            if isinstance(epoch, int):
                return epoch
    if isinstance(manifest.get("epoch"), int):
        return manifest["epoch"]
    match = _EPOCH.search(name)
    return int(match.group(1)) if match else None


def _metrics_row(run_dir: Path | None, epoch: int | None) -> dict[str, Any]:
    if run_dir is None or epoch is None or not (run_dir / RUN_METRICS).is_file():
        return {}
    for row in read_table(run_dir / RUN_METRICS):
        if finite(row.get("epoch")) and int(row["epoch"]) == epoch:
            return row
    return {}


def load_records(paths: Iterable[str | Path]) -> list[Record]:
    """Every measurement under ``paths`` joined with its run manifest and metrics row."""
    records = []
    for path, root in find_measurement_files(paths):
        measurement = read_measurement(path)
        checkpoint = _checkpoint_path(measurement.get("checkpoint"), path)
        manifest_path = _manifest_near(path, checkpoint, root)
        if manifest_path is not None:
            manifest = read_manifest(manifest_path.parent)
        else:
            recorded = measurement.get("manifest")
            manifest = dict(recorded) if isinstance(recorded, Mapping) else {}
        recorded_epoch = measurement.get("epoch")
        epoch = (
            recorded_epoch
            if isinstance(recorded_epoch, int | float) and not isinstance(recorded_epoch, bool)
            else _epoch(measurement.get("checkpoint"), checkpoint, manifest)
        )
        run_dir = manifest_path.parent if manifest_path is not None else None
        records.append(
            Record(path, measurement, manifest_path, manifest, epoch, _metrics_row(run_dir, epoch))
        )
    return records


def _is_final(record: Record) -> int | None:
    """1 when the checkpoint is its run's final model (the manifest's ``best_epoch``, else its
    last checkpoint), 0 when it is another epoch, None when unknown."""
    epochs = [
        entry.get("epoch")
        for entry in record.manifest.get("checkpoints") or []
        if isinstance(entry, Mapping) and isinstance(entry.get("epoch"), int)
    ]
    best = record.manifest.get("best_epoch")
    final = best if isinstance(best, int) else max(epochs, default=None)
    if final is None or record.epoch is None:
        return None
    return int(record.epoch == final)


def _noise_rate(label_noise: object) -> float | None:
    if finite(label_noise):
        return float(label_noise)
    if isinstance(label_noise, Mapping):
        rate = label_noise.get("rate")
        return float(rate) if finite(rate) else None
    return None


def _noise_kind(label_noise: object) -> str | None:
    if isinstance(label_noise, Mapping) and isinstance(label_noise.get("kind"), str):
        return label_noise["kind"]
    return None


def _config_value(manifest: Mapping[str, Any], name: str) -> float | None:
    """A radius of the run's config, for the methods whose constraint uses it (the manifest's
    ``radii`` is set exactly for those); None for the others."""
    config = manifest.get("config") or {}
    value = config.get(name) if isinstance(config, Mapping) else None
    return float(value) if manifest.get("radii") and finite(value) else None


def _selection_columns(selection: object) -> Row:
    """The ``selected``, ``selection_taken_from``, ``selection_validation_accuracy`` and
    ``selection_points`` cells of a run manifest's ``selection`` entry (empty without one)."""
    if not isinstance(selection, Mapping):
        return dict.fromkeys(
            (
                "selected",
                "selection_taken_from",
                "selection_validation_accuracy",
                "selection_points",
            )
        )
    choice = selection.get("choice") if isinstance(selection.get("choice"), Mapping) else {}
    grid = selection.get("grid") if isinstance(selection.get("grid"), Mapping) else {}
    accuracy = None
    for score in selection.get("scores") or []:
        if isinstance(score, Mapping) and score.get("options") == choice:
            accuracy = score.get("validation_accuracy")
    return {
        "selected": " ".join(f"{k}={v:g}" if finite(v) else f"{k}={v}" for k, v in choice.items()),
        "selection_taken_from": selection.get("taken_from"),
        "selection_validation_accuracy": accuracy,
        "selection_points": math.prod(len(v) for v in grid.values() if isinstance(v, list))
        if grid
        else None,
    }


def _sigma_name(sigma: object) -> str:
    return f"{sigma:g}" if finite(sigma) else str(sigma)


def flat_row(record: Record) -> Row:
    """The ``comparison.csv`` row of one record: the columns of
    :data:`hessfine.analysis.schema.COMPARISON_COLUMNS` in their order, copied from the
    measurement where they have a source, derived here otherwise, families expanded in place."""
    m = record.measurement
    bounds = m.get("bounds") or {}
    layers = m.get("layers") or []
    manifest = record.manifest
    forms = [(layer.get("quadratic_form") or {}).get("max") for layer in layers]
    rule = (manifest.get("confusion_used") or {}).get("rule") or {}
    derived: dict[str, Any] = {
        "measurement": str(record.path),
        "method": manifest.get("method"),
        "epoch": record.epoch,
        "final_checkpoint": _is_final(record),
        "seed": manifest.get("seed"),
        "noise_rate": _noise_rate(manifest.get("label_noise")),
        "noise_matrix_source": bounds.get("noise_matrix_source") or "none",
        "noise_kind": _noise_kind(manifest.get("label_noise")),
        "radius": _config_value(manifest, "radius"),
        "head_radius": _config_value(manifest, "head_radius"),
        "confusion_source": (manifest.get("confusion_used") or {}).get("source"),
        "confusion_estimate_kappa": rule.get("estimate_kappa"),
        "confusion_shrinkage": rule.get("shrinkage"),
        "run": str(record.manifest_path.parent) if record.manifest_path is not None else None,
        **_selection_columns(manifest.get("selection")),
        "n": bounds.get("n", value_at(m, "data.n_train")),
        TRACE_MEASURE: _trace_measure(bounds, value_at(m, "loss.train")),
        "num_layers": len(layers),
        "num_weights": sum(int(layer.get("numel") or 0) for layer in layers),
        "sum_hessian_quadratic_form": _sum(forms),
        "sum_sqrt_hessian_quadratic_form": (
            sum(math.sqrt(max(v, 0.0)) for v in forms)
            if forms and all(map(finite, forms))
            else None
        ),
        "sum_distance": _sum([layer.get("distance") for layer in layers]),
        "sum_trace_mean": _sum([(layer.get("trace") or {}).get("mean") for layer in layers]),
    }
    families = {
        "{bound}": lambda: {k: v for k, v in bounds.items() if k not in _BOUND_KEYS and finite(v)},
        DISTANCE_PREFIX + "{name}": lambda: {
            f"{DISTANCE_PREFIX}{k}": v
            for k, v in sorted((bounds.get("distance_measures") or {}).items())
        },
        NOISE_PREFIX + "{σ}": lambda: _noise_columns(m.get("noise_stability") or []),
        "pac_bayes_{name}": lambda: _certificate_columns(bounds.get("pac_bayes_certificate")),
        "trainer_{name}": lambda: _training_columns(m, "logged", "trainer_"),
        "timm_{column}": lambda: _training_columns(m, "summary", "timm_"),
        "metrics_{column}": lambda: {f"metrics_{k}": v for k, v in record.metrics.items()},
    }
    row: Row = {}
    for column in COMPARISON_COLUMNS:
        if column.name in families:
            row.update(families[column.name]())
        elif column.name in derived:
            row[column.name] = derived[column.name]
        elif column.source:
            row[column.name] = value_at(m, column.source)
    return row


def _training_columns(measurement: Mapping[str, Any], entry: str, prefix: str) -> Row:
    """The values under ``training.<entry>`` of a measurement, as columns ``<prefix><name>``."""
    recorded = (measurement.get("training") or {}).get(entry) or {}
    return {f"{prefix}{k}": v for k, v in recorded.items()}


def _noise_columns(entries: Sequence[Mapping[str, Any]]) -> Row:
    """The three columns of every noise level σ, level by level."""
    row: Row = {}
    for entry in entries:
        sigma = _sigma_name(entry.get("sigma"))
        row[f"{NOISE_PREFIX}{sigma}"] = entry.get("mean")
        row[f"noise_stability_stderr_sigma_{sigma}"] = entry.get("stderr")
        row[f"noise_trace_prediction_sigma_{sigma}"] = entry.get("trace_prediction")
    return row


def _certificate_columns(certificate: object) -> Row:
    if not isinstance(certificate, Mapping):
        return {}
    return {f"pac_bayes_{k}": v for k, v in certificate.items() if finite(v)}


def _trace_measure(bounds: Mapping[str, Any], train_loss: object) -> float | None:
    """Σ_i α_i·sqrt(C·max_x Tr[H_i⁺(x)]/n), recovered from the trace corollary's value
    (1+ε)·L̂ + (1+ε)·Σ_i α_i·sqrt(C·max_x Tr[H_i⁺(x)]/n)."""
    bound, epsilon = bounds.get("trace_corollary"), bounds.get("epsilon", 0.0)
    if not (finite(bound) and finite(train_loss) and finite(epsilon)):
        return None
    return bound / (1.0 + epsilon) - train_loss


def _sum(values: Sequence[object]) -> float | None:
    return float(sum(values)) if values and all(map(finite, values)) else None


def _sort_key(row: Row) -> tuple[str, float, float, str]:
    def number(v: object) -> float:
        return float(v) if finite(v) else -1.0

    return (
        str(row.get("method") or ""),
        number(row.get("seed")),
        number(row.get("epoch")),
        str(row.get("measurement")),
    )


def with_common_c(rows: Sequence[Row], loss_bound: float | None = None) -> list[Row]:
    """``rows`` with the bounds at one loss bound C for all of them: ``C_common`` (``loss_bound``,
    else the largest loss seen over all the rows' measurements, held-out ones included),
    ``hessian_distance_measure_common_c`` = Σ_i sqrt(C_common·𝓗_i/n), ``theorem_2_1_common_c``
    = (1+ε)·L̂ + (1+ε)·that, and for a row with a held-out measurement (:func:`fold_heldout`)
    ``hessian_distance_measure_heldout`` = Σ_i sqrt(C_common·𝓗_i^held-out/n).

    Theorem 2.1's C bounds the loss of every checkpoint compared; the per-measurement C (its own
    largest loss on the Hessian examples) falls as a run fits its data, which moves the measure
    independently of the curvature (docs/bounds.md, "Hessian distance measure and Theorem 2.1").
    """
    losses = [
        row[key] for row in rows for key in ("max_loss", "heldout_max_loss") if finite(row.get(key))
    ]
    common = loss_bound if loss_bound is not None else max(losses, default=None)
    out = []
    for row in rows:
        n, eps = row.get("n"), row.get("epsilon")
        scale = math.sqrt(common / n) if finite(common) and finite(n) and n > 0 else None
        measure, heldout = (
            scale * total if scale is not None and finite(total) else None
            for total in (
                row.get("sum_sqrt_hessian_quadratic_form"),
                row.get("heldout_sum_sqrt_hessian_quadratic_form"),
            )
        )
        theorem = None
        if measure is not None and finite(row.get("train_loss")) and finite(eps):
            theorem = (1 + eps) * row["train_loss"] + (1 + eps) * measure
        out.append(
            {
                **row,
                "C_common": common,
                HDM_COMMON: measure,
                "theorem_2_1_common_c": theorem,
                HDM_HELDOUT: heldout,
            }
        )
    return out


def _checkpoint_key(record: Record) -> tuple[str, str]:
    """What identifies the measured checkpoint: its path (resolved when it exists) and the
    reference it was measured against."""
    text = record.measurement.get("checkpoint")
    path = _checkpoint_path(text, record.path)
    return str(path if path is not None else text), str(record.measurement.get("reference"))


def fold_heldout(pairs: Sequence[tuple[Row, Record]]) -> list[tuple[Row, Record]]:
    """Join each measurement on held-out examples (``settings.hessian_split = eval``) to the
    measurement of the same checkpoint (and reference) on its training examples: the latter's
    row gets ``heldout_measurement``, ``heldout_sum_sqrt_hessian_quadratic_form`` and
    ``heldout_max_loss`` (for :func:`with_common_c`), and the held-out measurement is dropped
    as a row of its own. A held-out measurement without exactly one such partner stays a row.
    """
    partners: dict[tuple[str, str], list[int]] = {}
    for index, (row, record) in enumerate(pairs):
        if row.get("hessian_split") != "eval":
            partners.setdefault(_checkpoint_key(record), []).append(index)
    joined: dict[int, Row] = {}
    dropped: set[int] = set()
    for index, (row, record) in enumerate(pairs):
        found = partners.get(_checkpoint_key(record), [])
        if row.get("hessian_split") != "eval" or len(found) != 1 or found[0] in joined:
            continue
        joined[found[0]] = {
            "heldout_measurement": row.get("measurement"),
            "heldout_sum_sqrt_hessian_quadratic_form": row.get("sum_sqrt_hessian_quadratic_form"),
            "heldout_max_loss": row.get("max_loss"),
        }
        dropped.add(index)
    return [
        ({**row, **joined.get(index, {})}, record)
        for index, (row, record) in enumerate(pairs)
        if index not in dropped
    ]


def _rows(records: Sequence[Record]) -> list[tuple[Row, Record]]:
    """The comparison rows of ``records`` with their records, sorted by method, seed and epoch,
    held-out measurements joined to their partners (:func:`fold_heldout`)."""
    pairs = sorted(((flat_row(r), r) for r in records), key=lambda p: _sort_key(p[0]))
    return fold_heldout(pairs)


def collect(paths: Iterable[str | Path], *, loss_bound: float | None = None) -> list[Row]:
    """Flat ``comparison.csv`` rows of every measurement under ``paths`` (files or directories,
    searched recursively), sorted by method, seed and epoch, held-out measurements joined to
    their partners (:func:`fold_heldout`), with the common-C bounds of :func:`with_common_c`.

    Raises :class:`InputError` for a missing path, no measurements, or an unreadable one.
    """
    return with_common_c([row for row, _ in _rows(load_records(paths))], loss_bound)


def write_comparison(rows: Sequence[Row], out: Path) -> Path:
    """Write ``out/comparison.csv`` (``out`` is a directory, created if needed); return its path."""
    if not rows:
        raise InputError("no measurements to compare; pass measurement.json files or directories")
    return write_csv(rows, Path(out) / COMPARISON_TABLE, leading=LEADING_COLUMNS)


@dataclass(frozen=True)
class Comparison:
    """What ``hessfine compare`` wrote."""

    rows: list[Row]
    correlations: list[Row]
    tables: list[Path]
    figures: list[Path]


def compare(
    paths: Iterable[str | Path],
    out: Path,
    *,
    target: str = "generalization_gap_loss",
    formats: Sequence[str] = ("png", "pdf"),
    figures: bool = True,
    bootstrap: int = 1000,
    report: bool = False,
    settings: Mapping[str, Any] | None = None,
    loss_bound: float | None = None,
) -> Comparison:
    """Collect measurements, write the four tables and draw the figures into ``out``.

    What ``hessfine compare`` does (exported as ``hessfine.compare``).

    Args:
        paths: ``measurement.json`` files, or directories searched for them recursively (a
            ``hessfine measure`` output, a training callback's ``OUTPUT_DIR/hessfine``).
        out: The output directory.
        target: The column every measure is correlated with (default: the measured gap).
        formats: The figures' file formats.
        figures: Whether to draw the figures.
        bootstrap: Bootstrap resamples of the correlations' intervals.
        report: Also the study figures and ``report.md`` (:mod:`hessfine.analysis.report`).
        settings: What the report's settings section prints.
        loss_bound: The common C of :func:`with_common_c` (default: the largest loss seen).

    Returns:
        The rows of ``comparison.csv``, the correlations, and the paths written.
    """
    pairs = _rows(load_records(paths))
    rows = with_common_c([p[0] for p in pairs], loss_bound)
    out = Path(out)
    layers = [lr for row, r in pairs for lr in layer_rows(r.measurement, row)]
    noise = [nr for row, r in pairs for nr in noise_rows(r.measurement, row)]
    corr = correlations(rows, target, bootstrap=bootstrap)
    tables = [
        write_comparison(rows, out),
        write_csv(layers, out / LAYERS_TABLE, leading=KEY_COLUMNS),
        write_csv(noise, out / NOISE_TABLE, leading=KEY_COLUMNS),
        write_csv(corr, out / CORRELATIONS_TABLE),
    ]
    drawn = _draw(out / COMPARISON_TABLE, out, formats) if figures else []
    if report:
        written = write_report(
            rows, out, formats=formats, bootstrap=bootstrap, settings=settings or {}
        )
        tables += [p for p in written if p.suffix in (".csv", ".md")]
        drawn += [p for p in written if p.suffix not in (".csv", ".md")]
    return Comparison(rows, corr, tables, drawn)


def _draw(table: Path, out: Path, formats: Sequence[str]) -> list[Path]:
    from hessfine.figures.plots import draw_all

    return draw_all(table, out, formats=formats)


def format_correlations(rows: Sequence[Row]) -> str:
    """A fixed-width text table of the correlations over all rows, with 95% intervals."""

    def cell(r: Row, key: str) -> str:
        if not finite(r.get(key)):
            return "-"
        low, high = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
        interval = f" [{low:+.2f}, {high:+.2f}]" if finite(low) and finite(high) else ""
        return f"{r[key]:+.2f}{interval}"

    lines = [f"{'measure':<40} {'n':>4} {'pearson':>20} {'spearman':>20} {'kendall':>20}"]
    for r in rows:
        if r.get("group", "all") != "all":
            continue
        lines.append(
            f"{r['measure']:<40} {r['n']:>4} {cell(r, 'pearson_r'):>20} "
            f"{cell(r, 'spearman_rho'):>20} {cell(r, 'kendall_tau'):>20}"
        )
    return "\n".join(lines)


TARGETS = ("generalization_gap_loss", "generalization_gap_accuracy", "eval_loss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hessfine compare``."""
    parser.description = (
        "Collect measurement.json files (recursively), join them with their fine-tuning runs "
        "(hessfine.json, metrics.csv) and write comparison.csv, layers.csv, "
        "noise_stability.csv, correlations.csv (Pearson, Spearman and Kendall correlation of every "
        "bound with the measured generalization gap) and paper-style figures."
    )
    parser.epilog = (
        "examples:\n"
        "  hessfine compare measurements/ --out cmp\n"
        "  hessfine compare runs/plain/m runs/robust/m/measurement.json --out cmp --format png\n"
        "  hessfine compare measurements/ --out cmp --target generalization_gap_accuracy"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("runs", nargs="+", metavar="RUNS", help="measurement files or directories")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument(
        "--target", choices=TARGETS, default=TARGETS[0], help="column to correlate with"
    )
    _format_option(parser)
    add_quiet_option(parser)
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write the study figures and report.md (hessfine.analysis.report)",
    )
    parser.add_argument(
        "--loss-bound",
        type=float,
        metavar="C",
        help="one loss bound C for every measurement, for hessian_distance_measure_common_c and "
        "theorem_2_1_common_c (default: the largest loss seen over all of them)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="B",
        help="bootstrap replicates (resampling runs) for the correlation intervals (default 1000)",
    )


FORMATS = ("png", "pdf")
"""Figure formats when ``--format`` is not given."""


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        nargs="+",
        action="extend",
        choices=["png", "pdf", "svg"],
        dest="formats",
        help="figure formats (default png pdf; repeated options add up)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``hessfine compare``; print what was written and the correlations; return 0."""
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap {args.bootstrap}: give a number of replicates ≥ 0")
    if args.loss_bound is not None and not (math.isfinite(args.loss_bound) and args.loss_bound > 0):
        raise InputError(f"--loss-bound {args.loss_bound}: give a finite positive loss bound")
    result = compare(
        args.runs,
        args.out,
        target=args.target,
        formats=args.formats or FORMATS,
        figures=not args.no_figures,
        bootstrap=args.bootstrap,
        report=args.report,
        loss_bound=args.loss_bound,
    )
    if not args.quiet:
        print(f"{len(result.rows)} measurements → {args.out}")
        print(format_correlations(result.correlations))
        for path in [*result.tables, *result.figures]:
            print(f"  wrote {path}")
    return 0


def figures_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hessfine figures``."""
    parser.description = (
        "Redraw the figures from result files: comparison.csv tables (with layers.csv and "
        "noise_stability.csv beside them), directories written by `hessfine compare`, or "
        "measurement.json files/directories (collected as by `hessfine compare`). The merged "
        "tables are written to DIR next to the figures."
    )
    parser.epilog = (
        "examples:\n"
        "  hessfine figures cmp/comparison.csv --out figs\n"
        "  hessfine figures cmp-seed0 cmp-seed1 --out figs --format png\n"
        "  hessfine figures measurements/ --out figs"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="result files or directories")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    _format_option(parser)
    add_quiet_option(parser)


def _read_result_tables(path: Path) -> tuple[list[Row], list[Row], list[Row]]:
    table = path if path.is_file() else path / COMPARISON_TABLE

    def sibling(name: str) -> list[Row]:
        p = table.with_name(name)
        return read_table(p) if p.is_file() else []

    try:
        rows = read_table(table)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"{table}: not a readable CSV table ({err})") from None
    if rows and "measurement" not in rows[0]:
        raise InputError(f"{table}: not a comparison table (no 'measurement' column)")
    return rows, sibling(LAYERS_TABLE), sibling(NOISE_TABLE)


def figures_run(args: argparse.Namespace) -> int:
    """Run ``hessfine figures``; return 0."""
    rows: list[Row] = []
    layers: list[Row] = []
    noise: list[Row] = []
    measurement_inputs: list[Path] = []
    for entry in args.results:
        path = Path(entry).expanduser()
        if (path.suffix == ".csv" and path.is_file()) or (path / COMPARISON_TABLE).is_file():
            more = _read_result_tables(path)
            rows += more[0]
            layers += more[1]
            noise += more[2]
        elif path.exists():
            measurement_inputs.append(path)
        else:
            raise InputError(f"{entry}: no such file or directory; check the path")
    if measurement_inputs:
        for row, record in _rows(load_records(measurement_inputs)):
            rows.append(row)
            layers += layer_rows(record.measurement, row)
            noise += noise_rows(record.measurement, row)
    if not rows:
        raise InputError(f"no results in {', '.join(args.results)}; pass comparison.csv files")
    out = Path(args.out)
    write_csv(rows, out / COMPARISON_TABLE, leading=LEADING_COLUMNS)
    write_csv(layers, out / LAYERS_TABLE, leading=KEY_COLUMNS)
    write_csv(noise, out / NOISE_TABLE, leading=KEY_COLUMNS)
    written = _draw(out / COMPARISON_TABLE, out, args.formats or FORMATS)
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
        if not written:
            print("nothing to draw: the tables hold no bounds with positive values")
    return 0
