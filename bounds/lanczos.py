"""Old path of :mod:`hessfine.bounds.linalg.lanczos` and
:mod:`hessfine.bounds.linalg.positive_quadrature` (until hessfine 0.3.0)."""

from hessfine.bounds.linalg.lanczos import (
    LanczosResult,
    lanczos,
    lanczos_many,
    quadrature,
    ritz_values,
)
from hessfine.bounds.linalg.positive_quadrature import (
    PositiveQuadrature,
    gauss_radau,
    positive_quadrature,
    positive_quadrature_many,
)
from hessfine.bounds.moved import warn_moved

__all__ = [
    "LanczosResult",
    "lanczos",
    "lanczos_many",
    "quadrature",
    "ritz_values",
    "gauss_radau",
    "PositiveQuadrature",
    "positive_quadrature",
    "positive_quadrature_many",
]

warn_moved(__name__, "hessfine.bounds.linalg.lanczos or hessfine.bounds.linalg.positive_quadrature")
