"""Sparse query observations y: k weighted nodes per query, never a dense [nq, n] array.

An out-of-graph query is attached to its k nearest database items (Iscen et al.,
CVPR 2017, Sec. 3.2): y[q, indices[q, j]] = max(s_qj, 0)^gamma; a database item used
as a query is y = e_id. The exact-inverse and spectral routes read only these k
entries (x = sum_j y_j inv[i_j, :], U^T y = sum_j y_j U[i_j, :]); conjugate gradient
scatters them into a dense right-hand side (`SparseObservation.todense`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..graph.affinity import similarity_power
from .solve import warn_empty_observations


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weights", "indices"],
                   meta_fields=["num_nodes"])
@dataclasses.dataclass(frozen=True)
class SparseObservation:
    """y with k non-zeros per query: y[q, indices[q, j]] += weights[q, j].

    Attributes:
      weights: float[nq, k].
      indices: int32[nq, k] node ids in [0, num_nodes).
      num_nodes: n (static).
    """

    weights: jax.Array
    indices: jax.Array
    num_nodes: int

    @property
    def num_queries(self) -> int:
        return self.weights.shape[0]

    def todense(self) -> jax.Array:
        """y as float[nq, n] (repeated ids add up)."""
        rows = jnp.arange(self.weights.shape[0])[:, None]
        return jnp.zeros((self.weights.shape[0], self.num_nodes), self.weights.dtype).at[
            rows, self.indices].add(self.weights)


def observe_neighbours(similarities, indices, n: int, *, gamma=3.0) -> SparseObservation:
    """The observation of queries given their k nearest database items.

    weights = max(similarities, 0)^gamma (gamma may be traced). Concrete inputs are
    checked: matching [nq, k] shapes, integer ids in [0, n), finite similarities.
    """
    gamma = _checks.check_gamma(gamma)
    n = _checks.check_positive_int(n, "n")
    sims, idx = jnp.asarray(similarities), jnp.asarray(indices)
    if sims.ndim != 2 or sims.shape != idx.shape:
        raise ValueError(f"similarities and indices must both be [n_queries, k], got {sims.shape} and {idx.shape}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"indices must be integer node ids, got dtype {idx.dtype} (no silent cast)")
    if not _checks.is_traced(idx):
        i = np.asarray(idx)
        if i.size and (i.min() < 0 or i.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}), got range [{i.min()}, {i.max()}]")
    if not _checks.is_traced(sims):
        if not np.isfinite(np.asarray(sims)).all():
            raise ValueError("similarities contain NaN or inf")
        warn_empty_observations(np.asarray(sims))
    if not jnp.issubdtype(sims.dtype, jnp.floating):
        sims = sims.astype(jnp.float32)
    return SparseObservation(weights=similarity_power(sims, gamma), indices=idx.astype(jnp.int32), num_nodes=n)


def observe_items(ids, n: int) -> SparseObservation:
    """The observation y = e_id of database items used as queries (integer ids in [0, n))."""
    n = _checks.check_positive_int(n, "n")
    ids = jnp.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of node ids, got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integer node ids, got dtype {ids.dtype} (no silent cast)")
    if not _checks.is_traced(ids):
        i = np.asarray(ids)
        if i.size and (i.min() < 0 or i.max() >= n):
            raise ValueError(f"ids must lie in [0, {n}), got range [{i.min()}, {i.max()}]")
    return SparseObservation(weights=jnp.ones(ids.shape + (1,), jnp.float32),
                             indices=ids.astype(jnp.int32)[:, None], num_nodes=n)
