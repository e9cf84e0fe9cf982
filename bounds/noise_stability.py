"""Old path of :mod:`hessfine.bounds.estimators.noise_stability` (until hessfine 0.3.0)."""

from hessfine.bounds.estimates import NoiseStability, TraceEstimate  # noqa: F401
from hessfine.bounds.estimators.noise_stability import noise_stability, trace_prediction  # noqa: F401
from hessfine.bounds.estimators.traces import layer_traces, relative_noise_traces  # noqa: F401
from hessfine.bounds.functional import Batch, FunctionalModel  # noqa: F401
from hessfine.bounds.linalg.probes import base_key, keyed_generator  # noqa: F401
from hessfine.bounds.linalg.sharding import LOCAL, Shard  # noqa: F401
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.safe_autodiff import differentiable  # noqa: F401

warn_moved(
    __name__,
    "hessfine.bounds.estimators.noise_stability (relative_noise_traces: "
    "hessfine.bounds.estimators.traces)",
)
