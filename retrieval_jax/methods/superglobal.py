"""SuperGlobal re-ranking: the top M refined among themselves, then re-scored by two queries.

Shao, Chen, Karpur, Cui, Araujo & Cao, "Global Features are All You Need for Image
Retrieval and Reranking", ICCV 2023 (the re-ranking stage; the GeM variants of the
paper's extraction stage are descriptor work, not here). The facts below are those of
the authors' code (``modules/reranking/MDescAug.py`` and ``RerankwMDA.py`` of
ShihaoShao-GH/SuperGlobal), where the paper leaves a detail open.

For a query q with the shortlist x_1..x_M of its first search (the top M by <q, x>):

1. Each shortlist item is refined by its K nearest *within the shortlist*, N_K(i)
   (by s_ij = <x_i, x_j>, the item itself excluded):

       x'_i = (x_i + beta sum_{j in N_K(i)} s_ij x_j) / (1 + beta sum_{j in N_K(i)} s_ij)

   the weighted mean of the item (weight 1) and its neighbours (weights beta s_ij);
   x'_i is not re-normalised.
2. Each refined item is scored against the query, s1_i = <q, x'_i>.
3. A second query is max-pooled, element-wise, from the K + 1 refined items of highest
   s1 (the code's ``K + 1``, "including oneself": 10 for K = 9),
   q'' = max_{i in top_{K+1}(s1)} x'_i, and s2_i = <q'', x'_i>.
4. The shortlist is reordered by (s1_i + s2_i) / 2; the other items follow in their
   first-search order (`base.rerank_shortlist`).

Defaults M = 400, K = 9, beta = 0.15 (the code's). Neighbour weights are the raw
similarities (negative ones too), as in the code. A database item used as a query is
not in its own shortlist (it ranks right after the shortlist).

Nothing holds an [n, n] array: every query's work is [M, M] (the shortlist's Gram
matrix, the one cost of the method: M^2 d per query) and [M, K]; queries run in chunks
of `CHUNK` (``jax.lax.map``), the K neighbour sums one slot at a time.

Public API:
  * `refine_shortlist(vectors, k, beta)`: step 1 on one shortlist [M, d].
  * `shortlist_scores(query, vectors, k, beta)`: steps 1-3, the new scores [M].
  * `superglobal_rerank(queries, database, m, k, beta)`: scores [nq, n].
  * ``SUPERGLOBAL`` / `SuperGlobalConfig` / `SuperGlobalState`: the `Method` (``superglobal``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _checks
from .._precision import HIGHEST
from .base import checked_database, make_method, rerank_shortlist
from .options import finite_float, option, positive_int

__all__ = ["CHUNK", "SUPERGLOBAL", "SuperGlobalConfig", "SuperGlobalState", "SuperGlobalStatic", "refine_shortlist",
           "shortlist_scores", "superglobal_rerank"]

_EPS = 1e-12
#: queries per chunk of a batched search (bounds the [chunk, M, M] and [chunk, M, d] arrays)
CHUNK = 16


# ----------------------------------------------------------------------------- kernels
@functools.partial(jax.jit, static_argnames=("k",))
def refine_shortlist(vectors, k: int, beta) -> jax.Array:
    """SuperGlobal's refinement of one shortlist: float32[M, d].

        x'_i = (x_i + beta sum_{j in N_K(i)} s_ij x_j) / (1 + beta sum_{j in N_K(i)} s_ij)

    N_K(i): the k items j != i of highest s_ij = <x_i, x_j> in the shortlist.

    Args:
      vectors: float[M, d] the shortlist's descriptors.
      k: neighbours within the shortlist, 1 <= k < M (static).
      beta: neighbour weight (traced).

    Returns:
      float32[M, d]. Pure: jit / vmap over shortlists.
    """
    x = jnp.asarray(vectors, jnp.float32)
    m = x.shape[0]
    gram = jnp.matmul(x, x.T, precision=HIGHEST)
    gram = jnp.where(jnp.eye(m, dtype=bool), -jnp.inf, gram)
    sims, nbrs = jax.lax.top_k(gram, k)  # [M, K]
    w = jnp.asarray(beta, jnp.float32) * sims

    def add(j, acc):
        return acc + w[:, j, None] * x[nbrs[:, j]]

    acc = jax.lax.fori_loop(0, k, add, x)
    den = 1.0 + jnp.sum(w, axis=1, keepdims=True)
    return acc / jnp.where(jnp.abs(den) < _EPS, _EPS, den)


@functools.partial(jax.jit, static_argnames=("k",))
def shortlist_scores(query, vectors, k: int, beta) -> jax.Array:
    """SuperGlobal's new scores of one shortlist: float32[M], (s1 + s2) / 2.

    s1_i = <q, x'_i> on the refined items (`refine_shortlist`); s2_i = <q'', x'_i> with
    q'' the element-wise max of the k + 1 refined items of highest s1.

    Args:
      query: float[d].
      vectors: float[M, d] the shortlist's descriptors (any order).
      k: neighbours, 1 <= k < M (static).
      beta: neighbour weight (traced).
    """
    refined = refine_shortlist(vectors, k, beta)
    q = jnp.asarray(query, jnp.float32)
    s1 = jnp.matmul(refined, q, precision=HIGHEST)
    _, top = jax.lax.top_k(s1, k + 1)
    q2 = jnp.max(refined[top], axis=0)
    s2 = jnp.matmul(refined, q2, precision=HIGHEST)
    return 0.5 * (s1 + s2)


def _rerank(queries, database, m: int, k: int, beta, exclude=None):
    sims = jnp.matmul(queries, database.T, precision=HIGHEST)
    pick = sims if exclude is None else sims.at[jnp.arange(sims.shape[0]), exclude].set(-jnp.inf)
    _, shortlist = jax.lax.top_k(pick, m)

    def one(args):
        q, ids = args
        return shortlist_scores(q, database[ids], k, beta)

    new = jax.lax.map(one, (queries, shortlist), batch_size=min(CHUNK, max(1, queries.shape[0])))
    return rerank_shortlist(sims, shortlist, new)


@functools.partial(jax.jit, static_argnames=("m", "k"))
def _rerank_jit(queries, database, m: int, k: int, beta):
    return _rerank(queries, database, m, k, beta)


def superglobal_rerank(queries, database, m: int = 400, k: int = 9, beta: float = 0.15) -> jax.Array:
    """SuperGlobal re-ranking of a kNN search: scores float32[nq, n], higher is better.

    The top ``m`` of each query's search by <q, x> re-scored by `shortlist_scores` and
    ranked first; the rest after them in their first-search order (`base.rerank_shortlist`).

    Args:
      queries: float[nq, d].
      database: float[n, d].
      m: shortlist size, k < m <= n.
      k: neighbours within the shortlist, >= 1.
      beta: neighbour weight, finite.
    """
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    _checks.check_same_dim(q, db, "queries", "database")
    _check_static(SuperGlobalStatic(m, k), db.shape[0], items=False)
    beta = _checks.check_nonnegative(beta, "beta")
    return _rerank_jit(jnp.asarray(q), jnp.asarray(db), m, k, jnp.float32(beta))


# ----------------------------------------------------------------------------- validation
def _check_static(static: "SuperGlobalStatic", n_db: int, *, items: bool, prefix: str = "") -> None:
    for name in SuperGlobalStatic._fields:
        _checks.check_positive_int(getattr(static, name), prefix + name)
    if static.k >= static.m:
        raise ValueError(f"{prefix}k = {static.k} neighbours within a shortlist of {prefix}m = {static.m} items "
                         f"need k < m")
    others = n_db - 1 if items else n_db
    if static.m > others:
        raise ValueError(f"{prefix}m = {static.m} shortlist items need a database of more than "
                         f"{static.m if items else static.m - 1} items{' (the query item excluded)' if items else ''}, "
                         f"got {n_db}; choose {prefix}m <= {others}")


# ----------------------------------------------------------------------------- the Method
@dataclasses.dataclass(frozen=True)
class SuperGlobalConfig:
    """SuperGlobal re-ranking (Shao et al., ICCV 2023): the top m refined by their k nearest among
    themselves (weight beta), re-scored by the query and a max-pooled second query.

    m and k are static (shapes), beta a traced value. The command line takes
    m = min(400, n - 1) when it is not given.
    """

    m: int = option(400, "SuperGlobal shortlist size M", flag="--sg-m", parse=positive_int,
                    choose=lambda n, values: max(1, min(400, n - 1)), rule="min(400, n - 1)")
    k: int = option(9, "SuperGlobal neighbours K within the shortlist (K + 1 refined items max-pooled)",
                    flag="--sg-k", parse=positive_int)
    beta: float = option(0.15, "SuperGlobal neighbour weight beta", flag="--sg-beta", parse=finite_float)

    def __post_init__(self):
        for name in SuperGlobalStatic._fields:
            _checks.check_positive_int(getattr(self, name), f"SuperGlobalConfig.{name}")
        if self.k >= self.m:
            raise ValueError(f"SuperGlobalConfig.k = {self.k} must be < SuperGlobalConfig.m = {self.m}")
        _checks.check_nonnegative(self.beta, "SuperGlobalConfig.beta")


class SuperGlobalStatic(NamedTuple):
    """The shape-deciding fields of a `SuperGlobalConfig` (static under jit)."""

    m: int
    k: int


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "beta"], meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class SuperGlobalState:
    """Database descriptors float32[n, d], the traced beta (float32 scalar) and the static
    (m, k). States that differ only in beta share one compiled ``search``."""

    database: jax.Array
    beta: jax.Array
    static: SuperGlobalStatic

    @property
    def config(self) -> SuperGlobalConfig:
        if _checks.is_traced(self.beta):
            raise TypeError("state.config needs a concrete beta; under a trace read state.static and state.beta")
        return SuperGlobalConfig(m=self.static.m, k=self.static.k, beta=float(self.beta))


def _sg_check_sizes(config: SuperGlobalConfig, n_db: int) -> None:
    _check_static(SuperGlobalStatic(config.m, config.k), n_db, items=True, prefix="SuperGlobalConfig.")


def _sg_build(database, config: SuperGlobalConfig = SuperGlobalConfig()) -> SuperGlobalState:
    db = checked_database(database, config, SuperGlobalConfig, "superglobal")
    _sg_check_sizes(config, db.shape[0])
    return SuperGlobalState(database=jnp.asarray(db), beta=jnp.float32(config.beta),
                            static=SuperGlobalStatic(config.m, config.k))


@jax.jit
def _sg_search(state: SuperGlobalState, queries):
    return _rerank(queries.astype(jnp.float32), state.database, state.static.m, state.static.k, state.beta)


@jax.jit
def _sg_search_items(state: SuperGlobalState, ids):
    # a database item as query is not in its own shortlist
    return _rerank(state.database[ids], state.database, state.static.m, state.static.k, state.beta, exclude=ids)


SUPERGLOBAL = make_method("superglobal", _sg_build, _sg_search, _sg_search_items, SuperGlobalConfig,
                          check_sizes=_sg_check_sizes,
                          summary="SuperGlobal re-ranking of the top M (Shao et al. 2023)")
