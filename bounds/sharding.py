"""Old path of :mod:`hessfine.bounds.linalg.sharding` and :mod:`hessfine.bounds.linalg.probes`
(until hessfine 0.3.0)."""

from hessfine.bounds.functional import Batch  # noqa: F401
from hessfine.bounds.linalg.probes import DRAWS_VERSION, base_key, keyed_generator  # noqa: F401
from hessfine.bounds.linalg.sharding import LOCAL, Shard  # noqa: F401
from hessfine.bounds.moved import warn_moved

warn_moved(__name__, "hessfine.bounds.linalg.sharding or hessfine.bounds.linalg.probes")
