"""Lightning ``.ckpt`` files (docs/inputs.md, "Lightning").

``ModelCheckpoint`` writes ``lightning_logs/version_K/checkpoints/epoch=E-step=S.ckpt`` (and
``last.ckpt`` with ``save_last``): a dict with the LightningModule's ``state_dict`` (keys carry
the attribute that holds the network, e.g. ``model.``), ``epoch`` (0-based, the epoch that was
running when it was saved), ``global_step``, ``hyper_parameters`` (``save_hyperparameters()``),
and optimizer, scheduler, loop and callback states, which are not weights. The attribute prefix
is removed where the keys then match ``--model`` (:func:`hessfine.analysis.checkpoints.align`).
``last.ckpt`` is a copy of the newest checkpoint when its ``global_step`` equals a numbered one's,
and is then not counted twice (:func:`drop_repeated_last`). Under ``FSDPStrategy(state_dict_type=
"sharded")`` each checkpoint is a directory of that name instead, holding the weights as a
distributed checkpoint (:mod:`.dcp`) and the rest of the dict in ``meta.pt`` (:data:`META_FILE`).

Example:
    >>> lightning_record({"epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.6",
    ...                   "hyper_parameters": {"lr": 0.1}, "state_dict": {}})
    {'tool': 'lightning', 'step': 4, 'epoch': 1, 'hyper_parameters': {'lr': 0.1}}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.sources.files import json_safe

LIGHTNING_KEYS = ("pytorch-lightning_version", "lightning_version")
META_FILE = "meta.pt"


def is_lightning(obj: object) -> bool:
    """Whether a loaded ``.ckpt`` object was written by Lightning."""
    return isinstance(obj, Mapping) and (
        any(k in obj for k in LIGHTNING_KEYS)
        or {"state_dict", "epoch", "global_step"} <= set(map(str, obj))
    )


def lightning_record(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``{"tool", "step", "epoch", "hyper_parameters"}`` of a Lightning checkpoint (JSON-safe)."""
    step, epoch = obj.get("global_step"), obj.get("epoch")
    return {
        "tool": "lightning",
        "step": step if isinstance(step, int) else None,
        "epoch": epoch if isinstance(epoch, int) else None,
        "hyper_parameters": json_safe(obj.get("hyper_parameters") or {}),
    }


def attribute_prefix(state: Mapping[str, Any]) -> str | None:
    """The first key component every key shares (``"net."``), the candidate attribute prefix."""
    heads = {key.split(".", 1)[0] for key in state if "." in key}
    if len(heads) == 1 and all("." in key for key in state):
        return f"{heads.pop()}."
    return None


def drop_repeated_last(paths: list[Path]) -> list[Path]:
    """``paths`` without each ``last*.ckpt`` whose ``global_step`` equals that of another
    ``.ckpt`` in the same directory (of its ``meta.pt`` for a sharded checkpoint directory)."""
    steps: dict[Path, int | None] = {}

    def step(path: Path) -> int | None:
        if path not in steps:
            file = path / META_FILE if path.is_dir() else path
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # unreadable here: kept, and loading it reports the problem
                obj = None
            value = obj.get("global_step") if isinstance(obj, Mapping) else None
            steps[path] = value if isinstance(value, int) else None
        return steps[path]

    kept = []
    for path in paths:
        if path.suffix == ".ckpt" and path.name.startswith("last"):
            others = [
                p
                for p in paths
                if p.parent == path.parent and p.suffix == ".ckpt" and not p.name.startswith("last")
            ]
            if step(path) is not None and any(step(p) == step(path) for p in others):
                continue
        kept.append(path)
    return kept
