"""GPU details of a measurement: full-precision matrix products, and batches that fit.

* TF32: on Ampere and later GPUs PyTorch may round float32 matrix-product inputs to TF32
  (10-bit mantissa); Hessian quantities are differences of nearly equal products, so the
  measurement turns TF32 off (:func:`full_precision`) and records ``"tf32": false``.
* CUDA out of memory: :func:`halving_batches` reruns a stage with half the batch size until it
  fits (down to one example), and the result records the batch size used. Per-example values
  and keyed draws (:mod:`hessfine.bounds.linalg.probes`) do not depend on the batch size, so
  the numbers are the same to round-off. ``reference-code`` is excluded: its batch size is part of
  its definition.

Example:
    >>> value, used = halving_batches(lambda size: size * 10, 32, allowed=True)
    >>> value, used
    (320, 32)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from hessfine.analysis.errors import InputError

T = TypeVar("T")


@contextmanager
def full_precision() -> Iterator[None]:
    """TF32 off for CUDA matrix products and cuDNN convolutions inside the block (restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def halving_batches(
    run: Callable[[int], T],
    batch_size: int,
    *,
    allowed: bool,
    on_retry: Callable[[int], None] | None = None,
) -> tuple[T, int]:
    """``run(batch_size)``, retried with half the batch size after each CUDA out-of-memory error.

    Returns the value and the batch size that worked. ``allowed=False`` (reference-code, or
    several processes whose shards are whole batches) turns the error into one clear line.
    """
    size = batch_size
    while True:
        try:
            return run(size), size
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not allowed or size == 1:
                why = (
                    "even at batch size 1"
                    if allowed
                    else f"at --batch-size {size} (not reduced automatically here)"
                )
                raise InputError(
                    f"CUDA ran out of memory {why}; select fewer --layers, lower "
                    "--batch-size or --lanczos-steps, or use --device cpu"
                ) from None
            size = (size + 1) // 2
            if on_retry is not None:
                on_retry(size)
