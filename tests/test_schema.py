"""The result files' schema: the documents written follow it, and docs/schema.md is current."""

import json
import re
from pathlib import Path

import pytest
from hessfine.analysis import schema
from hessfine.analysis.compare import collect
from hessfine.figures.tables import layer_rows, noise_rows

PINNED = Path(__file__).parent / "pinned"
VOLATILE = ("provenance.", "settings.max_memory_bytes", "settings.chunks")
"""Left out of the pinned documents (tests/test_pinned_results.py)."""


def pinned_documents() -> dict[str, dict]:
    """The pinned measurement.json documents (their spectrum.json apart)."""
    out = {}
    for name in ("measurement_attention", "measurement_cnn"):
        document = json.loads((PINNED / f"{name}.json").read_text(encoding="utf-8"))
        out[f"{name}/spectrum"] = document.pop("spectrum")
        out[name] = document
    runs = json.loads((PINNED / "measurement_noisy_run.json").read_text(encoding="utf-8"))
    out.update({f"noisy_run/{epoch}": document for epoch, document in runs.items()})
    return out


DOCUMENTS = pinned_documents()


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_pinned_documents_have_exactly_the_declared_fields(name: str) -> None:
    fields = schema.SPECTRUM_FIELDS if name.endswith("spectrum") else schema.MEASUREMENT_FIELDS
    document = DOCUMENTS[name]
    assert schema.undeclared(document, fields) == []
    assert [p for p in schema.missing(document, fields) if not p.startswith(VOLATILE)] == []


def test_problems_are_named() -> None:
    document = json.loads(json.dumps(DOCUMENTS["measurement_cnn"]))
    document["surprise"] = 1
    document["layers"][0]["quadratic_form"]["max"] = "large"
    document["layers"][1]["diagnostics"]["new_entry"] = 0
    del document["loss"]["train"]
    assert schema.undeclared(document) == [
        "layers.[].quadratic_form.max: str is not number",
        "layers.[].diagnostics.new_entry",
        "surprise",
    ]
    assert "loss.train" in schema.missing(document)
    assert schema.missing({"loss": None}) == [] or "loss.train" not in schema.missing(
        {"loss": None}
    )


def test_every_path_is_declared_once() -> None:
    for fields in (schema.MEASUREMENT_FIELDS, schema.SPECTRUM_FIELDS):
        paths = [f.path for f in fields]
        assert len(paths) == len(set(paths))
        parents = {".".join(f.segments[:-1]) for f in fields if len(f.segments) > 1}
        declared = {".".join(f.segments) for f in fields}
        assert parents <= declared, parents - declared


def _declared_column(name: str, columns) -> bool:
    for column in columns:
        pattern = re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(column.name))
        if re.fullmatch(pattern, name):
            return True
    return False


def test_comparison_rows_have_only_declared_columns(tmp_path: Path) -> None:
    for name, document in DOCUMENTS.items():
        if not name.endswith("spectrum"):
            target = tmp_path / name / schema.MEASUREMENT
            target.parent.mkdir(parents=True)
            target.write_text(json.dumps(document), encoding="utf-8")
    rows = collect([tmp_path])
    assert len(rows) == 4
    for row in rows:
        assert list(row)[: len(schema.LEADING_COLUMNS)] == list(schema.LEADING_COLUMNS)
        unknown = [c for c in row if not _declared_column(c, schema.COMPARISON_COLUMNS)]
        assert unknown == []
        assert row[schema.HDM] == pytest.approx(
            next(d for n, d in DOCUMENTS.items() if str(tmp_path / n) in row["measurement"])[
                "bounds"
            ]["hessian_distance_measure"]
        )
    noise = [c for c in rows[0] if c.startswith(schema.NOISE_PREFIX)]
    assert noise, "the pinned measurements have noise stability"


@pytest.mark.parametrize("name", ["measurement_attention", "noisy_run/epoch_002"])
def test_long_tables_have_the_declared_columns(name: str) -> None:
    key = {c: c for c in schema.KEY_COLUMNS}
    layers = layer_rows(DOCUMENTS[name], key)
    names = [*schema.KEY_COLUMNS, *(c.name for c in schema.LAYER_COLUMNS[1:])]
    assert layers and all(list(row) == names for row in layers)
    assert layers[0]["route"] == DOCUMENTS[name]["layers"][0]["method"]
    noise = noise_rows(DOCUMENTS[name], key)
    names = [*schema.KEY_COLUMNS, *(c.name for c in schema.NOISE_COLUMNS[1:])]
    assert noise and all(list(row) == names for row in noise)


def test_the_constants_name_declared_columns() -> None:
    names = {c.name for c in schema.COMPARISON_COLUMNS}
    constants = [schema.GAP, schema.HDM, schema.TRACE_MEASURE, schema.SUM_DISTANCE]
    assert set(constants) <= names
    assert set(schema.MEASURE_COLUMNS) <= names and set(schema.KEY_COLUMNS) <= names
    assert schema.DISTANCE_PREFIX + "{name}" in names and schema.NOISE_PREFIX + "{σ}" in names
    assert schema.LEADING_COLUMNS[: len(schema.KEY_COLUMNS)] == schema.KEY_COLUMNS
