"""Cluster-aware similarity diffusion (CAS; Luo, Yao & Xu, "Cluster-Aware Similarity Diffusion for
Instance Retrieval", ICML 2024) on each query's top-K shortlist.

CAS diffuses similarities inside local clusters (k-reciprocal sets) instead of over the whole
kNN graph, with a bidirectional diffusion (rows and columns of the similarity matrix smoothed
alike), smooths each item's similarity vector over its neighbours, and ranks by the
Jensen-Shannon divergence of the resulting vectors. The steps and defaults below are those of
the authors' ``cas_reranking`` (github.com/jifeiluo/reranking, ``reranker/cas_reranking.py``);
the paper's equations are the objectives they solve. Here they run on a local set of
m = K + 1 items, the query (node 0) and its K nearest database items (K = ``shortlist``,
100 by default, at most n), never on an [N, N] matrix:

1. distances: d_ij = ||x_i - x_j||^2 = 2 - 2 <x_i, x_j> (unit vectors), each row divided by
   its maximum over the local set (the code divides by the maximum over all items); ranks
   r_i(j) of j in row i (i itself first); affinities A_ij = exp(-d_ij / sigma^2).
2. local clusters: confident neighbours C = {(i, j): r_i(j) < k1 and r_j(i) < k1}; candidate
   set L_i: the k2-reciprocal set of i (ranks < k2 + 1 both ways) joined by the
   (k2 // 2)-reciprocal set of each member c sharing more than 2/3 of its items with it
   (Zhong et al.'s expansion).
3. bidirectional similarity diffusion (BSD): W_ij = A_ij for 1 <= r_i(j) < k1, times
   ``confident_weight`` on C, then W = (W + W^T) / 2, S = D^-1/2 W D^-1/2 and, from F = W,
   ``iterations`` steps of

       F <- (alpha / 2) (F S + S F) + (1 - alpha) I,    alpha = 1 / (1 + mu),

   the fixed-point iteration of min_F sum_ij W_ij [(F_ki / sqrt(D_ii) - F_kj / sqrt(D_jj))^2
   + (F_ik / sqrt(D_ii) - F_jk / sqrt(D_jj))^2] / 4 + mu ||F - I||^2 (the row and the column
   term: "bidirectional"); F is kept on the local clusters only, P_i = F_i restricted to L_i.
4. neighbour-guided similarity smoothing (NSS): a two-step transition matrix
   T = (N N), N the row-normalised A over ranks 1 <= r < k3; per row i with more than one
   confident and more than one other candidate (and a_i^2 + 2 beta > 0), the anchor
   a_i = mean_{c in C_i} T_cc, the weights t_ij = a_i on C_i and min(mean_{c in C_i} T_jc, a_i)
   on L_i \\ C_i, and

       P_ij = (F_ij (a_i t_ij + 2 beta) + a_i^2 mean_L F_i - a_i mean_L (F_i t_i)) / (a_i^2 + 2 beta),  j in L_i,

   as the authors' code smooths (other rows keep F_ij on L_i); rows L1-normalised.
5. neighbourhood-direct diffusion: each row averaged over the item's k4 nearest (itself
   included) and mixed with its confident neighbours' rows, M = ((1/k4) sum P_nn +
   lv C~ P) / (1 + lv) (C~ = C row-normalised), L1-normalised; one Markov step
   Q = topk5(M M) (the k5 largest entries per row, L1-normalised) and V = Q Q, L1-normalised.
6. distance: d_JS(i, j) = JS divergence (base 2) of V_i and V_j on the graph of each row's
   ``geodesic_k`` nearest items (the others at ``max_distance``), made symmetric by the
   minimum, and shortest paths over it (Floyd-Warshall on the m nodes), clipped to
   ``max_distance``; the final distance (1 - lambda) d_geo + lambda d, scores -distance.

The re-ranked shortlist comes first, the rest in first-search order
(`base.rerank_shortlist`). A database item used as a query (``search_items``) is node 0 of
its own local set and scores 0 (first). lambda = 1 gives the kNN ranking. Defaults (the
code's ``cas_reranking`` signature): k1 = 5, k2 = 20, k3 = 25, k4 = 6, k5 = 25,
lambda = 0.3, lv = 2, sigma = 0.3, mu = 0.23, beta = 0, confident weight 2, 10 diffusion
steps, the geodesic graph on each row's 100 nearest with distance cap 50.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _checks
from .base import HIGHEST as _HIGHEST
from .base import checked_database, make_method, rerank_shortlist
from .options import finite_float, option, positive_int

__all__ = ["CAS", "CasConfig", "CasParams", "CasState", "CasStatic", "cas_local_distances"]

_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class CasConfig:
    """Cluster-aware similarity diffusion on each query's top-K shortlist (defaults: the authors' code).

    Attributes:
      k1: confident neighbours (mutual top-k1, the item itself included) and the diffusion
        graph's k1 - 1 nearest others.
      k2: local clusters: k2-reciprocal sets expanded by (k2 // 2)-reciprocal ones.
      k3: the smoothing's transition graph: each item's k3 - 1 nearest others.
      k4: neighbourhood-direct diffusion: rows averaged over the k4 nearest (the item included).
      k5: entries kept per row of the Markov step.
      lam: lambda, weight of the original distance in (1 - lambda) d_geo + lambda d (traced).
      lv: weight of the confident neighbours' rows in the neighbourhood step (traced).
      sigma: affinity bandwidth, exp(-d / sigma^2) (traced).
      mu: diffusion regulariser, alpha = 1 / (1 + mu) (traced).
      beta: smoothing regulariser (traced; 0 in the authors' runs).
      confident_weight: factor of the confident pairs' diffusion weights (traced).
      iterations: diffusion steps.
      geodesic_k: each row's nearest items joined in the geodesic graph (all when the
        local set is smaller).
      max_distance: the geodesic graph's distance of unjoined pairs and the cap of every
        distance (traced).
      shortlist: K, the database items re-ranked per query (at most n; n - 1 for a database
        item used as a query).
    """

    k1: int = option(5, "CAS confident neighbours k1 (mutual top-k1)", flag="--cas-k1", parse=positive_int)
    k2: int = option(20, "CAS local clusters: expanded k2-reciprocal sets", flag="--cas-k2", parse=positive_int)
    k3: int = option(25, "CAS smoothing transition graph: k3 - 1 nearest", flag="--cas-k3", parse=positive_int)
    k4: int = option(6, "CAS neighbourhood rows averaged over the k4 nearest", flag="--cas-k4",
                     parse=positive_int)
    k5: int = option(25, "CAS Markov step: entries kept per row", flag="--cas-k5", parse=positive_int)
    lam: float = option(0.3, "CAS weight of the original distance", flag="--cas-lambda", parse=finite_float)
    lv: float = option(2.0, "CAS weight of the confident neighbours' rows", flag="--cas-lv", parse=finite_float)
    sigma: float = option(0.3, "CAS affinity bandwidth: exp(-d / sigma^2)", flag="--cas-sigma", parse=finite_float)
    mu: float = option(0.23, "CAS diffusion regulariser: alpha = 1 / (1 + mu)", flag="--cas-mu", parse=finite_float)
    beta: float = option(0.0, "CAS smoothing regulariser", flag="--cas-beta", parse=finite_float)
    confident_weight: float = option(2.0, "CAS factor of the confident pairs' diffusion weights",
                                     flag="--cas-confident-weight", parse=finite_float)
    iterations: int = option(10, "CAS diffusion steps", flag="--cas-iterations", parse=positive_int)
    geodesic_k: int = option(100, "CAS geodesic graph: each row's nearest items", flag="--cas-geodesic-k",
                             parse=positive_int)
    max_distance: float = option(50.0, "CAS geodesic distance cap", flag="--cas-max-distance",
                                 parse=finite_float)
    shortlist: int = option(100, "CAS database items re-ranked per query (at most n)",
                            flag="--cas-shortlist", parse=positive_int)

    def __post_init__(self):
        for name in ("k1", "k2", "k3", "k4", "k5", "iterations", "geodesic_k", "shortlist"):
            _checks.check_positive_int(getattr(self, name), f"CasConfig.{name}")
        if self.k1 < 2:
            raise ValueError(f"CasConfig.k1 must be at least 2 (the diffusion graph takes k1 - 1 >= 1 "
                             f"neighbours), got {self.k1}")
        if self.k1 > self.k2 + 1:
            raise ValueError(f"CasConfig.k1 = {self.k1} must be at most k2 + 1 = {self.k2 + 1} (the confident "
                             "neighbours lie inside the local clusters)")
        for name, low, high in (("lam", 0.0, 1.0), ("lv", 0.0, math.inf), ("beta", 0.0, math.inf)):
            value = _as_number(getattr(self, name), name)
            if not low <= value <= high:
                raise ValueError(f"CasConfig.{name} must lie in [{low}, {high}], got {value}")
        for name in ("sigma", "mu", "confident_weight", "max_distance"):
            if not _as_number(getattr(self, name), name) > 0:
                raise ValueError(f"CasConfig.{name} must be positive, got {getattr(self, name)}")


def _as_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"CasConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"CasConfig.{name} must be finite, got {value}")
    return float(value)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["lam", "lv", "sigma", "mu", "beta", "confident_weight", "max_distance"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class CasParams:
    """The values of a `CasConfig` as traced float32 scalars (a new value does not recompile)."""

    lam: jax.Array
    lv: jax.Array
    sigma: jax.Array
    mu: jax.Array
    beta: jax.Array
    confident_weight: jax.Array
    max_distance: jax.Array

    @classmethod
    def of(cls, config: CasConfig) -> "CasParams":
        return cls(**{f.name: jnp.float32(getattr(config, f.name)) for f in dataclasses.fields(cls)})


class CasStatic(NamedTuple):
    """The shape-deciding fields of a `CasConfig` (static: a new value compiles anew)."""

    k1: int
    k2: int
    k3: int
    k4: int
    k5: int
    iterations: int
    geodesic_k: int

    @classmethod
    def of(cls, config: CasConfig) -> "CasStatic":
        return cls(*(getattr(config, name) for name in cls._fields))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "params"],
                   meta_fields=["static", "shortlist"])
@dataclasses.dataclass(frozen=True)
class CasState:
    """The database float32[n, d], the traced `CasParams`, the static `CasStatic` and
    K = min(config.shortlist, n) (a database item used as a query takes at most n - 1 others).
    States of configs that differ only in values share one compiled search."""

    database: jax.Array
    params: CasParams
    static: CasStatic
    shortlist: int


def _l1(x):
    return x / jnp.maximum(jnp.sum(jnp.abs(x), axis=-1, keepdims=True), _TINY)


def _local(xl, p: CasParams, cfg: CasStatic):
    """The CAS distances of one local set ``xl`` float32[m, d] (node 0 the query): [m, m]."""
    m = xl.shape[0]
    f32 = jnp.float32
    eye = jnp.eye(m, dtype=bool)
    gram = jnp.matmul(xl, xl.T, precision=_HIGHEST)
    dist = jnp.where(eye, 0.0, jnp.maximum(2.0 - 2.0 * gram, 0.0))
    dist = dist / jnp.maximum(jnp.max(dist, axis=1, keepdims=True), _TINY)
    order = jnp.argsort(jnp.where(eye, -1.0, dist), axis=1, stable=True)       # the item itself first
    rank = jnp.argsort(order, axis=1)                                           # rank[i, j] = r_i(j)
    aff = jnp.exp(-dist / (p.sigma * p.sigma))

    def mutual(k):
        top = rank < k
        return top & top.T

    # local clusters
    conf = mutual(cfg.k1)
    cand0 = mutual(cfg.k2 + 1)
    half = mutual(cfg.k2 // 2 + 1)
    inter = jnp.matmul(cand0.astype(f32), half.T.astype(f32), precision=_HIGHEST)      # [r, c]
    grow = cand0 & (3.0 * inter > 2.0 * jnp.sum(half, axis=1)[None, :])
    cand = cand0 | (jnp.matmul(grow.astype(f32), half.astype(f32), precision=_HIGHEST) > 0)
    # bidirectional similarity diffusion
    w = jnp.where((rank < cfg.k1) & ~eye, aff, 0.0)
    w = jnp.where(conf, p.confident_weight * w, w)
    w = (w + w.T) / 2
    dv = 1.0 / jnp.sqrt(jnp.maximum(jnp.sum(w, axis=1), _TINY))
    s = w * dv[:, None] * dv[None, :]
    s = (s + s.T) / 2
    alpha = 1.0 / (1.0 + p.mu)
    ident = jnp.eye(m, dtype=f32)

    def step(_, f):
        fs = jnp.matmul(f, s, precision=_HIGHEST) + jnp.matmul(s, f, precision=_HIGHEST)
        return 0.5 * alpha * fs + (1.0 - alpha) * ident

    f = jax.lax.fori_loop(0, cfg.iterations, step, w)
    # neighbour-guided similarity smoothing
    trans = _l1(jnp.where((rank < cfg.k3) & ~eye, aff, 0.0))
    tm = jnp.matmul(trans, trans, precision=_HIGHEST)
    confn = jnp.sum(conf, axis=1).astype(f32)
    semi = cand & ~conf
    candn = jnp.sum(cand, axis=1).astype(f32)
    anchor = jnp.sum(jnp.where(conf, jnp.diagonal(tm)[None, :], 0.0), axis=1) / confn
    toward = jnp.matmul(conf.astype(f32), tm.T, precision=_HIGHEST) / confn[:, None]   # mean_c T_jc
    a = anchor[:, None]
    tw = jnp.where(conf, a, jnp.where(semi, jnp.minimum(toward, a), 0.0))
    fc = jnp.where(cand, f, 0.0)
    tmp = anchor ** 2 * jnp.sum(fc, axis=1) / candn - anchor * jnp.sum(fc * tw, axis=1) / candn
    smooth = jnp.where(cand, (f * (a * tw + 2.0 * p.beta) + tmp[:, None]) / (a * a + 2.0 * p.beta), 0.0)
    use = (jnp.sum(conf, axis=1) > 1) & (jnp.sum(semi, axis=1) > 1) & (anchor * anchor + 2.0 * p.beta > 0)
    feat = _l1(jnp.where(use[:, None], smooth, fc))
    # neighbourhood-direct diffusion and one Markov step
    near = (rank < cfg.k4).astype(f32)
    mixed = jnp.matmul(near, feat, precision=_HIGHEST) / cfg.k4
    mixed = _l1((mixed + p.lv * jnp.matmul(_l1(conf.astype(f32)), feat, precision=_HIGHEST)) / (1.0 + p.lv))
    markov = jnp.matmul(mixed, mixed, precision=_HIGHEST)
    k5 = min(cfg.k5, m)
    _, top5 = jax.lax.top_k(markov, k5)
    keep = jnp.zeros((m, m), bool).at[jnp.arange(m)[:, None], top5].set(True)
    q = _l1(jnp.where(keep, markov, 0.0))
    v = _l1(jnp.matmul(q, q, precision=_HIGHEST))
    # Jensen-Shannon divergence, geodesics
    pi, pj = v[:, None, :], v[None, :, :]
    both = pi + pj
    js = 0.5 * (jnp.sum(jnp.where(pi > 0, pi * jnp.log2(2.0 * pi / jnp.where(pi > 0, both, 1.0)), 0.0), axis=-1)
                + jnp.sum(jnp.where(pj > 0, pj * jnp.log2(2.0 * pj / jnp.where(pj > 0, both, 1.0)), 0.0), axis=-1))
    cap = p.max_distance
    adj = jnp.where(rank < cfg.geodesic_k, js, cap)
    adj = jnp.where(eye, 0.0, adj)
    adj = jnp.clip(jnp.minimum(adj, adj.T), 0.0, cap)

    def relax(k, g):
        return jnp.minimum(g, g[:, k, None] + g[None, k, :])

    geo = jnp.clip(jax.lax.fori_loop(0, m, relax, adj), 0.0, cap)
    return (1.0 - p.lam) * geo + p.lam * dist


def cas_local_distances(local, config: CasConfig = CasConfig()) -> jax.Array:
    """CAS distances among the items of one local set (see the module docstring), jitted.

    Args:
      local: float[m, d] L2-normalised descriptors; the rows of a query's local set (the
        query first, then its nearest database items).
      config: a `CasConfig` (its k's at most m - 1 where the module's checks say so).

    Returns:
      float32[m, m], row i the final distances (1 - lambda) d_geo + lambda d from item i.
    """
    x = _checks.as_matrix(local, "local")
    _check_local(config, x.shape[0])
    return _local_jit(jnp.asarray(x), CasParams.of(config), CasStatic.of(config))


_local_jit = jax.jit(_local, static_argnums=2)


def _check_local(config: CasConfig, m: int) -> None:
    if not isinstance(config, CasConfig):
        raise TypeError(f"config must be a CasConfig, got {type(config).__name__}")
    for name in ("k2", "k3", "k4", "k5"):
        k = getattr(config, name)
        limit = m - 1 if name == "k2" else m
        if k > limit:
            raise ValueError(f"CasConfig.{name} = {k} exceeds a local set of {m} items (the query and its "
                             f"{m - 1} nearest); choose {name} <= {limit} or a longer shortlist")


def _check_sizes(config: CasConfig, n: int) -> None:
    if n < 2:
        raise ValueError(f"CAS needs a database of at least 2 items, got {n}")
    _check_local(config, min(config.shortlist, n - 1) + 1)


def _build(database, config: CasConfig = CasConfig()) -> CasState:
    db = checked_database(database, config, CasConfig, "cas")
    n = db.shape[0]
    _check_sizes(config, n)
    return CasState(database=jnp.asarray(db), params=CasParams.of(config), static=CasStatic.of(config),
                    shortlist=min(config.shortlist, n))


def _rerank(state: CasState, qx, sims, exclude=None):
    """Each query's local set (itself and its K nearest) through `_local`; d of node 0."""
    if exclude is not None:
        sims_k = sims.at[jnp.arange(sims.shape[0]), exclude].set(-jnp.inf)
    else:
        sims_k = sims
    k = state.shortlist if exclude is None else min(state.shortlist, sims.shape[1] - 1)
    _, short = jax.lax.top_k(sims_k, k)
    local = jnp.concatenate([qx[:, None, :], state.database[short]], axis=1)         # [nq, m, d]
    d0 = jax.lax.map(lambda xl: _local(xl, state.params, state.static)[0], local)    # [nq, m]
    if exclude is None:
        return rerank_shortlist(sims, short, -d0[:, 1:])
    return rerank_shortlist(sims, jnp.concatenate([exclude[:, None], short], axis=1), -d0)


@jax.jit
def _search(state: CasState, queries):
    qx = queries.astype(jnp.float32)
    return _rerank(state, qx, jnp.matmul(qx, state.database.T, precision=_HIGHEST))


@jax.jit
def _search_items(state: CasState, ids):
    qx = state.database[ids]
    return _rerank(state, qx, jnp.matmul(qx, state.database.T, precision=_HIGHEST), exclude=ids)


CAS = make_method("cas", _build, _search, _search_items, CasConfig, check_sizes=_check_sizes,
                  summary="cluster-aware similarity diffusion on each query's top-K shortlist")
