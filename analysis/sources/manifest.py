"""hessfine's run manifest ``hessfine.json`` (SPEC §3.3): model spec, kwargs, reference, data.

Example:
    >>> import tempfile
    >>> read_manifest(tempfile.mkdtemp())
    {}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import one_line

MANIFEST = "hessfine.json"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The JSON object in ``directory/hessfine.json``, or ``{}`` when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(
            f"manifest {path} is not readable JSON ({one_line(err)}); fix or delete it"
        ) from None
    if not isinstance(value, dict):
        raise InputError(
            f"manifest {path} must hold a JSON object, not {type(value).__name__}; fix or delete it"
        )
    return value
