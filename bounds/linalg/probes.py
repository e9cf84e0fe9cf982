"""Random probes, and random draws keyed so that no result depends on how the work is split.

* :func:`rademacher` — independent ±1 entries, the probes of Hutchinson's trace estimator
  (Tr[A] = E[zᵀ A z], Hutchinson 1989) and of stochastic Lanczos quadrature.
* :func:`keyed_generator` — every random draw that belongs to one example, one noise vector or
  one probe is made from its own generator, seeded by a hash of a key: the key is a base drawn
  once from the caller's generator (:func:`base_key`) plus the global index of the thing drawn.
  Each process therefore draws exactly what a single process would draw for the same items,
  whatever the number of processes, the batch size or the chunking (the counter-based idea of
  Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011, with a cryptographic
  hash as the counter map).

Example:
    >>> import torch
    >>> a = torch.randn(3, generator=keyed_generator(7, "noise", 2))
    >>> b = torch.randn(3, generator=keyed_generator(7, "noise", 2))
    >>> bool((a == b).all())
    True
    >>> rademacher((2, 3), generator=keyed_generator(7), like=a).abs().sum().item()
    6.0
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

DRAWS_VERSION = "keyed-v1"
"""Marker of how random draws are made (recorded in results: numbers change with it)."""


def rademacher(shape: Sequence[int], *, generator: torch.Generator, like: Tensor) -> Tensor:
    """Independent ±1 entries drawn on the CPU from ``generator`` as one byte each (the same
    stream as int64 draws), moved to ``like``'s device and only there widened to its dtype."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, dtype=torch.int8)
    return bits.to(like.device).to(like.dtype).mul_(2).sub_(1)


def keyed_generator(*key: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by a 63-bit BLAKE2b hash of ``key``."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    seed = int.from_bytes(digest, "little") & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def base_key(generator: torch.Generator) -> int:
    """One 62-bit draw from ``generator``: the base key of a family of keyed draws."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
