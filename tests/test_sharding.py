"""Keyed draws: results do not depend on how the examples are batched or split; noise
stability and the certificate stream their batches (peak memory flat in the number of examples)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from hessfine.bounds.estimators.noise_stability import noise_stability
from hessfine.bounds.estimators.traces import positive_trace_max
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.linalg.sharding import Shard
from hessfine.bounds.pac_bayes import pac_bayes_certificate

from tests.oracles import TINY_LAYERS, perturbed_reference, tiny_data, tiny_mlp


def split(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


@pytest.fixture
def network():
    module = tiny_mlp("tanh")
    fm, params = FunctionalModel.from_module(module)
    x, y = tiny_data("mlp_tanh", 12)
    return fm, params, TINY_LAYERS["mlp_tanh"], x, y


def test_shard_maps_local_batches_to_global_indices():
    batches = split(torch.zeros(10, 1), torch.zeros(10), 3)
    assert [s for s, _ in Shard().indexed(batches)] == [0, 3, 6, 9]
    assert [s for s, _ in Shard(1, 2, 3).indexed(batches[1::2])] == [3, 9]
    assert Shard().total(5) == 5.0


def test_certificate_and_positive_trace_do_not_depend_on_the_batching(network):
    fm, params, layers, x, y = network
    reference = perturbed_reference(params, layers, scale=0.05)
    curvature = dict.fromkeys(layers, 1.0)
    certificates, positives = [], []
    for size in (12, 4, 3):
        g = torch.Generator().manual_seed(0)
        certificates.append(
            pac_bayes_certificate(
                fm, params, reference, layers, split(x, y, size), n=12, curvature=curvature,
                draws=2, generator=g,
            ).to_json()
        )  # fmt: skip
        positives.append(
            positive_trace_max(
                fm, params, layers, split(x, y, size), certified={}, probes=3, lanczos_steps=4,
                generator=torch.Generator().manual_seed(0),
            )
        )  # fmt: skip
    assert (
        certificates[0]["per_scale"] == certificates[1]["per_scale"] == certificates[2]["per_scale"]
    )
    for other in positives[1:]:
        for name in layers:
            assert other[name].max == pytest.approx(positives[0][name].max, rel=1e-12)
            assert other[name].argmax == positives[0][name].argmax


def test_noise_stability_shares_unit_draws_across_sigma(network):
    fm, params, layers, x, y = network
    one = noise_stability(
        fm,
        params,
        layers,
        [(x, y)],
        sigma=1e-3,
        draws=4,
        generator=torch.Generator().manual_seed(0),
    )
    split_run = noise_stability(
        fm, params, layers, split(x, y, 5), sigma=1e-3, draws=4, chunk=3,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert split_run.samples == pytest.approx(one.samples, rel=1e-9)


_CHILD = textwrap.dedent(
    """
    import resource, sys, torch
    from hessfine.bounds.functional import FunctionalModel
    from hessfine.bounds.estimators.noise_stability import noise_stability
    from hessfine.bounds.pac_bayes import pac_bayes_certificate

    torch.set_num_threads(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    fm, params = FunctionalModel.from_module(net)
    layers = ["1.weight"]
    reference = {"1.weight": params["1.weight"] - 0.01}

    def batches(n):
        g = torch.Generator().manual_seed(0)
        for _ in range(0, n, 50):
            yield torch.randn(50, 3, 32, 32, generator=g), torch.randint(0, 3, (50,), generator=g)

    for n in map(int, sys.argv[1:]):
        g = torch.Generator().manual_seed(0)
        noise_stability(fm, params, layers, batches(n), sigma=1e-2, draws=2, generator=g)
        pac_bayes_certificate(fm, params, reference, layers, batches(n), n=n,
                              curvature={"1.weight": 1.0}, draws=1, grid=(1.0,), generator=g)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_examples():
    """Peak resident memory (ru_maxrss, KiB on Linux) of a child measuring N then 4N examples
    of 12 KiB each: holding the batches would add 3N·12 KiB = 72 MiB."""
    n = 2000
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(4 * n)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    small, large = (int(line) for line in out.stdout.split())
    assert large - small < 16 * 1024, (small, large)
