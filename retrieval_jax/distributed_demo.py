"""Diffusion across several processes with `jax.distributed`: a runnable worker.

Start one worker per process, with the same port and number of processes:

    python -m retrieval_jax.distributed_demo --process-id 0 --num-processes 2 --port 12355 --out scores.npz &
    python -m retrieval_jax.distributed_demo --process-id 1 --num-processes 2 --port 12355

Every process builds the same synthetic problem (clustered unit vectors, their
normalised mutual kNN graph W and the observation vectors y of a batch of
perturbed queries, as `DIFFUSION.search` builds them), then solves
(I - alpha W) x = y with `retrieval_jax.diffusion.diffuse` on global arrays spanning
every process's devices, in each requested layout:

* ``graph``: the rows of W split across processes, each process passing only its
  own rows (`sharding.graph_from_process_rows`), and y split along its node axis
  the same way; the sparse product gathers the other processes' entries;
* ``queries``: W replicated on every device, the query batch split.

The scores are gathered back (`sharding.gather_to_host`) and process 0 writes them
to ``--out`` (.npz, one array per layout, plus the CG iterations). On CPU the
collectives are gloo over TCP; the coordinator listens on 127.0.0.1 unless
``--coordinator host:port`` says otherwise. `synthetic_problem` is importable, so a
single-process run on the same data can check the result (tests/test_multiprocess.py).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from . import sharding

LAYOUTS = ("graph", "queries")


def synthetic_problem(n: int = 400, d: int = 16, k: int = 8, num_queries: int = 8, *, gamma: float = 3.0,
                      query_k: int = 5, seed: int = 0):
    """(W, y float32[nq, n]) of a small retrieval problem: W as `normalize` returns it.

    n unit vectors on short curves around n / 50 centres, the normalised mutual kNN
    graph W = normalize(knn_graph(x, k, gamma)), and for ``num_queries`` database
    items plus noise the observation vectors of their ``query_k`` nearest items
    (`query_vectors`). Deterministic for a given seed.
    """
    from .diffusion import query_vectors
    from .graph import knn, knn_graph, normalize

    rng = np.random.default_rng(seed)
    clusters = max(2, n // 50)
    centres = rng.normal(size=(clusters, d))
    dirs = rng.normal(size=(clusters, d))
    labels = rng.integers(0, clusters, n)
    t = rng.uniform(-1, 1, size=(n, 1))
    x = centres[labels] + 1.5 * t * dirs[labels] + 0.5 * rng.normal(size=(n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    w = normalize(knn_graph(x, k, gamma=gamma, show_progress=False))
    items = rng.choice(n, size=num_queries, replace=False)
    q = x[items] + 0.05 * rng.normal(size=(num_queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims, idx = knn(q, x, query_k, show_progress=False)
    y = query_vectors(sims, idx, n, gamma=gamma)
    return w, np.asarray(y, np.float32)


def run_layout(layout: str, w, y, mesh, *, alpha: float, tol: float, max_iter: int):
    """Diffusion scores [nq, n] (numpy, on every process) and CG iterations [nq], one layout.

    ``w`` is the whole normalised graph (every process built the same one); in the
    graph layout a process passes only its own rows of it, as a process that loaded
    just those rows from disk would.
    """
    from .diffusion import diffuse

    n = w.num_nodes
    nq = y.shape[0]
    if layout == "graph":
        rows = sharding.process_rows(n, mesh)
        graph = sharding.graph_from_process_rows(np.asarray(w.indices)[rows], np.asarray(w.weights)[rows], n,
                                                 mesh, graph_type=type(w))
        y_global = sharding.from_process_rows(y[:, rows], n, mesh, axis=1)
    elif layout == "queries":
        qrows = sharding.process_rows(nq, mesh)
        graph = sharding.replicate_from_processes(w, mesh)
        y_global = sharding.from_process_rows(y[qrows], nq, mesh)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    held = sum(shard.data.shape[0] for shard in graph.weights.addressable_shards)
    print(f"process {jax.process_index()}: layout {layout}, {held} of {n} rows of W on this process's "
          f"devices", flush=True)
    scores, info = diffuse(graph, y_global, alpha=alpha, tol=tol, max_iter=max_iter, return_info=True)
    spans = len(scores.sharding.device_set)
    if spans != len(mesh.devices.flat):  # pragma: no cover - a layout that silently fell back
        raise RuntimeError(f"layout {layout!r}: the scores live on {spans} devices, not the mesh's "
                           f"{len(mesh.devices.flat)}")
    return sharding.gather_to_host((scores, info.iterations))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="coordinator port on 127.0.0.1")
    where.add_argument("--coordinator", help="coordinator host:port (process 0's host)")
    p.add_argument("--out", help="process 0 writes the scores here (.npz)")
    p.add_argument("--layout", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--n", type=int, default=400, help="graph nodes (a multiple of the device count)")
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--queries", type=int, default=8, help="query batch (a multiple of the device count)")
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--tol", type=float, default=1e-7)
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=120, help="seconds to wait for every process to join")
    args = p.parse_args(argv)

    # before any other JAX call
    sharding.initialize_processes(args.coordinator, args.num_processes, args.process_id, port=args.port,
                                  initialization_timeout=args.timeout)
    mesh = sharding.make_mesh()
    me = f"process {jax.process_index()}/{jax.process_count()}"
    print(f"{me}: {jax.local_device_count()} local of {jax.device_count()} devices, "
          f"collectives {jax.config.jax_cpu_collectives_implementation}", flush=True)
    w, y = synthetic_problem(args.n, args.d, args.k, args.queries, seed=args.seed)
    results = {}
    for layout in args.layout:
        t = time.perf_counter()
        scores, iterations = run_layout(layout, w, y, mesh, alpha=args.alpha, tol=args.tol,
                                        max_iter=args.max_iter)
        results[layout] = scores
        results[f"{layout}_iterations"] = iterations
        print(f"{me}: layout {layout}, scores {scores.shape}, CG iterations {int(iterations.max())}, "
              f"{time.perf_counter() - t:.2f} s (compile included)", flush=True)
    if args.out and jax.process_index() == 0:
        from .files import atomic_write
        atomic_write(args.out, lambda f: np.savez(f, **results))
        print(f"{me}: wrote {args.out}", flush=True)
    sharding.shutdown_processes()
    return 0


if __name__ == "__main__":
    sys.exit(main())
