"""Per-example Gauss–Newton forms and traces (the fronts over the JVP/VJP and layer-io back ends)
against dense float64 Gauss–Newton blocks."""

import pytest
import torch
from hessfine.bounds.functional import FunctionalModel
from hessfine.bounds.operators.gauss_newton import GaussNewtonForms, gauss_newton_traces

from tests.cases import tiny_case
from tests.oracles import TINY_LAYERS, TINY_NETWORKS, dense_ggn_blocks, tiny_data
from tests.oracles import quadratic_forms as dense_forms


@pytest.mark.parametrize("network", ["cnn", "attention"])
def test_gauss_newton_traces_exact_per_example(network):
    module = TINY_NETWORKS[network]()
    fm, params = FunctionalModel.from_module(module)
    layers = TINY_LAYERS[network]
    x, y = tiny_data(network, 8)
    traces = gauss_newton_traces(fm, params, layers, x)
    for name in layers:
        dense = torch.diagonal(dense_ggn_blocks(module, params, name, x, y), dim1=1, dim2=2).sum(1)
        torch.testing.assert_close(traces[name], dense, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("network", "layers", "products"),
    [
        ("cnn", None, "layer-io"),
        ("mlp_gelu", None, "layer-io"),
        ("cnn", ["head.weight"], "jvp"),  # 3 logits: one backward pass each costs more than a JVP
    ],
)
def test_forms_from_shared_passes_where_they_pay_else_from_jvps(network, layers, products):
    module, fm, params, directions, x, y = tiny_case(network, 7)
    directions = {name: directions[name] for name in layers or directions}
    forms = GaussNewtonForms(fm, params, directions)
    for batch in (slice(0, 4), slice(4, 7)):
        values = forms(x[batch], y[batch])
        assert list(values) == list(directions)
        assert forms.products == dict.fromkeys(directions, products)
        for name, v in directions.items():
            dense = dense_forms(dense_ggn_blocks(module, params, name, x[batch], y[batch]), v)
            torch.testing.assert_close(values[name], dense, rtol=1e-10, atol=1e-14)
