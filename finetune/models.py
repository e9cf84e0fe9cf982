"""Small networks for the embedded demo and the tests (model spec ``hessfine.finetune.models:digits_cnn``).

:func:`digits_cnn` is a CNN for scikit-learn's 8×8 handwritten digits::

    x (N, 1, 8, 8) ─ conv1 3×3 ─ bn1 ─ ReLU ─ conv2 3×3 ─ bn2 ─ ReLU ─ max-pool 2
                   ─ conv3 3×3 ─ ReLU ─ global average pool ─ head (Linear)

Everything after each weight layer is piecewise linear in eval mode (ReLU, max-pool, eval-mode
BatchNorm, average pooling), so every per-layer Hessian block of the cross-entropy loss equals its
Gauss–Newton part and is PSD (SPEC §1.2). The classifier is the Linear layer named ``head``, so a
model with another number of classes differs from a pretrained one in ``head.*`` only.

Example:
    >>> import torch
    >>> net = digits_cnn(num_classes=10, width=8)
    >>> net(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    >>> net(torch.zeros(5, 64)).shape  # flat 64-pixel rows are reshaped to 1×8×8
    torch.Size([5, 10])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """conv→BN→ReLU, conv→BN→ReLU, max-pool, conv→ReLU, global average pool, Linear ``head``."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if num_classes < 2 or width < 1:
            raise ValueError(
                f"digits_cnn needs num_classes ≥ 2 and width ≥ 1, got {num_classes}, {width}"
            )
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


def digits_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A :class:`DigitsCNN` for 1×8×8 inputs (or flat rows of 64 pixels), randomly initialised."""
    return DigitsCNN(num_classes=num_classes, width=width)
