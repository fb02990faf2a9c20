"""The `Graph` pytree: a sparse symmetric matrix stored as padded neighbour lists."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from .. import _checks

MATVEC_UNROLL = 64
"""Most neighbour slots `Graph.matvec` fuses into one pass (all K, up to this many)."""
FULL_UNROLL_NODES = 16384
"""From this many nodes on `Graph.matvec` fuses all slots into one pass."""
CACHED_ACCUMULATOR_BYTES = 1 << 20
"""Below `FULL_UNROLL_NODES`, `Graph.matvec` fuses all slots too when its [n, B] accumulator
is at most this size (it stays in the per-core cache)."""


def matvec_unroll(num_nodes: int, max_degree: int, batch: int = 1, itemsize: int = 4) -> int:
    """Neighbour slots per pass of `Graph.matvec` (static) for an [n, B] product.

    The slot loop writes the accumulator (n * B * itemsize bytes) once per pass. All K
    slots are fused into one pass on graphs of `FULL_UNROLL_NODES` nodes or more, and on
    smaller ones when the accumulator is at most `CACHED_ACCUMULATOR_BYTES`; otherwise
    8 slots per pass, where the accumulator sits in the shared cache and the shorter
    loop body is as fast or faster. Either way the product costs O(n K B) multiply-adds;
    the accumulator is written ceil(K / slots) times. The grid of n and B behind the rule
    (``experiments/bench_matvec.py``): docs/benchmarks/bench_matvec.md.

    Under ``jax.vmap`` over single vectors the rule sees B = 1.
    """
    size = int(num_nodes) * max(1, int(batch)) * int(itemsize)
    full = num_nodes >= FULL_UNROLL_NODES or size <= CACHED_ACCUMULATOR_BYTES
    return max(1, min(MATVEC_UNROLL if full else 8, max_degree))


def _graph_pytree(cls):
    """Register a graph dataclass as a pytree whose fields are all children, keyed by
    attribute name (as ``jax.tree_util.register_dataclass``). Unflattening rebuilds the
    object without ``__init__``: the leaves of a transformation (tracers, placeholders,
    the outputs of a jitted function) are the fields of a graph that was checked when
    it was first built, so `Graph.__post_init__` runs once per graph, not per pytree
    operation."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flatten_with_keys(graph):
        return tuple((jax.tree_util.GetAttrKey(n), getattr(graph, n)) for n in names), None

    def flatten(graph):
        return tuple(getattr(graph, n) for n in names), None

    def unflatten(_, children):
        graph = object.__new__(cls)
        for n, child in zip(names, children):
            object.__setattr__(graph, n, child)
        return graph

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


@jax.jit
def _device_id_range(indices):
    return jnp.stack([jnp.min(indices), jnp.max(indices)])


def _id_range(indices) -> tuple[int, int]:
    """(min, max) of concrete neighbour ids: on the device for a JAX array, in blocks of
    rows for a numpy array (an ``np.memmap`` is read once, never copied whole)."""
    if isinstance(indices, jax.Array):
        with jax.ensure_compile_time_eval():   # concrete ids inside a jit (weights traced): still a value
            lo, hi = np.asarray(_device_id_range(indices))
        return int(lo), int(hi)
    rows = max(1, 2 ** 22 // max(1, indices.shape[1]))
    lo, hi = None, None
    for start in range(0, indices.shape[0], rows):
        block = indices[start:start + rows]
        b_lo, b_hi = int(block.min()), int(block.max())
        lo = b_lo if lo is None else min(lo, b_lo)
        hi = b_hi if hi is None else max(hi, b_hi)
    return lo, hi


def _is_array_like(value) -> bool:
    """An array, tracer or shape/dtype spec (``jax.ShapeDtypeStruct``): what has a static
    shape and dtype to check. Anything else (None, a Python int, an ``object()``) is a
    pytree placeholder or a ``vmap`` axis spec, which a `Graph` holds unchecked."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _as_field(value, name: str):
    """A Graph field as given, except that a list / tuple or another array-like with
    ``__array__`` (not a numpy or JAX array) becomes a JAX array."""
    if isinstance(value, (np.ndarray, jax.Array)):
        return value
    if isinstance(value, (list, tuple)) or (hasattr(value, "__array__") and not _is_array_like(value)):
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a Graph's {name} must be a rectangular [n, K] array of numbers, "
                            f"got a {type(value).__name__} that is not one ({exc})") from None
    return value


def _real_weights(w):
    """Edge weights as a real floating-point array: bool / integer weights (a 0/1 adjacency)
    become float32, which `normalize` and the solvers need (an integer W would truncate
    every normalised weight to 0); anything else non-floating is a TypeError."""
    dtype = w.dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return w
    if (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)) and hasattr(w, "astype"):
        return w.astype(np.float32 if isinstance(w, np.ndarray) else jnp.float32)
    raise TypeError(f"a Graph's weights must be real floating-point edge weights, got dtype {dtype}; "
                    "pass float32 weights (bool / integer arrays are converted to float32)")


def _float_dtype(dtype):
    """The weights' dtype of `Graph.from_scipy`: a real floating-point dtype, else a TypeError."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a real floating-point dtype such as np.float32, got {dtype!r}") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise TypeError(f"dtype must be a real floating-point dtype such as np.float32, got {d}: "
                        "integer or bool edge weights would be truncated to 0 when the graph is normalised")
    return d


def _as_csr(matrix) -> sp.csr_matrix:
    """``matrix`` (scipy sparse, or anything ``np.asarray`` reads) as a CSR matrix of real
    numbers, or a clear error: 2-D, square, bool / integer / floating entries."""
    def refuse(shape, dtype):
        return ValueError(f"a graph needs a 2-D square real matrix (an n x n affinity), "
                          f"got shape {tuple(shape)} and dtype {dtype}")

    if sp.issparse(matrix):
        if matrix.ndim != 2 or matrix.dtype.kind not in "biuf":
            raise refuse(matrix.shape, matrix.dtype)
        mat = sp.csr_matrix(matrix)
    else:
        try:
            arr = np.asarray(matrix)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a graph needs a 2-D square real matrix (an n x n affinity), got a "
                             f"{type(matrix).__name__} that is not a rectangular array ({exc})") from None
        if arr.ndim != 2 or not (arr.dtype.kind in "biuf" or jnp.issubdtype(arr.dtype, jnp.floating)):
            raise refuse(arr.shape, arr.dtype)
        if arr.dtype.kind == "V" or arr.dtype == np.float16:
            arr = arr.astype(np.float32)   # bfloat16 / float16: exact in float32, which scipy stores
        mat = sp.csr_matrix(arr)
    if mat.shape[0] != mat.shape[1]:
        raise ValueError(f"a graph needs a square matrix, got shape {mat.shape}")
    return mat


def neighbour_product(indices, weights, x, *, unroll: int | None = None, accumulate=None) -> jax.Array:
    """y = A x for the fixed-K neighbour lists of A: y_i = sum_k weights[i, k] x[indices[i, k]].

    The product `Graph.matvec` runs, for lists that are not (yet) a `Graph` (no id check:
    the caller vouches for ids in [0, n)). One neighbour slot after another (``fori_loop``
    over K): each slot gathers n rows of x and adds them with a fused multiply-add, so no
    [n, K, B] intermediate is ever built.

    Args:
      indices: int[n, K] neighbour ids in [0, n).
      weights: float[n, K] edge weights (0 on padding slots).
      x: float[n] or float[n, B] (node axis first).
      unroll: neighbour slots fused per pass (static); default `matvec_unroll`'s choice.
      accumulate: the accumulator's dtype (e.g. float32 for bfloat16 operands); default x's.

    Returns:
      [n] or [n, B] in the dtype of x. Cost O(n K B) multiply-adds, O(n B) memory.
    """
    x = jnp.asarray(x)
    acc_dtype = x.dtype if accumulate is None else jnp.dtype(accumulate)
    w = jnp.asarray(weights).astype(acc_dtype)
    idx = jnp.asarray(indices)
    if x.ndim == 1:
        def body(k, acc):
            return acc + w[:, k] * x[idx[:, k]].astype(acc_dtype)
    else:
        def body(k, acc):
            return acc + w[:, k, None] * x[idx[:, k]].astype(acc_dtype)
    if idx.shape[1] == 0:   # no neighbour slots: A x = 0 (fori_loop would still trace the body)
        return jnp.zeros(x.shape, x.dtype)
    if unroll is None:
        batch = 1 if x.ndim == 1 else int(np.prod(x.shape[1:]))
        unroll = matvec_unroll(idx.shape[0], idx.shape[1], batch, jnp.dtype(acc_dtype).itemsize)
    y = jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros(x.shape, acc_dtype), unroll=max(1, int(unroll)))
    return y.astype(x.dtype)


@_graph_pytree
@dataclasses.dataclass(frozen=True)
class Graph:
    """A weighted graph on ``n`` nodes as padded neighbour lists.

    Row ``i`` holds the neighbours of node ``i``: ``indices[i, j]`` is a node id and
    ``weights[i, j]`` the edge weight. Rows with fewer than ``K`` neighbours are
    padded with the node's own id and weight 0, so a padded slot contributes
    nothing to a product and every gather stays in range.

    Attributes:
      indices: int32[n, K] neighbour ids.
      weights: float32[n, K] edge weights, 0 on padding.
      overflow: None, or an int32 scalar: edges that did not fit in the K slots when the
        graph was built with a fixed capacity under ``jax.jit`` (as jax-md's neighbour
        lists report it). Non-zero means the graph lacks edges: rebuild with a larger
        ``max_degree``. The non-traced entry points check it (`check_overflow`).

    The leading axis is the node axis, so sharding a graph across devices is a
    matter of placing rows.

    Construction checks what `matvec` relies on: ``indices`` an integer [n, K] array
    with K >= 1, ``weights`` of the same shape, and (when concrete) every id in [0, n),
    O(n K) once; an id out of range would gather garbage (JAX clamps out-of-range
    gathers). Lists become JAX arrays; bool / integer weights (a 0/1 adjacency) become
    float32, since a normalised W needs real weights. Under a trace only shapes and
    dtypes are checked. A pytree transformation rebuilds a graph without checking it
    again, and a graph of non-array leaves (a ``vmap`` axis spec such as
    ``Graph(0, None)``) is not checked.

    Raises:
      ValueError: indices or weights not 2-D, of different shapes, with K = 0 slots, or
        ids outside [0, n).
      TypeError: non-integer indices, non-real (e.g. complex) weights, or one field an
        array and the other not (None weights).
    """

    indices: jax.Array
    weights: jax.Array
    overflow: jax.Array | None = None

    def __post_init__(self):
        idx = _as_field(self.indices, "indices")
        w = _as_field(self.weights, "weights")
        if not (_is_array_like(idx) or _is_array_like(w)):
            return   # a pytree placeholder or a vmap in_axes spec such as Graph(0, None): nothing to check
        for name, value in (("indices", idx), ("weights", w)):
            if not _is_array_like(value):
                raise TypeError(f"a Graph's {name} must be an [n, K] array, got {type(value).__name__}")
        shape_i, shape_w = tuple(idx.shape), tuple(w.shape)
        if len(shape_i) != 2 or len(shape_w) != 2:
            raise ValueError(f"a Graph's indices and weights must be 2-D arrays [n, K] (row i: node i's K "
                             f"neighbour ids / edge weights), got shapes {shape_i} and {shape_w}; "
                             "for one neighbour per node use shape [n, 1]")
        if shape_i != shape_w:
            raise ValueError(f"a Graph's indices and weights must have the same shape [n, K], "
                             f"got {shape_i} and {shape_w}")
        if shape_i[1] == 0:
            raise ValueError(f"a Graph needs at least one neighbour slot per node (K >= 1), got shape {shape_i}; "
                             "a node without neighbours holds its own id with weight 0")
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"a Graph's indices must be integer neighbour ids, got dtype {idx.dtype}")
        w = _real_weights(w)
        if idx is not self.indices:
            object.__setattr__(self, "indices", idx)
        if w is not self.weights:
            object.__setattr__(self, "weights", w)
        if shape_i[0] and isinstance(idx, (np.ndarray, jax.Array)) and not _checks.is_traced(idx):
            lo, hi = _id_range(idx)
            n = shape_i[0]
            if lo < 0 or hi >= n:
                raise ValueError(f"the graph has neighbour ids outside [0, {n}) (range [{lo}, {hi}]); "
                                 "a padding slot holds the node's own id with weight 0")

    @property
    def num_nodes(self) -> int:
        return self.indices.shape[0]

    @property
    def max_degree(self) -> int:
        return self.indices.shape[1]

    def degree(self) -> jax.Array:
        """Weighted degree d_i = sum_j A_ij, float32[n]."""
        return jnp.sum(self.weights, axis=1)

    def matvec(self, x: jax.Array) -> jax.Array:
        """y = A x for x of shape [n] or [n, B] (B right-hand sides, node axis first).

        y_i = sum_j weights[i, j] x[indices[i, j]], one neighbour slot after another
        (``fori_loop`` over K): each slot gathers n contiguous rows of x and adds them
        with a fused multiply-add, so no [n, K, B] intermediate is ever built. The loop
        is unrolled over all K slots on large graphs, and on small ones when the [n, B]
        accumulator is small (`matvec_unroll`), so XLA fuses them into one pass that
        writes it once instead of once per 8 slots. Cost: O(n K B) multiply-adds and
        gathered values, O(n B) memory (the one-shot gather
        ``einsum('nk,nkb->nb', w, x[idx])`` would hold [n, K, B]). Against other layouts
        (BCOO, BCSR, scipy CSR): docs/benchmarks/bench_matvec.md. The loop is
        `neighbour_product`, which takes bare neighbour lists.
        """
        return neighbour_product(self.indices, self.weights, x)

    def check_overflow(self) -> "Graph":
        """The graph itself, or a ValueError if edges overflowed its capacity (host side)."""
        if self.overflow is None or _checks.is_traced(self.overflow):
            return self
        lost = int(np.max(np.asarray(self.overflow)))
        if lost:
            raise ValueError(f"{lost} edge(s) did not fit in the graph's {self.max_degree} slots per node; "
                             f"rebuild it with a larger max_degree (capacity)")
        return self

    # ------------------------------------------------------------------ conversions
    def to_scipy(self) -> sp.csr_matrix:
        """The graph as a ``scipy.sparse.csr_matrix`` (padding dropped)."""
        idx = np.asarray(self.indices)
        w = np.asarray(self.weights)
        n = idx.shape[0]
        rows = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1])
        keep = w.ravel() != 0
        mat = sp.csr_matrix((w.ravel()[keep], (rows[keep], idx.ravel()[keep].astype(np.int64))),
                            shape=(n, n))
        mat.sum_duplicates()
        return mat

    def to_dense(self) -> np.ndarray:
        return self.to_scipy().toarray()

    @classmethod
    def from_scipy(cls, matrix, *, max_degree: int | None = None, dtype=np.float32) -> "Graph":
        """Build a padded graph from any scipy sparse (or dense) square matrix.

        ``max_degree`` fixes K (e.g. to keep one compiled shape across graphs); it
        must be at least the largest number of non-zeros in a row.

        Raises:
          ValueError: not a 2-D square matrix of real (bool, integer or floating)
            numbers, NaN / inf or negative entries, a ``max_degree`` that is not a
            positive int or is below the widest row.
          TypeError: a ``dtype`` that is not a real floating-point dtype (integer
            weights would be truncated by `normalize`).
        """
        dtype = _float_dtype(dtype)
        if max_degree is not None:
            max_degree = _checks.check_positive_int(max_degree, "max_degree")
        mat = _as_csr(matrix)
        mat.sum_duplicates()
        mat.eliminate_zeros()
        n = mat.shape[0]
        if mat.nnz and not np.isfinite(mat.data).all():
            raise ValueError("the matrix has NaN or inf weights")
        if mat.nnz and (mat.data < 0).any():
            raise ValueError("the matrix has negative weights; a graph's affinities must be non-negative")
        counts = np.diff(mat.indptr)
        width = int(counts.max()) if n else 0
        width = max(width, 1)
        if max_degree is not None:
            if max_degree < width:
                raise ValueError(f"max_degree = {max_degree} is smaller than the largest row ({width} non-zeros)")
            width = max_degree
        indices = np.repeat(np.arange(n, dtype=np.int32)[:, None], width, axis=1)
        weights = np.zeros((n, width), dtype=dtype)
        # position of every stored entry inside its row
        pos = np.arange(mat.nnz) - np.repeat(mat.indptr[:-1], counts)
        rows = np.repeat(np.arange(n), counts)
        indices[rows, pos] = mat.indices
        weights[rows, pos] = mat.data
        return cls(indices=jnp.asarray(indices), weights=jnp.asarray(weights))

    @classmethod
    def from_dense(cls, matrix, **kwargs) -> "Graph":
        """`from_scipy` of a dense square array (same checks)."""
        return cls.from_scipy(matrix, **kwargs)


def _rows_matvec(indices, weights, x: np.ndarray, rows: int) -> np.ndarray:
    """W x in float64 for x [n, c], a block of rows at a time (host, numpy or memmap arrays)."""
    out = np.empty_like(x)
    for start in range(0, indices.shape[0], rows):
        ib = np.asarray(indices[start:start + rows])
        wb = np.asarray(weights[start:start + rows], np.float64)
        out[start:start + rows] = np.einsum("ik,ikc->ic", wb, x[ib])
    return out


def check_normalized_rows(indices, weights, *, steps: int = 30, seed: int = 0) -> None:
    """Check on the host that concrete neighbour lists can be W = D^-1/2 A D^-1/2.

    The checks `retrieval_jax.diffusion.check_normalized` makes of a plain `Graph`, in
    blocks of rows so that an ``np.memmap`` is streamed, never copied whole: finite,
    non-negative weights; W = W^T, probed as u^T W v = v^T W u for two pairs of random
    vectors (float64, relative tolerance 1e-6; exact for symmetric W); and a largest
    eigenvalue at most 1 + 1e-3, estimated from below by ``steps`` power-iteration
    steps from the all-ones vector (an unnormalised affinity A has lambda_max = its
    average degree or more). Cost O((steps + 2) n K) time, O(n) memory beyond a block.
    The ids are the constructor's to check (`Graph`).

    Raises:
      ValueError: NaN / inf or negative weights, an asymmetric W, or a W whose largest
        eigenvalue exceeds 1 (not normalised).
    """
    n, width = indices.shape
    rows = max(1, 2 ** 20 // max(1, width))
    for start in range(0, n, rows):
        wb = weights[start:start + rows]
        if not np.isfinite(wb).all():
            raise ValueError("the graph has NaN or inf weights; rebuild it from finite descriptors")
        if (wb < 0).any():
            raise ValueError("the graph has negative weights; diffusion needs a non-negative affinity")
    if n == 0:
        return
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((n, 4))
    wp = _rows_matvec(indices, weights, probe, rows)
    u, v, wu, wv = probe[:, :2], probe[:, 2:], wp[:, :2], wp[:, 2:]
    gap = np.abs(np.sum(u * wv, axis=0) - np.sum(v * wu, axis=0))
    scale = (np.linalg.norm(u, axis=0) * np.linalg.norm(wv, axis=0)
             + np.linalg.norm(v, axis=0) * np.linalg.norm(wu, axis=0))
    if (gap > 1e-6 * scale + 1e-30).any():
        raise ValueError("W is not symmetric (u^T W v != v^T W u for random u, v): conjugate gradient and the "
                         "exact inverse need a symmetric graph; build it with knn_graph and normalize it")
    x = np.ones((n, 1)) / np.sqrt(n)
    est = 0.0
    for _ in range(steps):
        y = _rows_matvec(indices, weights, x, rows)
        est = max(est, float(np.sum(x * y)))
        norm = float(np.linalg.norm(y))
        if norm == 0:
            break
        x = y / norm
    if est > 1.0 + 1e-3:
        raise ValueError(f"W is not normalised (its largest eigenvalue is at least {est:.4g} > 1, so I - alpha W "
                         "is not positive definite and diffusion diverges): save normalize(A), "
                         "W = D^-1/2 A D^-1/2")


@_graph_pytree
@dataclasses.dataclass(frozen=True)
class NormalizedGraph(Graph):
    """A `Graph` known to be W = D^-1/2 A D^-1/2 of a symmetric non-negative affinity A.

    `normalize` returns one; the type carries the fact (its spectrum lies in [-1, 1], so
    I - alpha W is positive definite for 0 < alpha < 1) and the diffusion solvers take
    it without re-checking. A plain `Graph` passed to them is checked on the host
    (`retrieval_jax.diffusion.check_normalized`) at every call. Built directly, the type
    asserts the fact without a check; `load_graph` checks a W saved as normalised once
    (`check_normalized_rows`) and returns this type.

    ``layout``: None, or the graph's `retrieval_jax.graph.order.LocalityLayout` (its
    nodes renumbered for cache locality, computed once on the host; `normalize` attaches
    one to concrete graphs of `retrieval_jax.graph.order.LOCALITY_MIN_NODES` nodes or
    more). The CG solvers then run in the layout; results are in the graph's node order.
    It depends on ``indices`` only: replace the neighbour lists and drop it (layout=None).
    """

    layout: Any = None


@_graph_pytree
@dataclasses.dataclass(frozen=True)
class AffinityGraph(Graph):
    """A `Graph` known to be an affinity A (`knn_graph`'s output), not the normalised W.

    The type carries the fact so that the diffusion solvers can refuse A where they
    need W = `normalize` (A), under ``jax.jit`` too, where the value check of a plain
    `Graph` cannot run: an A with small weights (a small k, gamma = 3) has a spectrum
    inside [-1, 1] and would otherwise diffuse without a word, to another ranking.
    Anything that takes a graph takes it; `normalize` returns a `NormalizedGraph`.
    """
