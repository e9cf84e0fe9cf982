"""Old path of :mod:`hessfine.bounds.linalg.lanczos` and
:mod:`hessfine.bounds.linalg.positive_quadrature` (until hessfine 0.3.0)."""

from hessfine.bounds.linalg.lanczos import (  # noqa: F401
    LanczosResult,
    lanczos,
    lanczos_many,
    quadrature,
    ritz_values,
)
from hessfine.bounds.linalg.positive_quadrature import (  # noqa: F401
    PositiveQuadrature,
    gauss_radau,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.moved import warn_moved

warn_moved(__name__, "hessfine.bounds.linalg.lanczos or hessfine.bounds.linalg.positive_quadrature")
