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

Several processes (`jax.distributed`)
-------------------------------------
The same layouts span processes, one or more per host: `initialize_processes`
joins the processes (on CPU with gloo collectives over TCP), after which
`jax.devices()` lists every process's devices and `make_mesh()` spans them all.
A process can only place data on its own devices, so a global array is assembled
from each process's block: `process_rows` says which rows of the node (or query)
axis this process holds, `from_process_rows` / `graph_from_process_rows` build the
global array or `Graph` from them (`jax.make_array_from_process_local_data`),
`replicate_from_processes` places a value every process holds in full, and
`gather_to_host` brings a result back as numpy on every process. ``diffuse`` runs
unchanged on these arrays; XLA inserts the cross-process gathers of the sparse
product and the all-reduces of CG's dot products. `retrieval_jax.distributed_demo`
is a runnable worker, checked by ``tests/test_multiprocess.py`` against one process.

Running on a multi-host GPU or TPU slice:

1. Start the same program once per host (TPU: one process per host, e.g.
   ``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python run.py"``;
   GPU: one process per host or per GPU, e.g. with ``srun`` under SLURM).
2. Call ``initialize_processes()`` with no arguments first, before any other JAX
   call: on Cloud TPU, SLURM, Open MPI and Kubernetes jax finds the
   coordinator, the number of processes and this process's id itself. Elsewhere
   pass ``coordinator_address="HOST0:PORT", num_processes=P, process_id=i`` (the
   same address on every host, a port open between the hosts); with several GPUs
   per host and one process per GPU, also ``local_device_ids=[i % gpus_per_host]``.
   GPU collectives go over NCCL and TPU collectives over ICI; the gloo setting only
   concerns CPU devices.
3. ``mesh = make_mesh()`` (all global devices). Each host loads only its rows of
   the saved graph: ``rows = process_rows(n, mesh)``, then
   ``graph_from_process_rows(indices[rows], weights[rows], n, mesh, graph_type=...)`` (pad n to a
   multiple of the device count with isolated nodes first); the query batch
   ``y`` [nq, n] is split the same way along its node axis,
   ``from_process_rows(y[:, rows], n, mesh, axis=1)`` (graph parallel), or the
   graph is replicated and the queries split
   (``replicate_from_processes(graph, mesh)``,
   ``from_process_rows(y[qrows], nq, mesh)`` with ``qrows = process_rows(nq, mesh)``).
4. Every process calls ``diffuse(graph, y, ...)`` with the same arguments, in the
   same order; ``gather_to_host(scores)`` returns the full scores on every host
   (or read ``scores.addressable_shards`` to keep each host's part).
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
    return type(graph)(indices=jax.device_put(graph.indices, rows), weights=jax.device_put(graph.weights, rows),
                       overflow=graph.overflow)


# --------------------------------------------------------------------------- several processes
def initialize_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, *, port: int | None = None,
                         host: str = "127.0.0.1", cpu_collectives: str | None = "gloo",
                         local_device_ids=None, initialization_timeout: int = 300) -> None:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`).

    Call it first, before any other JAX computation, in every process with the
    same coordinator address and number of processes and a distinct
    ``process_id`` in [0, num_processes). Afterwards `jax.devices()` lists the
    devices of every process and `make_mesh()` spans them.

    Args:
      coordinator_address: "host:port" of process 0's coordinator service. With
        ``port`` instead, ``f"{host}:{port}"`` (several processes on one machine:
        the default ``host`` 127.0.0.1). With neither and no ``num_processes`` /
        ``process_id``, jax detects the cluster (Cloud TPU, SLURM, Open MPI, ...).
      num_processes: the number of processes.
      process_id: this one's rank.
      cpu_collectives: the cross-process collectives of CPU devices, "gloo" (TCP,
        bundled with jaxlib) or "mpi"; None keeps jax's setting. GPU and TPU
        devices use their own interconnect whatever this says.
      local_device_ids: restrict this process to these local devices (e.g. one GPU
        per process).
      initialization_timeout: seconds to wait for every process to join.
    """
    if coordinator_address is None and port is not None:
        coordinator_address = f"{host}:{int(port)}"
    explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(explicit) and not all(explicit):
        raise ValueError("give coordinator_address (or port), num_processes and process_id together, "
                         "or none of them to let jax detect the cluster")
    if all(explicit):
        if not (isinstance(num_processes, (int, np.integer)) and num_processes >= 1):
            raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
        if not (isinstance(process_id, (int, np.integer)) and 0 <= process_id < num_processes):
            raise ValueError(f"process_id must be an int in [0, {num_processes}), got {process_id!r}")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {} if local_device_ids is None else {"local_device_ids": local_device_ids}
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout,
                               **kwargs)


def shutdown_processes() -> None:
    """Leave the multi-process run (`jax.distributed.shutdown`); every process calls it."""
    jax.distributed.shutdown()


def process_rows(num_rows: int, mesh: Mesh, axis_name: str = AXIS) -> slice:
    """The rows of a [num_rows, ...] array split over ``axis_name`` that this process holds.

    With one process per host and the mesh's devices ordered by process (the
    default of `make_mesh`), process i holds one contiguous block. Raises if the
    rows do not divide evenly or this process's block is not contiguous (a mesh
    whose devices interleave processes).
    """
    _check_divisible(num_rows, mesh, "the array", axis_name)
    spec = NamedSharding(mesh, P(axis_name))
    blocks = sorted({(sl[0].start or 0, num_rows if sl[0].stop is None else sl[0].stop)
                     for sl in spec.addressable_devices_indices_map((num_rows,)).values()})
    if not blocks:
        raise ValueError("this process has no device in the mesh")
    for (_, stop), (start, _) in zip(blocks, blocks[1:]):
        if start != stop:
            raise ValueError(f"this process's rows are not contiguous ({blocks}); order the mesh's "
                             "devices by process (make_mesh() does)")
    return slice(blocks[0][0], blocks[-1][1])


def from_process_rows(local, num_rows: int, mesh: Mesh, axis_name: str = AXIS, *, axis: int = 0):
    """A global array whose ``axis`` (num_rows long) is split across the mesh, from this process's block.

    ``local`` is this process's part, ``x[process_rows(num_rows, mesh)]`` along
    ``axis`` (for the node axis of a query batch y [nq, n], ``axis=1``); every
    process calls this with its own block.
    """
    local = np.asarray(local)
    axis = axis % local.ndim
    rows = process_rows(num_rows, mesh, axis_name)
    if local.shape[axis] != rows.stop - rows.start:
        raise ValueError(f"this process holds rows {rows.start}:{rows.stop} of axis {axis} "
                         f"({rows.stop - rows.start} rows) but was given {local.shape[axis]}")
    spec = [None] * local.ndim
    spec[axis] = axis_name
    shape = list(local.shape)
    shape[axis] = num_rows
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)), local, tuple(shape))


def graph_from_process_rows(indices, weights, num_nodes: int, mesh: Mesh, axis_name: str = AXIS, *,
                            graph_type: type = Graph) -> Graph:
    """A graph with its rows split across the mesh, from this process's rows.

    ``indices`` / ``weights`` are rows ``process_rows(num_nodes, mesh)`` of the
    whole graph's padded neighbour lists; the neighbour ids stay global node ids.
    ``graph_type`` is the `Graph` class to build: pass ``type(w)`` of the graph
    the rows come from (e.g. the output of `normalize`) to keep what its type
    says about it.
    """
    if not (isinstance(graph_type, type) and issubclass(graph_type, Graph)):
        raise TypeError(f"graph_type must be Graph or a subclass, got {graph_type!r}")
    indices = np.asarray(indices, np.int32)
    weights = np.asarray(weights, np.float32)
    if indices.shape != weights.shape or indices.ndim != 2:
        raise ValueError(f"indices and weights must be [rows, K] of the same shape, got "
                         f"{indices.shape} and {weights.shape}")
    return graph_type(indices=from_process_rows(indices, num_nodes, mesh, axis_name),
                      weights=from_process_rows(weights, num_nodes, mesh, axis_name))


def replicate_from_processes(tree, mesh: Mesh):
    """Place every leaf of ``tree``, which each process holds in full, on every device of the mesh.

    The tree's structure (e.g. the class of a graph) is kept.
    """
    full = NamedSharding(mesh, P())
    return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(full, np.asarray(leaf)), tree)


def gather_to_host(tree):
    """Every leaf of ``tree`` as a numpy array with its full value, on every process.

    A global array spanning several processes is all-gathered (a collective: every
    process must call this, in the same order); a local one is simply copied.
    """
    from jax.experimental import multihost_utils

    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(one, tree)
