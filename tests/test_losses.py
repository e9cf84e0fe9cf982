"""The per-example losses of every task (hessfine.bounds.losses) against naive float64 definitions,
autograd Hessians in the logits, the task's curvature Λ written out, and dense oracles."""

import pytest
import torch
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.functional import (
    BinaryCrossEntropy,
    CausalLMLoss,
    ConsistentCrossEntropy,
    CrossEntropy,
    FunctionalModel,
    Seq2SeqLMLoss,
    SquaredError,
    TokenCrossEntropy,
)
from hessfine.bounds.losses import example_errors
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces

from tests.oracles import (
    binary_cross_entropy,
    causal_lm_loss,
    consistent_loss,
    cross_entropy,
    dense_block_hessians,
    dense_ggn_blocks,
    perturbed_reference,
    squared_error,
    task_curvature,
    tiny_data,
    tiny_mlp,
    token_cross_entropy,
)
from tests.oracles import quadratic_forms as dense_forms

DTYPE = torch.float64
NOISE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.05, 0.7]], dtype=DTYPE)


def causal_data(n=3, steps=5, vocab=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, steps, vocab, generator=g, dtype=DTYPE)
    y = torch.randint(0, vocab, (n, steps), generator=g)
    y[0, :2] = -100  # prompt positions
    y[1, 3:] = -100  # padding
    y[2, :] = -100  # no label at all
    y[2, 4] = 1
    return z, y


def classes():
    return torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 2, 1, 2])


def targets(outputs=3):
    return torch.randn(4, outputs, dtype=DTYPE), torch.randn(4, outputs, dtype=DTYPE)


def one_target():
    """One output, targets (N,) as a regression data file holds them for num_labels = 1."""
    return torch.randn(4, 1, dtype=DTYPE), torch.randn(4, dtype=DTYPE)


def multi_labels():
    return torch.randn(4, 3, dtype=DTYPE) * 2, torch.tensor(
        [[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]]
    )


# case: (loss, naive oracle, data, the task whose Λ it has)
CASES = {
    "classification": (CrossEntropy(), cross_entropy, classes, "classification"),
    "causal-lm": (CausalLMLoss(), causal_lm_loss, causal_data, "causal-lm"),
    "token-classification": (
        TokenCrossEntropy(),
        token_cross_entropy,
        causal_data,
        "token-classification",
    ),
    "seq2seq-lm": (Seq2SeqLMLoss(), token_cross_entropy, causal_data, "seq2seq-lm"),
    "regression": (SquaredError(), squared_error, targets, "regression"),
    "regression, one output": (SquaredError(), squared_error, one_target, "regression"),
    "multi-label": (BinaryCrossEntropy(), binary_cross_entropy, multi_labels, "multi-label"),
    "consistent": (
        ConsistentCrossEntropy(torch.linalg.inv(NOISE)),
        consistent_loss(torch.linalg.inv(NOISE)),
        classes,
        "classification",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_curvature_and_factors_match_autograd(case):
    torch.manual_seed(0)
    loss, oracle, data, task = CASES[case]
    z, y = data()
    values = loss(z, y)
    z1 = torch.randn_like(z)
    curvature = loss.curvature(z, z1, y)
    factors = loss.curvature_factors(z, y)
    for n in range(z.shape[0]):
        zn, yn = z[n : n + 1], y[n : n + 1]
        assert values[n] == pytest.approx(float(oracle(zn, yn)), rel=1e-12, abs=1e-12)
        A = torch.autograd.functional.hessian(lambda t, yn=yn: oracle(t, yn), zn)
        A = A.reshape(zn.numel(), zn.numel())
        torch.testing.assert_close(task_curvature(task, zn, yn), A, rtol=1e-10, atol=1e-12)
        u = z1[n].reshape(-1)
        assert curvature[n] == pytest.approx(float(u @ A @ u), rel=1e-10, abs=1e-12)
        r = factors[:, n].reshape(factors.shape[0], -1)
        torch.testing.assert_close(r.T @ r, A, rtol=1e-10, atol=1e-12)


def test_causal_lm_counts_label_positions_only():
    z, y = causal_data()
    right, total = CausalLMLoss().correct(z, y)
    assert total.tolist() == [3.0, 2.0, 1.0]
    predicted = z[:, :-1].argmax(-1)
    assert right[2] == float(predicted[2, 3] == y[2, 4])


def test_token_losses_count_label_positions_only():
    z, y = causal_data()
    right, total = TokenCrossEntropy().correct(z, y)
    assert total.tolist() == [3.0, 3.0, 1.0]  # unshifted: the causal LM's are [3, 2, 1]
    valid = y != -100
    assert right.tolist() == ((z.argmax(-1) == y) & valid).sum(dim=1).double().tolist()
    errors = example_errors(TokenCrossEntropy(), z, y)
    torch.testing.assert_close(errors, (total - right) / total)
    assert Seq2SeqLMLoss().correct(z, y)[1].tolist() == total.tolist()


def test_multi_label_and_regression_predictions():
    z, y = multi_labels()
    right, made = BinaryCrossEntropy().correct(z, y)
    assert made.tolist() == [3.0] * 4
    assert right.tolist() == ((z > 0) == y.bool()).sum(dim=1).double().tolist()
    torch.testing.assert_close(example_errors(BinaryCrossEntropy(), z, y), 1 - right / 3)
    assert SquaredError().correct(*targets())[1].tolist() == [0.0] * 4


def test_consistent_loss_is_unbiased_for_the_clean_loss():
    loss = ConsistentCrossEntropy(torch.linalg.inv(NOISE))
    z = torch.randn(5, 3, dtype=DTYPE)
    clean = torch.tensor([0, 1, 2, 1, 0])
    expected = sum(NOISE[clean, j] * loss(z, torch.full_like(clean, j)) for j in range(3))
    torch.testing.assert_close(expected, CrossEntropy()(z, clean))


def test_consistent_loss_refuses_rows_not_summing_to_one():
    with pytest.raises(ValueError, match="sum to one"):
        ConsistentCrossEntropy(torch.eye(3, dtype=DTYPE) * 2)


@pytest.mark.parametrize("estimator", ["block", "ggn"])
def test_consistent_loss_quadratic_forms_match_dense_oracle(estimator):
    """On a smooth net the block form of ℓ̄ differs from CE's (z'' is weighted by p − F⁻¹[ỹ])."""
    module = tiny_mlp("gelu")
    inverse = torch.linalg.inv(NOISE)
    fm, params = FunctionalModel.from_module(module, loss=ConsistentCrossEntropy(inverse))
    ce, _ = FunctionalModel.from_module(module)
    layers = ["fc1.weight", "fc2.weight"]
    reference = perturbed_reference(params, layers)
    v = {name: params[name] - reference[name] for name in layers}
    x, y = tiny_data("mlp_gelu", 6)
    forms = quadratic_forms(fm, params, v, [(x, y)], estimator=estimator)
    plain = quadratic_forms(ce, params, v, [(x, y)], estimator=estimator)
    dense = dense_block_hessians if estimator == "block" else dense_ggn_blocks
    for name in layers:
        values = dense_forms(dense(module, params, name, x, y, consistent_loss(inverse)), v[name])
        assert forms[name].max == pytest.approx(float(values.max()), rel=1e-6)
        assert forms[name].mean == pytest.approx(float(values.mean()), rel=1e-6)
        assert forms[name].argmax == int(values.argmax())
        if estimator == "block":
            assert forms[name].mean != pytest.approx(plain[name].mean, rel=1e-3)
        else:
            assert forms[name].mean == pytest.approx(plain[name].mean, rel=1e-10)


def test_gauss_newton_traces_of_consistent_loss_equal_dense_trace():
    module = tiny_mlp("tanh")
    inverse = torch.linalg.inv(NOISE)
    fm, params = FunctionalModel.from_module(module, loss=ConsistentCrossEntropy(inverse))
    x, y = tiny_data("mlp_tanh", 4)
    traces = gauss_newton_traces(fm, params, ["fc2.weight"], x, y)["fc2.weight"]
    G = dense_ggn_blocks(module, params, "fc2.weight", x, y, consistent_loss(inverse))
    torch.testing.assert_close(traces, torch.diagonal(G, dim1=1, dim2=2).sum(-1))
