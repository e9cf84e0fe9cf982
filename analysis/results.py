"""Result files: atomic writes and provenance.

Every file hessfine writes goes through :func:`write_json_atomic`, :func:`write_csv` or
:func:`write_text_atomic`:
the content is written to a temporary file in the target directory and moved into place with
:func:`os.replace`, so an interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """``data`` as the indented JSON text of a result file (non-finite floats become null)."""
    return json.dumps(_finite(data), indent=2, sort_keys=False) + "\n"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-finite floats become null)."""
    return write_text_atomic(path, json_text(data))


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) or math.isnan(value) else str(value)
    return str(value)


def columns_of(rows: Sequence[Mapping[str, Any]], leading: Sequence[str] = ()) -> list[str]:
    """The columns of ``rows``: those of ``leading`` that occur, then the others in order of appearance."""
    columns = [c for c in leading if any(c in row for row in rows)]
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    return columns


def write_csv(
    rows: Sequence[Mapping[str, Any]], path: Path, *, leading: Sequence[str] = ()
) -> Path:
    """Write ``rows`` as CSV atomically; columns: ``leading`` first, then in order of appearance."""
    buffer = io.StringIO()
    columns = columns_of(rows, leading)
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    write_text_atomic(path, buffer.getvalue())
    return path


def hessfine_version() -> str:
    """The installed hessfine version (``unknown`` when run from an uninstalled tree)."""
    try:
        return metadata.version("hessfine")
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """Versions a reader needs to reproduce a result."""
    return {
        "hessfine_version": hessfine_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


def timestamp() -> str:
    """Current UTC time, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")
