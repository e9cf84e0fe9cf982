"""Old path of :mod:`hessfine.bounds.estimators.traces` and the operators it used (until
hessfine 0.3.0)."""

from hessfine.bounds.estimates import PositiveTrace, RunningReduction, TraceEstimate  # noqa: F401
from hessfine.bounds.estimators.traces import TraceRoute as TraceMethod  # noqa: F401
from hessfine.bounds.estimators.traces import layer_traces, positive_trace_max  # noqa: F401
from hessfine.bounds.functional import (  # noqa: F401
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.linalg.positive_quadrature import positive_quadrature  # noqa: F401
from hessfine.bounds.linalg.probes import base_key, keyed_generator, rademacher  # noqa: F401
from hessfine.bounds.linalg.sharding import LOCAL, Shard  # noqa: F401
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.certification import (  # noqa: F401
    certification_tolerance,
    certify_piecewise_linear,
)
from hessfine.bounds.operators.gauss_newton import gauss_newton_traces  # noqa: F401
from hessfine.bounds.operators.layer_io import linear_conv_modules as ghost_modules  # noqa: F401
from hessfine.bounds.operators.layer_io import record_layer_calls  # noqa: F401
from hessfine.bounds.operators.mean_loss import flat_operator, mean_loss_hvp  # noqa: F401
from hessfine.bounds.operators.per_example import dense_example_blocks, per_example_hvp  # noqa: F401
from hessfine.bounds.operators.retained import RetainedTail, retained_fits  # noqa: F401
from hessfine.bounds.safe_autodiff import differentiable  # noqa: F401

warn_moved(
    __name__,
    "hessfine.bounds.estimators.traces, hessfine.bounds.estimates or the modules of "
    "hessfine.bounds.operators and hessfine.bounds.linalg",
)
