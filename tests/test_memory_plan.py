"""Calls sized to a memory budget (bounds.linalg.memory): sizes, retries, and values that do not
depend on the chunks (the estimators under a tight plan give what they give in one call)."""

from collections.abc import Callable

import pytest
import torch
from hessfine.bounds.estimators.noise_stability import noise_stability
from hessfine.bounds.estimators.quadratic_forms import quadratic_forms
from hessfine.bounds.estimators.spectra import top_eigenvalues
from hessfine.bounds.estimators.traces import layer_traces, positive_trace_max
from hessfine.bounds.linalg.memory import CallSize, MemoryBudgetError, MemoryPlan
from hessfine.bounds.pac_bayes import pac_bayes_certificate

from tests.cases import tiny_case


class TightMeter:
    """Every measured call grows memory by ``growth`` bytes, whatever its items, under a
    ``headroom`` that stays put: the fitted model (a + b·k with a = ¾·growth, b = growth/8 after
    the probes) then allows calls of a few items, so the estimators split every batch."""

    def __init__(self, headroom: int = 10**9, growth: int = 8 * 10**8) -> None:
        self.room, self.growth = headroom, growth
        self.calls = 0

    def headroom(self) -> int:
        return self.room

    def measure(self, call: Callable[[], object]) -> tuple[object, int]:
        self.calls += 1
        return call(), self.growth


def spans(calls: CallSize, n: int, fail_above: int | None = None) -> list[int]:
    """The items of the calls covering ``range(n)`` (calls of more than ``fail_above`` items run
    out of memory)."""

    def call(start: int, stop: int) -> int:
        if fail_above is not None and stop - start > fail_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return stop - start

    return calls.run(call, n)


def test_calls_start_with_the_probe_pass_then_fill_the_headroom_up_to_the_cap():
    # growth 0.8 GB at every size: b = 0.1 GB, a = 0.6 GB, 0.9 GB of room: k = 3, then the
    # secant through equal growths keeps b at growth/(4k) and the calls grow, up to the cap
    plan = MemoryPlan(TightMeter(), cap=6)
    sizes = spans(plan.calls("x"), 30)
    assert sizes[:3] == [1, 1, 2] and sum(sizes) == 30
    assert max(sizes) == 6 and sizes[3] == 3
    assert plan.sizes() == {"x": 6}


def test_without_a_meter_a_call_takes_the_cap_or_everything():
    assert spans(MemoryPlan().calls("x"), 10) == [10]
    assert spans(MemoryPlan(cap=4).calls("x"), 10) == [4, 4, 2]
    assert MemoryPlan().sizes() == {}


def test_a_call_that_runs_out_of_memory_is_rerun_with_half_the_items():
    sizes = spans(MemoryPlan(cap=8).calls("x"), 20, fail_above=3)
    assert sum(sizes) == 20 and max(sizes) <= 3
    with pytest.raises(MemoryBudgetError, match="x: one item ran out of memory"):
        spans(MemoryPlan(cap=8).calls("x"), 20, fail_above=0)


def test_one_item_that_outgrows_the_headroom_is_a_budget_error():
    plan = MemoryPlan(TightMeter(headroom=100, growth=200))
    with pytest.raises(MemoryBudgetError, match="x: one item needs 200 bytes, 100 bytes left"):
        spans(plan.calls("x"), 5)


def test_steady_calls_split_equal_batches_alike():
    plan = MemoryPlan(TightMeter(), cap=16)
    calls = plan.calls("loss", steady=True)
    calls.fit(lambda k: k, 12)  # the probe pass apart
    first, second = spans(calls, 12), spans(calls, 12)
    assert first == second == [3, 3, 3, 3]


NETWORKS = ["mlp_gelu", "attention"]


def case(network: str):
    _, fm, params, directions, x, y = tiny_case(network, 10)
    return fm, params, directions, [(x[:6], y[:6]), (x[6:], y[6:])]


def tight() -> MemoryPlan:
    return MemoryPlan(TightMeter(), cap=6)


def assert_close(found: object, expected: object) -> None:
    """Equal JSON values, numbers to round-off."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and found.keys() == expected.keys()
        for key, value in expected.items():
            assert_close(found[key], value)
    elif isinstance(expected, list):
        assert isinstance(found, list) and len(found) == len(expected)
        for a, b in zip(found, expected, strict=True):
            assert_close(a, b)
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, rel=1e-9, abs=1e-12)
    else:
        assert found == expected


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("estimator", ["block", "ggn", "auto"])
def test_quadratic_forms_do_not_depend_on_the_chunks(network, estimator):
    fm, params, directions, batches = case(network)
    options = {"estimator": estimator, "lanczos_steps": 12, "positive_rtol": 0.0}
    whole = quadratic_forms(fm, params, directions, batches, **options)
    plan = tight()
    chunked = quadratic_forms(fm, params, directions, batches, **options, memory=plan)
    assert plan.sizes() and min(plan.sizes().values()) < 6  # the batches were split
    for name, form in whole.items():
        assert chunked[name].max == pytest.approx(form.max, rel=1e-10)
        assert chunked[name].argmax == form.argmax
        assert chunked[name].mean == pytest.approx(form.mean, rel=1e-10)
        assert chunked[name].route == form.route


@pytest.mark.parametrize("network", NETWORKS)
def test_traces_and_eigenvalues_do_not_depend_on_the_chunks(network):
    fm, params, directions, batches = case(network)
    layers = list(directions)
    for estimate in (layer_traces, top_eigenvalues):
        options = {"probes": 4} if estimate is layer_traces else {"k": 2, "steps": 8}
        whole = estimate(fm, params, layers, batches, **options)
        plan = tight()
        chunked = estimate(fm, params, layers, batches, **options, memory=plan)
        assert min(plan.sizes().values()) < 6
        for name in layers:
            assert_close(chunked[name].to_json(), whole[name].to_json())


def test_positive_traces_do_not_depend_on_the_chunks():
    fm, params, directions, batches = case("attention")
    layers = list(directions)
    certified = {name: False for name in layers}
    options = {"certified": certified, "probes": 3, "lanczos_steps": 8, "dense_limit": 30}
    whole = positive_trace_max(fm, params, layers, batches, **options)
    plan = tight()
    chunked = positive_trace_max(fm, params, layers, batches, **options, memory=plan)
    assert min(plan.sizes().values()) < 6
    for name in layers:
        assert_close(chunked[name].to_json(), whole[name].to_json())


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("relative", [False, True])
def test_noise_stability_does_not_depend_on_the_chunks(network, relative):
    fm, params, directions, batches = case(network)
    options = {"sigma": 1e-2, "draws": 5, "relative": relative}
    whole = noise_stability(fm, params, list(directions), batches, **options, generator=seed())
    plan = tight()
    chunked = noise_stability(
        fm, params, list(directions), batches, **options, generator=seed(), memory=plan
    )
    assert plan.sizes()["noise"] < 6  # the batches were split
    assert_close(chunked.to_json(), whole.to_json())


@pytest.mark.parametrize("examples_per_draw", [1, 2])
def test_the_certificate_does_not_depend_on_the_chunks(examples_per_draw):
    fm, params, directions, batches = case("mlp_gelu")
    reference = {name: params[name] - v for name, v in directions.items()}
    layers = list(directions)
    options = {"n": 10, "curvature": dict.fromkeys(layers, 1.0), "draws": 3}
    options |= {"examples_per_draw": examples_per_draw}
    whole = pac_bayes_certificate(
        fm, params, reference, layers, batches, **options, generator=seed()
    )
    plan = MemoryPlan(TightMeter(), cap=6)
    chunked = pac_bayes_certificate(
        fm, params, reference, layers, batches, **options, generator=seed(), memory=plan
    )
    assert plan.sizes()["certificate"] < 6 // examples_per_draw
    assert set(plan.sizes()) == {"certificate"}
    assert_close(chunked.to_json(), whole.to_json())


def seed() -> torch.Generator:
    return torch.Generator().manual_seed(3)
