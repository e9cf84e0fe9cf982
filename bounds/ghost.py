"""Old path of :mod:`hessfine.bounds.operators.layer_io` and
:mod:`hessfine.bounds.operators.certification` (until hessfine 0.3.0)."""

from hessfine.bounds.functional import FunctionalModel, Inputs  # noqa: F401
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.certification import joint_certification  # noqa: F401
from hessfine.bounds.operators.layer_io import (  # noqa: F401
    LayerCalls,
    layer_with_weight,
    record_layer_calls,
)
from hessfine.bounds.operators.layer_io import layer_io_ggn_forms as ghost_ggn_forms  # noqa: F401
from hessfine.bounds.operators.layer_io import linear_conv_modules as ghost_modules  # noqa: F401

warn_moved(
    __name__, "hessfine.bounds.operators.layer_io or hessfine.bounds.operators.certification"
)
