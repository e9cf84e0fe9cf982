"""Fine-tuning methods: projections, penalties, early stopping and every method end to end."""

import math

import pytest
import torch
from hessfine.finetune.label_noise import corrupt_labels, symmetric_confusion
from hessfine.finetune.methods import (
    METHODS,
    METRIC_COLUMNS,
    FinetuneConfig,
    finetune,
    l2sp_penalty,
    layer_radii,
    load_reference,
    predict_probs,
    project_to_balls,
)
from hessfine.finetune.models import digits_cnn
from sklearn.datasets import load_digits
from torch import nn

N_TRAIN = 240
WIDTH = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run fastest (and steadiest on a shared machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits():
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.long)


@pytest.fixture(scope="module")
def digits():
    """Fine-tuning data: 240 training and 120 evaluation digits."""
    x, y = _digits()
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN : N_TRAIN + 120], y[N_TRAIN : N_TRAIN + 120]


@pytest.fixture(scope="module")
def source_state(one_thread):
    """A network pretrained (4 epochs, plain) on other digits; its state without the head."""
    x, y = _digits()
    torch.manual_seed(0)
    net = digits_cnn(width=WIDTH)
    finetune(
        net,
        {},
        train_x=x[600:1400],
        train_y=y[600:1400],
        config=FinetuneConfig("plain", epochs=4, lr=0.1),
    )
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("head.")}


@pytest.fixture
def pretrained(source_state):
    """Factory: a fresh model (new head, seeded) and the pretrained reference state."""

    def make(seed=100):
        torch.manual_seed(seed)
        return digits_cnn(width=WIDTH), source_state

    return make


def distances(model, reference, names):
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        centre = reference.get(name)
        delta = params[name] if centre is None else params[name] - centre
        out[name] = torch.linalg.vector_norm(delta).item()
    return out


def test_load_reference_keeps_a_fresh_head(pretrained):
    model, reference = pretrained()
    head_before = model.head.weight.detach().clone()
    loaded = load_reference(model, reference)
    assert "head.weight" not in loaded and "conv1.weight" in loaded and "bn1.running_var" in loaded
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])
    assert torch.equal(model.head.weight, head_before)


def test_layer_radii_scale_geometrically_with_depth(pretrained):
    model, reference = pretrained()
    radii = layer_radii(model, reference, radius=0.5, head_radius=7.0, depth_scaling=4.0)
    assert list(radii) == ["conv1.weight", "conv2.weight", "conv3.weight", "head.weight"]
    assert radii["conv1.weight"] == pytest.approx(0.5)
    assert radii["conv2.weight"] == pytest.approx(0.5 * 2.0)  # 4^(1/2)
    assert radii["conv3.weight"] == pytest.approx(0.5 * 4.0)
    assert radii["head.weight"] == 7.0


def test_projection_is_a_noop_inside_and_lands_on_the_sphere_outside(pretrained):
    model, reference = pretrained()
    load_reference(model, reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.conv1.weight.add_(0.01 * torch.randn(model.conv1.weight.shape, generator=g))
        model.conv2.weight.add_(torch.randn(model.conv2.weight.shape, generator=g))
    radii = {"conv1.weight": 1.0, "conv2.weight": 1.0, "head.weight": 0.3}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    old = distances(model, reference, radii)
    assert old["conv1.weight"] < 1.0 < old["conv2.weight"] and old["head.weight"] > 0.3
    after = project_to_balls(model, reference, radii)
    # Inside: bit-for-bit untouched.
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    # Outside: on the sphere, along the same direction from the centre (reference or zero).
    assert after["conv2.weight"] == pytest.approx(1.0, rel=1e-6)
    assert after["head.weight"] == pytest.approx(0.3, rel=1e-6)
    expected = reference["conv2.weight"] + (before["conv2.weight"] - reference["conv2.weight"]) * (
        1.0 / old["conv2.weight"]
    )
    torch.testing.assert_close(model.conv2.weight.detach(), expected)
    torch.testing.assert_close(
        model.head.weight.detach(), before["head.weight"] * (0.3 / old["head.weight"])
    )
    assert distances(model, reference, radii) == pytest.approx(after)
    # Parameters without a radius are untouched.
    assert torch.equal(model.bn1.weight, before["bn1.weight"])


def test_l2sp_penalty_value_and_gradient(pretrained):
    model, reference = pretrained()
    load_reference(model, reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    alpha = 0.3
    penalty = l2sp_penalty(model, reference, alpha)
    shared = [n for n, _ in model.named_parameters() if n in reference]
    params = dict(model.named_parameters())
    value = sum(0.5 * alpha * (params[n] - reference[n]).square().sum() for n in shared)
    torch.testing.assert_close(penalty, value)
    penalty.backward()
    for name, p in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(p.grad, alpha * (p.detach() - reference[name]))
        else:  # the new head is not pulled towards anything
            assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        FinetuneConfig("sgd")
    with pytest.raises(ValueError, match="radius"):
        FinetuneConfig("robust", radius=-1.0, confusion=((1.0, 0.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="noise matrix"):
        FinetuneConfig("consistent")
    with pytest.raises(ValueError, match="sum to 1"):
        FinetuneConfig("consistent", confusion=((0.5, 0.4), (0.0, 1.0)))
    config = FinetuneConfig("consistent", confusion=[[0.9, 0.1], [0.2, 0.8]])
    assert config.confusion == ((0.9, 0.1), (0.2, 0.8))
    assert config.to_dict()["confusion"] == [[0.9, 0.1], [0.2, 0.8]]
    assert set(config.to_dict()) >= {"method", "epochs", "radius", "head_radius", "save_every"}


def test_distance_constraint_keeps_every_layer_in_its_ball(digits, pretrained):
    x, y, _, _ = digits
    model, reference = pretrained()
    config = FinetuneConfig(
        "distance-constraint", epochs=3, lr=0.05, radius=0.2, head_radius=0.8, depth_scaling=2.0
    )
    seen = []

    def check(epoch, trained, row):
        seen.append(distances(trained, reference, result_radii))

    result_radii = layer_radii(model, reference, radius=0.2, head_radius=0.8, depth_scaling=2.0)
    result = finetune(model, reference, train_x=x, train_y=y, config=config, on_epoch=check)
    assert result.radii == pytest.approx(result_radii)
    for epoch_distances in seen:
        for name, distance in epoch_distances.items():
            assert distance <= result.radii[name] * (1 + 1e-5), name
    # The constraint is active: training pushes the layers to the boundary.
    assert max(d / result.radii[n] for n, d in seen[-1].items()) > 0.99
    # An unconstrained run from the same start moves much further.
    free_model, _ = pretrained()
    finetune(
        free_model,
        reference,
        train_x=x,
        train_y=y,
        config=FinetuneConfig("plain", epochs=3, lr=0.05),
    )
    free = distances(free_model, reference, result_radii)
    assert free["conv1.weight"] > 1.5 * result.radii["conv1.weight"]


def test_early_stopping_picks_the_best_validation_epoch(digits, pretrained):
    x, y, _, _ = digits
    noisy = corrupt_labels(
        y, symmetric_confusion(10, 0.6), generator=torch.Generator().manual_seed(0)
    )
    model, reference = pretrained()
    config = FinetuneConfig(
        "early-stopping", epochs=15, lr=0.1, patience=2, validation_fraction=0.25
    )
    result = finetune(model, reference, train_x=x, train_y=noisy, train_y_clean=y, config=config)
    losses = [row["val_loss"] for row in result.metrics]
    assert all(v is not None for v in losses)
    assert result.best_epoch == 1 + min(range(len(losses)), key=losses.__getitem__)
    assert len(result.metrics) <= result.best_epoch + config.patience
    if len(result.metrics) < config.epochs:  # stopped early: exactly `patience` stale epochs
        assert len(result.metrics) == result.best_epoch + config.patience
    for name, value in model.state_dict().items():
        assert torch.equal(value, result.best_state[name])
    held = result.validation_indices
    assert len(held) == round(0.25 * N_TRAIN) and len(set(held)) == len(held)


@pytest.mark.parametrize("method", ["plain", "label-smoothing", "mixup", "l2-sp"])
def test_baselines_learn_the_digits(digits, pretrained, method):
    x, y, ex, ey = digits
    model, reference = pretrained()
    config = FinetuneConfig(method, epochs=4, lr=0.05, l2sp_alpha=0.01)
    result = finetune(model, reference, train_x=x, train_y=y, eval_x=ex, eval_y=ey, config=config)
    assert [row["epoch"] for row in result.metrics] == [1, 2, 3, 4]
    for row in result.metrics:
        assert set(row) == set(METRIC_COLUMNS)
        assert row["val_loss"] is None and row["val_acc"] is None
        for key in ("train_loss_noisy", "train_loss_clean", "eval_loss", "objective"):
            assert math.isfinite(row[key])
        assert row["train_loss_noisy"] == row["train_loss_clean"]  # no noise given
    assert result.metrics[-1]["train_acc_clean"] > 0.5  # chance is 0.1
    assert result.metrics[-1]["eval_acc"] > 0.4
    assert not model.training


def test_consistent_and_robust_with_a_known_and_an_estimated_matrix(digits, pretrained):
    x, y, ex, ey = digits
    matrix = symmetric_confusion(10, 0.3)
    noisy = corrupt_labels(y, matrix, generator=torch.Generator().manual_seed(3))
    given = tuple(tuple(r) for r in matrix.tolist())
    for method, options in [
        ("consistent", {"confusion": given}),
        ("robust", {"confusion": given, "radius": 0.5}),
        ("robust", {"estimate_confusion": True, "radius": 0.5}),
    ]:
        model, reference = pretrained()
        config = FinetuneConfig(method, epochs=3, lr=0.02, **options)
        result = finetune(
            model,
            reference,
            train_x=x,
            train_y=noisy,
            train_y_clean=y,
            eval_x=ex,
            eval_y=ey,
            config=config,
        )
        estimated = options.get("estimate_confusion", False)
        assert result.confusion_source == ("dual-t" if estimated else "given")
        used = torch.tensor(result.confusion, dtype=torch.float64)
        torch.testing.assert_close(used.sum(dim=1), torch.ones(10, dtype=torch.float64))
        assert (result.radii is not None) == (method == "robust")
        assert all(math.isfinite(row["objective"]) for row in result.metrics)
        if estimated:  # Dual-T from a 3-epoch noisy-label model: a valid, different matrix
            assert (used >= 0).all() and not torch.allclose(used, matrix, atol=0.05)
        else:
            torch.testing.assert_close(used, matrix)
            assert result.metrics[-1]["train_acc_clean"] > 0.8  # clean accuracy from noisy labels


def test_every_method_is_covered_and_probs_are_distributions(digits, pretrained):
    x, y, _, _ = digits
    assert set(METHODS) == {
        "plain",
        "early-stopping",
        "l2-sp",
        "distance-constraint",
        "label-smoothing",
        "mixup",
        "consistent",
        "robust",
    }
    model, _ = pretrained()
    probs = predict_probs(model, x[:10])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(10))


def test_training_is_deterministic_and_leaves_the_global_rng_alone(digits, pretrained):
    x, y, _, _ = digits
    states = []
    for _ in range(2):
        model, reference = pretrained()
        torch.manual_seed(1234)
        marker = torch.rand(1)
        torch.manual_seed(1234)
        finetune(
            model, reference, train_x=x, train_y=y, config=FinetuneConfig("mixup", epochs=2, seed=5)
        )
        assert torch.equal(torch.rand(1), marker)
        states.append(model.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    model, reference = pretrained()
    finetune(
        model, reference, train_x=x, train_y=y, config=FinetuneConfig("mixup", epochs=2, seed=6)
    )
    assert not torch.equal(model.conv1.weight, states[0]["conv1.weight"])


def test_bad_data_is_refused(pretrained):
    model, reference = pretrained()
    with pytest.raises(ValueError, match="one per input"):
        finetune(
            model,
            reference,
            train_x=torch.zeros(4, 1, 8, 8),
            train_y=torch.zeros(3, dtype=torch.long),
            config=FinetuneConfig("plain", epochs=1),
        )
    with pytest.raises(ValueError, match="both"):
        finetune(
            model,
            reference,
            train_x=torch.zeros(4, 1, 8, 8),
            train_y=torch.zeros(4, dtype=torch.long),
            eval_x=torch.zeros(2, 1, 8, 8),
            config=FinetuneConfig("plain", epochs=1),
        )


def test_models_forward_and_head_name():
    net = digits_cnn(num_classes=3, width=2)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 3
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(net.eval()(x), net(x.reshape(5, 64)))
