"""DeepSpeed ZeRO checkpoint directories (docs/inputs.md, "Sharded checkpoints").

``engine.save_checkpoint(DIR)`` (and so the Hugging Face ``Trainer`` under DeepSpeed, with
``DIR = checkpoint-N``) writes ``DIR/latest`` naming the tag, ``DIR/TAG/`` (``global_stepN``) with
the model states and the optimizer's partitions (``*_optim_states.pt``), and ``DIR/zero_to_fp32.py``.
The model states file (``DeepSpeedEngine._save_checkpoint``) is a ``torch.save`` dict:
``module`` (``module.state_dict()``), ``buffer_names``, ``param_shapes``, ``global_steps``,
``ds_config``, ``ds_version``, the scheduler's state and more.

- ZeRO stages 0–2 write ``TAG/mp_rank_00_model_states.pt``, whose ``module`` holds the full
  weights the engine trained with (16-bit under fp16/bf16): they are read, with the tensors
  mapped from the file (``mmap``) and converted to the measurement's dtype when aligned.
- ZeRO stage 3 writes ``TAG/zero_pp_rank_R_mp_rank_00_model_states.pt``, one per process; its
  ``module`` holds empty placeholders (each process kept only its partition of every weight, in
  the optimizer states). Such a checkpoint is refused with the command that consolidates it
  (DeepSpeed's ``zero_to_fp32.py``), and so is a tensor-parallel one (``mp_rank_01_...``).

A Trainer's ``checkpoint-N/`` that also holds ``model.safetensors`` is a Hugging Face layout and
read as such (:mod:`.hf`). The file is read with ``weights_only=True``: the dict holds plain
data besides tensors; pickled objects need ``--trust-checkpoint``.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "global_step3").mkdir()
    >>> _ = (root / "latest").write_text("global_step3")
    >>> zero_tag(root).name
    'global_step3'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import load_torch, strip_prefixes
from hessfine.analysis.sources.trainer import trainer_record
from torch import Tensor

LATEST = "latest"
MODEL_STATES = "mp_rank_00_model_states.pt"
_STATES_SUFFIX = "model_states.pt"
_MODEL_PARALLEL = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_STAGE_3 = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt")


def holds_model_states(directory: Path) -> bool:
    """Whether ``directory`` is a tag directory: it holds ``*model_states.pt`` files."""
    return any(p.name.endswith(_STATES_SUFFIX) for p in directory.iterdir())


def zero_tag(directory: Path) -> Path | None:
    """The tag directory of a DeepSpeed checkpoint: the directory that ``directory/latest``
    names, or ``directory`` itself when it holds model states; ``None`` when ``directory`` is
    no DeepSpeed checkpoint."""
    latest = directory / LATEST
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if tag and Path(tag).name == tag and (directory / tag).is_dir():
            return directory / tag
    return directory if holds_model_states(directory) else None


def model_states_file(directory: Path, *, label: str) -> Path:
    """``mp_rank_00_model_states.pt`` of the DeepSpeed checkpoint in ``directory``; anything else
    (no tag, a ZeRO stage-3 or a tensor-parallel checkpoint) is one line."""
    tag = zero_tag(directory)
    if tag is None:
        raise InputError(
            f"{label} {directory}: no DeepSpeed checkpoint ('{LATEST}' naming a tag directory, or "
            "*model_states.pt files); copy the whole checkpoint directory"
        )
    names = {p.name for p in tag.iterdir()}
    parallel = sorted(n for n in names if _MODEL_PARALLEL.fullmatch(n) and n != MODEL_STATES)
    if parallel:
        raise InputError(
            f"{label} {tag}: a tensor-parallel DeepSpeed checkpoint ({parallel[0]}); merge its "
            "model-parallel ranks into one state dict first"
        )
    if MODEL_STATES in names:
        return tag / MODEL_STATES
    if any(_STAGE_3.fullmatch(n) for n in names):
        raise _stage_3(label, tag)
    raise InputError(
        f"{label} {tag}: no {MODEL_STATES} in this DeepSpeed checkpoint; copy the whole "
        "checkpoint, or pass a state dict"
    )


def _stage_3(label: str, tag: Path) -> InputError:
    save = tag.parent
    return InputError(
        f"{label} {save}: a ZeRO stage-3 checkpoint, whose weights are partitioned over the "
        f"processes' optimizer states; consolidate them with DeepSpeed's script, python "
        f"{save / 'zero_to_fp32.py'} {save} OUT, and measure OUT"
    )


def read_zero(
    directory: Path, *, trust: bool, label: str
) -> tuple[Path, dict[str, Tensor], dict[str, Any]]:
    """The model states file of a ZeRO stage 0–2 checkpoint, its ``module`` weights (mapped from
    the file, prefixes stripped) and what the training tool recorded (``trainer_state.json``,
    else DeepSpeed's ``global_steps``)."""
    file = model_states_file(directory, label=label)
    obj = load_torch(file, trust=trust, label=label, mmap=True)
    module = obj.get("module") if isinstance(obj, Mapping) else None
    state = (
        {str(k): v for k, v in module.items() if isinstance(v, Tensor)}
        if isinstance(module, Mapping)
        else {}
    )
    if not state:
        raise InputError(
            f"{label} {file} holds no weights under 'module' (a pipeline-parallel checkpoint keeps "
            "them in layer_*-model_states.pt); save a state dict from the trained engine"
        )
    steps = obj.get("global_steps")
    training = trainer_record(directory) or {
        "tool": "deepspeed",
        "step": steps if isinstance(steps, int) else None,
        "epoch": None,
    }
    return file, strip_prefixes(state), training
