"""Hugging Face ``Trainer`` output directories (docs/inputs.md, "Hugging Face Trainer").

``Trainer(args=TrainingArguments(output_dir))`` writes one ``checkpoint-N/`` per save: the model
(``model.safetensors`` or ``pytorch_model.bin`` with ``config.json``, or a PEFT adapter), the
optimizer, scheduler and RNG states, ``training_args.bin`` and ``trainer_state.json``. Every
``checkpoint-N/`` is one checkpoint; the other files are not, and a directory holding
``checkpoint-*/`` is a directory of runs even when ``trainer.save_model()`` also put the final
model at its top (measure that one by naming its ``model.safetensors``).

``trainer_state.json`` gives ``global_step`` and ``epoch`` (a float: fractions of an epoch, as the
Trainer counts them). Its ``log_history`` holds the training loss the Trainer logged every
``logging_steps`` and the ``eval_*`` metrics of each evaluation; :func:`trainer_record` takes the
entries at or nearest the checkpoint's step (ties go to the earlier step), leaving out run times
and throughputs.

Example:
    >>> logged_near([{"loss": 1.2, "step": 1}, {"loss": 0.9, "step": 3},
    ...              {"eval_loss": 1.0, "eval_runtime": 0.1, "step": 2}], 2)
    {'loss': 1.2, 'loss_step': 1, 'eval_loss': 1.0, 'eval_step': 2}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hessfine.analysis.sources.files import read_json_object

TRAINER_STATE = "trainer_state.json"
CHECKPOINT_DIR = re.compile(r"checkpoint-\d+")
_TIMINGS = ("_runtime", "_per_second")


def trainer_checkpoints(directory: Path, dirnames: Sequence[str]) -> list[str]:
    """The ``checkpoint-N`` sub-directories among ``dirnames`` of ``directory``."""
    return [d for d in dirnames if CHECKPOINT_DIR.fullmatch(d) and (directory / d).is_dir()]


def trainer_record(directory: Path) -> dict[str, Any]:
    """``{"tool", "step", "epoch", "logged"}`` from ``directory/trainer_state.json``, or ``{}``
    when the directory has none (not a Trainer checkpoint)."""
    path = directory / TRAINER_STATE
    if not path.is_file():
        return {}
    state = read_json_object(path, name=f"checkpoint {path}", fix="copy the checkpoint again")
    step = state.get("global_step")
    history = state.get("log_history")
    history = [e for e in history if isinstance(e, Mapping)] if isinstance(history, list) else []
    return {
        "tool": "transformers.Trainer",
        "step": step if isinstance(step, int) else None,
        "epoch": _number(state.get("epoch")),
        "logged": logged_near(history, step) if isinstance(step, int) else {},
    }


def logged_near(history: Sequence[Mapping[str, Any]], step: int) -> dict[str, Any]:
    """The training loss and the ``eval_*`` metrics logged at or nearest ``step``, each with the
    step it was logged at (``loss_step``, ``eval_step``)."""
    out: dict[str, Any] = {}
    train = [e for e in history if _number(e.get("loss")) is not None and _has_step(e)]
    if train:
        entry = min(train, key=lambda e: (abs(e["step"] - step), e["step"]))
        out["loss"], out["loss_step"] = float(entry["loss"]), entry["step"]
    evals = [e for e in history if _has_step(e) and any(k.startswith("eval_") for k in e)]
    if evals:
        entry = min(evals, key=lambda e: (abs(e["step"] - step), e["step"]))
        for key, value in entry.items():
            if key.startswith("eval_") and not key.endswith(_TIMINGS):
                number = _number(value)
                if number is not None:
                    out[key] = number
        out["eval_step"] = entry["step"]
    return out


def _has_step(entry: Mapping[str, Any]) -> bool:
    return isinstance(entry.get("step"), int)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
