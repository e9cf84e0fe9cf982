"""The tiny networks set up for the estimators' tests: functional form, directions and data."""

from __future__ import annotations

from hessfine.bounds.functional import FunctionalModel

from tests.oracles import TINY_LAYERS, TINY_NETWORKS, perturbed_reference, tiny_data


def tiny_case(network: str, n: int):
    """(module, functional model, params, directions, x, y) for one of ``TINY_NETWORKS``.

    The directions are v_i = W_i − W_i^(s) on the network's ``TINY_LAYERS`` from
    :func:`tests.oracles.perturbed_reference`; x, y are ``n`` examples of
    :func:`tests.oracles.tiny_data`.
    """
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    reference = perturbed_reference(params, TINY_LAYERS[network])
    directions = {name: params[name] - reference[name] for name in TINY_LAYERS[network]}
    x, y = tiny_data(network, n)
    return module, fm, params, directions, x, y
