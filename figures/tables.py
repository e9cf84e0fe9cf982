"""Result tables as the figures read them (plain ``csv``/``json``, no torch).

Three long tables describe a comparison (written by ``hessfine compare``,
docs/cli.md, "hessfine compare"):

* ``comparison.csv`` — one row per measurement;
* ``layers.csv`` — one row per (measurement, layer): ``distance`` = ‖v_i‖_F,
  ``quadratic_form_max`` = 𝓗_i, ``sqrt_quadratic_form_max`` = √𝓗_i, trace statistics;
* ``noise_stability.csv`` — one row per (measurement, σ): the measured
  I(σ) = E_U[ℓ(W+U)] − ℓ(W) with its standard error and the trace prediction
  (σ²/2)·Σ_i mean_x Tr[H_i(x)].

Every long row starts with :data:`KEY_COLUMNS` (the measurement it belongs to), copied from the
matching ``comparison.csv`` row, so a plot can group by method, epoch and seed. The columns of
every table are declared in :mod:`hessfine.analysis.schema` (``docs/schema.md``).

Example:
    >>> rows = layer_rows(
    ...     {"layers": [{"name": "fc.weight", "numel": 6, "distance": 0.5,
    ...                  "quadratic_form": {"max": 0.04, "mean": 0.01, "argmax": 3}}]},
    ...     {"method": "plain", "epoch": 3},
    ... )
    >>> rows[0]["sqrt_quadratic_form_max"]
    0.2
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hessfine.analysis.schema import (
    KEY_COLUMNS,
    LAYER_COLUMNS,
    NOISE_COLUMNS,
    copied,
)

Row = dict[str, Any]


def parse_cell(text: str) -> str | int | float | None:
    """A CSV cell as an int or float when it reads as one, ``None`` when empty, else the text."""
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_table(path: Path) -> list[Row]:
    """Rows of a CSV file with numeric cells parsed (see :func:`parse_cell`)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [{k: parse_cell(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def finite(value: object) -> bool:
    """Whether ``value`` is a finite real number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _sqrt_or_none(value: object) -> float | None:
    if not finite(value):
        return None
    return math.sqrt(value) if value >= 0 else None


def layer_rows(measurement: Mapping[str, Any], key: Mapping[str, Any]) -> list[Row]:
    """One row per layer of a ``measurement.json`` document, prefixed by ``key``: the columns
    of :data:`hessfine.analysis.schema.LAYER_COLUMNS`."""
    rows = []
    for index, layer in enumerate(measurement.get("layers") or []):
        values = copied(LAYER_COLUMNS, layer)
        eigen = layer.get("top_eigenvalues") or []
        derived = {
            "index": index,
            "sqrt_quadratic_form_max": _sqrt_or_none(values["quadratic_form_max"]),
            "top_eigenvalue": eigen[0] if eigen else None,
        }
        row = {c: key.get(c) for c in KEY_COLUMNS}
        row.update({c.name: derived.get(c.name, values.get(c.name)) for c in LAYER_COLUMNS[1:]})
        rows.append(row)
    return rows


def noise_rows(measurement: Mapping[str, Any], key: Mapping[str, Any]) -> list[Row]:
    """One row per noise level σ of a ``measurement.json`` document, prefixed by ``key``: the
    columns of :data:`hessfine.analysis.schema.NOISE_COLUMNS`."""
    return [
        {**{c: key.get(c) for c in KEY_COLUMNS}, **copied(NOISE_COLUMNS, entry)}
        for entry in measurement.get("noise_stability") or []
    ]


def _path_key(path: object) -> str:
    return str(Path(str(path)).resolve())


def measurement_tables(
    measurements: Iterable[Path], table: Sequence[Row]
) -> tuple[list[Row], list[Row]]:
    """Layer and noise rows of ``measurement.json`` files, joined to ``table`` rows by path.

    A file without a row in ``table`` (its ``measurement`` column) keeps its path as the key
    and an empty method.
    """
    by_path = {_path_key(row["measurement"]): row for row in table if row.get("measurement")}
    layers: list[Row] = []
    noise: list[Row] = []
    for path in measurements:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        key = by_path.get(_path_key(path), {"measurement": str(path)})
        layers.extend(layer_rows(document, key))
        noise.extend(noise_rows(document, key))
    return layers, noise
