"""The per-example losses ℓ(z, y) of the tasks, with their curvature in the logits.

A :class:`~hessfine.bounds.functional.FunctionalModel` carries one of these (``fmodel.loss``), and
every estimator takes its per-example quantities from it (docs/mathematics.md, "Computing the
quantities fast and exactly"):

* ``loss(z, y)`` — ℓ of every example, shape (N,): what a Hugging Face model returns as ``.loss``
  for that example alone (docs/inputs.md, "Tasks");
* ``loss.curvature(z, z1, y)`` — the Gauss–Newton form z1ᵀ ∇²_z ℓ z1 per example;
* ``loss.curvature_factors(z, y)`` — vectors r_k with Σ_k r_k r_kᵀ = ∇²_z ℓ (for the exact
  Gauss–Newton traces Tr[G_i(x)] = Σ_k ‖J_iᵀ r_k‖²), shape (K, *z.shape);
* ``loss.correct(z, y)`` — per example, the predictions that are right and the predictions made
  (accuracy, and the certificate's 0-1 error :func:`example_errors`);
* ``loss.task`` — the task's name; ``loss.sequence`` — whether an example's logits are a sequence
  (T, V) with curvature factors per position, else one vector (C,) with (K, N, C) factors;
* ``loss.error_name`` — what :func:`example_errors` is for this task, in words (the certificate's
  bounded loss, ``measurement.json → bounds.pac_bayes_certificate.bounded_loss``); ``None`` for a
  regression, which makes no predictions.

The losses (p = softmax(z), σ the logistic function):

* :class:`CrossEntropy` — classification, ℓ = −log p_y; ∇²_z ℓ = diag p − p pᵀ.
* :class:`TokenCrossEntropy` — token classification: the mean of −log softmax(z_t)_{y_t} over
  the m label positions S of the sequence (labels −100 ignored); ∇²_z ℓ is block diagonal over
  positions, (1/m)(diag p_t − p_t p_tᵀ) on t ∈ S and 0 elsewhere.
* :class:`Seq2SeqLMLoss` — the same over the decoder's positions (sequence-to-sequence LM).
* :class:`CausalLMLoss` — the same with the labels shifted: position t predicts y_{t+1}.
* :class:`SquaredError` — regression, ℓ = (1/L) Σ_l (z_l − y_l)² (Hugging Face's ``MSELoss``, no
  ½): gradient (2/L)(z − y), ∇²_z ℓ = (2/L)·I, factors √(2/L)·e_l.
* :class:`BinaryCrossEntropy` — multi-label, ℓ = (1/L) Σ_l [log(1 + e^{z_l}) − y_l z_l]
  (``BCEWithLogitsLoss``): gradient (σ(z) − y)/L, ∇²_z ℓ = diag σ(z)(1 − σ(z))/L, factors
  √(σ_l(1 − σ_l)/L)·e_l.
* :class:`ConsistentCrossEntropy` — the backward-corrected loss for class-conditional label noise
  (Patrini et al., CVPR 2017; docs/bounds.md, "Label noise"): ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(z, j).
  Because the rows of F⁻¹ sum to one, ℓ̄ = logsumexp(z) − (F⁻¹)[ỹ]·z, whose logit Hessian is that
  of cross-entropy; its weight-space Hessian differs through the gradient p − (F⁻¹)[ỹ] that
  multiplies z''.

Example:
    >>> loss = SquaredError()
    >>> z, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    >>> loss(z, y), loss.curvature(z, torch.tensor([[1.0, 1.0]]), y)
    (tensor([2.5000]), tensor([2.]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""The label of a position that carries none (Hugging Face's ``ignore_index``)."""


def per_example_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """ℓ(z, y) = −log softmax(z)_y for every example (no reduction)."""
    return F.cross_entropy(logits, y, reduction="none")


def softmax_ce_curvature(z: Tensor, z1: Tensor) -> Tensor:
    """z1ᵀ (diag p − p pᵀ) z1 over the last dimension, p = softmax(z): the softmax CE Hessian."""
    return probability_curvature(torch.softmax(z, dim=-1), z1)


def probability_curvature(p: Tensor, z1: Tensor) -> Tensor:
    """z1ᵀ (diag p − p pᵀ) z1 over the last dimension, for probabilities p (softmax(z))."""
    weighted = p * z1
    mean = weighted.sum(dim=-1)
    return (weighted * z1).sum(dim=-1) - mean * mean


def softmax_ce_curvature_factors(z: Tensor) -> Tensor:
    """Vectors r_c with Σ_c r_c r_cᵀ = diag p − p pᵀ over the last dimension: shape (C, *z.shape).

    r_c = √p_c (e_c − p) are the columns of M = diag(√p) − p √pᵀ, M Mᵀ = diag p − p pᵀ.
    """
    p = torch.softmax(z, dim=-1)
    classes = z.shape[-1]
    eye = torch.eye(classes, dtype=z.dtype, device=z.device).reshape(
        classes, *([1] * (z.dim() - 1)), classes
    )
    root = p.sqrt().movedim(-1, 0).unsqueeze(-1)
    return root * (eye - p.unsqueeze(0))


def diagonal_factors(root: Tensor) -> Tensor:
    """r_l = root_l · e_l for a diagonal curvature diag(root²) over the last dimension:
    shape (L, *root.shape)."""
    return torch.diag_embed(root).movedim(-2, 0)


def example_errors(loss: ExampleLoss, z: Tensor, y: Tensor) -> Tensor:
    """The 0-1 error of every example: the fraction of its predictions that are wrong, in [0, 1]
    (0 for an example that makes none, e.g. a sequence without label positions).

    Classification: 0 or 1; token tasks: the token error over the label positions; multi-label:
    the per-label (Hamming) error.
    """
    right, made = loss.correct(z, y)
    return (made - right) / made.clamp(min=1)


@dataclass(frozen=True)
class CrossEntropy:
    """Classification cross-entropy ℓ(z, y) = −log softmax(z)_y; z is (N, C), y is (N,).

    ∇_z ℓ = p − e_y, ∇²_z ℓ = diag p − p pᵀ = M Mᵀ with M = diag(√p) − p √pᵀ (p = softmax(z)).

    Example:
        >>> loss = CrossEntropy()
        >>> z, y = torch.zeros(2, 4), torch.tensor([0, 3])
        >>> loss(z, y)
        tensor([1.3863, 1.3863])
    """

    task = "classification"
    sequence = False
    error_name = "0-1 error"

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example losses, shape (N,)."""
        return per_example_cross_entropy(z, y)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ z1 per example (the labels do not enter), shape (N,)."""
        return softmax_ce_curvature(z, z1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_k with Σ_k r_k r_kᵀ = ∇²_z ℓ per example, shape (C, N, C)."""
        return softmax_ce_curvature_factors(z)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per example, the number of correct predictions and of predictions made (1 each)."""
        right = (z.argmax(dim=-1) == y).to(z.dtype)
        return right, torch.ones_like(right)


@dataclass(frozen=True)
class TokenCrossEntropy:
    """Mean cross-entropy of each sequence over its label positions (token classification).

    z is (N, T, C); y is (N, T) with −100 at positions without a label. With m label positions
    S, ℓ = (1/m) Σ_{t ∈ S} −log softmax(z_t)_{y_t}: the model's ``.loss`` for the sequence alone.
    The gradient is (p_t − e_{y_t})/m on t ∈ S, the curvature block diagonal,
    (1/m)(diag p_t − p_t p_tᵀ) on t ∈ S, and factored by r_(t,c) = √(1/m)·√p_tc (e_c − p_t) placed
    at position t. A sequence without any label position has loss 0 and no curvature.

    ``shift`` is 1 for causal language models, whose position t predicts y_{t+1}
    (:class:`CausalLMLoss`).

    Example:
        >>> loss = TokenCrossEntropy()
        >>> z = torch.zeros(1, 3, 5)
        >>> loss(z, torch.tensor([[2, -100, -100]]))  # one label position: log 5
        tensor([1.6094])
    """

    task = "token-classification"
    sequence = True
    shift = 0
    error_name = "token error (mean over label positions)"
    ignore_index: int = IGNORE_INDEX

    def _positions(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Logits z_t, their targets y_{t+shift} (ignored ones set to 0), weights 1/m on label
        positions and 0 elsewhere."""
        if y is None:
            raise ValueError(f"the {self.task} curvature depends on the label positions: pass y")
        steps = z.shape[1] - self.shift
        labels = y[:, self.shift :]
        weights = self.position_weights(y, z.dtype)[:, :steps]
        return z[:, :steps], labels.masked_fill(labels == self.ignore_index, 0), weights

    def position_weights(self, y: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """w_t, shape (N, T): the weight of position t of z in the loss and its curvature
        Σ_t w_t z1_tᵀ (diag p_t − p_t p_tᵀ) z1_t: 1/m where y_{t+shift} is a label, 0 elsewhere
        (and at the last ``shift`` positions, which predict nothing).

        Example:
            >>> CausalLMLoss().position_weights(torch.tensor([[-100, 2, 3]]))
            tensor([[0.5000, 0.5000, 0.0000]])
        """
        valid = y[:, self.shift :] != self.ignore_index
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)
        weights = valid.to(dtype) / count.to(dtype)
        return F.pad(weights, (0, self.shift))

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sequence losses, shape (N,)."""
        logits, labels, weights = self._positions(z, y)
        # −log softmax(z_t)_{y_t} = logsumexp(z_t) − z_t[y_t], over the vocabulary in place (the
        # class-first layout cross_entropy needs here is several times slower for large V)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        tokens = torch.logsumexp(logits, dim=-1) - picked
        return (weights * tokens).sum(dim=1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ z1 = Σ_t w_t · z1_tᵀ (diag p_t − p_t p_tᵀ) z1_t per sequence, shape (N,)."""
        logits, _, weights = self._positions(z, y)
        return (weights * softmax_ce_curvature(logits, z1[:, : logits.shape[1]])).sum(dim=1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_(t,c) = √w_t · √p_tc (e_c − p_t) placed at position t: shape ((T−shift)·V, N, T, V)."""
        logits, _, weights = self._positions(z, y)
        n, steps, vocab = logits.shape
        per_token = softmax_ce_curvature_factors(logits) * weights.sqrt().unsqueeze(-1)
        place = torch.eye(steps, z.shape[1], dtype=z.dtype, device=z.device)
        factors = torch.einsum("cntv,ts->tcnsv", per_token, place)
        return factors.reshape(steps * vocab, n, z.shape[1], vocab)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per sequence, the number of label positions predicted right and of label positions."""
        logits, labels = z[:, : z.shape[1] - self.shift], y[:, self.shift :]
        valid = labels != self.ignore_index
        right = (logits.argmax(dim=-1) == labels) & valid
        return right.sum(dim=1).to(z.dtype), valid.sum(dim=1).to(z.dtype)


@dataclass(frozen=True)
class Seq2SeqLMLoss(TokenCrossEntropy):
    """Mean decoder-token cross-entropy of each sequence over its label positions.

    z is the decoder's (N, T, V) logits, y the labels (N, T) the decoder inputs were made from
    (−100 ignored): position t predicts y_t, as in :class:`TokenCrossEntropy`.

    Example:
        >>> Seq2SeqLMLoss()(torch.zeros(1, 2, 4), torch.tensor([[3, -100]]))
        tensor([1.3863])
    """

    task = "seq2seq-lm"


@dataclass(frozen=True)
class CausalLMLoss(TokenCrossEntropy):
    """Mean next-token cross-entropy of each sequence over its label positions
    (docs/inputs.md, "Tasks").

    z is (N, T, V); y is (N, T), unshifted (position t predicts y[:, t+1]), −100 ignored; factors
    have shape ((T−1)·V, N, T, V), the last position's zero.

    Example:
        >>> loss = CausalLMLoss()
        >>> z = torch.zeros(1, 3, 5)
        >>> loss(z, torch.tensor([[-100, 2, -100]]))  # one label position: log 5
        tensor([1.6094])
    """

    task = "causal-lm"
    shift = 1
    error_name = "next-token error (mean over label positions)"


@dataclass(frozen=True)
class SquaredError:
    """Regression: ℓ(z, y) = (1/L) Σ_l (z_l − y_l)², the mean over the L outputs.

    z is (N, L); y is (N, L), or (N,) when L = 1. ∇_z ℓ = (2/L)(z − y), ∇²_z ℓ = (2/L)·I. The loss
    is unbounded (the bounds assume a bound C; docs/bounds.md). A regression predicts no classes:
    :meth:`correct` counts no predictions.

    Example:
        >>> SquaredError()(torch.tensor([[3.0]]), torch.tensor([1.0]))
        tensor([4.])
    """

    task = "regression"
    sequence = False
    error_name = None

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example losses, shape (N,)."""
        return (z - y.reshape(z.shape).to(z.dtype)).pow(2).mean(dim=-1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ (2/L)·I z1 = (2/L)‖z1‖² per example, shape (N,)."""
        return 2.0 * z1.pow(2).mean(dim=-1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_l = √(2/L)·e_l per example, shape (L, N, L)."""
        return diagonal_factors(torch.full_like(z, (2.0 / z.shape[-1]) ** 0.5))

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """No predictions: zeros, shape (N,) each."""
        none = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        return none, none


@dataclass(frozen=True)
class BinaryCrossEntropy:
    """Multi-label: ℓ(z, y) = (1/L) Σ_l [log(1 + e^{z_l}) − y_l z_l], the mean over the L labels.

    z is (N, L); y is (N, L) of 0/1. ∇_z ℓ = (σ(z) − y)/L, ∇²_z ℓ = diag σ(z)(1 − σ(z))/L. A label
    is predicted present when z_l > 0; :meth:`correct` counts the L labels of each example.

    Example:
        >>> BinaryCrossEntropy()(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
        tensor([0.6931])
    """

    task = "multi-label"
    sequence = False
    error_name = "per-label error (mean over labels)"

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example losses, shape (N,)."""
        terms = F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none")
        return terms.mean(dim=-1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ diag(σ(1 − σ))/L z1 per example, shape (N,)."""
        p = torch.sigmoid(z)
        return (p * (1 - p) * z1 * z1).mean(dim=-1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_l = √(σ_l(1 − σ_l)/L)·e_l per example, shape (L, N, L)."""
        p = torch.sigmoid(z)
        return diagonal_factors((p * (1 - p) / z.shape[-1]).sqrt())

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per example, the labels predicted right (z_l > 0 ⇔ y_l = 1) and the labels, L."""
        right = ((z > 0) == (y > 0.5)).sum(dim=-1).to(z.dtype)
        return right, torch.full_like(right, z.shape[-1])


@dataclass(frozen=True, eq=False)
class ConsistentCrossEntropy:
    """Backward-corrected cross-entropy ℓ̄(z, ỹ) = Σ_j (F⁻¹)[ỹ, j]·ℓ(z, j) (Patrini et al. 2017).

    ``inverse`` is F⁻¹ for the row-stochastic noise matrix F (F[y, z] = P(observed z | clean y));
    its rows sum to one, so ∇_z ℓ̄ = p − (F⁻¹)[ỹ] and ∇²_z ℓ̄ = diag p − p pᵀ as for
    cross-entropy. Unbiased for the clean
    loss: E_ỹ[ℓ̄(z, ỹ) | y] = ℓ(z, y).

    Example:
        >>> F_ = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
        >>> loss = ConsistentCrossEntropy(torch.linalg.inv(F_))
        >>> z = torch.tensor([[1.0, -1.0]])
        >>> clean = CrossEntropy()(z, torch.tensor([0]))
        >>> noisy = F_[0, 0] * loss(z, torch.tensor([0])) + F_[0, 1] * loss(z, torch.tensor([1]))
        >>> torch.allclose(noisy, clean)
        True
    """

    inverse: Tensor
    task = "classification"
    sequence = False
    error_name = "0-1 error"

    def __post_init__(self) -> None:
        rows = self.inverse.sum(dim=1)
        if self.inverse.dim() != 2 or self.inverse.shape[0] != self.inverse.shape[1]:
            raise ValueError(
                f"F⁻¹ must be a square matrix, not of shape {tuple(self.inverse.shape)}"
            )
        if not torch.allclose(rows, torch.ones_like(rows), atol=1e-6):
            raise ValueError("the rows of F⁻¹ must sum to one (F must be row-stochastic)")

    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-example ℓ̄ = −Σ_j (F⁻¹)[ỹ, j] log softmax(z)_j, shape (N,)."""
        weights = self.inverse.to(device=z.device, dtype=z.dtype)[y]
        return -(weights * torch.log_softmax(z, dim=-1)).sum(dim=-1)

    def curvature(self, z: Tensor, z1: Tensor, y: Tensor | None = None) -> Tensor:
        """z1ᵀ ∇²_z ℓ̄ z1 = z1ᵀ (diag p − p pᵀ) z1 per example, shape (N,)."""
        return softmax_ce_curvature(z, z1)

    def curvature_factors(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """r_k with Σ_k r_k r_kᵀ = ∇²_z ℓ̄ per example, shape (C, N, C)."""
        return softmax_ce_curvature_factors(z)

    def correct(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per example, agreement of the prediction with the observed label (1 prediction each)."""
        return CrossEntropy().correct(z, y)


ExampleLoss = (
    CrossEntropy | TokenCrossEntropy | SquaredError | BinaryCrossEntropy | ConsistentCrossEntropy
)
"""Every per-example loss (:class:`Seq2SeqLMLoss` and :class:`CausalLMLoss` are token losses)."""
