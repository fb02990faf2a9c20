"""Sharded diffusion on emulated CPU devices equals the single-device result."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    assert len(jax.devices()) == 4, jax.devices()
    from retrieval_jax.graph import knn_graph, normalize
    from retrieval_jax.diffusion import diffuse, indicator_vectors
    from retrieval_jax.methods import DIFFUSION, DiffusionConfig
    from retrieval_jax import sharding

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = normalize(knn_graph(x, 6))
    y = indicator_vectors(np.arange(8), 200)
    ref = np.asarray(diffuse(w, y, alpha=0.9, tol=1e-7, max_iter=300))
    mesh = sharding.make_mesh()

    # query parallel: graph replicated, queries split
    ys = sharding.shard_queries(y, mesh)
    out = diffuse(sharding.replicate(w, mesh), ys, alpha=0.9, tol=1e-7, max_iter=300)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-7)

    # graph parallel: rows of W split across devices
    wg = sharding.shard_graph(w, mesh)
    assert len(wg.weights.sharding.device_set) == 4
    out = diffuse(wg, y, alpha=0.9, tol=1e-7, max_iter=300)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-7)

    # a method's state and queries, sharded: search runs unchanged
    state = DIFFUSION.build(x, DiffusionConfig(k=6, query_k=5, alpha=0.9, tol=1e-7, max_iter=300))
    q = x[:8] + 0.01
    single = np.asarray(DIFFUSION.search(state, q))
    sharded = DIFFUSION.search(sharding.replicate(state, mesh), sharding.shard_queries(q, mesh))
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-7)
    assert len(sharded.sharding.device_set) == 4

    # the exact route: its per-component inverse replicated, the queries split
    inv_state = DIFFUSION.build(x, DiffusionConfig(k=6, query_k=5, alpha=0.9, solver="inverse"))
    single = np.asarray(DIFFUSION.search(inv_state, q))
    sharded = DIFFUSION.search(sharding.replicate(inv_state, mesh), sharding.shard_queries(q, mesh))
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=1e-5, atol=1e-6)
    items = DIFFUSION.search_items(sharding.replicate(inv_state, mesh),
                                   sharding.shard_queries(np.arange(8, dtype=np.int32), mesh))
    np.testing.assert_allclose(np.asarray(items), np.asarray(DIFFUSION.search_items(inv_state, np.arange(8))),
                               rtol=1e-5, atol=1e-6)

    try:
        sharding.shard_queries(y[:7], mesh)
    except ValueError as e:
        assert "divisible" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    print("SHARDING-OK")
""")


@pytest.mark.slow  # a subprocess with 4 emulated devices, 20-35 s: make test-slow
def test_sharded_diffusion_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SHARDING-OK" in res.stdout
