"""Affinity graphs from neighbour lists, on device: mutual or union, fixed capacity.

Iscen et al., "Efficient Diffusion on Region Manifolds" (CVPR 2017), Sec. 3.1:

    a_ij = max(s_ij, 0)^gamma        for j in NN_k(i), s_ij = <x_i, x_j>

kept only for reciprocal pairs (j in NN_k(i) and i in NN_k(j); weight min(a_ij, a_ji))
or for the union of both directions (weight max(a_ij, a_ji)), never on the diagonal.

Everything here is a jittable function of arrays with static shapes, so the graph can
be built inside ``jax.jit``, batched by ``jax.vmap`` over gamma and differentiated by
``jax.grad`` with respect to the similarities (hence the descriptors) and gamma. A
mutual graph needs at most k slots per node. The union does not have a bound, so it
takes a ``capacity`` (the padded width K) as jax-md's neighbour lists do; an edge that
finds no free slot is counted in ``Graph.overflow`` instead of being dropped silently,
and the non-traced entry points (`knn_graph`) refuse a graph that overflowed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .core import Graph


def similarity_power(sims, gamma):
    """max(s, 0)^gamma, with zero (and a zero gradient) where s <= 0, for any gamma > 0.

    Written as exp(gamma log s) on the positive part, so neither the value nor the
    derivative with respect to gamma is NaN at s = 0.
    """
    sims = jnp.asarray(sims)
    gamma = jnp.asarray(gamma, sims.dtype)
    pos = sims > 0
    safe = jnp.where(pos, sims, 1.0)
    return jnp.where(pos, jnp.exp(gamma * jnp.log(safe)), 0.0)


def reciprocal_partners(idx):
    """For the directed kNN edges (i -> idx[i, m]) flattened to E = n k entries: the flat
    position of the reverse edge (j -> i) when j also lists i, else -1; int32[E].

    Edges are sorted by their unordered pair (min, max) (``lexsort``, O(E log E), no
    [n, k, k] comparison), so a reciprocal pair sits in two adjacent places.
    """
    n, k = idx.shape
    rows = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    cols = idx.reshape(-1).astype(jnp.int32)
    lo, hi = jnp.minimum(rows, cols), jnp.maximum(rows, cols)
    order = jnp.lexsort((hi, lo)).astype(jnp.int32)
    lo_s, hi_s = lo[order], hi[order]
    same = (lo_s[1:] == lo_s[:-1]) & (hi_s[1:] == hi_s[:-1])       # [E - 1]: sorted p and p + 1 pair up
    fwd = jnp.concatenate([same, jnp.zeros((1,), bool)])            # partner at p + 1
    bwd = jnp.concatenate([jnp.zeros((1,), bool), same])            # partner at p - 1
    nxt = jnp.concatenate([order[1:], order[-1:]])
    prv = jnp.concatenate([order[:1], order[:-1]])
    partner_sorted = jnp.where(fwd, nxt, jnp.where(bwd, prv, -1))
    return jnp.full((n * k,), -1, jnp.int32).at[order].set(partner_sorted)


@functools.partial(jax.jit, static_argnames=("mutual", "capacity"))
def affinity_graph(sims, idx, gamma=3.0, *, mutual: bool = True, capacity: int | None = None) -> Graph:
    """The symmetric affinity graph of kNN lists, built on device.

    Args:
      sims: float[n, k] similarities s_ij of node i to its neighbours ``idx[i]``.
      idx: int[n, k] neighbour ids, distinct within a row, never i itself.
      gamma: similarity exponent (traced: one compiled program serves every value).
      mutual: keep reciprocal pairs only (width k); else the union (width ``capacity``).
      capacity: padded width of the union graph, at least k (default 2 k). Static.

    Returns:
      `Graph` with ``overflow`` = the number of union edges that found no free slot
      (always 0 for a mutual graph). Padding slots hold the node's own id and weight 0.
    """
    n, k = idx.shape
    idx = idx.astype(jnp.int32)
    dtype = jnp.result_type(sims.dtype, jnp.float32)                # float64 stays float64
    a = similarity_power(sims.astype(dtype), gamma).reshape(-1)   # [E]
    partner = reciprocal_partners(idx)
    has = partner >= 0
    a_rev = jnp.where(has, a[jnp.maximum(partner, 0)], 0.0)
    own = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, k))
    if mutual:
        w = jnp.where(has, jnp.minimum(a, a_rev), 0.0).reshape(n, k)
        ids = jnp.where(has.reshape(n, k), idx, own)
        return Graph(indices=ids, weights=w.astype(dtype), overflow=jnp.zeros((), jnp.int32))
    width = 2 * k if capacity is None else int(capacity)
    if width < k:
        raise ValueError(f"capacity = {width} must be at least k = {k}")
    # row i: its own k out-edges, weight max(a_ij, a_ji) ...
    w_out = jnp.where(has, jnp.maximum(a, a_rev), a).reshape(n, k)
    # ... then the in-edges j -> i that i does not list itself, in slots k, k+1, ...
    src = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
    dst = idx.reshape(-1)
    extra = ~has
    key = jnp.where(extra, dst, n)                                # non-extra entries sort last
    order = jnp.argsort(key, stable=True)
    key_s = key[order]
    first = jnp.searchsorted(key_s, key_s, side="left")
    slot = k + (jnp.arange(n * k, dtype=jnp.int32) - first.astype(jnp.int32))
    fits = (key_s < n) & (slot < width)
    overflow = jnp.sum((key_s < n) & (slot >= width)).astype(jnp.int32)
    row = jnp.where(fits, key_s, n)                               # row n is out of range: dropped
    ids = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, width - k))], 1)
    w = jnp.concatenate([w_out, jnp.zeros((n, width - k), w_out.dtype)], 1)
    ids = ids.at[row, slot].set(src[order], mode="drop")
    w = w.at[row, slot].set(a[order], mode="drop")
    return Graph(indices=ids, weights=w.astype(dtype), overflow=overflow)


def union_capacity(idx) -> int:
    """The exact width a union graph of these (concrete) kNN lists needs: k plus the
    largest number of in-edges a node has from nodes it does not list itself."""
    import numpy as np

    idx = np.asarray(idx)
    n, k = idx.shape
    partner = np.asarray(reciprocal_partners(jnp.asarray(idx, jnp.int32)))
    extra = idx.reshape(-1)[partner < 0]
    counts = np.bincount(extra, minlength=n) if extra.size else np.zeros(n, np.int64)
    return int(k + counts.max(initial=0))
