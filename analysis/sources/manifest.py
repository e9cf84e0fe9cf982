"""hessfine's run manifest ``hessfine.json`` (docs/inputs.md, "The run manifest"): model spec,
kwargs, reference, data.

Example:
    >>> import tempfile
    >>> read_manifest(tempfile.mkdtemp())
    {}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hessfine.analysis.sources.files import read_json_object

MANIFEST = "hessfine.json"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The JSON object in ``directory/hessfine.json``, or ``{}`` when there is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {}
    return read_json_object(path, name=f"manifest {path}", fix="fix or delete it")
