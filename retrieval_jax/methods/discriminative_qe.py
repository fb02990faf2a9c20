"""Discriminative query expansion (DQE): a linear SVM learnt per query re-scores the database.

Arandjelovic & Zisserman, "Three things everyone should know to improve object
retrieval", CVPR 2012, Sec. 4. A first search ranks the database by <q, x>; a linear
SVM is trained with

* positives: the query itself and its ``n_pos`` nearest database items (20 here; the
  paper takes the spatially verified top of the ranking, there is no verification here),
* negatives: the ``n_neg`` items at the bottom of that ranking, the lowest <q, x>
  (20 here; the paper's negatives are low-ranked images of the first search; this
  module reads that as the very bottom, far from every positive),

and the whole database is ranked by the SVM's weight vector, <w, x> (the bias shifts
every score alike and is dropped; w is returned L2-normalised, the same ranking).

The SVM is the L1-loss (hinge) linear SVM with its bias learnt as the weight of a
constant feature B (liblinear's ``-B``: the bias is regularised, so the dual has no
equality constraint):

    min_{w, b}  1/2 (||w||^2 + b^2) + C sum_i max(0, 1 - y_i (<w, x_i> + B b))

solved in its box-constrained dual over the m = 1 + n_pos + n_neg training points

    max_a  sum_i a_i - 1/2 sum_ij a_i a_j y_i y_j (<x_i, x_j> + B^2),   0 <= a_i <= C
    w = sum_i a_i y_i x_i,   intercept B b = B^2 sum_i a_i y_i

by dual coordinate ascent (Hsieh, Chang, Lin, Keerthi & Sundararajan, "A dual
coordinate descent method for large-scale linear SVM", ICML 2008): each step
maximises the dual exactly in one a_i, clipped to the box,

    a_i <- clip(a_i - ((Q a)_i - 1) / Q_ii, 0, C),   Q_ij = y_i y_j (<x_i, x_j> + B^2)

sweeping the m variables in order ``epochs`` times (a fixed, static count: no
data-dependent stopping, so it runs under jit / vmap). C and B are traced values.
C = 1 is liblinear's default (the paper does not state its C); B = 1 likewise.

Public API:
  * `svm_dual_coordinate_ascent(gram, labels, c, epochs)`: the dual solution a.
  * `train_linear_svm(features, labels, c, epochs, bias)`: (w, intercept) of one problem.
  * `discriminative_directions(queries, database, n_pos, n_neg, c, epochs, bias)`: the
    per-query SVM directions w / ||w||.
  * ``DQE`` / `DqeConfig` / `DqeState`: the `Method` (registered as ``dqe``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _checks
from .._precision import HIGHEST
from .base import checked_database, make_method
from .options import finite_float, option, positive_int

__all__ = ["DQE", "DqeConfig", "DqeState", "DqeStatic", "discriminative_directions", "svm_dual_coordinate_ascent",
           "train_linear_svm"]

_EPS = 1e-12
#: queries per chunk of the batched search (bounds the [chunk, m, d] gathers)
CHUNK = 128


# ----------------------------------------------------------------------------- the SVM
def _dual_ascent(gram, labels, c, epochs: int) -> jax.Array:
    """`svm_dual_coordinate_ascent` of a batch: gram float[B, m, m], labels float[m] -> a float32[B, m].

    The batch runs in one loop, laid out batch-last ([m, B] rows: coordinate i of every problem
    is one contiguous row), so a step costs O(m B) with no gather.
    """
    y = jnp.asarray(labels, jnp.float32)
    q = y[None, :, None] * y[None, None, :] * jnp.asarray(gram, jnp.float32)  # [B, m, m]
    batch, m = q.shape[0], q.shape[1]
    cols = jnp.transpose(q, (2, 1, 0))  # [i, j, B]: column i of every problem
    diag = jnp.maximum(jnp.diagonal(q, axis1=1, axis2=2).T, _EPS)  # [m, B]
    c = jnp.asarray(c, jnp.float32)

    def step(i, carry):
        a, qa = carry
        new = jnp.clip(a[i] - (qa[i] - 1.0) / diag[i], 0.0, c)
        return a.at[i].set(new), qa + (new - a[i])[None, :] * cols[i]

    def sweep(_, a):
        qa = jnp.einsum("bjk,kb->jb", q, a, precision=HIGHEST)  # Q a afresh each sweep: no float32 drift
        return jax.lax.fori_loop(0, m, step, (a, qa))[0]

    return jax.lax.fori_loop(0, epochs, sweep, jnp.zeros((m, batch), jnp.float32)).T


@functools.partial(jax.jit, static_argnames=("epochs",))
def svm_dual_coordinate_ascent(gram, labels, c, epochs: int = 200) -> jax.Array:
    """The dual variables a float32[m] of the L1-loss linear SVM on a Gram matrix.

        max_a  sum_i a_i - 1/2 a^T Q a,   Q_ij = y_i y_j gram_ij,   0 <= a_i <= C

    by exact coordinate steps a_i <- clip(a_i - ((Q a)_i - 1) / Q_ii, 0, C), the m
    coordinates in order, ``epochs`` sweeps (Hsieh et al., ICML 2008); Q a is kept up
    to date, so a step costs O(m), and recomputed at each sweep's start.

    Args:
      gram: float[m, m] inner products of the training points (with B^2 added for a
        bias learnt as the weight of a constant feature B).
      labels: float[m] in {-1, +1}.
      c: the cost C > 0 (a traced scalar).
      epochs: sweeps over the m coordinates (static).

    Returns:
      float32[m] in [0, C]. Batch problems with ``jax.vmap``.
    """
    return _dual_ascent(jnp.asarray(gram)[None], labels, c, epochs)[0]


def train_linear_svm(features, labels, c, epochs: int = 200, bias=1.0):
    """A linear SVM (hinge loss, bias regularised as a constant feature B): (w, intercept).

        min_{w, b}  1/2 (||w||^2 + b^2) + C sum_i max(0, 1 - y_i (<w, x_i> + B b))

    solved in the dual (`svm_dual_coordinate_ascent`); the decision function is
    <w, x> + intercept with intercept = B b = B^2 sum_i a_i y_i. ``bias = 0`` is the SVM
    through the origin.

    Args:
      features: float[m, d] training points.
      labels: float[m] in {-1, +1}.
      c: the cost C > 0 (traced).
      epochs: coordinate sweeps (static).
      bias: the constant feature B >= 0 (traced).

    Returns:
      (float32[d] w, float32 scalar intercept). Pure: jit / vmap over problems.
    """
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    b2 = jnp.square(jnp.asarray(bias, jnp.float32))
    gram = jnp.matmul(x, x.T, precision=HIGHEST) + b2
    a = svm_dual_coordinate_ascent(gram, y, c, epochs)
    ay = a * y
    return jnp.matmul(ay, x, precision=HIGHEST), b2 * jnp.sum(ay)


# ----------------------------------------------------------------------------- DQE kernel
def _training_sets(sims, n_pos: int, n_neg: int, exclude=None):
    """(positives int[nq, n_pos], negatives int[nq, n_neg]): top and bottom of each row."""
    top_s, bottom_s = sims, sims
    if exclude is not None:
        rows = jnp.arange(sims.shape[0])
        top_s = sims.at[rows, exclude].set(-jnp.inf)
        bottom_s = sims.at[rows, exclude].set(jnp.inf)
    _, pos = jax.lax.top_k(top_s, n_pos)
    _, neg = jax.lax.top_k(-bottom_s, n_neg)
    return pos, neg


def _directions(queries, database, sims, n_pos: int, n_neg: int, c, bias, epochs: int, exclude=None):
    """Normalised SVM directions float32[nq, d]: the Gram matrices [nq, m, m] made in chunks of
    `CHUNK` queries (no [nq, m, d] gather), every query's dual solved in one batched loop, and
    w = sum_i a_i y_i x_i summed one training slot at a time."""
    pos, neg = _training_sets(sims, n_pos, n_neg, exclude)
    idx = jnp.concatenate([pos, neg], axis=1)
    labels = jnp.concatenate([jnp.ones((1 + n_pos,), jnp.float32), -jnp.ones((n_neg,), jnp.float32)])

    def gram(args):
        q, ids = args
        feats = jnp.concatenate([q[None], database[ids]])
        return jnp.matmul(feats, feats.T, precision=HIGHEST)

    grams = jax.lax.map(gram, (queries, idx), batch_size=min(CHUNK, max(1, queries.shape[0])))
    grams = grams + jnp.square(jnp.asarray(bias, jnp.float32))
    a = _dual_ascent(grams, labels, c, epochs)
    ay = a * labels

    def add(j, w):
        return w + ay[:, 1 + j, None] * database[idx[:, j]]

    w = jax.lax.fori_loop(0, idx.shape[1], add, ay[:, :1] * queries)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), _EPS)


@functools.partial(jax.jit, static_argnames=("n_pos", "n_neg", "epochs"))
def _directions_jit(queries, database, n_pos: int, n_neg: int, c, bias, epochs: int):
    sims = jnp.matmul(queries, database.T, precision=HIGHEST)
    return _directions(queries, database, sims, n_pos, n_neg, c, bias, epochs)


def discriminative_directions(queries, database, n_pos: int = 20, n_neg: int = 20, c: float = 1.0,
                              epochs: int = 200, bias: float = 1.0) -> jax.Array:
    """DQE's per-query SVM directions w / ||w||: float32[nq, d]. Rank the database by <w, x>.

    For each query q the SVM (`train_linear_svm`) separates {q} and its ``n_pos``
    nearest database items (label +1) from its ``n_neg`` farthest (lowest <q, x>, label -1).

    Args:
      queries: float[nq, d].
      database: float[N, d].
      n_pos: nearest items taken as positives, >= 1.
      n_neg: bottom-ranked items taken as negatives, >= 1; n_pos + n_neg <= N.
      c: SVM cost C > 0.
      epochs: dual coordinate sweeps (fixed count).
      bias: the bias's constant feature B >= 0 (0: the SVM through the origin).
    """
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    _checks.check_same_dim(q, db, "queries", "database")
    static = DqeStatic(n_pos, n_neg, epochs)
    _check_static(static, db.shape[0], items=False)
    c, bias = _check_values(c, bias)
    return _directions_jit(jnp.asarray(q), jnp.asarray(db), static.n_pos, static.n_neg, jnp.float32(c),
                           jnp.float32(bias), static.epochs)


# ----------------------------------------------------------------------------- validation
def _check_values(c, bias, prefix: str = ""):
    """(C > 0, bias >= 0) as finite Python floats."""
    c = _checks.check_nonnegative(c, prefix + "c")
    if c == 0:
        raise ValueError(f"{prefix}c must be a finite number > 0, got {c}")
    return c, _checks.check_nonnegative(bias, prefix + "bias")


def _check_static(static: "DqeStatic", n_db: int, *, items: bool, prefix: str = "") -> None:
    for name in DqeStatic._fields:
        _checks.check_positive_int(getattr(static, name), prefix + name)
    needed = static.n_pos + static.n_neg + (1 if items else 0)
    if n_db < needed:
        raise ValueError(f"{prefix}n_pos + {prefix}n_neg = {static.n_pos} + {static.n_neg} training items need a "
                         f"database of at least {needed} items (positives and negatives apart"
                         f"{', the query item excluded' if items else ''}), got {n_db}")


# ----------------------------------------------------------------------------- the Method
@dataclasses.dataclass(frozen=True)
class DqeConfig:
    """Discriminative query expansion (Arandjelovic & Zisserman, CVPR 2012): a linear SVM per query.

    Positives: the query and its ``n_pos`` nearest items; negatives: the ``n_neg`` lowest-scoring
    items of the first search; the database ranked by the SVM's w. ``c`` and ``bias`` are traced
    values, ``epochs`` (dual coordinate sweeps) static.
    """

    n_pos: int = option(20, "DQE positives: the query's nearest items (the query itself is one too)",
                        flag="--dqe-pos", parse=positive_int)
    n_neg: int = option(20, "DQE negatives: the items at the bottom of the first ranking", flag="--dqe-neg",
                        parse=positive_int)
    c: float = option(1.0, "DQE SVM cost C > 0 (liblinear's default)", flag="--dqe-c", parse=finite_float)
    bias: float = option(1.0, "DQE SVM bias feature B >= 0 (0: hyperplane through the origin)", flag="--dqe-bias",
                         parse=finite_float)
    epochs: int = option(200, "DQE dual coordinate ascent sweeps (fixed count)", flag="--dqe-epochs",
                         parse=positive_int)

    def __post_init__(self):
        for name in DqeStatic._fields:
            _checks.check_positive_int(getattr(self, name), f"DqeConfig.{name}")
        _check_values(self.c, self.bias, "DqeConfig.")


class DqeStatic(NamedTuple):
    """The shape-deciding fields of a `DqeConfig` (static under jit)."""

    n_pos: int
    n_neg: int
    epochs: int


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database", "c", "bias"], meta_fields=["static"])
@dataclasses.dataclass(frozen=True)
class DqeState:
    """Database descriptors float32[N, d], the traced SVM values C and B (float32 scalars) and
    the static fields. States that differ only in C or B share one compiled ``search``."""

    database: jax.Array
    c: jax.Array
    bias: jax.Array
    static: DqeStatic

    @property
    def config(self) -> DqeConfig:
        if _checks.is_traced(self.c, self.bias):
            raise TypeError("state.config needs concrete values; under a trace read state.static, state.c, state.bias")
        return DqeConfig(**self.static._asdict(), c=float(self.c), bias=float(self.bias))


def _dqe_check_sizes(config: DqeConfig, n_db: int) -> None:
    _check_static(DqeStatic(config.n_pos, config.n_neg, config.epochs), n_db, items=True, prefix="DqeConfig.")


def _dqe_build(database, config: DqeConfig = DqeConfig()) -> DqeState:
    db = checked_database(database, config, DqeConfig, "dqe")
    _dqe_check_sizes(config, db.shape[0])
    return DqeState(database=jnp.asarray(db), c=jnp.float32(config.c), bias=jnp.float32(config.bias),
                    static=DqeStatic(config.n_pos, config.n_neg, config.epochs))


def _dqe_scores(state: DqeState, queries, exclude=None):
    queries = queries.astype(jnp.float32)
    st = state.static
    sims = jnp.matmul(queries, state.database.T, precision=HIGHEST)
    w = _directions(queries, state.database, sims, st.n_pos, st.n_neg, state.c, state.bias, st.epochs, exclude)
    return jnp.matmul(w, state.database.T, precision=HIGHEST)


@jax.jit
def _dqe_search(state: DqeState, queries):
    return _dqe_scores(state, queries)


@jax.jit
def _dqe_search_items(state: DqeState, ids):
    # a database item as query: it is the query positive, neither a neighbour nor a negative of itself
    return _dqe_scores(state, state.database[ids], exclude=ids)


DQE = make_method("dqe", _dqe_build, _dqe_search, _dqe_search_items, DqeConfig, check_sizes=_dqe_check_sizes,
                  summary="discriminative query expansion: a linear SVM per query (Arandjelovic & Zisserman 2012)")
