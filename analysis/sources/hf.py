"""Hugging Face ``save_pretrained`` directories: ``config.json`` beside the weights.

The weights are ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (the first present), else the directory's only
``*.index.json``. Such a directory is one checkpoint.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "model.safetensors").write_bytes(b"")
    0
    >>> hf_weights(root, ["config.json", "model.safetensors"]).name
    'model.safetensors'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hessfine.analysis.sources.files import INDEX_SUFFIXES

HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hf_weights(directory: Path, names: Sequence[str]) -> Path | None:
    """The weights file of a Hugging Face layout directory with entries ``names``, or ``None``."""
    present = set(names)
    for name in HF_FILES:
        if name in present and (directory / name).is_file():
            return directory / name
    indices = sorted(n for n in present if n.endswith(INDEX_SUFFIXES))
    return directory / indices[0] if len(indices) == 1 else None
