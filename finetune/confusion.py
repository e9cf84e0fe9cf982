"""Class-conditional label noise: generation, the consistent loss, and Dual-T estimation.

Noise model (docs/bounds.md, "Label noise"). The observed label of an example with clean label y is
z with probability F[y, z]; F is a row-stochastic k×k *confusion* (transition) matrix.

* :func:`symmetric_confusion` — F = (1−ρ)·I + ρ/(k−1)·(J − I): the stated rate ρ is the true
  probability that the label changes, spread evenly over the k−1 other classes.
* :func:`pair_flip_confusion` — y → (y+1) mod k with probability ρ (Han et al., "Co-teaching",
  NeurIPS 2018).
* :func:`load_confusion` — a given F from a ``.npy``, ``.csv`` or ``.pt`` file, checked.
* :func:`corrupt_labels` — draws z ~ F[y, ·] for every example at once.
* :func:`consistent_loss` — backward correction (Patrini et al., "Making deep neural networks
  robust to label noise: a loss correction approach", CVPR 2017):
  ℓ̄(f(x), z) = Σ_j (F⁻¹)[z, j]·ℓ(f(x), j). Since Σ_z F[y, z]·(F⁻¹)[z, j] = δ_{yj},
  E_{z~F[y]}[ℓ̄(f(x), z)] = ℓ(f(x), y): the corrected loss on noisy labels is unbiased for the
  clean loss. Its magnitude is at most max_row Σ_j |(F⁻¹)[row, j]| times the largest ℓ
  (:func:`correction_factor`), the factor that enters the noisy-label bound of Ju et al. (2022).
* :func:`estimate_confusion_dual_t` — the dual-T estimator (Yao et al., "Dual T: Reducing
  Estimation Error for Transition Matrix in Label-noise Learning", NeurIPS 2020, arXiv
  2006.07805), from the softmax outputs of a model trained on the noisy labels.

Example:
    >>> import torch
    >>> F_ = symmetric_confusion(3, 0.3)
    >>> F_[0].tolist()
    [0.7, 0.15, 0.15]
    >>> y = torch.zeros(10_000, dtype=torch.long)
    >>> z = corrupt_labels(y, F_, generator=torch.Generator().manual_seed(0))
    >>> round((z != y).double().mean().item(), 2)
    0.3
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from hessfine.bounds.functional import ConsistentCrossEntropy
from hessfine.bounds.generalization import consistent_loss_factor, noise_matrix_inverse
from torch import Tensor

__all__ = [
    "NoiseKind",
    "check_confusion",
    "consistent_loss",
    "correction_factor",
    "corrupt_labels",
    "estimate_confusion_dual_t",
    "inverse_confusion",
    "load_confusion",
    "noise_confusion",
    "pair_flip_confusion",
    "symmetric_confusion",
]

NoiseKind = Literal["symmetric", "pair"]

_ROW_TOLERANCE = 1e-6


def _check_rate(k: int, rate: float) -> None:
    if k < 2:
        raise ValueError(f"label noise needs at least 2 classes, got k={k}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")


def symmetric_confusion(k: int, rate: float) -> Tensor:
    """Symmetric noise: F[i, i] = 1 − rate and F[i, j] = rate/(k − 1) for j ≠ i (float64)."""
    _check_rate(k, rate)
    off = rate / (k - 1)
    matrix = torch.full((k, k), off, dtype=torch.float64)
    matrix.fill_diagonal_(1.0 - rate)
    return matrix


def pair_flip_confusion(k: int, rate: float) -> Tensor:
    """Pair flip: F[i, i] = 1 − rate and F[i, (i+1) mod k] = rate (float64)."""
    _check_rate(k, rate)
    matrix = torch.eye(k, dtype=torch.float64) * (1.0 - rate)
    rows = torch.arange(k)
    matrix[rows, (rows + 1) % k] += rate
    return matrix


def noise_confusion(kind: NoiseKind, k: int, rate: float) -> Tensor:
    """The confusion matrix of a named noise kind (``"symmetric"`` or ``"pair"``)."""
    if kind == "symmetric":
        return symmetric_confusion(k, rate)
    if kind == "pair":
        return pair_flip_confusion(k, rate)
    raise ValueError(f"unknown label-noise kind {kind!r}; use 'symmetric' or 'pair'")


def check_confusion(matrix: Tensor, k: int | None = None) -> Tensor:
    """``matrix`` as a float64 k×k row-stochastic tensor; ``ValueError`` if it is not one."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {tuple(matrix.shape)}")
    if k is not None and matrix.shape[0] != k:
        raise ValueError(
            f"confusion matrix is {matrix.shape[0]}×{matrix.shape[0]}, expected {k}×{k}"
        )
    if not torch.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("a confusion matrix must have finite, non-negative entries")
    sums = matrix.sum(dim=1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=_ROW_TOLERANCE, rtol=0.0):
        raise ValueError(f"confusion matrix rows must sum to 1, got sums {sums.tolist()}")
    return matrix


def load_confusion(path: str | Path, k: int | None = None) -> Tensor:
    """A confusion matrix F (F[y, z] = P(observed z | clean y)) read from a file, checked.

    Formats by suffix: ``.npy`` (a 2-D array, no pickles), ``.csv`` (k rows of k numbers separated
    by commas, no header), ``.pt`` (a tensor, loaded with ``weights_only=True``). The matrix must
    be k×k (``k`` the number of classes, when given), finite, non-negative, with rows summing to
    1 (within 1e-6): :func:`check_confusion`. Raises ``ValueError`` (or ``OSError`` for an
    unreadable file) with one line saying what is wrong.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "F.npy")
        ...     np.save(path, np.array([[0.9, 0.1], [0.25, 0.75]]))
        ...     load_confusion(path, 2).tolist()
        [[0.9, 0.1], [0.25, 0.75]]
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv", ".pt"):
        raise ValueError(f"unknown format {suffix or '(no suffix)'}; use .npy, .csv or .pt")
    try:
        if suffix == ".npy":
            matrix = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float64))
        elif suffix == ".csv":
            matrix = torch.from_numpy(np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Tensor):
                raise ValueError(f"holds a {type(loaded).__name__}, not a tensor")
            matrix = loaded.to(torch.float64)
    except (ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as err:
        first = " ".join(str(err).split())[:200]
        raise ValueError(f"cannot read a matrix ({first})") from None
    return check_confusion(matrix, k)


def corrupt_labels(y: Tensor, F: Tensor, *, generator: torch.Generator) -> Tensor:
    """Noisy labels z_n ~ F[y_n, ·], drawn for all examples at once (int64, on ``y``'s device).

    ``generator`` is a CPU :class:`torch.Generator`; the same seed gives the same labels.
    """
    matrix = check_confusion(F)
    y = torch.as_tensor(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor, got shape {tuple(y.shape)}")
    labels = y.long().cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() >= matrix.shape[0]):
        raise ValueError(f"labels must lie in 0..{matrix.shape[0] - 1}")
    if labels.numel() == 0:
        return labels.to(y.device)
    noisy = torch.multinomial(matrix[labels], 1, generator=generator).squeeze(1)
    return noisy.to(y.device)


def inverse_confusion(F: Tensor) -> Tensor:
    """F⁻¹ in float64, after checking that F is a confusion matrix; the one inverse of F
    (:func:`hessfine.bounds.generalization.noise_matrix_inverse`, which refuses a singular F)."""
    return noise_matrix_inverse(check_confusion(F))


def correction_factor(F: Tensor) -> float:
    """max_row Σ_j |(F⁻¹)[row, j]|: the consistent loss is at most this times max_j ℓ(f(x), j)."""
    return consistent_loss_factor(check_confusion(F))


def consistent_loss(
    logits: Tensor, noisy_y: Tensor, F: Tensor, *, inverse: Tensor | None = None
) -> Tensor:
    """Per-example backward-corrected cross-entropy ℓ̄(f(x), z) = Σ_j (F⁻¹)[z, j]·ℓ(f(x), j).

    ``logits`` (N, k), ``noisy_y`` (N,), ``F`` the k×k confusion matrix. Returns (N,) losses in
    ``logits``' dtype; their expectation over z ~ F[y, ·] is the clean cross-entropy ℓ(f(x), y).
    ``inverse`` is F⁻¹ precomputed with :func:`inverse_confusion` (a training loop passes it to
    skip the check and inversion at every batch).

    Example:
        >>> import torch
        >>> z, y = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, 2])
        >>> same = consistent_loss(z, y, torch.eye(3))  # F = I: the plain loss
        >>> torch.allclose(same, torch.nn.functional.cross_entropy(z, y, reduction="none"))
        True
    """
    if inverse is None:
        inverse = inverse_confusion(check_confusion(F, logits.shape[-1]))
    return ConsistentCrossEntropy(inverse.to(device=logits.device))(logits, noisy_y)


def _anchor_rows(probs: Tensor, quantile: float) -> Tensor:
    """For each class i, the index of the example whose p_i is largest after outlier filtering.

    Outlier filter (as in the public code of Xia et al. 2019 and Yao et al. 2020): values of p_i at
    or above the ``quantile``-quantile of p_i (the "higher" order statistic) are discarded before
    taking the maximum. ``quantile >= 1`` disables the filter; if the filter discards every
    example (all p_i equal), the plain maximum is used.
    """
    if quantile >= 1.0:
        return probs.argmax(dim=0)
    thresholds = torch.quantile(probs, quantile, dim=0, interpolation="higher")
    kept = torch.where(probs < thresholds, probs, torch.full_like(probs, -1.0))
    filtered = kept.argmax(dim=0)
    nothing_left = kept.max(dim=0).values < 0
    return torch.where(nothing_left, probs.argmax(dim=0), filtered)


def estimate_confusion_dual_t(
    probs: Tensor, noisy_labels: Tensor, *, quantile: float = 0.97
) -> Tensor:
    """Dual-T estimate of the confusion matrix (Yao et al., NeurIPS 2020), row-stochastic float64.

    ``probs`` (N, k) are softmax outputs of a model trained on the noisy labels ``noisy_labels``
    (N,). The estimator introduces an intermediate class Y′ — the model's predicted class — and
    factorises P(Ȳ | Y) through it (their Eq. 3, assuming P(Ȳ | Y′, Y) = P(Ȳ | Y′)):

        T = T♣ · T♠,   T♣[i, l] = P(Y′ = l | Y = i),   T♠[l, j] = P(Ȳ = j | Y′ = l).

    * T♣ by anchor points: the model's output *is* the posterior of Y′, so for an anchor x^i of
      clean class i (an example with P(Y = i | x^i) = 1) T♣[i, ·] = probs[x^i]; the anchor is the
      example with the largest p_i after discarding values at or above the ``quantile``-quantile
      (an outlier filter, as in the authors' code; ``quantile=1`` takes the plain maximum).
    * T♠ by counting: T♠[l, j] = #{n: argmax probs_n = l, z_n = j} / #{n: argmax probs_n = l}.
      A class the model never predicts gives no evidence; its row is taken as e_l (Y′ = Ȳ).

    Rows are renormalised to sum to one (they do up to rounding).

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
        >>> T = estimate_confusion_dual_t(probs, torch.tensor([0, 1, 1, 1]), quantile=1.0)
        >>> [[round(v, 3) for v in row] for row in T.tolist()]
        [[0.45, 0.55], [0.1, 0.9]]
    """
    probs = torch.as_tensor(probs).detach().to(dtype=torch.float64, device="cpu")
    labels = torch.as_tensor(noisy_labels).detach().long().cpu()
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(
            f"probs must be an (N, k) tensor with k ≥ 2, got shape {tuple(probs.shape)}"
        )
    n, k = probs.shape
    if labels.shape != (n,):
        raise ValueError(f"noisy_labels must have shape ({n},), got {tuple(labels.shape)}")
    if n == 0:
        raise ValueError("Dual-T needs at least one example")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"noisy labels must lie in 0..{k - 1}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
    club = probs[_anchor_rows(probs, quantile)]
    predicted = probs.argmax(dim=1)
    counts = torch.bincount(predicted * k + labels, minlength=k * k).reshape(k, k).double()
    totals = counts.sum(dim=1, keepdim=True)
    spade = torch.where(
        totals > 0, counts / totals.clamp(min=1.0), torch.eye(k, dtype=torch.float64)
    )
    dual = club @ spade
    return dual / dual.sum(dim=1, keepdim=True)
