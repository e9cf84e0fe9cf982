"""Hugging Face ``save_pretrained`` directories: ``config.json`` beside the weights.

The weights are ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (the first present), else the directory's only
``*.index.json``. Such a directory is one checkpoint. When its weights are one of those four
files, and it holds no PEFT adapter and no manifest naming another checkpoint, it is a *model
directory* (:func:`model_directory`) that a measurement loads with transformers' own
``from_pretrained`` (:mod:`hessfine.analysis.hf_loading`).

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
from hessfine.analysis.sources.manifest import read_manifest
from hessfine.analysis.sources.peft import adapter_file

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


def model_directory(path: str | Path) -> Path | None:
    """The Hugging Face model directory that ``path`` is, or holds as its weights file (module
    docs); else ``None``."""
    given = Path(path).expanduser()
    directory = given if given.is_dir() else given.parent
    if not (directory / "config.json").is_file() or adapter_file(directory) is not None:
        return None
    weights = hf_weights(directory, [name for name in HF_FILES if (directory / name).is_file()])
    if weights is None or (given != directory and given != weights):
        return None
    return None if "checkpoint" in read_manifest(directory) else directory
