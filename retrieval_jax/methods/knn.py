"""Plain nearest-neighbour search by inner product: the baseline every method is compared to."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .base import checked_database, database_state, make_method, similarities


@dataclasses.dataclass(frozen=True)
class KnnConfig:
    """Plain nearest-neighbour search by inner product (no parameters)."""


@database_state
class KnnState:
    database: jax.Array
    config: KnnConfig = KnnConfig()


def _knn_build(database, config: KnnConfig = KnnConfig()) -> KnnState:
    return KnnState(database=jnp.asarray(checked_database(database, config, KnnConfig, "knn")), config=config)


@jax.jit
def _knn_search(state: KnnState, queries):
    return similarities(state, queries)


@jax.jit
def _knn_search_items(state: KnnState, ids):
    return similarities(state, state.database[ids])


KNN_SEARCH = make_method("knn", _knn_build, _knn_search, _knn_search_items, KnnConfig,
                         summary="kNN search (inner product)")
