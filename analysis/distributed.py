"""One measurement on many processes: ``torchrun ... hessfine measure``
(docs/inputs.md, "Many processes (torchrun)").

Under ``torchrun --nproc-per-node K --no-python hessfine measure ...`` (or ``--nnodes N`` with a
rendezvous) every process runs the same command; :func:`detect` reads torchrun's environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and joins PyTorch's process group (gloo on the CPU,
NCCL on CUDA, each process on ``cuda:LOCAL_RANK``). Process r then holds the batches j ≡ r (mod K)
of every example stream (:class:`hessfine.bounds.linalg.sharding.Shard`); sums and counts are
added with ``all_reduce``, per-process results are gathered (:meth:`Context.gather`) and merged
by their types (maxima with their global example index, :mod:`hessfine.bounds.estimates`), and
every random draw is keyed by its global index, so the result equals the single-process result
to round-off. Rank 0 writes it and records ``world_size``.

Example:
    >>> ctx = detect("cpu")   # no torchrun environment here: one process
    >>> ctx.world_size, ctx.rank, list(ctx.local(range(5)))
    (1, 0, [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from hessfine.analysis.errors import InputError
from hessfine.analysis.model_specs import resolve_device
from hessfine.bounds.linalg.sharding import Shard
from torch import Tensor

T = TypeVar("T")

_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Context:
    """This process's place among the processes of one run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Whether several processes share the work."""
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes results and prints."""
        return self.rank == 0

    def alone(self) -> Context:
        """The same process working alone (a directory of runs spread over ranks)."""
        return replace(self, rank=0, world_size=1)

    def local(self, items: Iterable[T]) -> Iterator[T]:
        """This process's items of a stream: j ≡ rank (mod world_size)."""
        return itertools.islice(items, self.rank, None, self.world_size)

    def shard(self, batch_size: int) -> Shard:
        """The :class:`Shard` handed to :mod:`hessfine.bounds` estimators."""
        if not self.active:
            return Shard()
        return Shard(self.rank, self.world_size, batch_size, self.all_sum)

    def all_sum(self, tensor: Tensor) -> Tensor:
        """Σ over processes of ``tensor`` (same device and dtype as the input)."""
        if not self.active:
            return tensor
        work = tensor.detach().to(self._comm_device()).clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def max(self, value: float) -> float:
        """max over processes of a number."""
        if not self.active:
            return value
        work = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return float(work[0])

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def from_writer(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process."""
        return self.gather(obj)[0]

    def close(self) -> None:
        """Leave the process group."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def joined(device: torch.device) -> Context:
    """This process's place in the process group its program already joined (a distributed
    training's), or one process when there is none; collectives run on ``device`` under NCCL.

    A measurement inside training (the callbacks of :mod:`hessfine.integrations`) runs on every
    rank at the same point, so each computes its share as under ``torchrun``; rank 0 writes.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return Context(device=device)
    return Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        backend=str(dist.get_backend()),
    )


def detect(device: str) -> Context:
    """The torchrun context (joining its process group), or one process when not under torchrun.

    ``device`` is the ``--device`` option: under torchrun ``auto`` and ``cuda`` mean
    ``cuda:LOCAL_RANK`` when CUDA is available, and the backend is NCCL on CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                "use --nproc-per-node at most the number of GPUs per node"
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = resolve_device(device)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        options: dict[str, Any] = {"backend": backend, "timeout": _TIMEOUT}
        if backend == "nccl":
            options["device_id"] = chosen
        dist.init_process_group(**options)
    return Context(rank=rank, world_size=world, device=chosen, backend=backend)
