"""Old path of :mod:`hessfine.bounds.estimators.noise_stability` (until hessfine 0.3.0)."""

from hessfine.bounds.estimates import NoiseStability, TraceEstimate
from hessfine.bounds.estimators.noise_stability import noise_stability, trace_prediction
from hessfine.bounds.estimators.traces import layer_traces, relative_noise_traces
from hessfine.bounds.functional import Batch, FunctionalModel
from hessfine.bounds.linalg.probes import base_key, keyed_generator
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.safe_autodiff import differentiable

__all__ = [
    "NoiseStability",
    "noise_stability",
    "trace_prediction",
    "relative_noise_traces",
    "Batch",
    "FunctionalModel",
    "differentiable",
    "LOCAL",
    "Shard",
    "base_key",
    "keyed_generator",
    "TraceEstimate",
    "layer_traces",
]

warn_moved(
    __name__,
    "hessfine.bounds.estimators.noise_stability (relative_noise_traces: "
    "hessfine.bounds.estimators.traces)",
)
