"""Diffusion across 2 processes (jax.distributed, gloo CPU collectives) equals one process.

Two workers of `retrieval_jax.distributed_demo` run on this machine, joined through
a coordinator on 127.0.0.1 at a free port; process 0 writes the gathered scores of
both layouts (graph rows split, queries split), compared here with the
single-process `diffuse` on the same synthetic problem. Each worker has a timeout
and both are killed if either fails.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from retrieval_jax import sharding
from retrieval_jax.diffusion import diffuse
from retrieval_jax.distributed_demo import synthetic_problem
from retrieval_jax.graph import Graph

TIMEOUT = 240  # seconds per run of the two workers (jax import, graph build, two compiles)
PROBLEM = {"n": 400, "d": 16, "k": 8, "queries": 8, "alpha": 0.9, "tol": 1e-7, "max_iter": 300, "seed": 0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
        except ProcessLookupError:  # pragma: no cover
            pass
        proc.wait()


def run_workers(out, *, num_processes: int = 2, local_devices: int = 1):
    """Start the workers, wait for both (bounded), return their combined logs."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", RETRIEVAL_JAX_NO_PROGRESS="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}")
    args = [f"--n={PROBLEM['n']}", f"--d={PROBLEM['d']}", f"--k={PROBLEM['k']}",
            f"--queries={PROBLEM['queries']}", f"--alpha={PROBLEM['alpha']}", f"--tol={PROBLEM['tol']}",
            f"--max-iter={PROBLEM['max_iter']}", f"--seed={PROBLEM['seed']}", "--timeout=120"]
    procs, logs = [], []
    try:
        for i in range(num_processes):
            log = out.parent / f"worker{i}.log"
            logs.append(log)
            cmd = [sys.executable, "-m", "retrieval_jax.distributed_demo", f"--process-id={i}",
                   f"--num-processes={num_processes}", f"--port={port}", *args]
            if i == 0:
                cmd.append(f"--out={out}")
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its own timeout
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        text = "\n".join(f"--- worker {i}\n{log.read_text()}" for i, log in enumerate(logs))
        codes = [p.poll() for p in procs]
        assert all(c == 0 for c in codes), f"worker exit codes {codes} (None: timed out)\n{text}"
        return text
    finally:
        for p in procs:
            kill(p)


@pytest.fixture(scope="module")
def reference():
    w, y = synthetic_problem(PROBLEM["n"], PROBLEM["d"], PROBLEM["k"], PROBLEM["queries"],
                             seed=PROBLEM["seed"])
    scores, info = diffuse(w, y, alpha=PROBLEM["alpha"],
                           tol=PROBLEM["tol"], max_iter=PROBLEM["max_iter"], return_info=True)
    return np.asarray(scores), np.asarray(info.iterations)


@pytest.mark.slow
@pytest.mark.parametrize("local_devices", [1, 2], ids=["2x1-devices", "2x2-devices"])
def test_two_processes_match_one(tmp_path, reference, local_devices):
    ref, ref_iterations = reference
    out = tmp_path / "scores.npz"
    logs = run_workers(out, local_devices=local_devices)
    assert f"{local_devices} local of {2 * local_devices} devices, collectives gloo" in logs, logs
    n = PROBLEM["n"]
    assert f"layout graph, {n // 2} of {n} rows of W" in logs, logs  # each process holds half of W
    assert f"layout queries, {n * local_devices} of {n} rows of W" in logs, logs  # W on every device
    with np.load(out) as got:
        for layout in ("graph", "queries"):
            assert got[layout].shape == ref.shape, layout
            np.testing.assert_allclose(got[layout], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                                       err_msg=layout)
            # the same CG recurrences: a step more or less at most, from rounding near tol
            assert np.abs(got[f"{layout}_iterations"] - ref_iterations).max() <= 1, layout


@pytest.mark.slow
def test_worker_fails_fast_without_peer(tmp_path):
    """A lone worker whose peer never comes gives up at its own --timeout, with an error."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", RETRIEVAL_JAX_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "retrieval_jax.distributed_demo", "--process-id=1", "--num-processes=2",
           f"--port={free_port()}", "--timeout=5"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        kill(proc)
    assert proc.returncode != 0, out


# ---------------------------------------------------------------- helpers, in this (single) process
def test_helpers_on_one_process():
    mesh = sharding.make_mesh()
    parts = mesh.devices.size
    n = 6 * parts
    rows = sharding.process_rows(n, mesh)
    assert (rows.start, rows.stop) == (0, n)  # one process holds every row
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    g = sharding.from_process_rows(x, n, mesh)
    np.testing.assert_array_equal(sharding.gather_to_host(g), x)
    gt = sharding.from_process_rows(x.T, n, mesh, axis=1)
    assert gt.shape == (3, n)
    graph = sharding.graph_from_process_rows(np.zeros((n, 2), np.int32), np.ones((n, 2)), n, mesh)
    assert type(graph) is Graph
    assert graph.indices.dtype == np.int32 and graph.weights.shape == (n, 2)
    w, _ = synthetic_problem(n=4 * n, seed=1)
    rows = sharding.process_rows(w.num_nodes, mesh)
    again = sharding.graph_from_process_rows(np.asarray(w.indices)[rows], np.asarray(w.weights)[rows],
                                             w.num_nodes, mesh, graph_type=type(w))
    assert type(again) is type(w)  # the normalised graph's type survives
    np.testing.assert_array_equal(sharding.gather_to_host(again.weights), np.asarray(w.weights))
    assert type(sharding.replicate_from_processes(w, mesh)) is type(w)
    with pytest.raises(TypeError, match="graph_type"):
        sharding.graph_from_process_rows(np.zeros((n, 2), np.int32), np.ones((n, 2)), n, mesh, graph_type=dict)
    rep = sharding.replicate_from_processes({"a": x}, mesh)
    np.testing.assert_array_equal(sharding.gather_to_host(rep)["a"], x)
    with pytest.raises(ValueError, match="given"):
        sharding.from_process_rows(x[:-parts], n, mesh)
    with pytest.raises(ValueError, match="same shape"):
        sharding.graph_from_process_rows(np.zeros((n, 2), np.int32), np.ones((n, 3)), n, mesh)


@pytest.mark.parametrize("kwargs, match", [
    ({"port": 1234}, "together"),
    ({"num_processes": 2, "process_id": 0}, "together"),
    ({"port": 1234, "num_processes": 2, "process_id": 2}, "process_id"),
    ({"port": 1234, "num_processes": 0, "process_id": 0}, "num_processes"),
])
def test_initialize_processes_checks_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sharding.initialize_processes(**kwargs)
