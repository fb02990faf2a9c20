"""Guided Similarity Separation (GSS): a residual graph convolutional network trained without labels.

Liu, Yu, Chang, Rai, Ma, Gorti & Volkovs, "Guided Similarity Separation for Image
Retrieval", NeurIPS 2019 (reference implementation: layer6ai-labs/GSS; the defaults and
the details below are the reference's).

**Graph.** Over database descriptors X [n, d] (rows L2-normalised), each item keeps the
top k entries of its similarity row s_ij = <x_i, x_j>, the item itself counted among them,
and the self-edge is dropped (for normalised descriptors: its k - 1 nearest other items).
The adjacency is made symmetric, A_ij = A_ji = max(s_ij, 0) for every listed pair, then

    Â = D^-1/2 (A + I) D^-1/2,    D = diag(1 + sum_j A_ij).

**Network.** L layers (2 by default) of width d, pre-activations p_l and outputs h_l:

    p_l = Â h_{l-1} W_l + b_l,      h_0 = X,
    h_1 = elu(p_1),                 h_l = p_{l-1} + lambda elu(p_l)   (l >= 2),

with layer decay lambda = 0.3 (the residual is the previous layer's pre-activation, the
next layer's input its output h). The embedding is e_i = h_L,i / ||h_L,i||. Every W_l starts
at the identity plus N(0, eps^2) off the diagonal (eps = 1e-5), every b_l at 0, so the
untrained network is two normalised graph convolutions of the descriptors.

**Loss.** Over all n^2 ordered pairs (i, j) of the database, the diagonal included:

    L = -(1/2) mean_{i,j} (ReLU(e_i . e_j) - beta)^2  +  (mu / 2) sum_l ||W_l||_F^2,

beta = the 98th percentile of the n^2 similarities e_i . e_j of the untrained network
(pairs above beta are pushed up, those below down: the similarities separate), mu = 1e-5
(an L2 penalty on the kernels, not the biases). Adam (optax), learning rate 1e-4, 200
full-batch epochs: one step per epoch on the whole graph.

**Queries.** A query q has out-edges only: to its query_k = 5 nearest database items,
weights max(<q, x_j>, 0), and a self-loop. Its row of the normalised adjacency is
Â_qq = 1 / d_q, Â_qj = s_qj / sqrt(d_q d_j) (d_q = 1 + sum_j s_qj, d_j the database degree);
the database rows do not change (no item gains an edge to the query). The query goes
through the trained layers on that row (each layer's database inputs h_{l-1} precomputed
at build), and is scored by inner product with the database embeddings: s(q, j) = e_q . e_j.
A database item used as a query (``search_items``) is its own embedding.

Nothing holds an [n, n] array: the graph is padded neighbour lists (`Graph`), and the
loss sums the pairs in row blocks (``lax.map`` over checkpointed blocks, so its gradient
holds one [block, n] block at a time). The percentile of beta is taken exactly up to
``BETA_MAX_ENTRIES`` pairs, else over evenly spaced rows of the similarity matrix.

Public API (all pure, jit / grad / vmap-able except the host-side builders):
  * `graph_convolution(graph, x, kernel, bias)`: Â x W + b;
  * `ResidualGCN`: the Flax (nnx) network, `init_gss` its initialisation;
  * `residual_gcn(aggregate, x, layers, layer_decay)`: the layer recursion for any Â;
  * `gss_embeddings(model, graph, features, layer_decay)`: e (and the layer inputs);
  * `gss_loss(embeddings, beta)`, `gss_objective(params, graphdef, ...)`: the loss;
  * `make_gss_train_step(graphdef, optimizer)`: the jitted Adam step;
  * `gss_graph(database, k)`: Â as neighbour lists and the degrees; `initial_beta`;
  * `embed_queries(state, queries)`: the query embeddings;
  * `train_gss(database, config)`: the whole offline phase; ``GSS`` / `GssConfig` /
    `GssState`: the `Method`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import _checks
from .._precision import HIGHEST
from .._progress import progress
from ..graph.core import Graph
from ..graph.neighbours import affinity_lists, knn
from .base import GRAPH_OPTIONS, checked_database, make_method
from .options import finite_float, nonneg_int, option, positive_int

__all__ = ["BETA_MAX_ENTRIES", "GSS", "GssConfig", "GssState", "ResidualGCN", "embed_queries", "graph_convolution",
           "gss_embeddings", "gss_graph", "gss_loss", "gss_objective", "init_gss", "initial_beta",
           "make_gss_train_step", "residual_gcn", "train_gss"]

BETA_MAX_ENTRIES = 1 << 24
"""Most similarities `initial_beta` takes its percentile over (16.7 M: n up to 4096 exactly)."""

_EPS = 1e-12


# ----------------------------------------------------------------------------- the network
def graph_convolution(graph: Graph, x, kernel, bias) -> jax.Array:
    """One graph convolution before its non-linearity: Â x W + b.

    Args:
      graph: the normalised adjacency Â as neighbour lists (`gss_graph`), n nodes.
      x: float[n, d] node features.
      kernel: float[d, d'] the layer's weights W.
      bias: float[d'] the layer's bias b.

    Returns:
      float[n, d'] (the dtype of x). Cost O(n K d + n d d'), no [n, n] array.
    """
    return jnp.matmul(graph.matvec(x), kernel, precision=HIGHEST) + bias


def residual_gcn(aggregate: Callable[[int, jax.Array], jax.Array], x, layers: Sequence[tuple[Any, Any]],
                 layer_decay, *, return_inputs: bool = False):
    """GSS's residual layer recursion (module docstring) for any aggregation Â.

        p_l = aggregate(l, h_{l-1}) W_l + b_l,  h_1 = elu(p_1),  h_l = p_{l-1} + lambda elu(p_l)

    Args:
      aggregate: ``aggregate(l, h) -> Â h`` for layer l = 0, 1, ... (the query side
        aggregates over the database's inputs of layer l, hence the index).
      x: float[m, d] the inputs h_0.
      layers: a sequence of (kernel float[d, d], bias float[d]), one per layer.
      layer_decay: lambda, the weight of a layer's output beside its residual (traced).
      return_inputs: also return the inputs h_0 .. h_{L-1} of the layers.

    Returns:
      float[m, d] the output h_L (not normalised); with ``return_inputs`` also the list of
      the L layer inputs.
    """
    h, residual, inputs = x, None, []
    for layer, (kernel, bias) in enumerate(layers):
        inputs.append(h)
        pre = jnp.matmul(aggregate(layer, h), kernel, precision=HIGHEST) + bias
        out = jax.nn.elu(pre)
        h = out if residual is None else residual + layer_decay * out
        residual = pre
    return (h, inputs) if return_inputs else h


def _normalise_rows(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _identity_init(std: float):
    """W = I with N(0, std^2) entries off the diagonal (the reference's GCN initialisation)."""
    def init(key, shape, dtype=jnp.float32):
        noise = std * jax.random.normal(key, shape, dtype)
        eye = jnp.eye(shape[0], shape[1], dtype=dtype)
        return jnp.where(eye > 0, eye, noise)
    return init


class ResidualGCN(nnx.Module):
    """GSS's residual graph convolutional network (Flax nnx): ``num_layers`` square layers.

    Args:
      dim: the descriptor dimension d (every layer is d -> d).
      num_layers: L >= 1 (2 in the paper).
      init_std: standard deviation eps of the kernels' off-diagonal entries at
        initialisation (the diagonal is 1, the bias 0).
      rngs: the `nnx.Rngs` drawing the off-diagonal entries.
    """

    def __init__(self, dim: int, num_layers: int = 2, *, init_std: float = 1e-5, rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.Linear(dim, dim, kernel_init=_identity_init(init_std), bias_init=nnx.initializers.zeros,
                       precision=HIGHEST, rngs=rngs)
            for _ in range(num_layers)])

    def weights(self) -> list[tuple[jax.Array, jax.Array]]:
        """(kernel [d, d], bias [d]) of each layer."""
        return [(layer.kernel[...], layer.bias[...]) for layer in self.layers]

    def __call__(self, graph: Graph, x, layer_decay=0.3) -> jax.Array:
        """h_L [n, d] (not normalised) of node features x [n, d] on the graph Â."""
        return residual_gcn(lambda _, h: graph.matvec(h), x, self.weights(), layer_decay)


def init_gss(dim: int, num_layers: int = 2, *, init_std: float = 1e-5, seed: int = 0) -> ResidualGCN:
    """An untrained `ResidualGCN` (identity kernels plus N(0, init_std^2) off the diagonal)."""
    _checks.check_positive_int(dim, "dim")
    _checks.check_positive_int(num_layers, "num_layers")
    return ResidualGCN(int(dim), int(num_layers), init_std=float(init_std), rngs=nnx.Rngs(int(seed)))


def gss_embeddings(model: ResidualGCN, graph: Graph, features, layer_decay=0.3, *, return_inputs: bool = False):
    """The GSS embeddings e = rows_l2(h_L) of the graph's nodes: float[n, d].

    Args:
      model: a `ResidualGCN` (or ``nnx.merge(graphdef, params)`` of one, under jit / grad).
      graph: Â (`gss_graph`).
      features: float[n, d] the node descriptors h_0.
      layer_decay: lambda (traced).
      return_inputs: also return the L layer inputs h_0 .. h_{L-1} (a query needs the
        database's, `embed_queries`).
    """
    out = residual_gcn(lambda _, h: graph.matvec(h), features, model.weights(), layer_decay,
                       return_inputs=return_inputs)
    if return_inputs:
        return _normalise_rows(out[0]), out[1]
    return _normalise_rows(out)


# ----------------------------------------------------------------------------- the loss
def _loss_block(n: int, block_size: int | None) -> int:
    if block_size is None:
        return n if n <= 4096 else 1024
    return max(1, min(int(block_size), n))


def gss_loss(embeddings, beta, *, block_size: int | None = None) -> jax.Array:
    """The GSS loss of embeddings: -(1/2) mean_{i,j} (ReLU(e_i . e_j) - beta)^2.

    The mean runs over all n^2 ordered pairs, the diagonal included (the reference's mean
    over the whole [n, n] matrix). Its gradient pushes pairs above beta up and those below
    down (its minimum over a similarity is at the ends of [0, 1]).

    Args:
      embeddings: float[n, d] the (row-normalised) embeddings e.
      beta: the separation threshold (traced scalar).
      block_size: rows of the similarity matrix summed at once (static); None: all of them
        up to n = 4096, else 1024. The rows are padded to a multiple of it and masked.

    Returns:
      a scalar of the embeddings' dtype; under grad each [block, n] block is recomputed in
      the backward pass (``jax.checkpoint``), so memory stays O(block * n + n d).
    """
    e = jnp.asarray(embeddings)
    n, d = e.shape
    b = _loss_block(n, block_size)

    def block_sum(rows, valid):
        s = jnp.maximum(jnp.matmul(rows, e.T, precision=HIGHEST), 0.0)
        return jnp.sum(jnp.where(valid[:, None], (s - beta) ** 2, 0.0))

    if b >= n:
        total = block_sum(e, jnp.ones((n,), bool))
    else:
        nb = -(-n // b)
        rows = jnp.pad(e, ((0, nb * b - n), (0, 0))).reshape(nb, b, d)
        valid = (jnp.arange(nb * b) < n).reshape(nb, b)
        total = jnp.sum(jax.lax.map(jax.checkpoint(lambda a: block_sum(*a)), (rows, valid)))
    return -0.5 * total / (float(n) * float(n))  # a float: n * n overflows int32 past n = 46,340


def gss_objective(params, graphdef, graph: Graph, features, beta, layer_decay=0.3, weight_decay=1e-5, *,
                  block_size: int | None = None) -> jax.Array:
    """The training objective: `gss_loss` of the embeddings + (mu / 2) sum_l ||W_l||_F^2.

    Args:
      params: the network's parameters (``nnx.split(model, nnx.Param)[1]``).
      graphdef: the network's graph definition (``nnx.split(model, nnx.Param)[0]``).
      graph: Â of the database (`gss_graph`).
      features: float[n, d] database descriptors.
      beta: the loss threshold (traced).
      layer_decay: lambda (traced).
      weight_decay: mu, the L2 penalty on the kernels (traced; the reference's
        ``l2_regularizer(1e-5)``: mu / 2 times the sum of squares).
      block_size: see `gss_loss`.

    Returns:
      a scalar.
    """
    model = nnx.merge(graphdef, params)
    e = gss_embeddings(model, graph, features, layer_decay)
    penalty = sum(jnp.sum(kernel ** 2) for kernel, _ in model.weights())
    return gss_loss(e, beta, block_size=block_size) + 0.5 * weight_decay * penalty


def make_gss_train_step(graphdef, optimizer: optax.GradientTransformation, *,
                        block_size: int | None = None) -> Callable:
    """A jitted full-batch step of GSS training:

        step(params, opt_state, graph, features, beta, layer_decay, weight_decay)
            -> (params', opt_state', objective)

    the objective (`gss_objective`) at ``params`` and the parameters after one update of
    ``optimizer`` (the paper: ``optax.adam(1e-4)``). Forward, backward and update are one
    XLA program; beta, layer_decay and weight_decay are traced (no recompilation).
    """
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("optimizer must be an optax.GradientTransformation (with init and update)")

    @jax.jit
    def step(params, opt_state, graph, features, beta, layer_decay, weight_decay):
        value, grads = _value_and_grad(params, graphdef, graph, features, beta, layer_decay, weight_decay,
                                       block_size)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def _value_and_grad(params, graphdef, graph, features, beta, layer_decay, weight_decay, block_size):
    return jax.value_and_grad(lambda p: gss_objective(p, graphdef, graph, features, beta, layer_decay,
                                                      weight_decay, block_size=block_size))(params)


# train_gss's step: Adam = scale_by_adam, then -lr (traced), compiled once per graphdef and shape
_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _adam_step(params, opt_state, graph, features, beta, layer_decay, weight_decay, lr, *, graphdef):
    value, grads = _value_and_grad(params, graphdef, graph, features, beta, layer_decay, weight_decay, None)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, value


# ----------------------------------------------------------------------------- the graph (host)
def gss_graph(database, k: int = 5, *, graph_method: str = "auto",
              show_progress: bool | None = None) -> tuple[Graph, jax.Array]:
    """GSS's normalised database graph Â = D^-1/2 (A + I) D^-1/2 as neighbour lists.

    A is the symmetric kNN graph of the module docstring: item i keeps the top k of its
    similarity row, itself included (so its k - 1 nearest other items), with weights
    max(s_ij, 0), and every listed pair is an edge both ways.

    Args:
      database: float[n, d] descriptors (L2-normalised).
      k: the reference's k (the item itself counted), 2 <= k <= n.
      graph_method: the neighbour search of `retrieval_jax.graph.knn`.

    Returns:
      (Â as a `Graph` [n, 1 + K] with the self-loop in slot 0, the degrees d = 1 + A 1
      float32[n]).
    """
    db = _checks.as_matrix(database, "database")
    n = db.shape[0]
    k = _check_gss_k(k, n)
    s, i = knn(db, db, k - 1, exclude_self=True, method=graph_method, show_progress=show_progress)
    ids, w = affinity_lists(np.asarray(s), np.asarray(i), 1.0, mutual=False)
    ids, w = np.asarray(ids), np.asarray(w, np.float64)
    deg = 1.0 + w.sum(axis=1)
    scale = 1.0 / np.sqrt(deg)
    norm_w = w * scale[:, None] * scale[ids]
    self_ids = np.arange(n, dtype=np.int32)[:, None]
    graph = Graph(jnp.asarray(np.concatenate([self_ids, ids], axis=1), jnp.int32),
                  jnp.asarray(np.concatenate([(1.0 / deg)[:, None], norm_w], axis=1), jnp.float32))
    return graph, jnp.asarray(deg, jnp.float32)


def _check_gss_k(k, n: int) -> int:
    k = _checks.check_k(k, n, name="k", what="database items (GSS's k counts the item itself)")
    if k < 2:
        raise ValueError("GSS's k counts the item itself: k >= 2 gives each item k - 1 neighbours, got k = 1")
    return k


def initial_beta(embeddings, percentile: float = 98.0, *, max_entries: int = BETA_MAX_ENTRIES) -> float:
    """beta = the ``percentile``-th percentile of the similarities e_i . e_j (host).

    Over all n^2 pairs (the diagonal included, as the reference) when n^2 <=
    ``max_entries``, else over the rows of ``max_entries // n`` evenly spaced items
    (an estimate; the rows are computed in blocks, never the [n, n] matrix).
    """
    e = np.asarray(embeddings, np.float32)
    n = e.shape[0]
    rows = np.arange(n) if n * n <= max_entries else np.unique(
        np.linspace(0, n - 1, max(1, max_entries // n)).round().astype(int))
    sims = np.concatenate([e[rows[a:a + 1024]] @ e.T for a in range(0, len(rows), 1024)])
    return float(np.percentile(sims.astype(np.float64).ravel(), float(percentile)))


# ----------------------------------------------------------------------------- the method
@dataclasses.dataclass(frozen=True)
class GssConfig:
    """GSS (Liu et al., NeurIPS 2019) with the reference implementation's defaults.

    Attributes:
      epochs: full-batch Adam steps (200); 0 leaves the network untrained (two
        normalised graph convolutions of the descriptors).
      lr: Adam's learning rate (1e-4).
      k: database graph neighbours, the item itself counted (5: its 4 nearest others).
      query_k: database neighbours a query's out-edges go to (5).
      beta_percentile: beta is this percentile of the untrained similarities (98).
      num_layers: residual graph convolutions (2).
      layer_decay: lambda, the weight of a layer's output beside its residual (0.3).
      init_std: eps, the off-diagonal standard deviation of the initial kernels (1e-5).
      weight_decay: mu, the L2 penalty (mu / 2) ||W||^2 on the kernels (1e-5).
      seed: the seed of the initial kernels' off-diagonal noise.
      graph_method: the neighbour search (`retrieval_jax.graph.knn`).
    """

    epochs: int = option(200, "GSS training epochs (full-batch Adam steps; 0 = untrained)", flag="--gss-epochs",
                         parse=nonneg_int)
    lr: float = option(1e-4, "GSS Adam learning rate", flag="--gss-lr", parse=finite_float)
    k: int = option(5, "GSS graph neighbours, the item itself counted (k - 1 others)", flag="--gss-k",
                    parse=positive_int)
    query_k: int = option(5, "GSS query out-edges to database items", flag="--gss-query-k", parse=positive_int)
    beta_percentile: float = option(98.0, "GSS beta: this percentile of the untrained similarities",
                                    flag="--gss-beta-percentile", parse=finite_float)
    num_layers: int = option(2, "GSS residual graph convolutions", flag="--gss-layers", parse=positive_int)
    layer_decay: float = option(0.3, "GSS residual layer decay lambda", flag="--gss-layer-decay",
                                parse=finite_float)
    init_std: float = option(1e-5, "GSS off-diagonal std of the initial (identity) kernels",
                             flag="--gss-init-std", parse=finite_float)
    weight_decay: float = option(1e-5, "GSS L2 penalty on the kernels", flag="--gss-weight-decay",
                                 parse=finite_float)
    seed: int = option(0, "GSS seed of the initial kernels' noise", flag="--gss-seed", parse=nonneg_int)
    graph_method: str = option("auto", GRAPH_OPTIONS["graph_method"])

    def __post_init__(self):
        if not _checks.is_int(self.epochs) or self.epochs < 0:
            raise ValueError(f"GssConfig.epochs must be an int >= 0 (0 = untrained), got {self.epochs!r}")
        for name in ("k", "query_k", "num_layers"):
            _checks.check_positive_int(getattr(self, name), f"GssConfig.{name}")
        if self.k < 2:
            raise ValueError(f"GssConfig.k counts the item itself and must be >= 2, got {self.k}")
        _checks.check_positive(self.lr, "GssConfig.lr")
        for name in ("layer_decay", "init_std", "weight_decay"):
            _checks.check_nonnegative(getattr(self, name), f"GssConfig.{name}")
        p = self.beta_percentile
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) or not 0 <= p <= 100:
            raise ValueError(f"GssConfig.beta_percentile must lie in [0, 100], got {p}")
        if not _checks.is_int(self.seed) or self.seed < 0:
            raise ValueError(f"GssConfig.seed must be an int >= 0, got {self.seed!r}")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["database", "graph", "degrees", "params", "layer_inputs", "embeddings", "beta",
                                "losses"],
                   meta_fields=["graphdef", "config"])
@dataclasses.dataclass(frozen=True)
class GssState:
    """A trained GSS model over its database.

    Attributes:
      database: float32[n, d] the descriptors.
      graph: Â (`gss_graph`), [n, 1 + K] neighbour lists.
      degrees: float32[n] d = 1 + A 1 (a query's edge to j is scaled by 1 / sqrt(d_j)).
      params: the trained network's parameters (nnx ``State``).
      layer_inputs: the database's inputs h_0 .. h_{L-1} of each layer, float32[n, d] each.
      embeddings: float32[n, d] the database embeddings e (rows L2-normalised).
      beta: the loss threshold used in training.
      losses: float32[epochs] the objective before each epoch's update.
      graphdef: the network's structure (static).
      config: the `GssConfig` (static).
    """

    database: jax.Array
    graph: Graph
    degrees: jax.Array
    params: Any
    layer_inputs: tuple
    embeddings: jax.Array
    beta: jax.Array
    losses: jax.Array
    graphdef: Any
    config: GssConfig = GssConfig()

    @property
    def model(self) -> ResidualGCN:
        """The trained `ResidualGCN`."""
        return nnx.merge(self.graphdef, self.params)


def _gss_check_sizes(config: GssConfig, n: int) -> None:
    _check_gss_k(config.k, n)
    _checks.check_k(config.query_k, n, name="query_k")


def _state(db, graph, degrees, graphdef, params, beta, losses, config) -> GssState:
    model = nnx.merge(graphdef, params)
    e, inputs = _embed_database(model, graph, jnp.asarray(db), jnp.float32(config.layer_decay))
    return GssState(database=jnp.asarray(db), graph=graph, degrees=degrees, params=params,
                    layer_inputs=tuple(inputs), embeddings=e, beta=jnp.float32(beta),
                    losses=jnp.asarray(losses, jnp.float32), graphdef=graphdef, config=config)


@jax.jit
def _embed_database(model, graph, features, layer_decay):
    return gss_embeddings(model, graph, features, layer_decay, return_inputs=True)


def train_gss(database, config: GssConfig = GssConfig(), *, snapshots: Sequence[int] = (),
              show_progress: bool | None = None) -> tuple[GssState, dict[int, GssState]]:
    """GSS's offline phase: the graph, beta, ``config.epochs`` Adam steps, the embeddings.

    Args:
      database: float[n, d] descriptors (L2-normalised).
      config: a `GssConfig`.
      snapshots: epoch counts (0 .. config.epochs) whose states are returned too, e.g. to
        choose the epoch count on held-out data with one training run.
      show_progress: a progress bar over the epochs (None: from 20 epochs on, unless
        ``RETRIEVAL_JAX_NO_PROGRESS`` is set).

    Returns:
      (the state after ``config.epochs`` epochs, {epoch count: state} of ``snapshots``).
    """
    db = checked_database(database, config, GssConfig, "gss")
    n, d = db.shape
    _gss_check_sizes(config, n)
    wanted = sorted({int(e) for e in snapshots})
    if any(e < 0 or e > config.epochs for e in wanted):
        raise ValueError(f"snapshots must be epoch counts in [0, {config.epochs}], got {list(snapshots)}")
    graph, degrees = gss_graph(db, config.k, graph_method=config.graph_method, show_progress=show_progress)
    graphdef, params = nnx.split(init_gss(d, config.num_layers, init_std=config.init_std, seed=config.seed),
                                 nnx.Param)
    features = jnp.asarray(db)
    decay = jnp.float32(config.layer_decay)
    e0, _ = _embed_database(nnx.merge(graphdef, params), graph, features, decay)
    beta = initial_beta(e0, config.beta_percentile)
    opt_state = _ADAM.init(params)
    step = functools.partial(_adam_step, graphdef=graphdef)
    args = (graph, features, jnp.float32(beta), decay, jnp.float32(config.weight_decay), jnp.float32(config.lr))
    losses: list = []
    taken: dict[int, GssState] = {}
    if 0 in wanted:
        taken[0] = _state(db, graph, degrees, graphdef, params, beta, [], dataclasses.replace(config, epochs=0))
    for epoch in progress(range(config.epochs), desc="gss epochs", total=config.epochs, enable=show_progress):
        params, opt_state, value = step(params, opt_state, *args)
        losses.append(value)
        if epoch + 1 in wanted:
            taken[epoch + 1] = _state(db, graph, degrees, graphdef, params, beta, jnp.stack(losses),
                                      dataclasses.replace(config, epochs=epoch + 1))
    loss_arr = jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)
    if not bool(jnp.all(jnp.isfinite(loss_arr))):
        raise FloatingPointError("GSS training produced a non-finite loss; lower the learning rate (GssConfig.lr)")
    final = taken[config.epochs] if config.epochs in taken else _state(db, graph, degrees, graphdef, params, beta,
                                                                         loss_arr, config)
    return final, taken


def _gss_build(database, config: GssConfig = GssConfig(), *, show_progress: bool | None = None) -> GssState:
    return train_gss(database, config, show_progress=show_progress)[0]


def _query_embeddings(state: GssState, queries):
    """Query embeddings [nq, d] through the trained layers on their out-edges (module docstring)."""
    q = queries.astype(jnp.float32)
    sims = jnp.matmul(q, state.database.T, precision=HIGHEST)
    s, idx = jax.lax.top_k(sims, state.config.query_k)
    s = jnp.maximum(s, 0.0)
    deg_q = 1.0 + jnp.sum(s, axis=1)
    w_self = 1.0 / deg_q
    w_nbr = s / jnp.sqrt(deg_q[:, None] * state.degrees[idx])
    inputs = state.layer_inputs

    def aggregate(layer, h):
        return w_self[:, None] * h + jnp.einsum("qk,qkd->qd", w_nbr, inputs[layer][idx], precision=HIGHEST)

    out = residual_gcn(aggregate, q, state.model.weights(), jnp.float32(state.config.layer_decay))
    return _normalise_rows(out)


@jax.jit
def _embed_queries_jit(state, queries):
    return _query_embeddings(state, queries)


def embed_queries(state: GssState, queries) -> jax.Array:
    """The GSS embeddings float32[nq, d] of out-of-database queries float[nq, d]."""
    if not isinstance(state, GssState):
        raise TypeError(f"embed_queries takes a GssState, got {type(state).__name__}")
    if not _checks.is_traced(queries):
        q = _checks.as_matrix(queries, "queries")
        if q.shape[1] != state.database.shape[1]:
            raise ValueError(f"dimension mismatch: queries have d = {q.shape[1]} but the database "
                             f"has d = {state.database.shape[1]}; use the same descriptor pipeline")
        queries = jnp.asarray(q)
    return _embed_queries_jit(state, queries)


@jax.jit
def _gss_search(state: GssState, queries):
    return jnp.matmul(_query_embeddings(state, queries), state.embeddings.T, precision=HIGHEST)


@jax.jit
def _gss_search_items(state: GssState, ids):
    return jnp.matmul(state.embeddings[ids], state.embeddings.T, precision=HIGHEST)


GSS = make_method("gss", _gss_build, _gss_search, _gss_search_items, GssConfig, check_sizes=_gss_check_sizes,
                  summary="GSS: residual GCN trained unsupervised on the kNN graph (Liu et al. 2019)")
