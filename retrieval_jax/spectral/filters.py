"""Spectral transfer functions h(lambda) of Fast Spectral Ranking.

Diffusion on W is x = h(W) y = U h(L) U^T y for a scalar transfer function h applied
to the eigenvalues (Iscen et al., CVPR 2018, Sec. 3). The filters are frozen
dataclasses registered as pytrees: their parameter (alpha, t) is a leaf, so a filter
can be passed to ``jax.jit``, built from a traced value, batched by ``vmap`` and
differentiated by ``grad`` (see `retrieval_jax.spectral.filter_embedding`). Their
``__call__`` is a plain jittable function of an array of eigenvalues; any user
callable ``h(lam) -> array`` of the same shape works too.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import _checks


@jax.tree_util.register_dataclass
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ResolventFilter:
    """h(l) = 1 / (1 - alpha l): h(W) y = (I - alpha W)^-1 y, the scale conjugate gradient solves.

    The regularised Laplacian filter divided by (1 - alpha): the same ranking, and the
    same scores as `retrieval_jax.diffusion.diffuse`, so spectral and iterative routes
    can be compared value for value.
    """

    alpha: float

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        a = jnp.asarray(self.alpha, lam.dtype if jnp.issubdtype(lam.dtype, jnp.floating) else jnp.float32)
        return 1.0 / (1.0 - a * lam)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeatKernelFilter:
    """h(l) = exp(-t (1 - l)): the heat kernel exp(-t L) of the normalised Laplacian L = I - W."""

    t: float

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        t = jnp.asarray(self.t, lam.dtype if jnp.issubdtype(lam.dtype, jnp.floating) else jnp.float32)
        return jnp.exp(-t * (1.0 - lam))


def regularized_laplacian_filter(alpha: float = 0.99) -> RegularizedLaplacianFilter:
    """h(l) = (1 - alpha) / (1 - alpha l), 0 < alpha < 1 (a traced alpha is taken as is)."""
    return RegularizedLaplacianFilter(alpha=_checks.check_alpha(alpha))


def heat_kernel_filter(t: float) -> HeatKernelFilter:
    """h(l) = exp(-t (1 - l)), t > 0 (a traced t is taken as is)."""
    return HeatKernelFilter(t=_checks.check_positive(t, "t"))
