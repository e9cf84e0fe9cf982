"""Old path of :mod:`hessfine.bounds.estimators.spectra` (until hessfine 0.3.0)."""

from hessfine.bounds.estimates import Eigenvalues, SpectralDensity
from hessfine.bounds.estimators.spectra import (
    spectral_density,
    top_eigenvalues,
    whole_top_eigenvalues,
)
from hessfine.bounds.functional import Batch, FunctionalModel
from hessfine.bounds.linalg.lanczos import LanczosResult, lanczos, lanczos_many, ritz_values
from hessfine.bounds.linalg.probes import rademacher
from hessfine.bounds.linalg.sharding import LOCAL, Shard
from hessfine.bounds.moved import warn_moved
from hessfine.bounds.operators.mean_loss import block_diagonal_hvp, flat_operator, mean_loss_hvp
from hessfine.bounds.safe_autodiff import differentiable

__all__ = [
    "Eigenvalues",
    "SpectralDensity",
    "top_eigenvalues",
    "whole_top_eigenvalues",
    "spectral_density",
    "Batch",
    "FunctionalModel",
    "block_diagonal_hvp",
    "flat_operator",
    "mean_loss_hvp",
    "LanczosResult",
    "lanczos",
    "lanczos_many",
    "ritz_values",
    "differentiable",
    "LOCAL",
    "Shard",
    "rademacher",
]

warn_moved(__name__, "hessfine.bounds.estimators.spectra or hessfine.bounds.estimates")
