"""Plain nearest-neighbour search by inner product: the baseline every method is compared to."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .. import _checks
from .base import check_config, make_method, similarities


@dataclasses.dataclass(frozen=True)
class KnnConfig:
    """Plain nearest-neighbour search by inner product (no parameters)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["database"], meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class KnnState:
    database: jax.Array
    config: KnnConfig = KnnConfig()


def _knn_build(database, config: KnnConfig = KnnConfig()) -> KnnState:
    check_config(config, KnnConfig, "knn")
    db = _checks.as_matrix(database, "database")
    return KnnState(database=jnp.asarray(db), config=config)


@jax.jit
def _knn_search(state: KnnState, queries):
    return similarities(state, queries)


@jax.jit
def _knn_search_items(state: KnnState, ids):
    return similarities(state, state.database[ids])


KNN_SEARCH = make_method("knn", _knn_build, _knn_search, _knn_search_items, KnnConfig)
