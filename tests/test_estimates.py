"""The result types: their JSON form, their merge across processes and their unused-layer form."""

import warnings

import pytest
import torch
from hessfine.bounds.estimates import (
    UNUSED,
    Eigenvalues,
    NoiseStability,
    PositiveTrace,
    QuadraticForm,
    RunningReduction,
    SpectralDensity,
    TraceEstimate,
    merge_diagnostics,
    merge_layers,
)


def reduce(values, start=None, diagnostics=None):
    r = RunningReduction()
    r.update(torch.tensor(values, dtype=torch.float64), start=start)
    return r.form("w", "lanczos", diagnostics or {})


def test_running_reduction_streams():
    r = RunningReduction()
    r.update(torch.tensor([1.0, 5.0]))
    r.update(torch.tensor([7.0, -2.0, 3.0]))
    assert (r.max, r.argmax, r.count) == (7.0, 2, 5)
    assert r.mean == pytest.approx(14.0 / 5)


def test_running_reduction_takes_global_indices_and_skips_empty_blocks():
    r = RunningReduction()
    r.update(torch.tensor([]), start=0)
    r.update(torch.tensor([1.0, 4.0]), start=10)
    r.update(torch.tensor([4.0]), start=3)  # a tie keeps the first maximum seen
    assert (r.max, r.argmax, r.count, r.total) == (4.0, 11, 3, 9.0)
    assert RunningReduction().mean == 0.0


def test_merged_quadratic_form_equals_the_reduction_of_all_values_at_once():
    values = [0.5, 3.0, -1.0, 2.0, 3.0, 1.5, 0.25]
    whole = reduce(values)
    # two processes holding examples 0–3 and 4–6: the tie at 3.0 (examples 1 and 4) goes to 1
    parts = [reduce(values[:4], start=0), reduce(values[4:], start=4)]
    merged = QuadraticForm.merge(parts)
    assert merged == QuadraticForm.merge(parts[::-1])
    assert (merged.max, merged.argmax, merged.count) == (whole.max, whole.argmax, whole.count)
    assert (merged.name, merged.route) == ("w", "lanczos")
    assert merged.argmax == 1
    assert merged.mean == pytest.approx(whole.mean, rel=1e-15)
    assert QuadraticForm.merge(parts[:1]) is parts[0]


def test_quadratic_form_merge_leaves_out_empty_parts_and_merges_diagnostics():
    held = [
        reduce([1.0, 2.0], start=0, diagnostics={"pruned_fraction": 0.5, "lanczos_steps_max": 4}),
        reduce([2.0], start=2, diagnostics={"pruned_fraction": 1.0, "lanczos_steps_max": 9}),
    ]
    empty = RunningReduction().form("w", "auto", {})  # a process without examples
    merged = QuadraticForm.merge([empty, *held])
    assert (merged.max, merged.argmax, merged.count, merged.route) == (2.0, 1, 3, "lanczos")
    assert merged.diagnostics == {"pruned_fraction": pytest.approx(2 / 3), "lanczos_steps_max": 9}
    assert QuadraticForm.merge([empty, empty]).count == 0


def test_quadratic_form_json_and_unused_form():
    form = reduce([1.0, 3.0])
    exact = {"max": 3.0, "mean": 2.0, "mean_lower": 2.0, "mean_upper": 2.0, "argmax": 1}
    assert form.to_json() == exact
    unused = QuadraticForm.unused("v", 7)
    assert (unused.max, unused.mean, unused.argmax, unused.count) == (0.0, 0.0, 0, 7)
    assert unused.route == UNUSED and unused.diagnostics == {"used_in_eval": False}
    assert QuadraticForm.merge([unused, unused]).count == 14


def test_mean_interval_from_bounds_merges_by_count():
    # values with rigorous bounds (the lanczos route): [mean_lower, mean_upper] the means of the
    # bounds, over blocks; merged with an exact part, the exact part's ends are its mean
    r = RunningReduction()
    r.update(
        torch.tensor([1.0, 3.0]), lower=torch.tensor([0.9, 3.0]), upper=torch.tensor([1.2, 3.0])
    )
    r.update(torch.tensor([2.0]), lower=torch.tensor([1.5]), upper=torch.tensor([2.3]))
    bounded = r.form("v", "lanczos", {})
    assert bounded.to_json()["mean"] == 2.0
    assert bounded.to_json()["mean_lower"] == pytest.approx(5.4 / 3)
    assert bounded.to_json()["mean_upper"] == pytest.approx(6.5 / 3)
    merged = QuadraticForm.merge([bounded, reduce([4.0, 6.0])])
    assert merged.mean == pytest.approx(16 / 5)
    assert merged.mean_lower == pytest.approx(15.4 / 5)
    assert merged.mean_upper == pytest.approx(16.5 / 5)


@pytest.mark.parametrize(
    "result",
    [
        QuadraticForm("w", 1.0, 1.0, 0, 1, "hvp"),
        TraceEstimate(1.0, 0.1, 4, "hutchinson"),
        PositiveTrace(1.0, 0, 1.0, 0.0, "exact-ggn", 1),
    ],
)
def test_the_old_name_method_warns_and_gives_the_route(result):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert result.method == result.route
    assert [w.category for w in caught] == [DeprecationWarning]
    assert ".route" in str(caught[0].message)


def test_trace_estimate_json_merge_and_unused_form():
    t = TraceEstimate(2.0, 0.25, 8, "hutchinson-ggn")
    assert t.to_json() == {"mean": 2.0, "stderr": 0.25, "probes": 8, "method": "hutchinson-ggn"}
    assert TraceEstimate.merge([t, TraceEstimate(9.0, 1.0, 8, "hutchinson")]) is t
    assert TraceEstimate.unused(8) == TraceEstimate(0.0, 0.0, 8, UNUSED)


def test_positive_trace_merge_takes_the_max_with_its_error_and_the_weighted_mean():
    parts = [
        PositiveTrace(3.0, 5, 1.0, 0.1, "slq", count=6),
        PositiveTrace(3.0, 2, 2.0, 0.2, "slq", count=2),  # tie: the smaller index wins
        PositiveTrace(float("-inf"), -1, 0.0, 0.0, "slq", count=0),
    ]
    merged = PositiveTrace.merge(parts)
    assert (merged.max, merged.argmax, merged.stderr, merged.count) == (3.0, 2, 0.2, 8)
    assert merged.mean == pytest.approx((6 * 1.0 + 2 * 2.0) / 8)
    assert PositiveTrace.merge(parts[:1]) is parts[0]
    assert merged.to_json() == {
        "positive_max": 3.0,
        "positive_max_stderr": 0.2,
        "positive_method": "slq",
    }
    assert PositiveTrace.unused() == PositiveTrace(0.0, 0, 0.0, 0.0, UNUSED, 0)


def test_eigenvalues_json_merge_zeros_and_unused_form():
    e = Eigenvalues([3.0, 1.0, -2.0], [1e-3, 1e-2, 1e-1], 12, False)
    assert e.to_json() == {"values": [3.0, 1.0, -2.0], "residuals": [1e-3, 1e-2, 1e-1]}
    assert Eigenvalues.merge([e, Eigenvalues([], [], 0, True)]) is e
    with_zeros = e.with_zeros(5, 3)
    assert with_zeros.values == [3.0, 1.0, 0.0] and with_zeros.residuals == [1e-3, 1e-2, 0.0]
    assert (with_zeros.steps, with_zeros.exhausted) == (12, False)
    assert Eigenvalues.unused(2, 3) == Eigenvalues([0.0, 0.0], [0.0, 0.0], 0, True)


def test_spectral_density_and_noise_stability_json_and_merge():
    d = SpectralDensity([0.0, 1.0], [0.5, 0.5], [[0.2]], [[1.0]], 8, 1, 0.01)
    assert d.to_json() == {
        "grid": [0.0, 1.0],
        "density": [0.5, 0.5],
        "nodes": [[0.2]],
        "weights": [[1.0]],
        "steps": 8,
        "runs": 1,
        "bandwidth": 0.01,
    }
    assert SpectralDensity.merge([d, d]) is d
    n = NoiseStability(1e-2, 3e-5, 1e-6, 4, 8, False, True, (2e-5, 4e-5), 0.7, 10, (1.0, 2.0))
    out = n.to_json()
    assert out["evaluations"] == 8 and out["ci95"] == [2e-5, 4e-5] and "samples" not in out
    assert NoiseStability.merge([n, n]) is n


def test_diagnostics_merge_by_kind_and_layers_merge_by_type():
    merged = merge_diagnostics(
        [
            {"steps_mean": 2.0, "residual": 1e-3, "ok": True, "unit": "batch"},
            {"steps_mean": 5.0, "residual": 4e-3, "ok": True, "unit": "batch"},
        ],
        [3, 1],
    )
    assert merged == {"steps_mean": 11 / 4, "residual": 4e-3, "ok": True, "unit": "batch"}
    a = {"f": reduce([1.0], start=0), "t": TraceEstimate(1.0, 0.1, 4, "hutchinson")}
    b = {"f": reduce([5.0], start=1), "t": TraceEstimate(1.0, 0.1, 4, "hutchinson")}
    out = merge_layers([a, b])
    assert (out["f"].max, out["f"].argmax, out["f"].count) == (5.0, 1, 2)
    assert out["t"] is a["t"]
