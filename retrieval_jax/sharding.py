"""Scaling past one device with `jax.sharding`: a change of layout, not a rewrite.

Every array in this library keeps the node axis (graph rows, database items)
first and the query axis of a batch first in scores, so the same jitted
functions run sharded once their inputs are placed on a mesh:

* **query parallel** (`shard_queries`): the graph is replicated, the batch of
  queries is split across devices; CG runs independently per query, so each
  device solves its own right-hand sides (the convergence test is a cheap
  all-reduce of one flag);
* **graph parallel** (`shard_graph`): the rows of ``Graph`` (and of the database)
  are split across devices for graphs too large for one; XLA's SPMD partitioner
  inserts the gathers the sparse product needs.

Both are plain `jax.device_put` with a `NamedSharding`; `diffuse`, `knn`, the
methods' ``search`` and FSR then run unchanged. On a CPU machine, tests emulate
several devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .graph.core import Graph

AXIS = "devices"


def make_mesh(devices=None, axis_name: str = AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of the default backend)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices to build a mesh on")
    return Mesh(np.array(devices), (axis_name,))


def _check_divisible(size: int, mesh: Mesh, what: str, axis_name: str) -> None:
    parts = mesh.shape[axis_name]
    if size % parts:
        raise ValueError(f"{what} has {size} rows, not divisible by the {parts} devices of the mesh; "
                         f"pad it to a multiple of {parts} (e.g. with zero queries) first")


def shard_queries(y, mesh: Mesh, axis_name: str = AXIS):
    """Place a batch ``y`` [nq, ...] with its query axis split across the mesh."""
    _check_divisible(y.shape[0], mesh, "the query batch", axis_name)
    spec = P(axis_name, *([None] * (y.ndim - 1)))
    return jax.device_put(y, NamedSharding(mesh, spec))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` (a Graph, a method state...) on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_graph(graph: Graph, mesh: Mesh, axis_name: str = AXIS) -> Graph:
    """Place the rows of ``graph`` (the node axis) across the mesh."""
    _check_divisible(graph.num_nodes, mesh, "the graph", axis_name)
    rows = NamedSharding(mesh, P(axis_name, None))
    return Graph(indices=jax.device_put(graph.indices, rows), weights=jax.device_put(graph.weights, rows))
