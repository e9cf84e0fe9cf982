"""Old path of :mod:`hessfine.bounds.estimators.spectra` (until hessfine 0.3.0)."""

from hessfine.bounds.estimates import Eigenvalues, SpectralDensity  # noqa: F401
from hessfine.bounds.estimators.spectra import (  # noqa: F401
    spectral_density,
    top_eigenvalues,
    whole_top_eigenvalues,
)
from hessfine.bounds.functional import Batch, FunctionalModel  # noqa: F401
from hessfine.bounds.linalg.lanczos import LanczosResult, lanczos, lanczos_many, ritz_values  # noqa: F401
from hessfine.bounds.linalg.probes import rademacher  # noqa: F401
from hessfine.bounds.linalg.sharding import LOCAL, Shard  # noqa: F401
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.mean_loss import block_diagonal_hvp, flat_operator, mean_loss_hvp  # noqa: F401
from hessfine.bounds.safe_autodiff import differentiable  # noqa: F401

warn_moved(__name__, "hessfine.bounds.estimators.spectra or hessfine.bounds.estimates")
