"""Old path of :mod:`hessfine.bounds.estimators.quadratic_forms` and the operators it used
(until hessfine 0.3.0)."""

from hessfine.bounds.estimates import QuadraticForm, RunningReduction
from hessfine.bounds.estimators.quadratic_forms import (
    ESTIMATORS,
    Estimator,
    positive_forms,
    positive_forms_layers,
    quadratic_forms,
)
from hessfine.bounds.functional import (
    Batch,
    FunctionalModel,
    Inputs,
    batch_size,
    index_inputs,
    slice_inputs,
    unsqueeze_inputs,
)
from hessfine.bounds.linalg.positive_quadrature import (
    PositiveQuadrature,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.certification import (
    certification_tolerance,
    certify_piecewise_linear,
    joint_certification,
)
from hessfine.bounds.operators.gauss_newton import ggn_forms
from hessfine.bounds.operators.layer_io import layer_io_ggn_forms as ghost_ggn_forms
from hessfine.bounds.operators.per_example import block_forms_hvp, layers_hvp, per_example_hvp
from hessfine.bounds.operators.retained import RetainedLayersHVP, RetainedTail, retained_fits
from hessfine.bounds.safe_autodiff import differentiable

__all__ = [
    "Estimator",
    "ESTIMATORS",
    "QuadraticForm",
    "RunningReduction",
    "ggn_forms",
    "per_example_hvp",
    "block_forms_hvp",
    "positive_forms",
    "layers_hvp",
    "RetainedLayersHVP",
    "RetainedTail",
    "retained_fits",
    "positive_forms_layers",
    "certify_piecewise_linear",
    "certification_tolerance",
    "quadratic_forms",
    "Batch",
    "FunctionalModel",
    "Inputs",
    "batch_size",
    "index_inputs",
    "slice_inputs",
    "unsqueeze_inputs",
    "ghost_ggn_forms",
    "joint_certification",
    "PositiveQuadrature",
    "positive_quadrature",
    "positive_quadrature_many",
    "differentiable",
    "LOCAL",
    "Shard",
]

warn_moved(
    __name__,
    "hessfine.bounds.estimators.quadratic_forms, hessfine.bounds.estimates or the modules of "
    "hessfine.bounds.operators",
)
