"""Query expansion (AQE, AQEwD, alpha-QE) and database-side augmentation (DBA).

Chum, Philbin, Sivic, Isard & Zisserman, "Total Recall: Automatic Query Expansion
with a Generative Feature Model for Object Retrieval", ICCV 2007 (average query
expansion, AQE); Gordo, Almazan, Revaud & Larlus, "End-to-end Learning of Deep
Visual Representations for Image Retrieval", IJCV 2017 (AQE with decay, AQEwD);
Radenovic, Tolias & Chum, "Fine-tuning CNN Image Retrieval with No Human
Annotation", TPAMI 2018 (alpha-QE); Arandjelovic & Zisserman, "Three things
everyone should know to improve object retrieval", CVPR 2012, and Gordo et al.,
"End-to-end Learning of Deep Visual Representations for Image Retrieval", IJCV
2017 (DBA, here with the alpha weighting of Radenovic et al.).

With L2-normalised descriptors, a query q and its n nearest database items
x_1..x_n by inner product (s_i = <q, x_i>, decreasing):

    q' = normalise(q + sum_{i=1..n} w_i x_i)

with the query itself at weight 1, and the ranking by <q', x>. The weights:

    AQE:        w_i = 1                                  (Chum et al.; n = 4 here)
    AQEwD:      w_i = (n - i + 1) / n,  i = 1..n         (Gordo et al.; n = 8 here)
    alpha-QE:   w_i = max(s_i, 0)^alpha                  (Radenovic et al.; n = 10, alpha = 3)

AQEwD's weights fall linearly with the rank: 1 for the nearest item, (n - 1) / n
for the second, ..., 1 / n for the n-th (Gordo et al.'s weights decreasing with the
rank, read here as w_i = (n - i) / n for the i-th nearest, i = 0..n-1, the query at
weight 1; a reading that counts the query as rank 0 would instead give the n-th
neighbour weight 0). AQE with n = 0 is the kNN search (q' = q / ||q||: the same
ranking); AQEwD with n = 1 is AQE with n = 1; alpha-QE with ``alpha = 0`` is AQE
(0^0 = 1) and a large alpha keeps only the closest neighbours.

    DBA:        x_j' = normalise(x_j + sum_{i=1..n} w_ji x_i),  w_ji = max(<x_j, x_i>, 0)^alpha

over the n nearest *other* database items x_i of x_j, computed once offline from the
original descriptors. ``DBA_ALPHA_QE`` searches the augmented database with
alpha-QE (neighbours and expansion both taken from the augmented vectors).

The weighted sum ``sum_i w_i x_{idx_i}`` is accumulated one neighbour slot at a
time (``fori_loop`` over n), so no [nq, n, d] gather is ever materialised (the same
layout as ``Graph.matvec``). Everything numerical is float32 and jitted; inputs
are validated on the host before tracing.

Public API:
  * ``alpha_weights(sims, alpha)``: max(s, 0)^alpha; ``decay_weights(n)``: (n - i) / n.
  * ``expand_weighted(x, weights, idx, database)``: normalise(x + sum_i w_i database[idx_i]).
  * ``expand(x, sims, idx, database, alpha)``: the same with alpha weights.
  * ``average_query_expansion(queries, database, n)``, ``decay_query_expansion(queries,
    database, n)``, ``alpha_query_expansion(queries, database, n, alpha)``: expanded queries.
  * ``database_augmentation(database, n, alpha)``: DBA of a database.
  * ``AQE`` / ``AqeConfig``, ``AQEWD`` / ``AqewdConfig``, ``ALPHA_QE`` / ``AlphaQEConfig``,
    ``DBA_ALPHA_QE`` / ``DbaQEConfig``: `Method`s.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import _checks
from ..graph.neighbours import knn
from .base import HIGHEST as _HIGHEST
from .base import checked_database, database_state, make_method, top_similar
from .options import finite_float, nonneg_int, option, positive_int

__all__ = [
    "ALPHA_QE", "AQE", "AQEWD", "AlphaQEConfig", "AlphaQEState", "AqeConfig", "AqeState", "AqewdConfig",
    "AqewdState", "DBA_ALPHA_QE", "DbaQEConfig", "DbaQEState", "alpha_query_expansion", "alpha_weights",
    "average_query_expansion", "database_augmentation", "decay_query_expansion", "decay_weights", "expand",
    "expand_weighted",
]

_EPS = 1e-12
_EXPONENT = "a finite exponent >= 0 (0 = average query expansion)"


# ----------------------------------------------------------------------------- validation
def _check_n(n, n_db: int, name: str = "n") -> int:
    if not _checks.is_int(n):
        raise TypeError(f"{name} must be an int (number of neighbours), got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{name} must be a positive number of neighbours, got {n}")
    if n >= n_db:
        raise ValueError(f"{name} = {n} neighbours needs a database of more than {n} items, got "
                         f"{n_db}; choose {name} <= {n_db - 1}")
    return n


# ----------------------------------------------------------------------------- kernels
def alpha_weights(sims, alpha: float) -> jax.Array:
    """w = max(s, 0)^alpha, float32, the same shape as ``sims``.

    For alpha > 0 a neighbour with s <= 0 gets weight 0; alpha = 0 gives every
    neighbour weight 1 (0^0 = 1), i.e. average query expansion over the top n.
    """
    return jnp.maximum(jnp.asarray(sims, jnp.float32), 0.0) ** jnp.float32(alpha)


def decay_weights(n: int) -> jax.Array:
    """AQEwD's weights float32[n]: (n - i) / n for the i-th nearest item, i = 0..n-1.

    1 for the nearest, 1 / n for the n-th (Gordo et al., IJCV 2017: weights decreasing
    linearly with the rank; the query itself enters at weight 1).
    """
    n = int(n)
    return (n - jnp.arange(n, dtype=jnp.float32)) / jnp.float32(max(n, 1))


@jax.jit
def expand_weighted(x, weights, idx, database) -> jax.Array:
    """Weighted expansion ``normalise(x + sum_i weights_i database[idx_i])``.

    Args:
      x: float[m, d] vectors to expand (queries, or database items for DBA); each
        enters its own sum with weight 1.
      weights: float[m, n] the neighbours' weights (traced values).
      idx: int[m, n] database indices of the neighbours (n = 0: x normalised).
      database: float[N, d].

    Returns:
      float32[m, d], rows L2-normalised. The sum runs one neighbour slot at a time: no
      [m, n, d] gather.
    """
    x = jnp.asarray(x, jnp.float32)
    db = jnp.asarray(database, jnp.float32)
    idx = jnp.asarray(idx, jnp.int32)
    w = jnp.asarray(weights, jnp.float32)
    if idx.shape[1] == 0:
        return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True)), _EPS)

    def body(j, acc):
        return acc + w[:, j, None] * db[idx[:, j]]

    acc = jax.lax.fori_loop(0, idx.shape[1], body, x, unroll=min(8, max(1, idx.shape[1])))
    norm = jnp.sqrt(jnp.sum(acc * acc, axis=1, keepdims=True))
    return acc / jnp.maximum(norm, _EPS)


@jax.jit
def expand(x, sims, idx, database, alpha) -> jax.Array:
    """Weighted expansion ``normalise(x + sum_i max(s_i, 0)^alpha database[idx_i])``.

    Args:
      x: float[m, d] vectors to expand (queries, or database items for DBA); each
        enters its own sum with weight 1.
      sims: float[m, n] similarities <x, database[idx]> of the n neighbours.
      idx: int[m, n] database indices of the neighbours.
      database: float[N, d].
      alpha: exponent >= 0 (a traced scalar: changing it does not recompile).

    Returns:
      float32[m, d], rows L2-normalised.
    """
    return expand_weighted(x, alpha_weights(sims, alpha), idx, database)


@functools.partial(jax.jit, static_argnames=("n",))
def _alpha_qe(queries, database, n: int, alpha):
    s, i = top_similar(queries, database, n)
    return expand(queries, s, i, database, alpha)


def alpha_query_expansion(queries, database, n: int = 10, alpha: float = 3.0) -> jax.Array:
    """alpha-QE (Radenovic et al., TPAMI 2018): expanded queries float32[nq, d].

        q' = normalise(q + sum_{i=1..n} max(<q, x_i>, 0)^alpha x_i)

    over the n nearest database items x_i of q by inner product. Rank by <q', x>.

    Args:
      queries: float[nq, d], L2-normalised.
      database: float[N, d], L2-normalised.
      n: neighbours, 1 <= n < N.
      alpha: exponent >= 0 (3 in the paper; 0 = average QE).
    """
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    _checks.check_same_dim(q, db, "queries", "database")
    n = _check_n(n, db.shape[0])
    alpha = _checks.check_nonnegative(alpha, "alpha", _EXPONENT)
    return _alpha_qe(jnp.asarray(q), jnp.asarray(db), n, jnp.float32(alpha))


def _check_n0(n, n_db: int, name: str = "n") -> int:
    """A neighbour count that may be 0 (no expansion)."""
    if _checks.is_int(n) and int(n) == 0:
        return 0
    return _check_n(n, n_db, name)


def _rank_expanded(queries, database, n: int, decay: bool, exclude=None):
    """AQE (decay False) or AQEwD (decay True) expanded queries; ``exclude[q]`` is no neighbour of q."""
    queries = queries.astype(jnp.float32)
    if n == 0:
        empty = jnp.zeros((queries.shape[0], 0), jnp.int32)
        return expand_weighted(queries, empty.astype(jnp.float32), empty, database)
    _, i = top_similar(queries, database, n, exclude)
    w = jnp.broadcast_to(decay_weights(n) if decay else jnp.ones((n,), jnp.float32), i.shape)
    return expand_weighted(queries, w, i, database)


@functools.partial(jax.jit, static_argnames=("n", "decay"))
def _rank_qe(queries, database, n: int, decay: bool):
    return _rank_expanded(queries, database, n, decay)


def _checked_qe_inputs(queries, database, n):
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    _checks.check_same_dim(q, db, "queries", "database")
    return jnp.asarray(q), jnp.asarray(db), _check_n0(n, db.shape[0])


def average_query_expansion(queries, database, n: int = 4) -> jax.Array:
    """Average query expansion (AQE, Chum et al., ICCV 2007): expanded queries float32[nq, d].

        q' = normalise(q + sum_{i=1..n} x_i)

    over the n nearest database items x_i of q by inner product. Rank by <q', x>.

    Args:
      queries: float[nq, d], L2-normalised.
      database: float[N, d], L2-normalised.
      n: neighbours, 0 <= n < N (0: q / ||q||, the kNN ranking).
    """
    q, db, n = _checked_qe_inputs(queries, database, n)
    return _rank_qe(q, db, n, False)


def decay_query_expansion(queries, database, n: int = 8) -> jax.Array:
    """AQE with decay (AQEwD, Gordo et al., IJCV 2017): expanded queries float32[nq, d].

        q' = normalise(q + sum_{i=0..n-1} (n - i) / n x_(i))

    over the n nearest database items x_(0), x_(1), ... of q by inner product, nearest
    first (weights 1, (n - 1) / n, ..., 1 / n; the query at weight 1). Rank by <q', x>.

    Args:
      queries: float[nq, d], L2-normalised.
      database: float[N, d], L2-normalised.
      n: neighbours, 0 <= n < N (0: q / ||q||, the kNN ranking).
    """
    q, db, n = _checked_qe_inputs(queries, database, n)
    return _rank_qe(q, db, n, True)


def database_augmentation(database, n: int = 10, alpha: float = 3.0, *,
                          show_progress: bool | None = None) -> jax.Array:
    """Database-side augmentation with alpha weights: float32[N, d].

        x_j' = normalise(x_j + sum_{i=1..n} max(<x_j, x_i>, 0)^alpha x_i)

    over the n nearest *other* items x_i of x_j (original descriptors). The
    neighbour search is the blocked, jitted exact kNN of ``retrieval_jax.graph.neighbours``
    (never an N x N matrix), followed by one jitted ``expand``.

    Args:
      database: float[N, d], L2-normalised.
      n: neighbours per item (the item itself excluded), 1 <= n < N.
      alpha: exponent >= 0.
    """
    db = _checks.as_matrix(database, "database")
    n = _check_n(n, db.shape[0])
    alpha = _checks.check_nonnegative(alpha, "alpha", _EXPONENT)
    s, i = knn(db, db, n, exclude_self=True, show_progress=show_progress)
    dbj = jnp.asarray(db)
    return expand(dbj, s, i, dbj, jnp.float32(alpha))


# ----------------------------------------------------------------------------- alpha-QE method
_ALPHA_HELP = "weight exponent: w = max(s, 0)^alpha (0 = average QE)"


@dataclasses.dataclass(frozen=True)
class AlphaQEConfig:
    """alpha query expansion: n neighbours, weights max(s, 0)^alpha (query weight 1)."""

    n: int = option(10, "alpha-QE neighbours", flag="--qe-n", parse=nonneg_int)
    alpha: float = option(3.0, _ALPHA_HELP, flag="--qe-alpha", parse=finite_float)

    def __post_init__(self):
        _checks.check_positive_int(self.n, "AlphaQEConfig.n")
        _checks.check_nonnegative(self.alpha, "AlphaQEConfig.alpha", _EXPONENT)


@database_state
class AlphaQEState:
    """Database descriptors float32[N, d] and the (static) config."""

    database: jax.Array
    config: AlphaQEConfig = AlphaQEConfig()


def _qe_check_sizes(config: AlphaQEConfig, n_db: int) -> None:
    _check_n(config.n, n_db, "AlphaQEConfig.n")


def _qe_build(database, config: AlphaQEConfig = AlphaQEConfig()) -> AlphaQEState:
    db = checked_database(database, config, AlphaQEConfig, "alpha-qe")
    _qe_check_sizes(config, db.shape[0])
    return AlphaQEState(database=jnp.asarray(db), config=config)


def _qe_scores(database, queries, n, alpha, exclude=None):
    queries = queries.astype(jnp.float32)
    s, i = top_similar(queries, database, n, exclude)
    q2 = expand(queries, s, i, database, jnp.float32(alpha))
    return jnp.matmul(q2, database.T, precision=_HIGHEST)


@jax.jit
def _qe_search(state, queries):
    cfg = state.config
    return _qe_scores(state.database, queries, cfg.n, cfg.alpha)


@jax.jit
def _qe_search_items(state, ids):
    cfg = state.config
    # a database item as query: itself with weight 1, its n nearest *other* items
    return _qe_scores(state.database, state.database[ids], cfg.n, cfg.alpha, exclude=ids)


ALPHA_QE = make_method("alpha-qe", _qe_build, _qe_search, _qe_search_items, AlphaQEConfig,
                       check_sizes=_qe_check_sizes, summary="alpha query expansion")


# ----------------------------------------------------------------------------- AQE / AQEwD methods
def _check_nonneg_n(n, name: str) -> None:
    if not _checks.is_int(n) or n < 0:
        raise ValueError(f"{name} must be an int >= 0 (0 = no expansion, the kNN search), got {n!r}")


@dataclasses.dataclass(frozen=True)
class AqeConfig:
    """Average query expansion (Chum et al., ICCV 2007): q' = normalise(q + sum of its n nearest items).

    ``n = 0`` is the kNN search.
    """

    n: int = option(4, "AQE neighbours averaged with the query (0 = kNN search)", flag="--aqe-n", parse=nonneg_int)

    def __post_init__(self):
        _check_nonneg_n(self.n, "AqeConfig.n")


@dataclasses.dataclass(frozen=True)
class AqewdConfig:
    """AQE with decay (Gordo et al., IJCV 2017): the i-th nearest of n items (i = 0..n-1) at weight (n - i) / n.

    ``n = 0`` is the kNN search.
    """

    n: int = option(8, "AQEwD neighbours, weights (n - i) / n by rank (0 = kNN search)", flag="--aqewd-n",
                    parse=nonneg_int)

    def __post_init__(self):
        _check_nonneg_n(self.n, "AqewdConfig.n")


@database_state
class AqeState:
    """Database descriptors float32[N, d] and the (static) config."""

    database: jax.Array
    config: AqeConfig = AqeConfig()


@database_state
class AqewdState:
    """Database descriptors float32[N, d] and the (static) config."""

    database: jax.Array
    config: AqewdConfig = AqewdConfig()


def _aqe_check_sizes(config, n_db: int) -> None:
    _check_n0(config.n, n_db, f"{type(config).__name__}.n")


def _aqe_build(database, config: AqeConfig = AqeConfig()) -> AqeState:
    db = checked_database(database, config, AqeConfig, "aqe")
    _aqe_check_sizes(config, db.shape[0])
    return AqeState(database=jnp.asarray(db), config=config)


def _aqewd_build(database, config: AqewdConfig = AqewdConfig()) -> AqewdState:
    db = checked_database(database, config, AqewdConfig, "aqewd")
    _aqe_check_sizes(config, db.shape[0])
    return AqewdState(database=jnp.asarray(db), config=config)


def _rank_qe_scores(state, queries, exclude=None):
    decay = isinstance(state.config, AqewdConfig)
    q2 = _rank_expanded(queries, state.database, state.config.n, decay, exclude)
    return jnp.matmul(q2, state.database.T, precision=_HIGHEST)


@jax.jit
def _rank_qe_search(state, queries):
    return _rank_qe_scores(state, queries)


@jax.jit
def _rank_qe_search_items(state, ids):
    # a database item as query: itself with weight 1, its n nearest *other* items
    return _rank_qe_scores(state, state.database[ids], exclude=ids)


AQE = make_method("aqe", _aqe_build, _rank_qe_search, _rank_qe_search_items, AqeConfig,
                  check_sizes=_aqe_check_sizes, summary="average query expansion (Chum et al. 2007)")
AQEWD = make_method("aqewd", _aqewd_build, _rank_qe_search, _rank_qe_search_items, AqewdConfig,
                    check_sizes=_aqe_check_sizes, summary="average query expansion with decay (Gordo et al. 2017)")


# ----------------------------------------------------------------------------- DBA + alpha-QE
@dataclasses.dataclass(frozen=True)
class DbaQEConfig:
    """DBA over dba_n neighbours offline, then alpha-QE over qe_n neighbours online.

    ``qe_n = 0`` searches the augmented database without query expansion (DBA only).
    """

    dba_n: int = option(10, "DBA neighbours", parse=positive_int)
    qe_n: int = option(10, "alpha-QE neighbours (0 = DBA only)", flag="--qe-n", parse=nonneg_int)
    alpha: float = option(3.0, _ALPHA_HELP, flag="--qe-alpha", parse=finite_float)

    def __post_init__(self):
        _checks.check_positive_int(self.dba_n, "DbaQEConfig.dba_n")
        if not _checks.is_int(self.qe_n) or self.qe_n < 0:
            raise ValueError(f"DbaQEConfig.qe_n must be an int >= 0 (0 = no query expansion), "
                             f"got {self.qe_n!r}")
        _checks.check_nonnegative(self.alpha, "DbaQEConfig.alpha", _EXPONENT)


@database_state
class DbaQEState:
    """The augmented database float32[N, d] (rows L2-normalised) and the (static) config."""

    database: jax.Array
    config: DbaQEConfig = DbaQEConfig()


def _dba_check_sizes(config: DbaQEConfig, n_db: int) -> None:
    _check_n(config.dba_n, n_db, "DbaQEConfig.dba_n")
    if config.qe_n:
        _check_n(config.qe_n, n_db, "DbaQEConfig.qe_n")


def _dba_build(database, config: DbaQEConfig = DbaQEConfig(), *,
               show_progress: bool | None = None) -> DbaQEState:
    db = checked_database(database, config, DbaQEConfig, "dba-qe")
    _dba_check_sizes(config, db.shape[0])
    aug = database_augmentation(db, config.dba_n, config.alpha, show_progress=show_progress)
    return DbaQEState(database=aug, config=config)


def _dba_scores(state, queries, exclude=None):
    cfg = state.config
    if cfg.qe_n == 0:
        return jnp.matmul(queries.astype(jnp.float32), state.database.T, precision=_HIGHEST)
    return _qe_scores(state.database, queries, cfg.qe_n, cfg.alpha, exclude)


@jax.jit
def _dba_search(state, queries):
    return _dba_scores(state, queries)


@jax.jit
def _dba_search_items(state, ids):
    # a database item queries with its augmented descriptor
    return _dba_scores(state, state.database[ids], exclude=ids)


DBA_ALPHA_QE = make_method("dba-qe", _dba_build, _dba_search, _dba_search_items, DbaQEConfig,
                           check_sizes=_dba_check_sizes, summary="database-side augmentation + alpha-QE")
