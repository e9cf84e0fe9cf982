"""Old path of :mod:`hessfine.bounds.linalg.sharding` and :mod:`hessfine.bounds.linalg.probes`
(until hessfine 0.3.0)."""

from hessfine.bounds.functional import Batch
from hessfine.bounds.linalg.probes import DRAWS_VERSION, base_key, keyed_generator
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.moved import warn_moved

__all__ = ["DRAWS_VERSION", "keyed_generator", "base_key", "Shard", "LOCAL", "Batch"]

warn_moved(__name__, "hessfine.bounds.linalg.sharding or hessfine.bounds.linalg.probes")
