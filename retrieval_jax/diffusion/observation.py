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
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from ..graph.affinity import similarity_power


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

    def node_first(self, positions=None) -> jax.Array:
        """y^T as float[n, nq] (node axis first), scattered straight into place.

        ``positions`` maps node ids to rows (a `LocalityLayout`'s ``positions``), else row
        = node id. Repeated ids add up. One scatter of nq * k values into a zeroed
        [n, nq] array: no [nq, n] intermediate, no transpose, no renumbering gather."""
        rows = self.indices if positions is None else positions(self.indices)
        cols = jnp.broadcast_to(jnp.arange(self.weights.shape[0])[:, None], rows.shape)
        return jnp.zeros((self.num_nodes, self.weights.shape[0]), self.weights.dtype).at[
            rows, cols].add(self.weights)


def observe_neighbours(similarities, indices, n: int, *, gamma=3.0) -> SparseObservation:
    """The observation of queries given their k nearest database items.

    weights = max(similarities, 0)^gamma (gamma may be traced). Checked: matching
    [nq, k] shapes with k >= 1, real similarities, integer ids; concrete inputs also ids
    in [0, n), finite similarities and finite weights (no overflow of the power).
    """
    gamma = _checks.check_gamma(gamma)
    n = _checks.check_positive_int(n, "n")
    sims, idx = jnp.asarray(similarities), jnp.asarray(indices)
    if sims.ndim != 2 or sims.shape != idx.shape:
        raise ValueError(f"similarities and indices must both be [n_queries, k], got {sims.shape} and {idx.shape}")
    if sims.shape[1] == 0:
        raise ValueError("each query needs at least one neighbour (k >= 1): with k = 0 its y and every "
                         "diffusion score would be 0")
    if not (jnp.issubdtype(sims.dtype, jnp.floating) or jnp.issubdtype(sims.dtype, jnp.integer)):
        raise TypeError(f"similarities must be real numbers, got dtype {sims.dtype}")
    _checks.check_node_ids(idx, n, "indices")
    if not _checks.is_traced(sims):
        if not np.isfinite(np.asarray(sims)).all():
            raise ValueError("similarities contain NaN or inf")
        warn_empty_observations(np.asarray(sims))
    if not jnp.issubdtype(sims.dtype, jnp.floating):
        sims = sims.astype(jnp.float32)
    weights = similarity_power(sims, gamma)
    if not _checks.is_traced(weights) and not np.isfinite(np.asarray(weights)).all():
        raise ValueError(f"max(similarity, 0)^gamma overflows {weights.dtype} (largest similarity "
                         f"{float(jnp.max(sims)):.3g}, gamma = {gamma}): similarities of L2-normalised "
                         "descriptors lie in [-1, 1]; normalise the descriptors")
    return SparseObservation(weights=weights, indices=idx.astype(jnp.int32), num_nodes=n)


def observe_items(ids, n: int) -> SparseObservation:
    """The observation y = e_id of database items used as queries (integer ids in [0, n))."""
    n = _checks.check_positive_int(n, "n")
    ids = jnp.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of node ids, got shape {ids.shape}")
    _checks.check_node_ids(ids, n, "ids")
    return SparseObservation(weights=jnp.ones(ids.shape + (1,), jnp.float32),
                             indices=ids.astype(jnp.int32)[:, None], num_nodes=n)


def warn_empty_observations(similarities: np.ndarray) -> None:
    """Warn when a query's k similarities are all <= 0: its y is 0, so are its scores, and
    its ranking is the database order. Host side (concrete similarities only)."""
    if similarities.size and similarities.ndim == 2:
        empty = np.flatnonzero((similarities <= 0).all(axis=1))
        if empty.size:
            warnings.warn(f"{empty.size} query(ies) (first: {empty[0]}) have no positive similarity among their "
                          f"{similarities.shape[1]} nearest items, so y = 0 and every score is 0 (the ranking "
                          "is the database order); check the descriptors or raise query_k", stacklevel=3)
