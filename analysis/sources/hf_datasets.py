"""Hugging Face ``datasets`` directories (``Dataset.save_to_disk``) as data
(docs/inputs.md, "Hugging Face datasets directories").

A spec is ``DIR`` (a ``Dataset``: ``state.json`` and ``dataset_info.json``) or ``DIR:SPLIT`` (one
split of a ``DatasetDict``: ``dataset_dict.json``). Inputs are the columns ``input_columns``
(``--input-columns``; default: ``input_ids`` and ``attention_mask``, those present), labels the
column ``label_column`` (``--label-column``; default ``label``, else ``labels``). One input column
gives a tensor ``x`` (passed to the model positionally), several a dict keyed by column name.

Ragged list columns (tokenised text of different lengths) are right-padded to the longest row:
``input_ids`` with ``pad_token_id`` (the model config's, which is required then), label
sequences with −100 (ignored by the loss), every other column with 0; when ``input_ids`` needed
padding and no ``attention_mask`` is among the inputs, one is added (1 on tokens, 0 on padding).
Padding is one vectorised scatter over the flattened column, not a loop over rows.

Raw text and image columns are turned into inputs by the model's own tokenizer or image processor
in :mod:`hessfine.analysis.sources.processors`, which opens the directory with
:func:`open_dataset` and reads the labels with :func:`read_labels`.

Example:
    >>> import numpy as np
    >>> _pad(np.array([1, 2, 3, 4, 5]), np.array([3, 2]), value=0).tolist()
    [[1, 2, 3], [4, 5, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hessfine.analysis.errors import InputError
from hessfine.analysis.sources.files import one_line
from torch import Tensor

DATASET_FILES = ("state.json", "dataset_info.json")
DICT_FILE = "dataset_dict.json"
DEFAULT_INPUTS = ("input_ids", "attention_mask")
DEFAULT_LABELS = ("label", "labels")
_ZERO_PADDED = ("attention_mask", "token_type_ids")


def is_dataset_spec(spec: str) -> bool:
    """Whether ``spec`` names a ``save_to_disk`` directory, or ``DIR:SPLIT`` of a DatasetDict."""
    directory, split = _split(spec)
    if split is not None:
        return (directory / DICT_FILE).is_file()
    return _is_dataset(directory) or (directory / DICT_FILE).is_file()


def read_dataset(
    spec: str,
    *,
    input_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    pad_token_id: int | None = None,
    label: str = "--data",
) -> tuple[Tensor | dict[str, Tensor], Tensor]:
    """``(x, y)`` from a ``datasets`` directory (module docs)."""
    return dataset_tensors(
        open_dataset(spec, label),
        input_columns=input_columns,
        label_column=label_column,
        pad_token_id=pad_token_id,
        spec=spec,
        label=label,
    )


def dataset_tensors(
    loaded: Any,
    *,
    input_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    pad_token_id: int | None = None,
    spec: str,
    label: str = "--data",
    labels_optional: bool = False,
) -> tuple[Tensor | dict[str, Tensor], Tensor | None]:
    """``(x, y)`` from a ``datasets.Dataset`` (module docs); ``spec`` names it in messages.

    ``labels_optional``: without a label column ``y`` is None (a causal language model's
    labels are then its inputs)."""
    columns = list(loaded.column_names)
    inputs = list(input_columns or [c for c in DEFAULT_INPUTS if c in columns])
    target = label_column or default_label_column(columns)
    missing = [c for c in [*inputs, target] if c not in columns and c is not None]
    if not inputs or (target is None and not labels_optional) or missing:
        what = f"column {missing[0]!r}" if missing and missing[0] else "input or label columns"
        raise InputError(
            f"{label} {spec}: no {what} (columns: {', '.join(columns)}); name them with "
            "--input-columns COL... and --label-column COL (raw text or images: --text-column "
            "COL or --image-column COL)"
        )
    table = loaded.with_format("arrow")[:]
    x: dict[str, Tensor] = {}
    lengths = None
    for name in inputs:
        x[name], ragged = _column(table.column(name), name, pad_token_id, spec, label)
        if name == "input_ids" and ragged is not None:
            lengths = ragged
    if lengths is not None and "attention_mask" not in x:
        x["attention_mask"] = (torch.arange(x["input_ids"].shape[1]) < lengths[:, None]).long()
    y = None if target is None else read_labels(loaded, target, spec, label)
    return (next(iter(x.values())) if len(x) == 1 else x), y


def open_dataset(spec: str, label: str) -> Any:
    """The ``datasets.Dataset`` that ``spec`` names: the directory's, or one split of its
    DatasetDict."""
    import datasets

    directory, split = _split(spec)
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as err:  # unreadable or foreign files: the user's to fix
        raise InputError(
            f"{label} {spec}: cannot read the datasets directory ({one_line(err)[:300]}); "
            "write it again with save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = ", ".join(loaded)
        if split is None or split not in loaded:
            raise InputError(
                f"{label} {spec}: a DatasetDict with splits {names}; pass {directory}:SPLIT"
            )
        return loaded[split]
    if split is not None:
        raise InputError(
            f"{label} {spec}: {directory} holds one Dataset, not splits; drop :{split}"
        )
    return loaded


def default_label_column(columns: Sequence[str]) -> str | None:
    """The first of ``label`` and ``labels`` among ``columns``."""
    return next((c for c in DEFAULT_LABELS if c in columns), None)


def read_labels(dataset: Any, column: str, spec: str, label: str) -> Tensor:
    """The ``column`` of ``dataset`` as labels; ragged label sequences right-padded with −100."""
    y, _ = _column(dataset.with_format("arrow")[:].column(column), column, -100, spec, label)
    return y


def _split(spec: str) -> tuple[Path, str | None]:
    path = Path(spec).expanduser()
    if path.exists():
        return path, None
    head, sep, tail = spec.rpartition(":")
    return (Path(head).expanduser(), tail) if sep and head and tail else (path, None)


def _is_dataset(directory: Path) -> bool:
    return all((directory / name).is_file() for name in DATASET_FILES)


def _column(
    column: Any, name: str, pad: int | None, spec: str, label: str
) -> tuple[Tensor, Tensor | None]:
    """A column as a tensor, and the row lengths when it was ragged and got padded."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if column.null_count:
        raise InputError(f"{label} {spec}: column {name!r} has missing values; fill or drop them")
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column)
        if not (pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type)):
            values = flat.to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths == lengths[0]).all():
                return _tensor(
                    values.reshape(len(lengths), int(lengths[0])), name, spec, label
                ), None
            fill = 0 if name in _ZERO_PADDED else pad
            if fill is None:
                raise InputError(
                    f"{label} {spec}: column {name!r} has rows of different lengths and the model "
                    "config has no pad_token_id; pad the rows, or set pad_token_id in config.json"
                )
            padded = _pad(values, lengths, value=fill)
            return _tensor(padded, name, spec, label), torch.from_numpy(lengths.astype(np.int64))
        try:
            array = np.asarray(column.to_pylist())
        except ValueError as err:
            raise InputError(
                f"{label} {spec}: column {name!r} has nested rows of different shapes "
                f"({one_line(err)}); store equally shaped rows"
            ) from None
    else:
        array = column.to_numpy(zero_copy_only=False)
    return _tensor(array, name, spec, label), None


def _pad(values: np.ndarray, lengths: np.ndarray, *, value: int) -> np.ndarray:
    """Rows of ``lengths`` from the flat ``values``, right-padded with ``value``."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = np.full((len(lengths), int(lengths.max(initial=0))), value, dtype=values.dtype)
    out[rows, np.arange(len(values)) - starts] = values
    return out


def _tensor(array: np.ndarray, name: str, spec: str, label: str) -> Tensor:
    if array.dtype.kind in "biu":
        return torch.from_numpy(np.array(array)).long()
    if array.dtype.kind == "f":
        return torch.from_numpy(np.array(array)).float()
    raise InputError(
        f"{label} {spec}: column {name!r} holds {array.dtype} values, not numbers; choose "
        "numeric columns with --input-columns/--label-column (raw text: --text-column COL)"
    )
