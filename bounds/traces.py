"""Old path of :mod:`hessfine.bounds.estimators.traces` and the operators it used (until
hessfine 0.3.0)."""

from hessfine.bounds.estimates import PositiveTrace, RunningReduction, TraceEstimate
from hessfine.bounds.estimators.traces import TraceRoute as TraceMethod
from hessfine.bounds.estimators.traces import layer_traces, positive_trace_max
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.linalg.positive_quadrature import positive_quadrature
from hessfine.bounds.linalg.probes import base_key, keyed_generator, rademacher
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces
from hessfine.bounds.operators.layer_io import linear_conv_modules as ghost_modules
from hessfine.bounds.operators.layer_io import record_layer_calls
from hessfine.bounds.operators.mean_loss import flat_operator, mean_loss_hvp
from hessfine.bounds.operators.per_example import dense_example_blocks, per_example_hvp
from hessfine.bounds.operators.retained import RetainedTail, retained_fits
from hessfine.bounds.safe_autodiff import differentiable

__all__ = [
    "TraceMethod",
    "TraceEstimate",
    "PositiveTrace",
    "rademacher",
    "layer_traces",
    "gauss_newton_traces",
    "positive_trace_max",
    "dense_example_blocks",
    "Batch",
    "FunctionalModel",
    "Inputs",
    "batch_size",
    "index_inputs",
    "slice_inputs",
    "unsqueeze_inputs",
    "ghost_modules",
    "record_layer_calls",
    "flat_operator",
    "mean_loss_hvp",
    "positive_quadrature",
    "RetainedTail",
    "RunningReduction",
    "certification_tolerance",
    "certify_piecewise_linear",
    "per_example_hvp",
    "retained_fits",
    "differentiable",
    "LOCAL",
    "Shard",
    "base_key",
    "keyed_generator",
]

warn_moved(
    __name__,
    "hessfine.bounds.estimators.traces, hessfine.bounds.estimates or the modules of "
    "hessfine.bounds.operators and hessfine.bounds.linalg",
)
