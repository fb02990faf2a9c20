"""Spectral transfer functions h(lambda) of Fast Spectral Ranking.

Diffusion on W is x = h(W) y = U h(L) U^T y for a scalar transfer function h applied
to the eigenvalues (Iscen et al., CVPR 2018, Sec. 3). The filters are frozen
dataclasses (hashable, so they can be static jit arguments) whose ``__call__`` is a
plain jittable function of an array of eigenvalues; any user callable
``h(lam) -> array`` of the same shape works too.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .. import _checks


@dataclasses.dataclass(frozen=True)
class RegularizedLaplacianFilter:
    """h(l) = (1 - alpha) / (1 - alpha l): the Zhou et al. (NIPS 2003) diffusion.

    h(W) y = (1 - alpha) (I - alpha W)^-1 y, the closed form of the ranking solved
    by conjugate gradients in Iscen et al., CVPR 2017. h(1) = 1, h(0) = 1 - alpha.
    """

    alpha: float

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        a = jnp.asarray(self.alpha, lam.dtype if jnp.issubdtype(lam.dtype, jnp.floating) else jnp.float32)
        return (1.0 - a) / (1.0 - a * lam)


@dataclasses.dataclass(frozen=True)
class HeatKernelFilter:
    """h(l) = exp(-t (1 - l)): the heat kernel exp(-t L) of the normalised Laplacian L = I - W."""

    t: float

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        t = jnp.asarray(self.t, lam.dtype if jnp.issubdtype(lam.dtype, jnp.floating) else jnp.float32)
        return jnp.exp(-t * (1.0 - lam))


def regularized_laplacian_filter(alpha: float = 0.99) -> RegularizedLaplacianFilter:
    """h(l) = (1 - alpha) / (1 - alpha l), 0 < alpha < 1."""
    return RegularizedLaplacianFilter(alpha=_checks.check_alpha(alpha))


def heat_kernel_filter(t: float) -> HeatKernelFilter:
    """h(l) = exp(-t (1 - l)), t > 0."""
    return HeatKernelFilter(t=_checks.check_positive(t, "t"))
