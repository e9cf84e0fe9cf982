"""Old path of :mod:`hessfine.bounds.estimators.quadratic_forms` and the operators it used
(until hessfine 0.3.0)."""

from hessfine.bounds.estimates import QuadraticForm, RunningReduction  # noqa: F401
from hessfine.bounds.estimators.quadratic_forms import (  # noqa: F401
    ESTIMATORS,
    Estimator,
    positive_forms,
    positive_forms_layers,
    quadratic_forms,
)
from hessfine.bounds.functional import (  # noqa: F401
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.linalg.positive_quadrature import (  # noqa: F401
    PositiveQuadrature,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.linalg.sharding import LOCAL, Shard  # noqa: F401
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.certification import (  # noqa: F401
    certification_tolerance,
    certify_piecewise_linear,
    joint_certification,
)
from hessfine.bounds.operators.gauss_newton import ggn_forms  # noqa: F401
from hessfine.bounds.operators.layer_io import layer_io_ggn_forms as ghost_ggn_forms  # noqa: F401
from hessfine.bounds.operators.per_example import block_forms_hvp, layers_hvp, per_example_hvp  # noqa: F401
from hessfine.bounds.operators.retained import RetainedLayersHVP, RetainedTail, retained_fits  # noqa: F401
from hessfine.bounds.safe_autodiff import differentiable  # noqa: F401

warn_moved(
    __name__,
    "hessfine.bounds.estimators.quadratic_forms, hessfine.bounds.estimates or the modules of "
    "hessfine.bounds.operators",
)
