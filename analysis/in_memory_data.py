"""Data in memory as a measurement's data: DataLoaders, datasets, tensors.

:func:`object_data` turns what a Python caller holds into the
:class:`~hessfine.analysis.labeled_data.LabeledData` that files give
(:func:`hessfine.analysis.data.load_data`):

- a pair ``(x, y)``: ``x`` a tensor or a dict of tensors (``input_ids``, ``attention_mask``,
  …), ``y`` the labels (``None`` for a causal language model: its inputs);
- a ``datasets.Dataset``: its columns that the model's ``forward`` takes (as the Trainer passes
  them; else its only column besides the labels, passed positionally) and the label column
  ``label`` or ``labels``, ragged rows right-padded
  (:func:`hessfine.analysis.sources.hf_datasets.dataset_tensors`);
- a map-style ``torch.utils.data.Dataset`` (``len`` and indexing; a list too): its examples in
  index order;
- a ``DataLoader`` or any other iterable of batches: every batch, in iteration order; the data
  is then :attr:`~hessfine.analysis.labeled_data.LabeledData.iterated`, so the Hessian examples
  are its first N, not a sample;
- a path or spec string: :func:`~hessfine.analysis.data.load_data`.

An example or a batch is a pair ``(inputs, labels)`` (a list or tuple) or a Hugging Face-style
dict whose ``labels`` (else ``label``) entry holds the labels and whose entries named as the
model's ``forward`` arguments are its inputs (an only other entry is the positional input);
``-100`` marks ignored tokens of a causal LM. Examples and batches are gathered into
tensors: sequences of different lengths are right-padded, ``input_ids`` (and every input but
``attention_mask`` and ``token_type_ids``, which take 0) with the model's ``pad_token_id``,
label sequences with −100, and an ``attention_mask`` is added when ``input_ids`` needed padding
and none was given. The whole data is held in memory; :func:`sampled_data` reads only a fixed
sample of it (the training callbacks' examples). Iterating leaves torch's global random state as
it was (a shuffling ``DataLoader`` draws its order from it), so a training's order is unchanged.

Example:
    >>> import torch
    >>> batches = [{"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])},
    ...            {"input_ids": torch.ones(1, 5, dtype=torch.long), "labels": torch.tensor([2])}]
    >>> data = object_data(iter(batches), task="classification", label="data", pad_token_id=0)
    >>> data.x["input_ids"].shape, data.x["attention_mask"][0].tolist(), data.iterated
    (torch.Size([3, 5]), [1, 1, 1, 0, 0], True)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hessfine.analysis.data import Task, checked_data, load_data
from hessfine.analysis.labeled_data import LabeledData
from hessfine.analysis.sampling import stratified_sample
from hessfine.analysis.sources.hf_datasets import DEFAULT_LABELS, dataset_tensors, read_labels
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

__all__ = ["IN_MEMORY", "object_data", "sampled_data"]

IN_MEMORY = "<in-memory>"
"""What ``measurement.json`` records in place of a path for an object held in memory."""

LABEL_KEYS = ("labels", "label")
"""The entries of a dict example or batch that hold its labels, the first present."""

_ZERO_PADDED = ("attention_mask", "token_type_ids")


def object_data(
    data: Any,
    *,
    task: Task,
    label: str,
    pad_token_id: int | None = None,
    input_names: Collection[str] | None = None,
    image_size: int = 224,
) -> LabeledData:
    """Every example of ``data`` (module docs) as a :class:`LabeledData`.

    ``label`` names the argument in messages (``data``, ``eval_data``), ``pad_token_id`` pads
    ragged ``input_ids``, ``input_names`` (the model's ``forward`` arguments) choose the entries
    of dict examples and the columns of a ``datasets.Dataset`` that are inputs, and
    ``image_size`` applies to an ImageFolder path.
    """
    if isinstance(data, str | Path):
        return load_data(str(data), label=label, task=task, image_size=image_size)
    if _is_pair(data):
        return checked_data(IN_MEMORY, data[0], data[1], task=task, label=label)
    if _is_hf_dataset(data):
        return _hf_dataset(data, task, label, pad_token_id, input_names)
    if _indexable(data):
        return _gathered(
            (data[i] for i in range(len(data))), task, label, pad_token_id, input_names, False
        )
    if isinstance(data, Iterable):
        with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader draws from it
            gathered = _gathered(iter(data), task, label, pad_token_id, input_names, _batched(data))
        return replace(gathered, iterated=True)
    raise TypeError(
        f"{label}: expected a DataLoader, a Dataset, a datasets.Dataset, an (x, y) pair of "
        f"tensors or a path, got {type(data).__name__}"
    )


def sampled_data(
    data: Any,
    count: int,
    *,
    seed: int,
    task: Task,
    label: str,
    pad_token_id: int | None = None,
    input_names: Collection[str] | None = None,
) -> tuple[LabeledData, int | None]:
    """A fixed sample of ``count`` examples of ``data`` and the size of ``data`` (None when an
    iterable does not say).

    An indexable ``data`` gives the seeded class-stratified sample that ``measure`` draws
    (:func:`~hessfine.analysis.sampling.stratified_sample`): its labels are read first, then
    only the sampled examples; a ``DataLoader`` or iterable gives its first ``count`` examples
    in iteration order, and is read no further.
    """
    if _is_pair(data) or isinstance(data, str | Path):
        whole = object_data(data, task=task, label=label, pad_token_id=pad_token_id)
        return _stratified(whole, whole.y, count, seed), len(whole)
    if _is_hf_dataset(data):
        column = next((c for c in DEFAULT_LABELS if c in data.column_names), None)
        if column is None:
            indices = torch.arange(min(count, len(data)))
        else:
            labels = read_labels(data, column, IN_MEMORY, label)
            indices = stratified_sample(labels, count, generator=_generator(seed)).indices
        chosen = data.select(indices.tolist())
        return _hf_dataset(chosen, task, label, pad_token_id, input_names), len(data)
    if _indexable(data):
        labels = [_labels_of(data[i], label) for i in range(len(data))]
        indices = stratified_sample(_label_tensor(labels), count, generator=_generator(seed))
        examples = (data[int(i)] for i in indices.indices)
        chosen = _gathered(examples, task, label, pad_token_id, input_names, False)
        return chosen, len(data)
    batched = _batched(data)
    with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader draws from it
        stream = _first(iter(data), count, batched)
        chosen = _gathered(stream, task, label, pad_token_id, input_names, batched)
    first = chosen.subset(torch.arange(min(count, len(chosen))))
    return replace(first, iterated=True), _dataset_size(data)


def _batched(data: Iterable[Any]) -> bool:
    """Whether ``data`` yields batches: an iterable does, a DataLoader unless it has no batch
    sampler (``batch_size=None``)."""
    return not isinstance(data, DataLoader) or data.batch_sampler is not None


def _stratified(data: LabeledData, labels: Tensor, count: int, seed: int) -> LabeledData:
    if count >= len(data):
        return data
    return data.subset(stratified_sample(labels, count, generator=_generator(seed)).indices)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dataset_size(data: Any) -> int | None:
    """The number of examples of a DataLoader's (map-style) dataset, else None."""
    dataset = getattr(data, "dataset", None)
    try:
        return None if isinstance(dataset, IterableDataset) else len(dataset)
    except TypeError:
        return None


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], Tensor | Mapping)
        and (data[1] is None or isinstance(data[1], Tensor))
    )


def _is_hf_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("datasets.") and hasattr(data, "column_names")


def _indexable(data: Any) -> bool:
    if isinstance(data, DataLoader | IterableDataset):
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _hf_dataset(
    data: Any,
    task: Task,
    label: str,
    pad_token_id: int | None,
    input_names: Collection[str] | None,
) -> LabeledData:
    """A ``datasets.Dataset``: the numeric columns the model takes, padded (module docs)."""
    columns = [c for c in data.column_names if c not in DEFAULT_LABELS]
    chosen = _input_keys(columns, input_names)
    if not chosen:
        raise ValueError(
            f"{label}: no column the model takes (columns: {', '.join(data.column_names)}); "
            "name the inputs as forward's arguments"
        )
    x, y = dataset_tensors(
        data,
        input_columns=chosen,
        pad_token_id=pad_token_id,
        spec=IN_MEMORY,
        label=label,
        labels_optional=task == "causal-lm",
    )
    return checked_data(IN_MEMORY, x, y, task=task, label=label)


def _first(batches: Iterator[Any], count: int, batched: bool) -> Iterator[Any]:
    """The batches (or examples) of ``batches`` up to the one holding example ``count``."""
    seen = 0
    for batch in batches:
        yield batch
        seen += len(_labels_or_inputs(batch)) if batched else 1
        if seen >= count:
            return


def _labels_or_inputs(batch: Any) -> Tensor:
    """A tensor with one row per example of ``batch``."""
    inputs, labels = _parts(batch, "data", None)
    if isinstance(labels, Tensor):
        return labels
    return next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs


def _labels_of(example: Any, label: str) -> Any:
    return _parts(example, label, None)[1]


def _label_tensor(labels: list[Any]) -> Tensor:
    """Class labels of single examples (numbers or 0-D tensors) as one tensor; other labels (token
    sequences, none) as a tensor without classes, which is sampled uniformly."""
    if any(v is None for v in labels):
        return torch.zeros(len(labels), 0)
    values = [torch.as_tensor(v) for v in labels]
    if all(v.ndim == 0 for v in values):
        return torch.stack(values)
    return torch.zeros(len(values), 0)


def _parts(
    element: Any, label: str, input_names: Collection[str] | None
) -> tuple[Tensor | dict[str, Any], Any]:
    """``(inputs, labels)`` of one example or batch: a pair, or a dict with labels."""
    if isinstance(element, Mapping):
        key = next((k for k in LABEL_KEYS if k in element), None)
        labels = None if key is None else element[key]
        keys = [k for k, v in element.items() if k not in LABEL_KEYS and not _text(v)]
        chosen = _input_keys(keys, input_names)
        if not chosen:
            raise ValueError(
                f"{label}: a dict example has no entry the model takes (entries: "
                f"{', '.join(map(str, element))}); name the inputs as forward's arguments"
            )
        if input_names is not None and chosen[0] not in input_names:  # the only entry
            return element[chosen[0]], labels
        return {k: element[k] for k in chosen}, labels
    if isinstance(element, tuple | list) and len(element) == 2:
        return element[0], element[1]
    if isinstance(element, Tensor):
        return element, None
    raise TypeError(
        f"{label}: an example or batch must be an (inputs, labels) pair or a dict with "
        f"'labels', got {type(element).__name__}"
    )


def _input_keys(keys: list[str], input_names: Collection[str] | None) -> list[str]:
    """The entries (or columns) that are inputs: those named as forward's arguments, else the
    only one there is (the model's positional input)."""
    if input_names is None:
        return keys
    return [k for k in keys if k in input_names] or (keys if len(keys) == 1 else [])


def _text(value: Any) -> bool:
    """Whether ``value`` is text (a string, or a batch of them): not a model input."""
    if isinstance(value, list | tuple) and value:
        value = value[0]
    return isinstance(value, str)


def _gathered(
    elements: Iterable[Any],
    task: Task,
    label: str,
    pad_token_id: int | None,
    input_names: Collection[str] | None,
    batched: bool,
) -> LabeledData:
    """The examples of ``elements`` (batches, or single examples) as one padded data set."""
    inputs: dict[str, list[Tensor]] = {}
    labels: list[Tensor] = []
    plain = True
    count = 0
    for element in elements:
        x, y = _parts(element, label, input_names)
        plain = plain and isinstance(x, Tensor)
        for key, value in x.items() if isinstance(x, Mapping) else [("x", x)]:
            inputs.setdefault(key, []).append(_rows(value, batched))
        if y is not None:
            labels.append(_rows(y, batched))
        count += 1
    if count == 0:
        raise ValueError(f"{label}: no examples; pass data with at least one")
    if labels and len(labels) != count:
        raise ValueError(f"{label}: some examples have labels and others not; label every one")
    x = {key: _joined(parts, key, pad_token_id, label) for key, parts in inputs.items()}
    ids = inputs.get("input_ids")
    if ids is not None and "attention_mask" not in x and len({p.shape[1] for p in ids}) > 1:
        x["attention_mask"] = torch.cat(
            [_padded(torch.ones_like(p), x["input_ids"].shape[1], 0) for p in ids]
        )
    y = _joined(labels, "labels", -100, label) if labels else None
    return checked_data(IN_MEMORY, x["x"] if plain else x, y, task=task, label=label)


def _rows(value: Any, batched: bool) -> Tensor:
    """A batch's (or an example's) entry as a tensor with one row per example."""
    tensor = value if isinstance(value, Tensor) else torch.as_tensor(value)
    return tensor.detach().cpu() if batched else tensor.detach().cpu().unsqueeze(0)


def _joined(parts: list[Tensor], key: str, pad_token_id: int | None, label: str) -> Tensor:
    """The rows of ``parts`` in one tensor, sequences right-padded to the longest (module docs)."""
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) == 1:
        return torch.cat(parts)
    if len({(p.ndim, tuple(p.shape[2:])) for p in parts}) != 1 or parts[0].ndim < 2:
        raise ValueError(
            f"{label}: entry {key!r} has examples of shapes {sorted(shapes)}, which cannot be "
            "padded into one tensor; give equally shaped examples"
        )
    fill = 0 if key in _ZERO_PADDED else -100 if key == "labels" else pad_token_id
    if fill is None:
        raise ValueError(
            f"{label}: entry {key!r} has sequences of different lengths and the model config has "
            "no pad_token_id; pad them (e.g. a DataLoader with a padding collate_fn)"
        )
    length = max(p.shape[1] for p in parts)
    return torch.cat([_padded(p, length, fill) for p in parts])


def _padded(rows: Tensor, length: int, fill: int) -> Tensor:
    """``rows`` (N, T, …) right-padded along T to ``length`` with ``fill``."""
    pad = [0, 0] * (rows.ndim - 2) + [0, length - rows.shape[1]]
    return torch.nn.functional.pad(rows, pad, value=fill)
