"""Per-component spectra: spectral ranking on graphs with many connected components.

W is block diagonal over its connected components, and so is every h(W):

    h(W) = sum_c U_c h(L_c) U_c^T,      W_c = U_c L_c U_c^T  (component c's block).

Every component contributes an eigenvalue 1 (eigenvector D_c^1/2 1), so on a graph
with more than r components the global top r eigenpairs are r eigenvalues 1: the
embedding holds r components' constant vectors and nothing else, and FSR ranks the
other components' queries at chance. Here each component keeps its own top
r_c = min(r, n_c) eigenpairs:

* components of at most ``dense_size`` nodes exactly, one batched ``eigh`` per
  bucket of padded blocks (`graph.component_blocks`); where n_c <= r the whole
  spectrum is kept and FSR is exact on the component;
* larger components by thick-restart Lanczos on the component alone
  (`graph_eigenpairs` of its subgraph).

FSR then reads, with f_c = h(L_c) (rank-r) or h(L_c) - h(0) (approx) as in
`spectral_embedding` (Iscen, Avrithis, Tolias, Furon & Chum, CVPR 2018):

    x = sum_c U_c (f_c * (U_c^T y)) + h0 y.

Storage is one float[C_b, P_b, r_b] array per bucket (C_b components padded to P_b
nodes, r_b = min(r, P_b) columns, zero on padding): about n r floats, as the global
embedding. A query costs O(n r) like global FSR (O(k r) for U^T y of a k-sparse y).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._precision import HIGHEST as _HI
from .. import _checks
from ..graph.components import ComponentLayout, component_blocks, dense_blocks
from ..graph.core import Graph
from ..graph.neighbours import check_symmetric
from .decomposition import graph_eigenpairs

_BLOCK_BYTES = 2 ** 28  # at most 256 MB of dense blocks per batched eigh

FSR_MODES = ("rank_r", "approx")
"""Fast Spectral Ranking's modes: x = U h(L) U^T y, or that plus h(0) (y - U U^T y)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["vectors", "values", "layout"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ComponentEigenpairs:
    """The top eigenpairs of each connected component of W (`component_eigenpairs`).

    Attributes:
      vectors: tuple over buckets b of float[C_b, P_b, r_b]: column j of block c holds
        eigenvector j of the bucket's component c at its nodes (0 on padding nodes and
        on the columns of a component with fewer than r_b nodes).
      values: tuple over buckets of float[C_b, r_b], each component's eigenvalues in
        descending order (0 on unused columns).
      layout: the `graph.ComponentLayout` of the blocks (each node's bucket, component
        and position).
    """

    vectors: tuple
    values: tuple
    layout: ComponentLayout

    @property
    def num_nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def rank(self) -> int:
        """The largest number of eigenpairs kept for one component (r)."""
        return max(v.shape[2] for v in self.vectors)

    @property
    def nbytes(self) -> int:
        return int(sum(v.size * v.dtype.itemsize for v in self.vectors))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["pairs", "filtered", "h0"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ComponentSpectralEmbedding:
    """Offline part of per-component FSR: x = sum_c U_c (f_c * (U_c^T y)) + h0 y.

    Attributes:
      pairs: the `ComponentEigenpairs`.
      filtered: tuple over buckets of float[C_b, r_b], f_c = h(L_c) (rank-r) or
        h(L_c) - h(0) (approx).
      h0: float scalar, 0 (rank-r) or h(0) (approx).
    """

    pairs: ComponentEigenpairs
    filtered: tuple
    h0: jax.Array

    @property
    def num_nodes(self) -> int:
        return self.pairs.num_nodes

    @property
    def rank(self) -> int:
        return self.pairs.rank

    @property
    def nbytes(self) -> int:
        return self.pairs.nbytes


# --------------------------------------------------------------------------- offline
@functools.partial(jax.jit, static_argnames=("r",))
def _dense_top_pairs(graph: Graph, nodes, position, *, r: int):
    """Top r eigenpairs of each padded component block: (values [C, r], vectors [C, P, r])."""
    w = dense_blocks(graph, nodes, position)
    p = nodes.shape[1]
    pad = jnp.where(nodes >= 0, 0.0, -3.0).astype(w.dtype)   # padding eigenvalues -3, below W's [-1, 1]
    w = w + pad[:, :, None] * jnp.eye(p, dtype=w.dtype)
    values, vectors = jnp.linalg.eigh(w, symmetrize_input=True)   # ascending
    values, vectors = values[:, ::-1][:, :r], vectors[:, :, ::-1][:, :, :r]
    real = values > -2.0
    vectors = jnp.where(real[:, None, :] & (nodes >= 0)[:, :, None], vectors, 0.0)
    return jnp.where(real, values, 0.0), vectors


def _lanczos_block(mat, nodes, r_b: int, dtype, eig_kwargs):
    """Top eigenpairs of each (large) component of one bucket, one Lanczos run each."""
    c_b, p_b = nodes.shape
    values = np.zeros((c_b, r_b), np.float32)
    vectors = np.zeros((c_b, p_b, r_b), np.float32)
    for c in range(c_b):
        ids = nodes[c][nodes[c] >= 0]
        sub = Graph.from_scipy(mat[ids][:, ids])
        r_c = min(r_b, ids.size - 1)
        pairs = graph_eigenpairs(sub, r_c, split_components=False, check_symmetric=False, dtype=dtype, **eig_kwargs)
        values[c, :r_c] = np.asarray(pairs.values)
        vectors[c, :ids.size, :r_c] = np.asarray(pairs.vectors)
    return jnp.asarray(values, dtype), jnp.asarray(vectors, dtype)


def component_eigenpairs(graph: Graph, r: int, *, dense_size: int = 2048, dtype=jnp.float32,
                         **eig_kwargs) -> ComponentEigenpairs:
    """The top r eigenpairs of every connected component of W, each on its own (host side).

    Args:
      graph: a symmetric (normalised) `Graph` on n nodes (checked on the host).
      r: eigenpairs per component (a component of n_c < r nodes keeps all n_c).
      dense_size: components of at most this many nodes are solved exactly by a
        batched dense ``eigh``; larger ones by Lanczos (``eig_kwargs`` go to
        `graph_eigenpairs`: ``num_iter``, ``tol``, ``key``...).
      dtype: float dtype of the result.

    Returns:
      `ComponentEigenpairs`; about 4 n r bytes.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    if _checks.is_traced(graph.indices, graph.weights):
        raise TypeError("component_eigenpairs finds the components on the host: call it outside jax.jit")
    if not _checks.is_int(r) or r < 1:
        raise ValueError(f"r (eigenpairs per component) must be an int >= 1, got {r!r}")
    _checks.check_positive_int(dense_size, "dense_size")
    mat = check_symmetric(graph).tocsr()
    blocks = component_blocks(graph)
    layout = blocks.layout()
    position = layout.position
    g = type(graph)(indices=graph.indices, weights=graph.weights.astype(dtype))
    values, vectors = [], []
    for nodes in blocks.groups:
        c_b, p_b = nodes.shape
        r_b = min(int(r), p_b)
        if p_b <= dense_size:
            step = max(1, _BLOCK_BYTES // (4 * p_b * p_b))
            parts = [_dense_top_pairs(g, jnp.asarray(nodes[s:s + step], jnp.int32), position, r=r_b)
                     for s in range(0, c_b, step)]
            values.append(jnp.concatenate([v for v, _ in parts]))
            vectors.append(jnp.concatenate([u for _, u in parts]))
        else:
            v, u = _lanczos_block(mat, nodes, r_b, dtype, eig_kwargs)
            values.append(v)
            vectors.append(u)
    if not all(np.isfinite(np.asarray(v)).all() for v in values):
        raise ValueError("the eigenvalues contain NaN or inf (the eigen-solver did not converge)")
    return ComponentEigenpairs(vectors=tuple(vectors), values=tuple(values), layout=layout)


def filter_component_pairs(pairs: ComponentEigenpairs, h, *, mode: str = "rank_r") -> ComponentSpectralEmbedding:
    """f_c = h(L_c) (rank-r) or h(L_c) - h(0) (approx) for every component: pure, jittable
    (h may be a pytree filter of traced parameters, as for `filter_embedding`)."""
    if mode not in FSR_MODES:
        raise ValueError(f"mode must be 'rank_r' or 'approx', got {mode!r}")
    dtype = pairs.values[0].dtype
    h0 = jnp.asarray(h(jnp.zeros((), dtype)), dtype) if mode == "approx" else jnp.zeros((), dtype)
    filtered = tuple(jnp.asarray(h(v), dtype) - h0 for v in pairs.values)
    return ComponentSpectralEmbedding(pairs=pairs, filtered=filtered, h0=h0)


# --------------------------------------------------------------------------- online
def _from_coefficients(emb: ComponentSpectralEmbedding, z) -> jax.Array:
    """x [q, n] from per-bucket coefficients z_b = f_b * (U_b^T y) [q, C_b, r_b]."""
    return emb.pairs.layout.to_nodes([jnp.einsum("qcr,cpr->qcp", zb, u, precision=_HI)
                                      for zb, u in zip(z, emb.pairs.vectors)])


@jax.jit
def component_fsr_scores_dense(embedding: ComponentSpectralEmbedding, y):
    """x = sum_c U_c (f_c * (U_c^T y)) + h0 y for dense y float[q, n]; float[q, n]. Pure and
    jittable (no checks: `fast_spectral_ranking` is the checked entry point)."""
    pairs = embedding.pairs
    y = y.astype(pairs.vectors[0].dtype)
    z = [jnp.einsum("qcp,cpr->qcr", yb, u, precision=_HI) * f
         for yb, u, f in zip(pairs.layout.to_blocks(y), pairs.vectors, embedding.filtered)]
    return _from_coefficients(embedding, z) + embedding.h0 * y


@jax.jit
def component_fsr_scores_sparse(embedding: ComponentSpectralEmbedding, weights, indices):
    """The same for y with k non-zeros per query, y[q, indices[q, j]] = weights[q, j]
    (float[q, k], int[q, k]): U_c^T y is a weighted sum of k rows of the blocks. Pure and
    jittable (no checks)."""
    pairs = embedding.pairs
    weights = weights.astype(pairs.vectors[0].dtype)
    q, k = weights.shape
    rows = jnp.broadcast_to(jnp.arange(q)[:, None], (q, k))
    z = []
    for b, (u, f) in enumerate(zip(pairs.vectors, embedding.filtered)):
        c_b, _, r_b = u.shape
        m, p, w = pairs.layout.locate(indices, weights, b)
        coef = u[m, p] * w[..., None]                                     # [q, k, r_b]
        zb = jnp.zeros((q, c_b, r_b), u.dtype).at[rows, m].add(coef)
        z.append(zb * f)
    x = _from_coefficients(embedding, z)
    return x.at[rows, indices].add(embedding.h0 * weights)
