"""Assembly of the generalization bounds from per-layer quantities
(docs/bounds.md; the ``bounds`` entry of docs/schema.md).

Notation: selected layers i = 1..L with weights W_i, reference (pretrained) weights W_i^(s),
v_i = vec(W_i − W_i^(s)), training-set size n, loss bound C, training loss L̂, ε ≥ 0.

* Hessian distance measure (Ju, Li & Zhang, ICML 2022, eq. (3)):
      HDM = Σ_i sqrt(C · 𝓗_i / n),   𝓗_i = max_x v_iᵀ H_i⁺(x) v_i
  (negative inputs, possible with the raw ``block`` estimator, are clipped at 0).
* Theorem 2.1 (computable part, the O(n^(-3/4)) remainder ξ dropped):
      L(f) ≤ (1+ε)·L̂(f) + (1+ε)·HDM.
* Trace corollary (distance-constrained fine-tuning, ‖v_i‖ ≤ α_i ⇒ 𝓗_i ≤ α_i² max_x Tr[H_i⁺(x)]):
      L(f) ≤ (1+ε)·L̂(f) + (1+ε)·Σ_i α_i·sqrt(C · max_x Tr[H_i⁺(x)] / n).
* Noisy labels (class-conditional noise with row-stochastic confusion matrix F; Ju, Li & Zhang
  2022, the theorem for the consistent loss): the consistent loss
  ℓ̄(f(x), ỹ) = Σ_j (F⁻¹)[ỹ, j] ℓ(f(x), j) is bounded by C·κ(F) with
      κ(F) = max_row Σ_j |(F⁻¹)[row, j]|  (the ∞-norm of F⁻¹),
  and the bound on the clean test loss is
      L(f) ≤ (1+ε)·L̄̂(f) + (1+ε)·Σ_i sqrt(κ(F)·C·𝓗̄_i / n)   (+ ξ),
  with L̄̂ the mean consistent loss on the noisy training labels and 𝓗̄_i the quadratic forms of
  ℓ̄'s own Hessian. 𝓗̄_i = 𝓗_i on piecewise-linear networks (∇²_z ℓ̄ = ∇²_z ℓ because the rows of
  F⁻¹ sum to one, and the residual Σ_c (∂ℓ̄/∂z_c)·∇²z_c vanishes); on smooth networks they differ
  and must be passed as ``noisy_layer_max`` (docs/bounds.md, "Label noise").
* Prior distance-based measures, for comparison (Fig. 1 of the paper), in
  :func:`prior_distance_measures`.

All functions are pure (floats and tensors in, floats out).

Example:
    >>> hessian_distance_measure({"a": 4.0, "b": 9.0}, C=1.0, n=100)
    0.5
    >>> theorem_2_1(0.1, 0.5, epsilon=0.0)
    0.6
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor


def hessian_distance_measure(layer_max: Mapping[str, float], *, C: float, n: int) -> float:
    """Σ_i sqrt(C · max(𝓗_i, 0) / n) — the paper's Hessian distance measure."""
    _check_constants(C, n)
    return float(sum(math.sqrt(C * max(float(h), 0.0) / n) for h in layer_max.values()))


def theorem_2_1(train_loss: float, hdm: float, *, epsilon: float = 0.0) -> float:
    """(1+ε)·L̂ + (1+ε)·HDM — Theorem 2.1 of Ju, Li & Zhang (2022) without the ξ remainder."""
    _check_epsilon(epsilon)
    return (1.0 + epsilon) * float(train_loss) + (1.0 + epsilon) * float(hdm)


def trace_corollary(
    train_loss: float,
    trace_positive_max: Mapping[str, float],
    alphas: Mapping[str, float],
    *,
    C: float,
    n: int,
    epsilon: float = 0.0,
) -> float:
    """(1+ε)·L̂ + (1+ε)·Σ_i α_i·sqrt(C · max(max_x Tr[H_i⁺(x)], 0) / n).

    α_i bounds ‖W_i − W_i^(s)‖_F (the radius of a distance-constrained run, or ‖v_i‖_F itself);
    ``alphas`` must have an entry for every layer of ``trace_positive_max``.
    """
    _check_constants(C, n)
    _check_epsilon(epsilon)
    missing = [name for name in trace_positive_max if name not in alphas]
    if missing:
        raise ValueError(f"alphas lacks layers {missing}; give a radius for every layer")
    term = sum(
        float(alphas[name]) * math.sqrt(C * max(float(t), 0.0) / n)
        for name, t in trace_positive_max.items()
    )
    return (1.0 + epsilon) * float(train_loss) + (1.0 + epsilon) * term


def noise_matrix_inverse(F: Tensor, k: int | None = None) -> Tensor:
    """F⁻¹ (float64) of a k×k noise matrix F, after checking it is square, finite, invertible.

    Example:
        >>> noise_matrix_inverse(torch.tensor([[0.8, 0.2], [0.2, 0.8]])).mul(3).round().tolist()
        [[4.0, -1.0], [-1.0, 4.0]]
    """
    F = torch.as_tensor(F, dtype=torch.float64)
    if F.dim() != 2 or F.shape[0] != F.shape[1] or F.shape[0] < 2:
        raise ValueError(
            f"confusion matrix must be square k×k with k ≥ 2, got shape {tuple(F.shape)}"
        )
    if k is not None and F.shape[0] != k:
        raise ValueError(
            f"confusion matrix is {F.shape[0]}×{F.shape[0]}, the model has {k} classes"
        )
    if not torch.isfinite(F).all():
        raise ValueError("confusion matrix has non-finite entries")
    cond = torch.linalg.cond(F)
    if not torch.isfinite(cond) or cond > 1e12:
        raise ValueError(
            f"confusion matrix is singular (condition number {float(cond):.3g}); the consistent "
            "loss needs an invertible F — lower the noise rate or re-estimate F"
        )
    return torch.linalg.inv(F)


KAPPA_LIMIT = 10.0
"""The largest κ(F) = ‖F⁻¹‖_∞ at which an *estimated* noise matrix is used as it is
(:func:`usable_noise_matrix`)."""


@dataclass(frozen=True)
class UsableNoiseMatrix:
    """An estimated noise matrix made usable for the consistent loss.

    ``matrix`` is F_λ = (1 − λ)·F̂ + λ·T with ``shrinkage`` λ (0: the estimate F̂ as it is) and
    ``target`` T: ``"symmetric"``, the symmetric noise matrix S(ρ̂) of the estimate's mean flip
    rate ρ̂ = 1 − mean_y F̂[y, y] (``flip_rate``), or ``"identity"`` when S(ρ̂) itself breaks the
    limit; ``kappa`` is κ(F_λ) and ``estimate_kappa`` κ(F̂).
    """

    matrix: Tensor
    kappa: float
    estimate_kappa: float
    shrinkage: float
    flip_rate: float
    target: Literal["symmetric", "identity"]

    def to_json(self) -> dict[str, float | str]:
        """The record a fine-tuning run keeps of the rule (``confusion_used`` in its manifest)."""
        return {
            "kappa": self.kappa,
            "estimate_kappa": self.estimate_kappa,
            "shrinkage": self.shrinkage,
            "target": self.target,
            "flip_rate": self.flip_rate,
            "kappa_limit": KAPPA_LIMIT,
        }


def usable_noise_matrix(estimate: Tensor, *, steps: int = 20) -> UsableNoiseMatrix:
    """The rule for an estimated noise matrix F̂ (e.g. by Dual-T): used as it is when
    κ(F̂) = ‖F̂⁻¹‖_∞ ≤ :data:`KAPPA_LIMIT`; else shrunk, F_λ = (1 − λ)·F̂ + λ·T with the smallest
    λ ∈ {1/steps, 2/steps, …, 1} that brings κ within the limit, towards T = S(ρ̂), the symmetric
    noise matrix of the estimate's own mean flip rate ρ̂, or, when S(ρ̂) itself exceeds the limit
    (ρ̂ near chance, (k−1)/k: the noisy-label model learned too little to say which labels are
    flipped), towards the identity, which turns the consistent loss back into the plain loss.

    Why κ: the consistent loss is Σ_j (F⁻¹)[ỹ, j]·ℓ(f(x), j), so κ bounds its weights — an
    estimate with κ = 65 turns the loss into large signed sums whose training diverges, while its
    condition number can still look harmless (42) — and κ multiplies C in the noisy-label bound
    (docs/bounds.md, "Label noise"). The true matrices of the demo's settings have κ ≤ 5 (40%
    symmetric noise on 10 classes: 2.44). Shrinking towards S(ρ̂) keeps the estimated amount of
    noise and drops the part of the estimate too poorly determined to invert.

    Example:
        >>> F = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
        >>> used = usable_noise_matrix(F)
        >>> round(used.estimate_kappa, 3), used.shrinkage, used.kappa <= KAPPA_LIMIT
        (3.0, 0.0, True)
    """
    estimate = torch.as_tensor(estimate, dtype=torch.float64)
    k = estimate.shape[0]
    flip = float(1.0 - estimate.diagonal().mean())
    symmetric = torch.full_like(estimate, flip / (k - 1)).fill_diagonal_(1.0 - flip)
    first = _kappa_or_inf(estimate)
    target: Literal["symmetric", "identity"] = "symmetric"
    if _kappa_or_inf(symmetric) > KAPPA_LIMIT:
        target, symmetric = "identity", torch.eye(k, dtype=torch.float64)
    for step in range(steps):
        shrinkage = step / steps
        matrix = (1.0 - shrinkage) * estimate + shrinkage * symmetric
        kappa = _kappa_or_inf(matrix)
        if kappa <= KAPPA_LIMIT:
            return UsableNoiseMatrix(matrix, kappa, first, shrinkage, flip, target)
    return UsableNoiseMatrix(symmetric, _kappa_or_inf(symmetric), first, 1.0, flip, target)


def _kappa_or_inf(F: Tensor) -> float:
    try:
        return consistent_loss_factor(F)
    except ValueError:
        return math.inf


def consistent_loss_factor(F: Tensor) -> float:
    """κ(F) = max_row Σ_j |(F⁻¹)[row, j]| for a k×k confusion matrix F (F[y, z] = P(z | y)).

    Example (symmetric noise at rate ρ = 0.2 with k = 2 classes, κ = 1/(1 − 2ρ)):
        >>> round(consistent_loss_factor(torch.tensor([[0.8, 0.2], [0.2, 0.8]])), 6)
        1.666667
    """
    return float(noise_matrix_inverse(F).abs().sum(dim=1).max())


def as_matrix(weight: Tensor) -> Tensor:
    """A weight as a float64 matrix: (out, in) for Linear, (out, in·k·k…) for convolutions."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if w.dim() < 2:
        raise ValueError(f"distance measures need ≥2-D weights, got shape {tuple(weight.shape)}")
    return w.reshape(w.shape[0], -1)


def spectral_norm(weight: Tensor) -> float:
    """Largest singular value of M = :func:`as_matrix` (``weight``), in float64.

    σ_max(M)² is the largest eigenvalue of the smaller Gram matrix (M Mᵀ or MᵀM), which a
    symmetric eigensolver gives to a relative error of order machine ε (Weyl's inequality: the
    error is at most ‖ΔG‖ ≈ ε‖G‖ = ε σ_max²) — the same value as a full SVD at a fraction of the
    cost (ResNet-18's 21 weights: 0.25 s instead of 2.9 s). For a convolution this is the norm
    of the reshaped kernel, not the operator norm of the convolution itself (as in the papers'
    released code).
    """
    m = as_matrix(weight)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0))


def classification_margins(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example margins z_y − max_{j≠y} z_j (for the margin γ of Neyshabur et al. 2018)."""
    z = logits.detach().double()
    true = z.gather(1, y.long().reshape(-1, 1)).squeeze(1)
    other = z.scatter(1, y.long().reshape(-1, 1), float("-inf")).max(dim=1).values
    return true - other


def prior_distance_measures(
    weights: Mapping[str, Tensor] | Sequence[Tensor],
    directions: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    n: int,
    margin: float = 1.0,
    input_norm: float = 1.0,
    delta: float = 0.05,
    depth: int | None = None,
) -> dict[str, float]:
    """Distance-from-initialisation measures in the style of prior work (not bounds as stated).

    With M_i = :func:`as_matrix` (W_i), spectral norms ‖M_i‖_2, distances ‖v_i‖_F, d = ``depth``
    (default: number of layers given), h = max_i max(shape(M_i)):

    * ``spectral_product_distance`` — Σ_i ‖v_i‖_F · Π_{j≠i} ‖M_j‖_2 / sqrt(n)
      (= Π_j ‖M_j‖_2 · Σ_i ‖v_i‖_F/‖M_i‖_2 / sqrt(n) when no norm is zero): a spectral-product
      distance measure in the style of the Rademacher bound of Gouk, Hospedales & Pontil
      ("Distance-Based Regularisation of Deep Networks for Fine-Tuning", ICLR 2021, which uses
      other norms and constants). Constants are 1. It is *not* the theorem of Li & Zhang
      (NeurIPS 2021), whose PAC-Bayes bound rests on the layer distances and a perturbed-loss
      (noise-stability) term; see docs/bounds.md.
    * ``neyshabur_2018_complexity`` — the complexity term of Theorem 1 of Neyshabur,
      Bhojanapalli & Srebro (ICLR 2018), with the prior centred at the reference weights
      (‖W_i‖_F² → ‖v_i‖_F²):
          sqrt( [B² d² h ln(d h) Σ_i ‖v_i‖_F² Π_{j≠i} ‖M_j‖_2² + ln(d n / δ)] / (γ² n) ),
      B = ``input_norm``, γ = ``margin``, δ = ``delta``. It is only the second term of their
      bound (which adds the γ-margin training error and holds for fully connected networks
      without biases, every layer included); with the defaults B = γ = 1 it is the term per
      unit B/γ, over the layers given.

    Each also comes as ``<name>_log10``, computed in log space: finite when the product of
    norms overflows, and ``-inf`` when the measure is 0. A zero layer (‖M_i‖_2 = 0, e.g. a
    zero-initialised head) is defined by continuity: it contributes ‖v_i‖·Π_{j≠i} and zeroes
    every other layer's term. Layers are matched by name (mappings) or position (sequences).

    Example (two layers, M_1 = 2I, M_2 = 0, v_1 = 0, v_2 = (3, 4)):
        >>> w = [2 * torch.eye(2), torch.zeros(1, 2)]
        >>> v = [torch.zeros(2, 2), torch.tensor([[3.0, 4.0]])]
        >>> round(prior_distance_measures(w, v, n=4)["spectral_product_distance"], 12)  # 5·2/2
        5.0
    """
    w, v = _paired(weights, directions)
    if n < 1:
        raise ValueError(f"n must be a positive integer, not {n}")
    if margin <= 0 or input_norm <= 0 or not (0 < delta < 1):
        raise ValueError("margin and input_norm must be positive and delta in (0, 1)")
    d = len(w) if depth is None else int(depth)
    mats = [as_matrix(t) for t in w]
    log_spec = [_log(spectral_norm(m)) for m in mats]
    log_dist = [_log(float(t.detach().double().norm())) for t in v]
    h = max(max(m.shape) for m in mats)

    def others(i: int) -> float:
        return sum(s for j, s in enumerate(log_spec) if j != i)

    log_spd = _logsumexp([log_dist[i] + others(i) for i in range(len(w))]) - 0.5 * math.log(n)
    log_sq = _logsumexp([2 * (log_dist[i] + others(i)) for i in range(len(w))])
    log_main = (
        2 * math.log(input_norm) + 2 * math.log(d) + math.log(h) + _log(math.log(d * h)) + log_sq
    )
    log_total = _logaddexp(log_main, _log(math.log(d * n / delta)))
    log_ney = 0.5 * (log_total - 2 * math.log(margin) - math.log(n))

    ln10 = math.log(10.0)
    return {
        "spectral_product_distance": _exp(log_spd),
        "spectral_product_distance_log10": log_spd / ln10,
        "neyshabur_2018_complexity": _exp(log_ney),
        "neyshabur_2018_complexity_log10": log_ney / ln10,
    }


@dataclass(frozen=True)
class Bounds:
    """``measurement.json → bounds`` (docs/schema.md) plus the noisy-label versions when F is
    known."""

    C: float
    n: int
    epsilon: float
    hessian_distance_measure: float
    theorem_2_1: float
    trace_corollary: float | None
    distance_measures: Mapping[str, float]
    pac_bayes_certificate: Mapping[str, object] | None
    noisy_label_factor: float | None = None
    hessian_distance_measure_noisy_labels: float | None = None
    theorem_2_1_noisy_labels: float | None = None
    trace_corollary_noisy_labels: float | None = None
    noise_matrix_source: str | None = None
    settings: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A JSON-ready dict with every field (None for what was not computed)."""
        out = asdict(self)
        out["distance_measures"] = dict(self.distance_measures)
        out["settings"] = dict(self.settings)
        return out


def assemble_bounds(
    *,
    train_loss: float,
    layer_max: Mapping[str, float],
    distances: Mapping[str, float],
    weights: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    trace_positive_max: Mapping[str, float] | None = None,
    alphas: Mapping[str, float] | None = None,
    C: float,
    n: int,
    epsilon: float = 0.0,
    confusion: Tensor | None = None,
    consistent_train_loss: float | None = None,
    noisy_layer_max: Mapping[str, float] | None = None,
    noisy_trace_positive_max: Mapping[str, float] | None = None,
    noise_matrix_source: str | None = None,
    certificate: object | None = None,
    margin: float = 1.0,
    input_norm: float = 1.0,
    delta: float = 0.05,
) -> Bounds:
    """Every bound in docs/schema.md from per-layer values (see the module docstring for the
    formulas).

    Args:
        train_loss: L̂, the mean training loss.
        layer_max: 𝓗_i per layer (``quadratic_form.max``).
        distances: ‖v_i‖_F per layer, the default α_i of the trace corollary.
        weights, directions: W_i and v_i per layer, for the prior distance measures (none when
            empty).
        trace_positive_max: max_x Tr[H_i⁺(x)] per layer; the trace corollary is None without it.
        alphas: radii α_i (default ``distances``).
        C, n, epsilon: loss bound, training-set size, ε.
        confusion: the k×k matrix F; adds the noisy-label versions (C → C·κ(F)).
        consistent_train_loss: L̂ of the consistent loss ℓ̄ on the noisy training labels, for
            the noisy-label versions (default ``train_loss``).
        noisy_layer_max: 𝓗_i of ℓ̄ on the noisy labels (default ``layer_max``, which equals it
            on piecewise-linear networks; see the module docs).
        noisy_trace_positive_max: max_x Tr[H_i⁺(x)] of ℓ̄, for the noisy-label trace corollary
            (None: that corollary is not computed).
        noise_matrix_source: where F comes from (e.g. ``known``, ``dual-t``), recorded as is.
        certificate: a :class:`hessfine.bounds.pac_bayes.Certificate` (anything with ``to_json()``) or a
            mapping, stored as ``pac_bayes_certificate``.
        margin, input_norm, delta: γ, B and δ of the Neyshabur et al. measure.
    """
    hdm = hessian_distance_measure(layer_max, C=C, n=n)
    alphas = distances if alphas is None else alphas
    trace = (
        None
        if trace_positive_max is None
        else trace_corollary(train_loss, trace_positive_max, alphas, C=C, n=n, epsilon=epsilon)
    )
    measures = (
        prior_distance_measures(
            weights, directions, n=n, margin=margin, input_norm=input_norm, delta=delta
        )
        if weights
        else {}
    )
    cert = None
    if certificate is not None:
        cert = certificate.to_json() if hasattr(certificate, "to_json") else dict(certificate)
    noisy: dict[str, float | None] = {}
    if confusion is not None:
        factor = consistent_loss_factor(confusion)
        loss = train_loss if consistent_train_loss is None else consistent_train_loss
        forms = layer_max if noisy_layer_max is None else noisy_layer_max
        hdm_noisy = hessian_distance_measure(forms, C=C * factor, n=n)
        noisy = {
            "noisy_label_factor": factor,
            "hessian_distance_measure_noisy_labels": hdm_noisy,
            "theorem_2_1_noisy_labels": theorem_2_1(loss, hdm_noisy, epsilon=epsilon),
            "trace_corollary_noisy_labels": None
            if noisy_trace_positive_max is None
            else trace_corollary(
                loss, noisy_trace_positive_max, alphas, C=C * factor, n=n, epsilon=epsilon
            ),
            "noise_matrix_source": noise_matrix_source,
        }
    return Bounds(
        C=float(C),
        n=int(n),
        epsilon=float(epsilon),
        hessian_distance_measure=hdm,
        theorem_2_1=theorem_2_1(train_loss, hdm, epsilon=epsilon),
        trace_corollary=trace,
        distance_measures=measures,
        pac_bayes_certificate=cert,
        settings={"margin": float(margin), "input_norm": float(input_norm), "delta": float(delta)},
        **noisy,
    )


def _paired(weights, directions) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(weights, Mapping):
        if not isinstance(directions, Mapping) or set(weights) != set(directions):
            raise ValueError("weights and directions must name the same layers")
        names = list(weights)
        return [weights[k] for k in names], [directions[k] for k in names]
    w, v = list(weights), list(directions)
    if len(w) != len(v) or not w:
        raise ValueError("weights and directions must be non-empty and of equal length")
    return w, v


def _check_constants(C: float, n: int) -> None:
    if not (math.isfinite(C) and C >= 0):
        raise ValueError(f"the loss bound C must be finite and non-negative, not {C}")
    if n < 1:
        raise ValueError(f"the training-set size n must be a positive integer, not {n}")


def _check_epsilon(epsilon: float) -> None:
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and non-negative, not {epsilon}")


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def _logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    if hi == float("-inf"):
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == float("-inf"):
        return top
    return top + math.log(sum(math.exp(x - top) for x in values))


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else float("inf")
