"""Small networks for the embedded demo and the tests (model specs
``hessfine.finetune.digit_networks:digits_cnn`` and ``hessfine.finetune.digit_networks:digits_resnet``).

:func:`digits_resnet` is the demo's network: a small residual CNN (He et al., "Deep residual
learning for image recognition", CVPR 2016) for 1×28×28 digit images with ten weight layers,
each followed by BatchNorm::

    x (N, 1, 28, 28) ─ stem conv 3×3 stride 2 ─ bn ─ ReLU                    14×14, w channels
                     ─ block1: [conv ─ bn ─ ReLU ─ conv ─ bn] + identity ─ ReLU     14×14, w
                     ─ block2: [conv s2 ─ bn ─ ReLU ─ conv ─ bn] + [conv 1×1 s2 ─ bn] ─ ReLU  7×7, 2w
                     ─ block3: [conv s2 ─ bn ─ ReLU ─ conv ─ bn] + [conv 1×1 s2 ─ bn] ─ ReLU  4×4, 4w
                     ─ global average pool ─ head (Linear)

Ten weight layers (nine convolutions and the head) are deep enough for the product of spectral
norms in the distance-based bounds of prior work to grow the way it does in the paper's
ResNets, while a 28×28 image still costs well under a megaflop at ``width=8``.

:func:`digits_cnn` is a CNN for scikit-learn's 8×8 handwritten digits::

    x (N, 1, 8, 8) ─ conv1 3×3 ─ bn1 ─ ReLU ─ conv2 3×3 ─ bn2 ─ ReLU ─ max-pool 2
                   ─ conv3 3×3 ─ ReLU ─ global average pool ─ head (Linear)

Everything after each weight layer is piecewise linear in eval mode (ReLU, max-pool, eval-mode
BatchNorm, average pooling), so every per-layer Hessian block of the cross-entropy loss equals its
Gauss–Newton part and is PSD (docs/mathematics.md, "Computing the quantities fast and exactly"); the
residual additions of :func:`digits_resnet` are linear, so the same holds there. The classifier is
the Linear layer named ``head``, so a model with another number of classes differs from a pretrained
one in ``head.*`` only.

Example:
    >>> import torch
    >>> net = digits_cnn(num_classes=10, width=8)
    >>> net(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 10])
    >>> net(torch.zeros(5, 64)).shape  # flat 64-pixel rows are reshaped to 1×8×8
    torch.Size([5, 10])
    >>> resnet = digits_resnet(num_classes=10, width=4)
    >>> resnet(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
    >>> sum(m.weight.ndim >= 2 for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    10
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsCNN", "DigitsResNet", "digits_cnn", "digits_resnet"]


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


class _Block(nn.Module):
    """Basic residual block: conv─bn─ReLU─conv─bn plus the input (or its 1×1 strided projection
    with BatchNorm when the shape changes), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem conv, three residual blocks (widths w, 2w, 4w), global average pool, ``head``."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        if num_classes < 2 or width < 1:
            raise ValueError(
                f"digits_resnet needs num_classes ≥ 2 and width ≥ 1, got {num_classes}, {width}"
            )
        self.stem = nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = _Block(width, width, 1)
        self.block2 = _Block(width, 2 * width, 2)
        self.block3 = _Block(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.reshape(x.shape[0], 1, 28, 28)
        x = F.relu(self.bn(self.stem(x)))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean(dim=(2, 3)))


def digits_resnet(num_classes: int = 10, width: int = 8) -> nn.Module:
    """A :class:`DigitsResNet` for 1×28×28 inputs (or flat rows of 784 pixels), randomly
    initialised."""
    return DigitsResNet(num_classes=num_classes, width=width)
