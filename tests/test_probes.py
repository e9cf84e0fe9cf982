"""Rademacher probes and keyed generators: draws depend only on their key."""

import torch
from hessfine.bounds.linalg.probes import keyed_generator, rademacher


def test_keyed_generators_depend_only_on_the_key():
    draw = lambda *key: torch.randn(4, generator=keyed_generator(*key))  # noqa: E731
    assert torch.equal(draw(1, "noise", 3), draw(1, "noise", 3))
    assert not torch.equal(draw(1, "noise", 3), draw(1, "noise", 4))
    assert not torch.equal(draw(1, "noise", 3), draw(2, "noise", 3))


def test_rademacher_probes_are_signs_from_the_generator_stream():
    like = torch.zeros(1, dtype=torch.float64)
    z = rademacher((3, 50), generator=torch.Generator().manual_seed(0), like=like)
    assert z.dtype == torch.float64 and z.shape == (3, 50)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    bits = torch.randint(0, 2, (3, 50), generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, 2.0 * bits.double() - 1)
