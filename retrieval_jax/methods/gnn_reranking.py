"""GNN re-ranking: message passing of top-k1 adjacency rows over the top-k2 graph.

Zhang, Jiang, Zheng, Tan, Ding & Yang, "Understanding Image Retrieval Re-Ranking: A Graph
Neural Network Perspective", arXiv:2012.07620, 2020 (code: Xuanmeng-Zhang/gnn-re-ranking,
with the PaddlePaddle and PyTorch ports the authors link to).

Every node's feature is a row of an adjacency matrix over the N database items; message
passing over the kNN graph mixes the rows of a node's neighbours into its own, and the
new similarity of two items is the inner product of their rows. With N(i, k) the node i
itself followed by its k - 1 nearest other items by inner product s_ij = <x_i, x_j>:

    A_0[i, j] = 1 if j in N(i, k1), else 0                          (stage 1: the top-k1 graph)
    for l = 1..L:                                                     (stage 2: L layers, L = 2)
        B_{l-1} = A_{l-1} + A_{l-1}^T
        H_l[i] = sum_{j in N(i, k2)} s_ij^2 B_{l-1}[j]
        A_l[i] = H_l[i] / ||H_l[i]||_2
    score(i, g) = <A_L[i], A_L[g]>

as the authors' code computes it (binary top-k1 edges, squared similarities as the
aggregation weights of the top-k2, two layers). Written with P the top-k2 weights
(P[i, j] = s_ij^2 for j in N(i, k2)) and D_l = diag(1 / ||H_l[i]||), this is
A_l = D_l P B_{l-1}, B_l = A_l + A_l^T: every A_l is a product of sparse fixed-width
neighbour lists and diagonals. Nothing here holds an [N, N] array: B_l is applied to
[N, m] blocks by the recursion

    B_0 V = A_0 V + A_0^T V,      B_l V = D_l P (B_{l-1} V) + B_{l-1} (P^T D_l V),

(2^l products with A_0, gathers for A_0 and P, per-slot scatter-adds for their
transposes), and the scores of a feature u against the database are A_L u = D_L P
B_{L-1} u. Offline, ``build`` stores the neighbour lists and the normalisers D_1..D_L:
scipy sparse products on the host, H_l a block of rows at a time with only its row norms
kept, A_1 .. A_{L-1} stored sparse (A_1 has at most k2 (k1 + in-degree) entries a row;
H_2's rows up to about 2 k2^2 k1, so the offline work of the default grows as N k2^2 k1).
A query then costs O(2^l N k) per layer l, on [N, nq] vectors.

A database item ranked as a query (``search_items``) has its own row A_L[i]: the ranking
is exactly the authors' algorithm run on the database. An out-of-database query q is a
node that no database item lists (the database's features are computed once, without
it) and whose own column is left out, as no database row has one:

    u_0 = 1[j in N_db(q, k1 - 1)]                   (its k1 - 1 nearest database items)
    u_l = h_l / ||h_l||,  h_l = s_qq^2 u_{l-1} + B_{l-1} p_q,  p_q[j] = s_qj^2 (j in N_db(q, k2 - 1))
    score(q, g) = <u_L, A_L[g]>

(the query's own slot of N(q, k) is the self term s_qq^2 u_{l-1}; the transposed part of
its B row is empty). The PyTorch port also mixes in the original similarity,
(1 - lambda) score + lambda <q, x_g> with lambda = 0.3; the paper and the PaddlePaddle
code do not (``lam = 0``, the default here).

Public API:
  * ``GNN`` / ``GnnConfig`` / ``GnnState``: the `Method` (registered as "gnn").
  * ``gnn_scores(state, queries)``, ``gnn_item_scores(state, ids)``: the pure, jittable
    scores float32[nq, N] (no checks; ``GNN.search`` checks and pads).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .. import _checks
from .._progress import progress
from ..graph.neighbours import knn
from .base import HIGHEST as _HIGHEST
from .base import checked_database, make_method, top_k_scores
from .options import finite_float, nonneg_int, option, positive_int

__all__ = ["GNN", "GnnConfig", "GnnState", "gnn_item_scores", "gnn_scores"]

_EPS = 1e-30
_KNN_METHODS = ("auto", "exact", "faiss")


@dataclasses.dataclass(frozen=True)
class GnnConfig:
    """GNN re-ranking (Zhang et al., arXiv:2012.07620): the authors' defaults.

    Attributes:
      k1: the top-k1 graph of the node features A_0 (the node itself counts as one of the
        k1); 40 (the authors' code sets k1 = 26 for Market-1501 and 60 for VeRi-776).
      k2: the top-k2 neighbours whose features a node aggregates (itself included), with
        weights s_ij^2; 10 (their code: 7 for Market-1501, 10 for VeRi-776). k2 <= k1.
      layers: message-passing layers L (2 in the authors' code; 0 scores by the number
        of shared top-k1 neighbours, <A_0[q], A_0[g]>).
      lam: weight of the original similarity mixed into the scores,
        (1 - lam) <A_L[q], A_L[g]> + lam <q, x_g>; 0 in the paper and the PaddlePaddle
        code, 0.3 in the PyTorch port. A traced value of the state (no recompilation).
      knn_method: the neighbour search of `retrieval_jax.graph.knn` ("auto", "exact",
        "faiss").
      block_size: database rows per block of the offline normalisers (host sparse products).
    """

    k1: int = option(40, "GNN re-ranking: top-k1 graph of the node features (the node itself included; "
                     "default 40, at most n)", flag="--gnn-k1", parse=positive_int,
                     choose=lambda n, values: max(2, min(40, n)), rule="min(40, n)")
    k2: int = option(10, "GNN re-ranking: neighbours aggregated per layer (the node itself included, <= k1; "
                     "default 10, at most k1)", flag="--gnn-k2", parse=positive_int,
                     choose=lambda n, values: min(10, values["k1"]), rule="min(10, k1)")
    layers: int = option(2, "GNN re-ranking: message-passing layers (0: shared top-k1 neighbours)",
                         flag="--gnn-layers", parse=nonneg_int)
    lam: float = option(0.0, "GNN re-ranking: weight of the original similarity in the scores, in [0, 1]",
                        flag="--gnn-lambda", parse=finite_float)
    knn_method: str = "auto"
    block_size: int = 1024

    def __post_init__(self):
        k1 = _checks.check_positive_int(self.k1, "GnnConfig.k1")
        if k1 < 2:
            raise ValueError(f"GnnConfig.k1 must be at least 2 (the node itself and one neighbour), got {k1}")
        k2 = _checks.check_positive_int(self.k2, "GnnConfig.k2")
        if k2 > k1:
            raise ValueError(f"GnnConfig.k2 = {k2} must be at most k1 = {k1} (the aggregated neighbours "
                             "are the first k2 of the top-k1)")
        if not _checks.is_int(self.layers) or self.layers < 0:
            raise ValueError(f"GnnConfig.layers must be an int >= 0, got {self.layers!r}")
        if self.layers > 6:
            raise ValueError(f"GnnConfig.layers = {self.layers}: each layer doubles the work (2^L products "
                             "with the graph); the authors use 2, at most 6 is accepted")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float, np.integer, np.floating)):
            raise TypeError(f"GnnConfig.lam must be a number in [0, 1], got {self.lam!r}")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"GnnConfig.lam must lie in [0, 1], got {self.lam}")
        if self.knn_method not in _KNN_METHODS:
            raise ValueError(f"GnnConfig.knn_method must be one of {_KNN_METHODS}, got {self.knn_method!r}")
        _checks.check_positive_int(self.block_size, "GnnConfig.block_size")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["database", "a0", "p_idx", "p_w", "inv_norms", "lam"], meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class GnnState:
    """The database and its GNN graph (a pytree: arrays and lam traced, the sizes static).

    Attributes:
      database: float32[N, d] descriptors.
      a0: int32[N, k1] the top-k1 lists N(i, k1), slot 0 the node itself (A_0's ones).
      p_idx: int32[N, k2] the top-k2 lists N(i, k2) (slot 0 the node itself).
      p_w: float32[N, k2] their weights s_ij^2 (P's entries).
      inv_norms: float32[L, N] the normalisers 1 / ||H_l[i]|| of layers 1..L.
      lam: float32 scalar, the weight of the original similarity (a traced leaf: states
        of several lam share one compiled search).
      static: the `GnnConfig` with lam = 0 (static metadata); ``config`` is the whole one.
    """

    database: jax.Array
    a0: jax.Array
    p_idx: jax.Array
    p_w: jax.Array
    inv_norms: jax.Array
    lam: jax.Array
    static: GnnConfig = GnnConfig()

    @property
    def config(self) -> GnnConfig:
        """The `GnnConfig` the state was built with (host side: lam read from its leaf)."""
        return dataclasses.replace(self.static, lam=float(self.lam))


# ----------------------------------------------------------------------------- sparse products
def _gather(idx, w, v):
    """M v for M[i, idx[i, s]] = w[i, s] (w None: ones), v [N, m]: one slot at a time."""
    def body(s, acc):
        rows = v[idx[:, s]]
        return acc + (rows if w is None else w[:, s, None] * rows)
    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros_like(v), unroll=1)


def _scatter(idx, w, v):
    """M^T v for the M of `_gather`: (M^T v)[j] = sum_{i, s: idx[i, s] = j} w[i, s] v[i]."""
    def body(s, acc):
        return acc.at[idx[:, s]].add(v if w is None else w[:, s, None] * v)
    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros_like(v), unroll=1)


def _apply_b(a0, p_idx, p_w, inv_norms, level: int, v):
    """B_level v for v float32[N, m] (node axis first), by the recursion of the module docstring."""
    if level == 0:
        return _gather(a0, None, v) + _scatter(a0, None, v)
    d = inv_norms[level - 1][:, None]
    m = v.shape[1]
    both = _apply_b(a0, p_idx, p_w, inv_norms, level - 1,
                    jnp.concatenate([v, _scatter(p_idx, p_w, d * v)], axis=1))
    return d * _gather(p_idx, p_w, both[:, :m]) + both[:, m:]


def _apply_a(state: GnnState, v):
    """A_L v for v [N, m]: the scores of the features v (columns) against every database row."""
    layers = state.static.layers
    if layers == 0:
        return _gather(state.a0, None, v)
    b = _apply_b(state.a0, state.p_idx, state.p_w, state.inv_norms, layers - 1, v)
    return state.inv_norms[layers - 1][:, None] * _gather(state.p_idx, state.p_w, b)


def _unit_columns(h):
    norm = jnp.sqrt(jnp.sum(h * h, axis=0, keepdims=True))
    return h / jnp.maximum(norm, _EPS)


def _mix(state: GnnState, scores, sims):
    lam = state.lam.astype(jnp.float32)
    return (1.0 - lam) * scores + lam * sims


# ----------------------------------------------------------------------------- scores
def gnn_scores(state: GnnState, queries) -> jax.Array:
    """Scores float32[nq, N] of out-of-database queries (module docstring: u_L, then A_L u_L).

    Pure and jittable (vmap over single queries [1, d] works too); no checks (``GNN.search``
    checks and pads).

    Args:
      state: a `GnnState` from ``GNN.build``.
      queries: float[nq, d] descriptors.

    Returns:
      float32[nq, N], higher is better: (1 - lam) <u_L(q), A_L[g]> + lam <q, x_g>.
    """
    cfg = state.static
    q = jnp.asarray(queries, jnp.float32)
    n = state.database.shape[0]
    sims = jnp.matmul(q, state.database.T, precision=_HIGHEST)                    # [nq, N]
    s, idx = top_k_scores(sims, cfg.k1 - 1)
    rows = jnp.arange(q.shape[0])[:, None]
    u = jnp.zeros((q.shape[0], n), jnp.float32).at[rows, idx].set(1.0).T           # u_0 [N, nq]
    if cfg.layers:
        self_w = jnp.sum(q * q, axis=1) ** 2                                        # s_qq^2 [nq]
        p = jnp.zeros((q.shape[0], n), jnp.float32).at[rows, idx[:, :cfg.k2 - 1]].set(
            s[:, :cfg.k2 - 1] ** 2).T                                               # p_q [N, nq]
        for level in range(cfg.layers):
            h = self_w[None, :] * u + _apply_b(state.a0, state.p_idx, state.p_w, state.inv_norms, level, p)
            u = _unit_columns(h)
    return _mix(state, _apply_a(state, u).T, sims)


def gnn_item_scores(state: GnnState, ids) -> jax.Array:
    """Scores float32[nq, N] of database items ranked as queries: <A_L[i], A_L[g]>.

    The authors' algorithm on the database itself (the item scores itself too; leave it
    out of its ranking). Pure and jittable; ``ids`` int[nq] in [0, N) unchecked.
    """
    cfg = state.static
    ids = jnp.asarray(ids, jnp.int32)
    n = state.database.shape[0]
    nq = ids.shape[0]
    cols = jnp.arange(nq)[:, None]
    if cfg.layers == 0:
        rows = jnp.zeros((nq, n), jnp.float32).at[cols, state.a0[ids]].set(1.0).T          # A_0^T e_i
    else:
        d = state.inv_norms[cfg.layers - 1][ids]
        pt = jnp.zeros((nq, n), jnp.float32).at[cols, state.p_idx[ids]].add(
            d[:, None] * state.p_w[ids]).T                                                   # P^T D_L e_i
        rows = _apply_b(state.a0, state.p_idx, state.p_w, state.inv_norms, cfg.layers - 1, pt)  # A_L^T e_i
    sims = jnp.matmul(state.database[ids], state.database.T, precision=_HIGHEST)
    return _mix(state, _apply_a(state, rows).T, sims)


# ----------------------------------------------------------------------------- build
def _normalisers(a0: np.ndarray, p_idx: np.ndarray, p_w: np.ndarray, layers: int, block: int,
                 show_progress) -> np.ndarray:
    """1 / ||H_l[i]|| for l = 1..L, float32[L, N], by scipy sparse products on the host.

    H_l = P B_{l-1} is formed a block of rows at a time and only its row norms are kept,
    except below the last layer, where A_l = D_l H_l is the next layer's input (sparse:
    at most k2 (k1 + in-degree) entries a row for A_1). Work and memory follow the
    non-zeros of the rows (dense rows on a small database)."""
    n = a0.shape[0]
    a = sp.csr_matrix((np.ones(a0.size), (np.repeat(np.arange(n), a0.shape[1]), a0.ravel())), shape=(n, n))
    p = sp.csr_matrix((p_w.ravel().astype(np.float64), (np.repeat(np.arange(n), p_idx.shape[1]), p_idx.ravel())),
                      shape=(n, n))
    out = np.empty((layers, n), np.float32)
    starts = range(0, n, block)
    for level in range(layers):
        b = (a + a.T).tocsr()
        keep = level < layers - 1
        norms = np.empty(n)
        rows = []
        for start in progress(starts, desc=f"gnn layer {level + 1} normalisers", total=len(starts),
                              enable=show_progress):
            h = (p[start:start + block] @ b).tocsr()
            norms[start:start + block] = np.sqrt(np.asarray(h.multiply(h).sum(axis=1)).ravel())
            if keep:
                rows.append(h)
        inv = 1.0 / np.maximum(norms, _EPS)
        out[level] = inv
        if keep:
            a = sp.diags(inv) @ sp.vstack(rows).tocsr()
    return out


def _gnn_check_sizes(config: GnnConfig, n: int) -> None:
    _checks.check_k(config.k1, n, name="GnnConfig.k1", what="database items (the item itself and k1 - 1 others)")


def _gnn_build(database, config: GnnConfig = GnnConfig(), *, show_progress: bool | None = None) -> GnnState:
    db = checked_database(database, config, GnnConfig, "gnn")
    n = db.shape[0]
    _gnn_check_sizes(config, n)
    if n < 2:
        raise ValueError("GNN re-ranking needs a database of at least 2 items")
    s, i = knn(db, db, config.k1 - 1, exclude_self=True, method=config.knn_method, show_progress=show_progress)
    s, i = np.asarray(s, np.float32), np.asarray(i, np.int32)
    self_ids = np.arange(n, dtype=np.int32)[:, None]
    self_sim = np.sum(db.astype(np.float64) ** 2, axis=1, keepdims=True).astype(np.float32)
    a0 = jnp.asarray(np.concatenate([self_ids, i], axis=1))
    p_idx = jnp.asarray(np.concatenate([self_ids, i[:, :config.k2 - 1]], axis=1))
    p_w = jnp.asarray(np.concatenate([self_sim, s[:, :config.k2 - 1]], axis=1) ** 2)
    inv = _normalisers(np.asarray(a0), np.asarray(p_idx), np.asarray(p_w), config.layers, config.block_size,
                       show_progress)
    return GnnState(database=jnp.asarray(db), a0=a0, p_idx=p_idx, p_w=p_w, inv_norms=jnp.asarray(inv),
                    lam=jnp.float32(config.lam), static=dataclasses.replace(config, lam=0.0))


@jax.jit
def _gnn_search(state: GnnState, queries):
    return gnn_scores(state, queries)


@jax.jit
def _gnn_search_items(state: GnnState, ids):
    return gnn_item_scores(state, ids)


GNN = make_method("gnn", _gnn_build, _gnn_search, _gnn_search_items, GnnConfig, check_sizes=_gnn_check_sizes,
                  summary="GNN re-ranking (message passing of top-k1 adjacency rows, Zhang et al. 2020)")
