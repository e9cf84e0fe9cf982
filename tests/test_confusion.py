"""Label-noise generation, the backward-corrected loss and the Dual-T estimator."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from hessfine.finetune.confusion import (
    check_confusion,
    consistent_loss,
    correction_factor,
    corrupt_labels,
    estimate_confusion_dual_t,
    inverse_confusion,
    load_confusion,
    noise_confusion,
    pair_flip_confusion,
    symmetric_confusion,
)


@pytest.mark.parametrize(("k", "rate"), [(2, 0.3), (5, 0.4), (10, 0.0), (10, 0.8)])
def test_symmetric_confusion_rows_and_rate(k, rate):
    matrix = symmetric_confusion(k, rate)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(matrix.diagonal(), torch.full((k,), 1 - rate, dtype=torch.float64))
    off = matrix[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, rate / (k - 1)))


def test_symmetric_noise_empirical_flip_rate_is_the_stated_rate():
    k, rate, n = 10, 0.4, 200_000
    y = torch.arange(n) % k
    z = corrupt_labels(y, symmetric_confusion(k, rate), generator=torch.Generator().manual_seed(1))
    flipped = z != y
    # Binomial standard error sqrt(0.4·0.6/2e5) ≈ 0.0011: 5 standard errors.
    assert abs(flipped.double().mean().item() - rate) < 0.0055
    # Flips spread evenly over the other k − 1 classes: each target gets rate/(k−1) of class 0.
    targets = torch.bincount(z[(y == 0) & flipped], minlength=k).double() / (y == 0).sum()
    assert targets[0] == 0
    assert torch.allclose(
        targets[1:], torch.full((k - 1,), rate / (k - 1), dtype=torch.float64), atol=0.005
    )


def test_pair_flip_confusion_and_samples():
    matrix = pair_flip_confusion(4, 0.25)
    expected = torch.tensor(
        [[0.75, 0.25, 0, 0], [0, 0.75, 0.25, 0], [0, 0, 0.75, 0.25], [0.25, 0, 0, 0.75]],
        dtype=torch.float64,
    )
    assert torch.equal(matrix, expected)
    y = torch.arange(100_000) % 4
    z = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(2))
    flipped = z != y
    assert torch.equal(z[flipped], (y[flipped] + 1) % 4)  # only to the next class
    assert abs(flipped.double().mean().item() - 0.25) < 0.007
    assert torch.equal(noise_confusion("pair", 4, 0.25), matrix)


def test_corrupt_labels_is_deterministic_per_seed():
    y = torch.arange(1000) % 10
    matrix = symmetric_confusion(10, 0.5)
    a = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(7))
    b = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(7))
    c = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(corrupt_labels(y, torch.eye(10), generator=torch.Generator()), y)


def test_invalid_matrices_and_rates_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        check_confusion(torch.tensor([[0.5, 0.4], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        check_confusion(torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match="rate"):
        symmetric_confusion(3, 1.5)
    with pytest.raises(ValueError, match="0..2"):
        corrupt_labels(torch.tensor([3]), torch.eye(3), generator=torch.Generator())
    with pytest.raises(ValueError, match="singular"):
        consistent_loss(torch.zeros(1, 2), torch.tensor([0]), symmetric_confusion(2, 0.5))


@pytest.mark.parametrize("kind", ["symmetric", "pair", "random"])
def test_consistent_loss_is_exactly_unbiased(kind):
    k = 5
    g = torch.Generator().manual_seed(3)
    if kind == "random":
        matrix = torch.rand(k, k, generator=g, dtype=torch.float64) + 3 * torch.eye(
            k, dtype=torch.float64
        )
        matrix /= matrix.sum(dim=1, keepdim=True)
    else:
        matrix = noise_confusion(kind, k, 0.35)
    logits = torch.randn(7, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (7,), generator=g)
    clean = nnf.cross_entropy(logits, y, reduction="none")
    # E_{z ~ F[y]} ℓ̄(f(x), z) = Σ_z F[y, z]·ℓ̄(f(x), z), summed exactly over all k noisy labels.
    corrected = torch.stack(
        [consistent_loss(logits, torch.full_like(y, z), matrix) for z in range(k)], dim=1
    )
    expectation = (matrix[y] * corrected).sum(dim=1)
    torch.testing.assert_close(expectation, clean, rtol=1e-12, atol=1e-12)
    # A precomputed inverse gives the same losses.
    inverse = inverse_confusion(matrix)
    torch.testing.assert_close(
        consistent_loss(logits, y, matrix, inverse=inverse), consistent_loss(logits, y, matrix)
    )


def test_consistent_loss_matches_the_definition_and_bound():
    k = 3
    matrix = symmetric_confusion(k, 0.3)
    inverse = torch.linalg.inv(matrix)
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], dtype=torch.float64)
    z = torch.tensor([1, 2])
    per_class = -torch.log_softmax(logits, dim=1)
    expected = torch.stack(
        [sum(inverse[z[n], j] * per_class[n, j] for j in range(k)) for n in range(2)]
    )
    torch.testing.assert_close(consistent_loss(logits, z, matrix), expected)
    factor = correction_factor(matrix)
    assert factor == pytest.approx(inverse.abs().sum(dim=1).max().item())
    assert (consistent_loss(logits, z, matrix).abs() <= factor * per_class.max(dim=1).values).all()
    # Float32 logits keep their dtype (the inverse is cast).
    assert consistent_loss(logits.float(), z, matrix).dtype == torch.float32


def _clean_predicting_probs(y, k, generator):
    """A model sure of the clean class: p = (1−s)·e_y + s·Dirichlet-ish, s ∈ [0, 0.05)."""
    n = len(y)
    s = 0.05 * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    spread = torch.rand(n, k, generator=generator, dtype=torch.float64)
    spread /= spread.sum(dim=1, keepdim=True)
    return (1 - s) * nnf.one_hot(y, k).double() + s * spread


@pytest.mark.parametrize("quantile", [1.0, 0.97])
def test_dual_t_recovers_symmetric_noise(quantile):
    k, n, rate = 4, 20_000, 0.3
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, k, (n,), generator=g)
    matrix = symmetric_confusion(k, rate)
    z = corrupt_labels(y, matrix, generator=g)
    probs = _clean_predicting_probs(y, k, g)
    estimate = estimate_confusion_dual_t(probs, z, quantile=quantile)
    assert torch.allclose(estimate.sum(dim=1), torch.ones(k, dtype=torch.float64))
    # T♣ ≈ I within 0.05·0.03 (anchors near the top), T♠ = empirical F: sampling error ≈ 0.006.
    assert (estimate - matrix).abs().max() < 0.025


def test_dual_t_composes_both_factors_in_order():
    """Y → Y′ via A (anchors give A's rows), Y′ → Ȳ via B (counted): the estimate is A·B ≠ B·A."""
    k, n = 3, 30_000
    g = torch.Generator().manual_seed(5)
    a = pair_flip_confusion(k, 0.35)
    b = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.5, 0.5], [0.4, 0.0, 0.6]], dtype=torch.float64)
    assert (a @ b - b @ a).abs().max() > 0.1
    y = torch.randint(0, k, (n,), generator=g)
    y_mid = corrupt_labels(y, a, generator=g)
    z = corrupt_labels(y_mid, b, generator=g)
    # Ordinary examples: predicted class Y′ with p_{Y′} = 0.4 + 0.6/k = 0.6 < 0.65. Anchors (one
    # per class, at the front): p = A[i], the largest p_i of all examples.
    probs = 0.4 * nnf.one_hot(y_mid, k).double() + 0.6 / k
    probs[:k] = a
    y_mid[:k] = torch.arange(k)  # the anchors' predicted class is their argmax
    estimate = estimate_confusion_dual_t(probs, z, quantile=1.0)
    assert (estimate - a @ b).abs().max() < 0.02
    assert (estimate - b @ a).abs().max() > 0.1


def test_dual_t_handles_a_never_predicted_class():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    estimate = estimate_confusion_dual_t(probs, torch.tensor([0, 1, 1, 1]), quantile=1.0)
    assert torch.isfinite(estimate).all()
    assert torch.allclose(estimate.sum(dim=1), torch.ones(3, dtype=torch.float64))
    # Class 2 is never predicted: T♠'s row 2 is e_2, so T[·, 2] = T♣[·, 2].
    club_col2 = torch.tensor([0.05, 0.1, 0.1], dtype=torch.float64)
    torch.testing.assert_close(estimate[:, 2], club_col2)


def test_dual_t_anchor_filter_skips_top_outliers():
    # Class 0 scores: one outlier at 1.0 and the rest spread below; with quantile 0.9 the anchor
    # is the largest value strictly below the 0.9-quantile ("higher" order statistic).
    scores = torch.linspace(0.5, 0.95, 10, dtype=torch.float64)
    scores[-1] = 1.0
    probs = torch.stack([scores, 1 - scores], dim=1)
    labels = torch.zeros(10, dtype=torch.long)
    plain = estimate_confusion_dual_t(probs, labels, quantile=1.0)
    filtered = estimate_confusion_dual_t(probs, labels, quantile=0.9)
    # All examples are predicted class 0 with noisy label 0, so T♠ = I on row 0 and T = T♣.
    assert plain[0, 0].item() == pytest.approx(1.0)
    threshold = torch.quantile(scores, 0.9, interpolation="higher")
    expected = scores[scores < threshold].max().item()
    assert filtered[0, 0].item() == pytest.approx(expected)


def test_dual_t_input_checks():
    with pytest.raises(ValueError, match="shape"):
        estimate_confusion_dual_t(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="quantile"):
        estimate_confusion_dual_t(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), quantile=0)


def test_load_confusion_reads_three_formats_and_refuses_the_rest(tmp_path):
    matrix = pair_flip_confusion(4, 0.25)
    np.save(tmp_path / "F.npy", matrix.numpy())
    np.savetxt(tmp_path / "F.csv", matrix.numpy(), delimiter=",")
    torch.save(matrix.float(), tmp_path / "F.pt")
    for name in ("F.npy", "F.csv", "F.pt"):
        torch.testing.assert_close(load_confusion(tmp_path / name, 4), matrix, atol=1e-7, rtol=0)
    torch.save({"F": matrix}, tmp_path / "dict.pt")
    (tmp_path / "F.txt").write_text("1")
    for name, message in [
        ("dict.pt", "not a tensor"),
        ("F.txt", "use .npy, .csv or .pt"),
        ("F.npy", "expected 3×3"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_confusion(tmp_path / name, 3 if name == "F.npy" else None)
