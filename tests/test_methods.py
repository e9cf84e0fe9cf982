"""Fine-tuning methods: projections, penalties, early stopping and every method end to end."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
from hessfine.finetune.confusion import corrupt_labels, symmetric_confusion
from hessfine.finetune.digit_networks import digits_cnn
from hessfine.finetune.method_registry import (
    L2SP,
    Backward,
    BatchLoss,
    ConsistentLoss,
    CrossEntropy,
    GradientRule,
    LabelSmoothing,
    Mixup,
    NoiseStability,
    SharpnessAware,
)
from hessfine.finetune.methods import (
    CONSISTENT_METHODS,
    CONSTRAINED_METHODS,
    METHODS,
    METRIC_COLUMNS,
    REGISTRY,
    FinetuneConfig,
    FinetuneMethod,
    finetune,
    l2sp_penalty,
    layer_radii,
    learning_rate,
    load_reference,
    make_optimizer,
    noise_generator,
    nso_gradient,
    predict_probs,
    project_to_balls,
    sam_gradient,
)
from sklearn.datasets import load_digits
from torch import nn

N_TRAIN = 240
WIDTH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


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
        "sam",
        "nso",
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


# ------------------------------------------------------------ update rules in closed form
A_DIAG = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
W0 = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)


def quadratic():
    """L(w) = ½wᵀAw with A = diag(1, 3, ½): ∇L = Aw."""
    w = nn.Parameter(W0.clone())
    return nn.ParameterList([w]), w, lambda: 0.5 * (A_DIAG * w * w).sum()


def test_one_sam_step_on_a_quadratic_by_hand():
    model, w, loss = quadratic()
    rho, lr = 0.3, 0.1
    g = A_DIAG * W0
    expected_grad = A_DIAG * (W0 + rho * g / g.norm())  # ∇L at the ascent point
    value = sam_gradient(model, loss, rho=rho)
    assert value.item() == pytest.approx(0.5 * float((A_DIAG * W0 * W0).sum()))
    torch.testing.assert_close(w.grad, expected_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.detach(), W0, rtol=0, atol=0)  # back at W
    optimizer = make_optimizer([w], FinetuneConfig("sam", lr=lr, momentum=0.0))
    optimizer.step()
    torch.testing.assert_close(w.detach(), W0 - lr * expected_grad, rtol=1e-12, atol=0)


def test_sam_with_a_zero_gradient_does_not_move_the_point():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    sam_gradient(nn.ParameterList([w]), lambda: 0.5 * (A_DIAG * w * w).sum(), rho=1.0)
    assert torch.count_nonzero(w.grad) == 0


def test_one_nso_step_by_hand_and_the_noise_cancels_on_a_quadratic():
    sigma, draws = 0.2, 3
    # A quartic L = ¼Σw⁴: the average over ±ε_j of (w ± ε_j)³ is w³ + 3w·mean_j ε_j².
    w = nn.Parameter(W0.clone())
    value = nso_gradient(
        nn.ParameterList([w]),
        lambda: 0.25 * (w**4).sum(),
        sigma=sigma,
        draws=draws,
        generator=noise_generator(7),
    )
    replay = noise_generator(7)
    eps = torch.stack([sigma * torch.randn(3, generator=replay) for _ in range(draws)]).double()
    expected = W0**3 + 3 * W0 * eps.square().mean(dim=0)
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-15)
    losses = [0.25 * ((W0 + s * e) ** 4).sum() for e in eps for s in (1, -1)]
    assert value.item() == pytest.approx(float(torch.stack(losses).mean()), rel=1e-12)
    torch.testing.assert_close(w.detach(), W0, rtol=0, atol=0)
    # On a quadratic the antithetic pair cancels the noise exactly: the plain gradient Aw.
    model, wq, loss = quadratic()
    nso_gradient(model, loss, sigma=0.5, draws=2, generator=noise_generator(0))
    torch.testing.assert_close(wq.grad, A_DIAG * W0, rtol=1e-12, atol=1e-12)


def test_nso_noise_is_seeded_and_distinct_from_the_batch_stream():
    a = torch.randn(5, generator=noise_generator(3))
    assert torch.equal(a, torch.randn(5, generator=noise_generator(3)))
    assert not torch.equal(a, torch.randn(5, generator=noise_generator(4)))
    assert not torch.equal(a, torch.randn(5, generator=torch.Generator().manual_seed(3)))


def test_adamw_first_two_steps_by_hand():
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.8, 0.9, 1e-8
    config = FinetuneConfig(
        "plain",
        optimizer="adamw",
        lr=lr,
        weight_decay=wd,
        adam_beta1=b1,
        adam_beta2=b2,
        adam_eps=eps,
    )
    _, w, loss = quadratic()
    optimizer = make_optimizer([w], config)
    x, m, v = W0.clone(), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in (1, 2):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        g = A_DIAG * x
        x = x * (1 - lr * wd)  # decoupled decay, applied to the weights before the Adam step
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(w.detach(), x, rtol=1e-12, atol=1e-14)
    # Step one moves every coordinate by lr·sign(g) (plus the decay), whatever |g| is.
    first = W0 * (1 - lr * wd) - lr * torch.sign(A_DIAG * W0)
    _, w1, loss1 = quadratic()
    optimizer = make_optimizer([w1], config)
    loss1().backward()
    optimizer.step()
    torch.testing.assert_close(w1.detach(), first, rtol=1e-7, atol=1e-9)


def test_sgd_momentum_and_coupled_weight_decay_by_hand():
    lr, mu, wd = 0.1, 0.9, 0.2
    _, w, loss = quadratic()
    optimizer = make_optimizer([w], FinetuneConfig("plain", lr=lr, momentum=mu, weight_decay=wd))
    x, buf = W0.clone(), None
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
        g = A_DIAG * x + wd * x
        buf = g if buf is None else mu * buf + g
        x = x - lr * buf
        torch.testing.assert_close(w.detach(), x, rtol=1e-12, atol=1e-14)


def test_schedules_learning_rate_at_given_epochs():
    constant = FinetuneConfig("plain", epochs=5, lr=0.2)
    assert [learning_rate(constant, e) for e in (1, 3, 5)] == [0.2, 0.2, 0.2]
    step = FinetuneConfig("plain", epochs=9, lr=0.4, schedule="step", lr_step_size=3, lr_gamma=0.5)
    assert [learning_rate(step, e) for e in range(1, 10)] == pytest.approx(
        [0.4] * 3 + [0.2] * 3 + [0.1] * 3
    )
    cosine = FinetuneConfig("plain", epochs=4, lr=0.3, schedule="cosine", lr_min=0.1)
    expected = [0.1 + 0.1 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [learning_rate(cosine, e) for e in range(1, 5)] == pytest.approx(expected)
    assert learning_rate(cosine, 3) == pytest.approx(0.2)  # halfway: the midpoint
    with pytest.raises(ValueError, match="epoch"):
        learning_rate(cosine, 5)


def test_new_options_are_validated():
    for options, name in [
        ({"optimizer": "adam"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"sam_rho": 0.0}, "sam_rho"),
        ({"nso_sigma": -1.0}, "nso_sigma"),
        ({"nso_draws": 0}, "nso_draws"),
        ({"lr_gamma": 1.5}, "lr_gamma"),
        ({"lr_step_size": 0}, "lr_step_size"),
        ({"lr_min": 1.0}, "lr_min"),
        ({"adam_beta2": 1.0}, "adam_beta2"),
        ({"adam_eps": 0.0}, "adam_eps"),
    ]:
        with pytest.raises(ValueError, match=name):
            FinetuneConfig("plain", **options)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("sam", {"sam_rho": 0.05}),
        ("nso", {"nso_sigma": 0.01, "nso_draws": 2}),
        ("plain", {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.01}),
    ],
)
def test_sam_nso_and_adamw_learn_the_digits_with_a_schedule(digits, pretrained, method, options):
    x, y, ex, ey = digits
    model, reference = pretrained()
    config = FinetuneConfig(method, epochs=3, schedule="cosine", **{"lr": 0.05, **options})
    result = finetune(model, reference, train_x=x, train_y=y, eval_x=ex, eval_y=ey, config=config)
    assert [row["lr"] for row in result.metrics] == pytest.approx(
        [learning_rate(config, e) for e in (1, 2, 3)]
    )
    assert result.metrics[-1]["train_acc_clean"] > 0.5
    again, _ = pretrained()
    finetune(again, reference, train_x=x, train_y=y, config=config)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name


@pytest.mark.parametrize("method", ["sam", "nso"])
def test_batchnorm_statistics_come_from_the_unperturbed_weights(digits, pretrained, method):
    x, y, _, _ = digits
    states = []
    for name in (method, "plain"):
        model, reference = pretrained()
        config = FinetuneConfig(
            name, epochs=1, lr=1e-12, batch_size=64, sam_rho=5.0, nso_sigma=1.0, nso_draws=2
        )
        finetune(model, reference, train_x=x[:64], train_y=y[:64], config=config)
        states.append(model.state_dict())
    # With a vanishing step both runs see the same weights at W; only the ascent or perturbed
    # passes (far from W) could change the statistics differently, and they must not.
    for key in ("bn1.running_mean", "bn2.running_var"):
        torch.testing.assert_close(states[0][key], states[1][key])
    assert torch.equal(states[0]["bn1.num_batches_tracked"], states[1]["bn1.num_batches_tracked"])


# ------------------------------------------------------------ the registry of method objects
def test_the_registry_declares_what_each_method_does():
    assert tuple(REGISTRY) == METHODS
    assert all(isinstance(method, FinetuneMethod) for method in REGISTRY.values())
    assert {n for n in METHODS if REGISTRY[n].needs_confusion} == CONSISTENT_METHODS
    assert {n for n in METHODS if REGISTRY[n].constrained} == CONSTRAINED_METHODS
    assert {"consistent", "robust"} == CONSISTENT_METHODS
    assert {"distance-constraint", "robust"} == CONSTRAINED_METHODS
    assert {n for n in METHODS if REGISTRY[n].early_stopping} == {"early-stopping"}
    assert {n: type(REGISTRY[n].penalty) for n in METHODS if REGISTRY[n].penalty} == {"l2-sp": L2SP}
    losses = {n: type(REGISTRY[n].loss) for n in METHODS}
    assert losses == {
        **dict.fromkeys(METHODS, CrossEntropy),
        "label-smoothing": LabelSmoothing,
        "mixup": Mixup,
        "consistent": ConsistentLoss,
        "robust": ConsistentLoss,
    }
    rules = {n: type(REGISTRY[n].gradient) for n in METHODS}
    assert rules == {
        **dict.fromkeys(METHODS, Backward),
        "sam": SharpnessAware,
        "nso": NoiseStability,
    }
    # The paper's algorithm is the consistent loss plus the distance constraint, nothing else.
    assert REGISTRY["robust"] == replace(REGISTRY["consistent"], constrained=True)
    assert REGISTRY["distance-constraint"] == replace(REGISTRY["plain"], constrained=True)
    with pytest.raises(ValueError, match="choose one of " + ", ".join(METHODS)):
        FinetuneConfig("sgd")


class CountedBackward(GradientRule):
    """Plain backpropagation that counts its calls."""

    def __init__(self):
        self.calls = 0

    def backward(self, run, closure):
        self.calls += 1
        return Backward().backward(run, closure)


@dataclass(frozen=True)
class BrierScore(BatchLoss):
    """Σ_j (softmax(f(x))_j − onehot(y)_j)², the mean over the batch; it needs F (to test the
    declaration only)."""

    needs_confusion = True

    def closure(self, run, x, y):
        def loss():
            probs = torch.softmax(run.model(x), dim=1)
            return (probs - nn.functional.one_hot(y, probs.shape[1])).square().sum(dim=1).mean()

        return loss


def test_a_registered_method_fine_tunes_through_the_same_loop(digits, pretrained, monkeypatch):
    x, y, _, _ = digits
    counted = CountedBackward()
    monkeypatch.setitem(REGISTRY, "counted", FinetuneMethod(gradient=counted))
    config = FinetuneConfig("counted", epochs=2, lr=0.05, batch_size=40)
    model, reference = pretrained()
    result = finetune(model, reference, train_x=x, train_y=y, config=config)
    assert counted.calls == 2 * N_TRAIN // 40  # the loop asked the object once per batch
    # The same parts as ``plain``: the same run, to the bit.
    plain, _ = pretrained()
    expected = finetune(
        plain, reference, train_x=x, train_y=y, config=replace(config, method="plain")
    )
    assert result.metrics == expected.metrics
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name

    # A new loss composed with the constraint and early stopping: each part is honoured.
    brier = FinetuneMethod(loss=BrierScore(), constrained=True, early_stopping=True)
    monkeypatch.setitem(REGISTRY, "brier", brier)
    with pytest.raises(ValueError, match="noise matrix"):
        FinetuneConfig("brier")
    identity = tuple(tuple(row) for row in torch.eye(10, dtype=torch.float64).tolist())
    config = FinetuneConfig("brier", epochs=3, lr=0.5, radius=0.3, confusion=identity)
    model, reference = pretrained()
    result = finetune(model, reference, train_x=x, train_y=y, config=config)
    assert result.confusion_source == "given" and result.best_epoch is not None
    assert len(result.validation_indices) == round(config.validation_fraction * N_TRAIN)
    assert result.radii == pytest.approx(
        layer_radii(model, reference, radius=0.3, head_radius=config.head_radius)
    )
    for name, distance in distances(model, reference, result.radii).items():
        assert distance <= result.radii[name] * (1 + 1e-5), name
    assert all(0 < row["objective"] < 2 for row in result.metrics)  # a Brier score lies in [0, 2]
