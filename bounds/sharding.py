"""Work split across processes, and random draws keyed so that no result depends on the split.

A measurement over N examples can be shared by W processes (``torchrun``): process r holds the
batches j ≡ r (mod W) of the example stream, each of ``batch_size`` examples, so its local batch j
starts at the global example index (j·W + r)·B. The estimators of :mod:`hessfine.bounds` take an
optional :class:`Shard` describing this split and its ``all_sum`` (the sum of a tensor over all
processes, e.g. ``torch.distributed.all_reduce``); bounds itself never talks to other processes.

Every random draw that belongs to one example, one noise vector or one probe is made from its own
generator, seeded by a hash of a key (:func:`keyed_generator`): the key is a base drawn once from
the caller's generator plus the global index of the thing drawn. Each process therefore draws
exactly what a single process would draw for the same items, whatever the number of processes,
the batch size or the chunking (the counter-based idea of Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011, with a cryptographic hash as the counter map).

Example:
    >>> import torch
    >>> a = torch.randn(3, generator=keyed_generator(7, "noise", 2))
    >>> b = torch.randn(3, generator=keyed_generator(7, "noise", 2))
    >>> bool((a == b).all())
    True
    >>> batches = [(torch.zeros(4, 2), torch.zeros(4)), (torch.zeros(3, 2), torch.zeros(3))]
    >>> [start for start, _ in Shard(rank=1, world_size=2, batch_size=4).indexed(batches)]
    [4, 12]
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from hessfine.bounds.functional import Batch
from torch import Tensor

DRAWS_VERSION = "keyed-v1"
"""Marker of how random draws are made (recorded in results: numbers change with it)."""


def keyed_generator(*key: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by a 63-bit BLAKE2b hash of ``key``."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def base_key(generator: torch.Generator) -> int:
    """One 62-bit draw from ``generator``: the base key of a family of keyed draws."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


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
