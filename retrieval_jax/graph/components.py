"""Connected components as padded blocks of similar size (host-side planning).

A kNN graph (a mutual one especially) falls apart into connected components, and
every function of W that diffusion uses, (I - alpha W)^-1 or h(W) = U h(L) U^T, is
block diagonal over them. The exact inverse (`diffusion.diffusion_inverse`) and the
per-component spectra (`spectral.component_eigenpairs`) both work on the components
as dense blocks: components are grouped into buckets (a bucket takes components of
more than half its largest, so padding at most doubles a block), each bucket an
int[C_b, P_b] array of node ids, -1 on padding, and every node has its place in one.
`ComponentBlocks` is that plan on the host; `ComponentLayout` (``blocks.layout()``) is
its device side, the pytree the block-diagonal operators carry to move between node
order and block order under ``jax.jit``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .core import Graph
from .neighbours import connected_components


class ComponentBlocks(NamedTuple):
    """The components of an n-node graph in padded buckets, largest first (host numpy).

    Attributes:
      groups: tuple over buckets b of int64[C_b, P_b] node ids (-1 on padding).
      bucket: int32[n] bucket of each node.
      member: int32[n] index of the node's component within its bucket.
      position: int32[n] index of the node within its component's block.
      slot: int32[n] column of the node in the concatenation of the buckets'
        flattened [C_b * P_b] layouts (so ``flat[:, slot]`` maps block order to node order).
    """

    groups: tuple
    bucket: np.ndarray
    member: np.ndarray
    position: np.ndarray
    slot: np.ndarray

    @property
    def largest(self) -> int:
        """Nodes of the largest connected component."""
        return int(self.groups[0].shape[1]) if self.groups else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the buckets as dense float32 blocks (4 C_b P_b^2 each)."""
        return int(sum(4 * nodes.shape[0] * nodes.shape[1] ** 2 for nodes in self.groups))

    @property
    def num_components(self) -> int:
        return int(sum(nodes.shape[0] for nodes in self.groups))

    def sizes(self) -> np.ndarray:
        """int64[c] nodes per component, in bucket order."""
        return np.concatenate([(nodes >= 0).sum(axis=1) for nodes in self.groups]) if self.groups else np.zeros(0)

    def layout(self) -> "ComponentLayout":
        """The device-side `ComponentLayout` of these blocks."""
        return ComponentLayout(bucket=jnp.asarray(self.bucket), member=jnp.asarray(self.member),
                               position=jnp.asarray(self.position), slot=jnp.asarray(self.slot),
                               shapes=tuple((int(c), int(p)) for c, p in (g.shape for g in self.groups)))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bucket", "member", "position", "slot"],
                   meta_fields=["shapes"])
@dataclasses.dataclass(frozen=True)
class ComponentLayout:
    """Where every node of an n-node graph sits in the padded component blocks (device side).

    Block-diagonal operators over the connected components (the exact inverse, the
    per-component eigenpairs) store one array per bucket b with a leading [C_b, P_b]
    (components, padded nodes); this maps between that block order and node order.

    Attributes:
      bucket: int32[n] bucket of each node.
      member: int32[n] index of the node's component within its bucket.
      position: int32[n] index of the node within its component's block.
      slot: int32[n] column of the node in the concatenation of the buckets' flattened
        [C_b * P_b] layouts.
      shapes: static tuple of (C_b, P_b) per bucket, largest components first.
    """

    bucket: jax.Array
    member: jax.Array
    position: jax.Array
    slot: jax.Array
    shapes: tuple = ()

    @property
    def num_nodes(self) -> int:
        return self.bucket.shape[0]

    def locate(self, indices, weights, b: int):
        """The entries of a sparse y (``weights`` float[q, k] at nodes ``indices`` int[q, k])
        that fall in bucket ``b``: (member int[q, k], position int[q, k], weights float[q, k]),
        member and position 0 and the weight 0 where the node lies in another bucket."""
        here = self.bucket[indices] == b
        return (jnp.where(here, self.member[indices], 0), jnp.where(here, self.position[indices], 0),
                jnp.where(here, weights, 0))

    def to_blocks(self, y) -> list:
        """Dense y float[q, n] in block order: one float[q, C_b, P_b] per bucket, 0 on padding."""
        q = y.shape[0]
        total = sum(c * p for c, p in self.shapes)
        flat = jnp.zeros((q, total), y.dtype).at[:, self.slot].set(y)
        out, offset = [], 0
        for c, p in self.shapes:
            out.append(flat[:, offset:offset + c * p].reshape(q, c, p))
            offset += c * p
        return out

    def to_nodes(self, blocks) -> jax.Array:
        """The inverse of `to_blocks`: per-bucket float[q, C_b, P_b] (or [q, C_b * P_b]) back to
        float[q, n] in node order (padding dropped)."""
        parts = [x.reshape(x.shape[0], -1) for x in blocks]
        flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return flat[:, self.slot]


def blocks_from_labels(labels) -> ComponentBlocks:
    """`ComponentBlocks` of any node partition ``labels`` (int[n] >= 0, e.g. component ids)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.dtype.kind not in "iu" or labels.min() < 0)):
        raise ValueError(f"labels must be non-negative integers of shape [n], got {labels.dtype} {labels.shape}")
    n = labels.shape[0]
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(-1)
    sizes = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups: list[list[int]] = []
    for c in np.argsort(-sizes, kind="stable"):
        if groups and 2 * sizes[c] > sizes[groups[-1][0]]:
            groups[-1].append(int(c))
        else:
            groups.append([int(c)])
    bucket = np.zeros(n, np.int32)
    member = np.zeros(n, np.int32)
    position = np.zeros(n, np.int32)
    slot = np.zeros(n, np.int32)
    out, offset = [], 0
    for b, group in enumerate(groups):
        p_b = int(sizes[group[0]])
        nodes = np.full((len(group), p_b), -1, np.int64)
        for i, c in enumerate(group):
            nodes[i, :sizes[c]] = order[starts[c]:starts[c + 1]]
        ci, pi = np.nonzero(nodes >= 0)
        ids = nodes[ci, pi]
        bucket[ids], member[ids], position[ids] = b, ci, pi
        slot[ids] = offset + ci * p_b + pi
        offset += len(group) * p_b
        out.append(nodes)
    return ComponentBlocks(groups=tuple(out), bucket=bucket, member=member, position=position, slot=slot)


def component_blocks(graph: Graph) -> ComponentBlocks:
    """The connected components of ``graph`` (`connected_components`) as `ComponentBlocks`."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    return blocks_from_labels(connected_components(graph))


@jax.jit
def dense_blocks(graph: Graph, nodes, position) -> jax.Array:
    """W restricted to each row of ``nodes``: float[C, P, P] (zero on padding rows and columns).

    ``nodes`` int[C, P] are node ids (-1 on padding) of components, ``position`` int[n]
    every node's index within its block (`ComponentBlocks.position`). Jittable: the
    weights may be traced. The dtype is the graph's, at least float32.
    """
    c, p = nodes.shape
    valid = nodes >= 0
    safe = jnp.where(valid, nodes, 0)
    cols = position[graph.indices[safe]]                                 # [C, P, K]
    dtype = jnp.result_type(graph.weights.dtype, jnp.float32)
    w = jnp.where(valid[..., None], graph.weights[safe], 0.0).astype(dtype)
    return jnp.zeros((c, p, p), dtype).at[jnp.arange(c)[:, None, None], jnp.arange(p)[None, :, None], cols].add(w)
