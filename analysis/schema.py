"""The result files' schema: every field of ``measurement.json`` and every column of the
comparison tables, once, with its type, unit and meaning.

This module is the one owner of the names. The declarations are tables beside it
(``schema_tables/*.tsv``, one entry a line: a field's path, kind, unit, whether it is required
and its meaning; a column's name, unit, source and meaning), read once at import; the names the
code reads by name are constants here. The measurement writer (:mod:`hessfine.analysis.measure`,
with the results' own ``to_json``), the comparison (:mod:`hessfine.analysis.compare`), the
figures (:mod:`hessfine.figures`) and the report import the names from here; the tests check
that every document the writer produces has exactly the declared fields (:func:`undeclared`,
:func:`missing`), that every constant names a declared column, and that ``docs/schema.md`` —
rendered by :func:`render_markdown` and written by ``python -m hessfine.analysis.doc_pages`` — is
current. The module imports nothing from hessfine, so every layer of the package may use it.

A field's ``path`` names its place: ``.`` separates keys, ``[]`` stands for every element of a
list and ``{layer}``-style segments for keys that vary (layer names, which may hold dots, count
as one key). ``kind`` lists the JSON types allowed (``number`` is an int or a float; ``object*``
is an object whose keys are not declared one by one). A field that is not ``required`` appears
only in the circumstances its meaning states. ``measurement.json`` keeps the name ``method`` for
how a value was computed (the *route*): version 1 of the schema fixes it.

Example:
    >>> FIELDS["layers[].quadratic_form.max"].unit
    'loss'
    >>> undeclared({"schema_version": 1, "surprise": 0})
    ['surprise']
    >>> [c.name for c in COMPARISON_COLUMNS][:3]
    ['measurement', 'checkpoint', 'method']
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MEASUREMENT = "measurement.json"
SPECTRUM = "spectrum.json"
COMPARISON_TABLE = "comparison.csv"
LAYERS_TABLE = "layers.csv"
NOISE_TABLE = "noise_stability.csv"
CORRELATIONS_TABLE = "correlations.csv"
RUN_METRICS = "metrics.csv"
"""The per-epoch metrics a ``hessfine finetune`` run writes; joined as ``metrics_*`` columns."""


@dataclass(frozen=True)
class Field:
    """One entry of a JSON result file."""

    path: str
    kind: str
    unit: str
    meaning: str
    required: bool = True

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.replace("[]", ".[]").split("."))


TABLES = Path(__file__).resolve().parent / "schema_tables"
"""The declarations: one tab-separated table per file, a header line, then one entry a line."""


def _rows(name: str) -> list[dict[str, str]]:
    with (TABLES / f"{name}.tsv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _fields(name: str) -> tuple[Field, ...]:
    return tuple(
        Field(r["path"], r["kind"], r["unit"], r["meaning"], r["required"] == "yes")
        for r in _rows(name)
    )


MEASUREMENT_FIELDS = _fields("measurement")
"""Every entry of ``measurement.json`` (``schema_tables/measurement.tsv``)."""
SPECTRUM_FIELDS = _fields("spectrum")
"""Every entry of ``spectrum.json`` (``schema_tables/spectrum.tsv``)."""
FIELDS: dict[str, Field] = {f.path: f for f in MEASUREMENT_FIELDS}


def _declared(fields: Sequence[Field]) -> dict[tuple[str, ...], Field]:
    return {f.segments: f for f in fields}


def _lookup(table: Mapping[tuple[str, ...], Field], path: tuple[str, ...]) -> Field | None:
    """The field declared for a document path (placeholders ``{…}`` match any one key)."""
    for segments, found in table.items():
        if len(segments) == len(path) and all(
            s == p or (s.startswith("{") and p != "[]") for s, p in zip(segments, path, strict=True)
        ):
            return found
    return None


_JSON_KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "object*": lambda v: isinstance(v, dict),
}


def _walk(
    value: Any, path: tuple[str, ...], table: Mapping[tuple[str, ...], Field]
) -> Iterator[str]:
    """Problems below ``path``: undeclared entries and values of the wrong kind."""
    if isinstance(value, dict):
        for key, item in value.items():
            child = (*path, str(key))
            found = _lookup(table, child)
            if found is None:
                yield ".".join(child)
                continue
            if not any(_JSON_KINDS[k](item) for k in found.kind.split("|")):
                yield f"{'.'.join(child)}: {type(item).__name__} is not {found.kind}"
            elif not found.kind.startswith("object*"):
                yield from _walk(item, child, table)
    elif isinstance(value, list):
        child = (*path, "[]")
        found = _lookup(table, child)
        for item in value:
            if found is None:
                yield ".".join(child)
                return
            if not any(_JSON_KINDS[k](item) for k in found.kind.split("|")):
                yield f"{'.'.join(child)}: {type(item).__name__} is not {found.kind}"
            else:
                yield from _walk(item, child, table)


def undeclared(
    document: Mapping[str, Any], fields: Sequence[Field] = MEASUREMENT_FIELDS
) -> list[str]:
    """The entries of a result document that the schema does not declare, or whose value is
    not of the declared kind (empty for a conforming document)."""
    return list(_walk(dict(document), (), _declared(fields)))


def missing(document: Mapping[str, Any], fields: Sequence[Field] = MEASUREMENT_FIELDS) -> list[str]:
    """The required fields absent from a document (below every object that is present)."""
    out = []
    for f in fields:
        if f.required and "[]" not in f.path and "{" not in f.path:
            node: Any = document
            for key in f.segments[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and f.segments[-1] not in node:
                out.append(f.path)
    return out


@dataclass(frozen=True)
class Column:
    """One column of a comparison table: its name, where its value comes from, unit, meaning.

    ``source`` is the ``measurement.json`` path of a column copied as it is, empty for a
    derived column (its meaning says how). A name with ``{…}`` stands for a family of columns.
    """

    name: str
    meaning: str
    unit: str = ""
    source: str = ""


GAP = "generalization_gap_loss"
HDM = "hessian_distance_measure"
TRACE_MEASURE = "trace_distance_measure"
SUM_DISTANCE = "sum_distance"
DISTANCE_PREFIX = "distance_measure_"
NOISE_PREFIX = "noise_stability_sigma_"
NOISY_SUFFIX = "_noisy_labels"

KEY_COLUMNS = (
    "measurement",
    "checkpoint",
    "method",
    "epoch",
    "seed",
    "noise_rate",
    "final_checkpoint",
)
"""The columns every long table starts with: the measurement a row belongs to."""


def _columns(name: str) -> tuple[Column, ...]:
    return tuple(Column(r["name"], r["meaning"], r["unit"], r["source"]) for r in _rows(name))


COMPARISON_COLUMNS = _columns("comparison")
"""``comparison.csv``, in order (``schema_tables/comparison.tsv``)."""

LEADING_COLUMNS = tuple(
    c.name
    for c in COMPARISON_COLUMNS[: [c.name for c in COMPARISON_COLUMNS].index(TRACE_MEASURE) + 1]
)
"""The columns that come first in comparison.csv, in this order; the others follow in the order
of :data:`COMPARISON_COLUMNS` (families expanded in place)."""

HDM_COMMON = "hessian_distance_measure_common_c"
HDM_HELDOUT = "hessian_distance_measure_heldout"

MEASURE_COLUMNS = (
    HDM,
    HDM_COMMON,
    HDM_HELDOUT,
    "theorem_2_1_common_c",
    "theorem_2_1",
    "trace_corollary",
    TRACE_MEASURE,
    "sum_hessian_quadratic_form",
    "sum_sqrt_hessian_quadratic_form",
    SUM_DISTANCE,
    "sum_trace_mean",
)
"""Bound and measure columns correlated with the gap (with the families of
:data:`MEASURE_PREFIXES` and :data:`MEASURE_SUFFIXES`)."""
MEASURE_PREFIXES = (DISTANCE_PREFIX, NOISE_PREFIX)
MEASURE_SUFFIXES = (NOISY_SUFFIX,)

LAYER_COLUMNS = _columns("layers")
"""``layers.csv``: one row per (measurement, layer); sources relative to ``layers[]``."""

NOISE_COLUMNS = _columns("noise_stability")
"""``noise_stability.csv``: one row per (measurement, σ); sources relative to ``noise_stability[]``."""

CORRELATION_COLUMNS = _columns("correlations")
"""``correlations.csv``."""


def value_at(document: Mapping[str, Any], source: str) -> Any:
    """The value at a dotted ``source`` path of a document (None where any part is absent)."""
    node: Any = document
    for key in source.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def copied(columns: Sequence[Column], document: Mapping[str, Any]) -> dict[str, Any]:
    """The columns with a ``source``, read from ``document``."""
    return {c.name: value_at(document, c.source) for c in columns if c.source}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _field_table(fields: Sequence[Field]) -> list[str]:
    lines = ["| field | type | unit | meaning |", "|---|---|---|---|"]
    for f in fields:
        when = "" if f.required else " *(not always present)*"
        lines.append(f"| `{f.path}` | {_cell(f.kind)} | {f.unit} | {_cell(f.meaning)}{when} |")
    return lines


def _column_table(columns: Sequence[Column], source_label: str) -> list[str]:
    lines = [f"| column | unit | {source_label} | meaning |", "|---|---|---|---|"]
    for c in columns:
        source = f"`{c.source}`" if c.source else "derived"
        lines.append(f"| `{c.name}` | {c.unit} | {source} | {_cell(c.meaning)} |")
    return lines


def render_markdown() -> str:
    """The text of ``docs/schema.md``."""
    lines = [
        "# Result files: measurement.json and the comparison tables",
        "",
        "<!-- generated by `python -m hessfine.analysis.doc_pages`; do not edit -->",
        "",
        f"Schema version {SCHEMA_VERSION}. Every field is declared once in "
        "`analysis/schema.py`, which the writer, `hessfine compare`, the figures and the report "
        "use; the tests check each written document against it. Paths: `.` separates keys, "
        "`[]` is every element of a list, `{…}` a key that varies (a layer's name counts as one "
        "key). `number` is an int or a float; `object*` an object whose keys are not declared "
        "one by one; `null` stands for a value not computed (JSON has no NaN or infinity: they "
        "are written as null too). Units: `loss` is the unit of the per-example loss (nats for "
        "cross-entropy); `weight units` those of the weights. How a value was computed is its "
        "*route*; schema version 1 names that field `method`.",
        "",
        f"## `{MEASUREMENT}`",
        "",
        "Written by `hessfine measure` for every checkpoint (atomically).",
        "",
        *_field_table(MEASUREMENT_FIELDS),
        "",
        f"## `{SPECTRUM}`",
        "",
        "Written beside it with `--density`: the stochastic-Lanczos-quadrature estimate of the "
        "eigenvalue density of the selected layers' mean-loss Hessian.",
        "",
        *_field_table(SPECTRUM_FIELDS),
        "",
        f"## `{COMPARISON_TABLE}`",
        "",
        "Written by `hessfine compare`: one row per measurement, joined with its run's "
        "manifest (`hessfine.json`) and metrics; the fixed columns come first in this order, "
        "then the families in order of appearance.",
        "",
        *_column_table(COMPARISON_COLUMNS, "from measurement.json"),
        "",
        f"## `{LAYERS_TABLE}`",
        "",
        *_column_table(LAYER_COLUMNS, "from layers[]"),
        "",
        f"## `{NOISE_TABLE}`",
        "",
        *_column_table(NOISE_COLUMNS, "from noise_stability[]"),
        "",
        f"## `{CORRELATIONS_TABLE}`",
        "",
        *_column_table(CORRELATION_COLUMNS, "source"),
        "",
    ]
    return "\n".join(lines)
