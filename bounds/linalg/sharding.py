"""Work split across processes: one process's share of a batch stream and the sum over all.

A measurement over N examples can be shared by W processes (``torchrun``): process r holds the
batches j ≡ r (mod W) of the example stream, each of ``batch_size`` examples, so its local batch j
starts at the global example index (j·W + r)·B. The estimators of :mod:`hessfine.bounds` take an
optional :class:`Shard` describing this split and its ``all_sum`` (the sum of a tensor over all
processes, e.g. ``torch.distributed.all_reduce``); bounds itself never talks to other processes.
Random draws are keyed by the global index of what they draw for
(:mod:`hessfine.bounds.linalg.probes`), so that results do not depend on the split.

Example:
    >>> import torch
    >>> batches = [(torch.zeros(4, 2), torch.zeros(4)), (torch.zeros(3, 2), torch.zeros(3))]
    >>> [start for start, _ in Shard(rank=1, world_size=2, batch_size=4).indexed(batches)]
    [4, 12]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from hessfine.bounds.functional import Batch
from torch import Tensor


@dataclass(frozen=True)
class Shard:
    """This process's share of a batch stream and the sum over processes.

    ``rank`` and ``world_size`` say which batches are local (j ≡ rank mod world_size of the
    global stream); ``batch_size`` is the global stream's batch size (every batch but the last
    is full), needed only when ``world_size`` > 1. ``all_sum`` returns the elementwise sum of a
    tensor over all processes (identity for one process).
    """

    rank: int = 0
    world_size: int = 1
    batch_size: int | None = None
    all_sum: Callable[[Tensor], Tensor] | None = None

    def sum(self, tensor: Tensor) -> Tensor:
        """Σ over processes of ``tensor`` (``tensor`` itself for one process)."""
        return tensor if self.all_sum is None else self.all_sum(tensor)

    def total(self, value: float) -> float:
        """Σ over processes of a number (computed in float64)."""
        return float(self.sum(torch.tensor([float(value)], dtype=torch.float64))[0])

    def indexed(self, batches: Iterable[Batch]) -> Iterator[tuple[int, Batch]]:
        """(global index of the batch's first example, batch) for every local batch."""
        if self.world_size == 1:
            start = 0
            for batch in batches:
                yield start, batch
                start += int(batch[1].shape[0])
            return
        if self.batch_size is None:
            raise ValueError("a Shard over several processes needs the global batch_size")
        for j, batch in enumerate(batches):
            yield (j * self.world_size + self.rank) * self.batch_size, batch


LOCAL = Shard()
"""The whole stream in this process."""
