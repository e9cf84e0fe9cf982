"""Run directories: fine-tune once and write everything the analysis needs
(docs/finetune.md, "Run directories").

Layout of a run directory::

    DIR/hessfine.json            manifest (format "hessfine-run/1"), rewritten atomically
    DIR/epoch_001.safetensors    full state dict (parameters and buffers) after epoch 1, ...
    DIR/metrics.csv              one row per finished epoch, columns METRIC_COLUMNS (incl. lr)
    DIR/labels.csv               index, clean and noisy training label of every example

Checkpoints are written for every epoch that is a multiple of ``config.save_every``, for the last
epoch of a run that trains all ``config.epochs``, and for the best validation epoch of
``early-stopping`` (recorded as ``best_epoch``). Each file is written to a hidden temporary name
and renamed, and the manifest is rewritten after every saved checkpoint with ``"complete":
false`` until the run ends, so an interrupted run leaves only whole files and a manifest that
says so. The analysis reads a checkpoint file's manifest from its directory.

Manifest fields: ``format``, ``model`` (spec), ``model_kwargs``, ``reference`` (the pretrained
checkpoint, relative to the run directory when it exists on disk), ``head_reference`` (null: a new
head's reference is zero — also the centre of its distance constraint), ``method``, ``seed``,
``config`` (every :class:`~hessfine.finetune.methods.FinetuneConfig` field), ``data`` (caller's
description — with ``held_out_indices``, the examples of the training data file held out as a
selection's validation split and not trained on, which ``hessfine measure`` leaves out — plus
``n_train`` (the examples trained on), ``n_eval`` and ``validation_indices``), ``label_noise``
(``kind`` — symmetric, pair or matrix —, ``rate`` (null for a matrix), ``confusion_matrix``, and
from the CLI ``seed``, ``flipped_fraction`` and, for a matrix file, ``matrix_file`` and
``matrix_sha256``; or null), ``confusion_used`` (the F
of the consistent loss and its ``source``, ``given`` or ``dual-t``, or null), ``selection`` (how
the hyperparameters were chosen on a validation split — ``rule``, ``grid``, ``validation``,
``scores``, ``choice``, and ``taken_from`` where the choice was made for another run —, or null;
:mod:`hessfine.finetune.selection`), ``radii``
(per-layer ball radii of the constrained methods, or null), ``checkpoints`` (``[{"file",
"epoch"}]``), ``best_epoch``, ``epochs_run``, ``complete``, ``metrics``, ``labels`` and
``provenance`` (versions and a UTC timestamp).

Example:
    >>> import tempfile, torch
    >>> from hessfine.finetune.methods import FinetuneConfig
    >>> from hessfine.finetune.digit_networks import digits_cnn
    >>> _ = torch.manual_seed(0)
    >>> net = digits_cnn(width=4)
    >>> x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run = finetune_run(net, net.state_dict(), train_x=x, train_y_noisy=y, train_y_clean=y,
    ...                        eval_x=x, eval_y=y, config=FinetuneConfig("plain", epochs=2),
    ...                        out_dir=tmp, model_spec="hessfine.finetune.digit_networks:digits_cnn",
    ...                        model_kwargs={"width": 4}, reference_path="ref.safetensors")
    ...     [p.name for p in run.checkpoints], run.manifest["complete"]
    (['epoch_001.safetensors', 'epoch_002.safetensors'], True)
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from hessfine.finetune.methods import METRIC_COLUMNS, FinetuneConfig, finetune
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "FORMAT",
    "LABELS_FILE",
    "MANIFEST",
    "METRICS_FILE",
    "RunResult",
    "checkpoint_name",
    "finetune_run",
    "read_run",
]

FORMAT = "hessfine-run/1"
MANIFEST = "hessfine.json"
METRICS_FILE = "metrics.csv"
LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class RunResult:
    """A written run directory: its checkpoints (in epoch order), metrics rows and manifest."""

    directory: Path
    checkpoints: list[Path]
    metrics: list[dict[str, Any]]
    manifest: dict[str, Any]


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint after ``epoch`` (1-based): ``epoch_001.safetensors``."""
    return f"epoch_{epoch:03d}.safetensors"


def _epoch_of(path: Path) -> int:
    return int(path.name.removeprefix("epoch_").removesuffix(".safetensors"))


def _write_atomic(path: Path, data: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    _write_atomic(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow("" if row.get(c) is None else row[c] for c in columns)
    _write_atomic(path, buffer.getvalue().encode("utf-8"))


def _save_state(path: Path, state: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _relative_reference(reference_path: str, directory: Path) -> str:
    given = Path(reference_path).expanduser()
    if not given.exists():
        return reference_path
    try:
        return os.path.relpath(given.resolve(), directory.resolve())
    except ValueError:  # another drive on Windows
        return str(given.resolve())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _provenance() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        hessfine_version = version("hessfine")
    except PackageNotFoundError:
        hessfine_version = "unknown"
    return {
        "hessfine_version": hessfine_version,
        "torch_version": torch.__version__,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _prepare(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise InputError(f"--out {directory}: exists and is not a directory; choose another path")
    directory.mkdir(parents=True, exist_ok=True)
    old = [directory / MANIFEST, directory / METRICS_FILE, directory / LABELS_FILE]
    old = [p for p in old if p.exists()] + sorted(directory.glob("epoch_*.safetensors"))
    if old and not overwrite:
        raise InputError(
            f"--out {directory}: already holds a run ({old[0].name}); choose an empty directory "
            "or pass --overwrite"
        )
    for path in old:
        path.unlink()


def finetune_run(
    model: nn.Module,
    reference_state: Mapping[str, Tensor],
    *,
    train_x: Tensor,
    train_y_noisy: Tensor,
    train_y_clean: Tensor,
    eval_x: Tensor | None,
    eval_y: Tensor | None,
    config: FinetuneConfig,
    out_dir: str | Path,
    model_spec: str,
    model_kwargs: Mapping[str, Any],
    reference_path: str,
    data: Mapping[str, Any] | None = None,
    label_noise: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    selection: Mapping[str, Any] | None = None,
) -> RunResult:
    """Fine-tune ``model`` (see :func:`hessfine.finetune.methods.finetune`) and write the run directory.

    ``reference_state`` uses the model's state-dict names; entries with matching shapes are loaded
    into the model before training (a new head keeps its initialisation). ``data`` describes the
    data (e.g. ``{"train": "digits:train", "eval": "digits:test"}``); ``label_noise`` the noise
    applied to ``train_y_noisy`` (``{"kind", "rate", "confusion_matrix"}``) or None;
    ``selection`` how ``config``'s hyperparameters were chosen (the ``to_json`` or ``reused``
    entry of a :class:`hessfine.finetune.selection.Selection`) or None. An ``out_dir`` that
    already holds a run raises :class:`InputError` unless ``overwrite``.
    """
    directory = Path(out_dir).expanduser()
    n_train = len(train_x)
    if len(train_y_noisy) != n_train or len(train_y_clean) != n_train:
        raise InputError(
            f"training data: {n_train} inputs but {len(train_y_noisy)} noisy and "
            f"{len(train_y_clean)} clean labels; give one label of each per input"
        )
    _prepare(directory, overwrite)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model": model_spec,
        "model_kwargs": _jsonable(dict(model_kwargs)),
        "reference": _relative_reference(reference_path, directory),
        "head_reference": None,
        "method": config.method,
        "seed": config.seed,
        "config": config.to_dict(),
        "data": {
            **_jsonable(dict(data or {})),
            "n_train": n_train,
            "n_eval": None if eval_x is None else len(eval_x),
        },
        "label_noise": None if label_noise is None else _jsonable(dict(label_noise)),
        "confusion_used": None,
        "selection": None if selection is None else _jsonable(dict(selection)),
        "radii": None,
        "checkpoints": [],
        "best_epoch": None,
        "epochs_run": 0,
        "complete": False,
        "metrics": METRICS_FILE,
        "labels": LABELS_FILE,
        "provenance": _provenance(),
    }
    _write_json(directory / MANIFEST, manifest)
    labels = [
        {"index": i, "clean": c, "noisy": z}
        for i, (c, z) in enumerate(zip(train_y_clean.tolist(), train_y_noisy.tolist(), strict=True))
    ]
    _write_csv(directory / LABELS_FILE, ("index", "clean", "noisy"), labels)

    checkpoints: list[Path] = []
    rows: list[dict[str, Any]] = []

    def save(epoch: int, state: Mapping[str, Tensor]) -> None:
        path = directory / checkpoint_name(epoch)
        _save_state(path, state, {"format": FORMAT, "epoch": str(epoch), "method": config.method})
        checkpoints.append(path)
        checkpoints.sort(key=_epoch_of)
        manifest["checkpoints"] = [{"file": p.name, "epoch": _epoch_of(p)} for p in checkpoints]
        _write_json(directory / MANIFEST, manifest)

    def on_epoch(epoch: int, trained: nn.Module, row: dict[str, Any]) -> None:
        rows.append(dict(row))
        manifest["epochs_run"] = epoch
        _write_csv(directory / METRICS_FILE, METRIC_COLUMNS, rows)
        if epoch % config.save_every == 0 or epoch == config.epochs:
            save(epoch, trained.state_dict())
        else:
            _write_json(directory / MANIFEST, manifest)

    result = finetune(
        model,
        reference_state,
        train_x=train_x,
        train_y=train_y_noisy,
        train_y_clean=train_y_clean,
        eval_x=eval_x,
        eval_y=eval_y,
        config=config,
        on_epoch=on_epoch,
    )
    if result.best_epoch is not None and result.best_state is not None:
        if not (directory / checkpoint_name(result.best_epoch)).exists():
            save(result.best_epoch, result.best_state)
        manifest["data"]["validation_indices"] = result.validation_indices
    manifest["best_epoch"] = result.best_epoch
    manifest["radii"] = result.radii
    if result.confusion is not None:
        manifest["confusion_used"] = {
            "source": result.confusion_source,
            "matrix": result.confusion,
            "rule": result.confusion_rule,
        }
    manifest["complete"] = True
    _write_json(directory / MANIFEST, manifest)
    return RunResult(directory, list(checkpoints), rows, manifest)


def read_run(directory: str | Path) -> RunResult:
    """Read back a run directory written by :func:`finetune_run` (manifest and metrics).

    Metric values are floats (``epoch`` an int) and empty cells None.
    """
    directory = Path(directory).expanduser()
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable run manifest ({err}); check the path") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} manifest; point at a finetune run directory")
    rows: list[dict[str, Any]] = []
    metrics = directory / METRICS_FILE
    if metrics.is_file():
        with metrics.open(newline="", encoding="utf-8") as file:
            for raw in csv.DictReader(file):
                row: dict[str, Any] = {k: (None if v == "" else float(v)) for k, v in raw.items()}
                row["epoch"] = int(row["epoch"])
                rows.append(row)
    checkpoints = [directory / entry["file"] for entry in manifest.get("checkpoints", [])]
    return RunResult(directory, checkpoints, rows, manifest)
