"""The labelled data set every loader returns: :class:`LabeledData`.

Inputs held in memory (a tensor, or a dict of tensors for text models) or read lazily from a
``Dataset`` (an ImageFolder), with labels; batches come in file order, without
shuffling, and :meth:`LabeledData.subset` gives the examples of a sample
(:mod:`hessfine.analysis.sampling`) in the sample's order. :func:`hessfine.analysis.data.load_data`
and the built-in digit sets (:mod:`hessfine.analysis.digit_sets`) build it.

Example:
    >>> import torch
    >>> data = LabeledData("toy", torch.zeros(5, 3), torch.tensor([0, 1, 2, 1, 0]))
    >>> len(data), data.num_classes, len(data.subset(torch.tensor([4, 1])))
    (5, 3, 2)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from hessfine.analysis.errors import InputError
from hessfine.bounds.functional import Inputs, to_device
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["LabeledData"]


@dataclass(frozen=True, eq=False)
class LabeledData:
    """Inputs ``x`` (a tensor, a dict of tensors, or ``None`` when ``dataset`` reads them lazily)
    and labels ``y``, one row per example: int64 class labels (N,) or token labels (N, T),
    float32 targets (N, L) (:mod:`hessfine.analysis.tasks`); ``processor`` records the
    tokenizer or image processor that made the inputs from raw columns
    (:mod:`hessfine.analysis.sources.processors`), ``None`` for inputs read as stored.
    ``iterated``: the examples are in the order an iterable (a ``DataLoader``) yielded them, so
    the Hessian examples are the first N, not a sample."""

    name: str
    x: Tensor | dict[str, Tensor] | None
    y: Tensor
    dataset: Dataset | None = None
    processor: Mapping[str, Any] | None = None
    iterated: bool = False

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        """Largest label + 1."""
        return int(self.y.max()) + 1

    def subset(self, indices: Tensor) -> LabeledData:
        """The examples at ``indices`` (int64, in that order) as a data set of their own."""
        indices = indices.to(torch.int64).cpu()
        if self.dataset is not None:
            return replace(self, y=self.y[indices], dataset=Subset(self.dataset, indices.tolist()))
        if isinstance(self.x, Mapping):
            return replace(self, x={k: v[indices] for k, v in self.x.items()}, y=self.y[indices])
        return replace(self, x=self.x[indices], y=self.y[indices])

    def batches(
        self,
        batch_size: int,
        *,
        limit: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[Inputs, Tensor]]:
        """Batches ``(x, y)`` of the first ``limit`` examples (all when ``None`` or larger than
        the data) in file order. Floating inputs and labels are cast to ``dtype`` when given;
        everything is moved to ``device`` when given. Images of an ImageFolder are read batch by batch."""
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if limit is not None and limit < 1:
            raise InputError(f"--samples must be at least 1 (or 'all'), got {limit}")
        count = len(self) if limit is None else min(limit, len(self))
        return self._batches(batch_size, count, dtype, device)

    def _batches(
        self,
        batch_size: int,
        count: int,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> Iterator[tuple[Inputs, Tensor]]:
        target = "cpu" if device is None else device
        if self.dataset is not None:
            loader = DataLoader(
                Subset(self.dataset, range(count)),
                batch_size=batch_size,
                shuffle=False,
                num_workers=0,
            )
            for start, (x, _) in zip(range(0, count, batch_size), loader, strict=True):
                y = self.y[start : min(start + batch_size, count)]
                yield to_device(x, target, dtype), to_device(y, target, dtype)
            return
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            if isinstance(self.x, Mapping):
                x: Inputs = {k: v[start:stop] for k, v in self.x.items()}
            else:
                x = self.x[start:stop]
            yield to_device(x, target, dtype), to_device(self.y[start:stop], target, dtype)
