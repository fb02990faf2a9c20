"""Mining on manifolds: training tuples without labels, and fine-tuning the head on them.

Iscen, Tolias, Avrithis & Chum, "Mining on Manifolds: Metric Learning without Labels",
CVPR 2018. On an unlabelled collection of descriptors ``X [n, d]`` (L2-normalised rows,
similarity = inner product):

1. the mutual kNN graph A (k = 30, a_ij = max(<x_i, x_j>, 0)^3, Iscen et al. 2017) and
   W = D^-1/2 A D^-1/2 (`retrieval_jax.graph.knn_graph`, `retrieval_jax.graph.normalize`);
2. the manifold similarity of an anchor q to every item is its diffusion,

       (I - alpha W) s_q = e_q,     alpha = 0.99,

   solved by batched conjugate gradient (`retrieval_jax.diffusion.solve`, `CG`), one
   batch of anchors at a time (never an [n, n] inverse);
3. with NN^e_k(q) the k nearest items of q by Euclidean similarity and NN^m_k(q) the k
   items of largest manifold similarity s_q (s_q > 0: an item the walk cannot reach is
   no manifold neighbour), q itself excluded from both (paper, eq. 6):

       P+(q) = NN^m_k(q) \\ NN^e_k(q)     (hard positives: near on the manifold, far in
                                          Euclidean space; in decreasing s_q, at most 50)
       P-(q) = NN^e_k(q) \\ NN^m_k(q)     (hard negatives: near in Euclidean space, far on
                                          the manifold; in decreasing <x_q, x>, at most 50)

   with k = 50 for P+ and, for P-, the reference code's k = min(10000, ceil(n / 2));
4. anchors: every item (the paper's fine-grained set-up), or (its retrieval set-up) the
   strongest 1-hop local maxima of the stationary distribution pi = pi D^-1 A of the
   random walk on the largest connected component, found by power iteration; the mining
   is then restricted to that component, as in the reference code;
5. the loss is the triplet loss weighted by the positive's manifold similarity (the
   reference code's ``WeightedTriplet``: margin 0.5, squared distances, mean over the
   batch of w_i [m + ||f_a - f_p||^2 - ||f_a - f_n||^2]_+, w_i = s_a(p)), or a contrastive
   loss with its positive pairs weighted the same way.

`mine_on_manifold` returns a `MinedTuples` pytree of fixed-size arrays; `finetune_mined`
trains the GeM + whitening head of :mod:`retrieval_jax.training.finetune` (optionally
the last conv block) on them with optax, mining from the initial descriptors and,
optionally, again at every epoch from the current ones.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _checks
from .._precision import HIGHEST as _HIGHEST
from .._progress import progress
from ..diffusion import CG, SparseObservation, diffusion_operator, solve
from ..graph import Graph, connected_components, knn_graph, normalize
from .finetune import embed_with_head, init_head
from .losses import check_triplets
from .step import TrainState, make_train_step

__all__ = ["MinedTuples", "mine_on_manifold", "random_walk_anchors", "stationary_distribution",
           "weighted_triplet_loss", "weighted_contrastive_loss", "finetune_mined"]


# ----------------------------------------------------------------------------- mined tuples
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MinedTuples:
    """Anchors with their manifold positives and Euclidean negatives (fixed-size, padded).

    Attributes:
      anchors: int32[m] item ids of the anchors.
      positives: int32[m, P] ids of P+(anchor), in decreasing manifold similarity.
      positive_mask: bool[m, P], False on padding.
      positive_similarity: float32[m, P] manifold similarity s_anchor(positive) (0 on padding).
      negatives: int32[m, N] ids of P-(anchor), in decreasing Euclidean similarity.
      negative_mask: bool[m, N], False on padding.
    """

    anchors: jax.Array
    positives: jax.Array
    positive_mask: jax.Array
    positive_similarity: jax.Array
    negatives: jax.Array
    negative_mask: jax.Array

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]


# ----------------------------------------------------------------------------- anchors
@functools.partial(jax.jit, static_argnames=("iterations",))
def _power_iteration(graph: Graph, start, *, iterations: int):
    deg = graph.degree()
    inv = jnp.where(deg > 0, 1.0 / jnp.where(deg > 0, deg, 1.0), 0.0)

    def body(_, r):
        # r <- r (I + D^-1 A) / 2 ; A symmetric: (r D^-1 A)_j = (A (r / d))_j
        r = 0.5 * (r + graph.matvec(r * inv))
        return r / jnp.sum(r)

    return jax.lax.fori_loop(0, iterations, body, start)


def stationary_distribution(graph: Graph, nodes=None, *, iterations: int = 1000) -> jax.Array:
    """Stationary distribution pi = pi P of the random walk P = D^-1 A on ``nodes``, by power iteration.

    Iterates the lazy walk r <- r (I + P) / 2 (the same stationary vector, and it also
    converges on a bipartite component) from the uniform distribution on ``nodes``;
    the reference code of Iscen et al. (CVPR 2018) runs 1000 steps of r <- r P.

    Args:
      graph: the symmetric affinity A (`knn_graph`, not normalised), n nodes.
      nodes: int[c] ids of one connected component (default: every node; with several
        components the result then mixes them in proportion to their start mass).
      iterations: power-iteration steps (static).

    Returns:
      float32[n], summing to 1, zero outside ``nodes``.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a retrieval_jax.graph.Graph, got {type(graph).__name__}")
    iterations = _checks.check_positive_int(iterations, "iterations")
    n = graph.num_nodes
    start = np.zeros(n, np.float32)
    if nodes is None:
        start[:] = 1.0 / n
    else:
        nodes = np.asarray(nodes)
        _checks.check_node_ids(nodes, n, "nodes")
        start[nodes] = 1.0 / len(nodes)
    return _power_iteration(graph, jnp.asarray(start), iterations=iterations)


def _largest_component(graph: Graph) -> np.ndarray:
    labels = connected_components(graph)
    return np.flatnonzero(labels == np.argmax(np.bincount(labels)))


def random_walk_anchors(graph: Graph, num: int, *, iterations: int = 1000) -> np.ndarray:
    """The ``num`` strongest 1-hop local maxima of the random walk's stationary vector.

    Within the largest connected component C of A: pi = `stationary_distribution` on C;
    node i is a local maximum if pi_i > pi_j for every neighbour j of i; the anchors
    are the local maxima of largest pi, in decreasing pi (Iscen et al., CVPR 2018, Sec.
    4: anchors for retrieval).

    Args:
      graph: the symmetric affinity A (`knn_graph`).
      num: largest number of anchors (fewer if C has fewer local maxima).
      iterations: power-iteration steps.

    Returns:
      int32[m] node ids, m <= num.
    """
    num = _checks.check_positive_int(num, "num")
    comp = _largest_component(graph)
    pi = np.asarray(stationary_distribution(graph, comp, iterations=iterations))
    idx, w = np.asarray(graph.indices), np.asarray(graph.weights)
    neighbour_pi = np.where(w > 0, pi[idx], -np.inf).max(axis=1, initial=-np.inf)
    in_comp = np.zeros(graph.num_nodes, bool)
    in_comp[comp] = True
    maxima = np.flatnonzero(in_comp & (pi > neighbour_pi))
    order = np.argsort(-pi[maxima], kind="stable")
    return maxima[order[:num]].astype(np.int32)


# ----------------------------------------------------------------------------- mining
def _first_true(keep, width: int):
    """Positions of the first ``width`` True entries of each row (in row order) and their mask."""
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :width]
    return order, jnp.take_along_axis(keep, order, axis=1)


@functools.partial(jax.jit, static_argnames=("pos_k", "neg_k", "num_pos", "num_neg"))
def _mine_chunk(operator, solver, X, anchors, pool, *, pos_k, neg_k, num_pos, num_neg):
    """P+ and P- of a batch of anchors [b] (see the module docstring)."""
    n = X.shape[0]
    b = anchors.shape[0]
    y = SparseObservation(weights=jnp.ones((b, 1), jnp.float32), indices=anchors[:, None], num_nodes=n)
    sm = solve(operator, y, solver).scores.astype(jnp.float32)                   # [b, n]
    se = jnp.matmul(X[anchors], X.T, precision=_HIGHEST)                          # [b, n]
    other = pool[None, :] & (jnp.arange(n)[None, :] != anchors[:, None])
    rows = jnp.arange(b)[:, None]
    se = jnp.where(other, se, -jnp.inf)
    sm_ok = other & (sm > 0)
    sm = jnp.where(sm_ok, sm, -jnp.inf)

    def member(values, k):                       # bool[b, n]: among the row's top k valid values
        v, i = jax.lax.top_k(values, k)
        return jnp.zeros(values.shape, bool).at[rows, i].set(jnp.isfinite(v)), v, i

    # positives: manifold top pos_k outside the Euclidean top pos_k
    eucl_pos, _, _ = member(se, pos_k)
    vm, im = jax.lax.top_k(sm, pos_k)
    keep = jnp.isfinite(vm) & ~eucl_pos[rows, im]
    order, pos_mask = _first_true(keep, num_pos)
    positives = jnp.take_along_axis(im, order, axis=1)
    pos_sim = jnp.where(pos_mask, jnp.take_along_axis(vm, order, axis=1), 0.0)
    # negatives: Euclidean top neg_k outside the manifold top neg_k
    mani_neg, _, _ = member(sm, neg_k)
    ve, ie = jax.lax.top_k(se, neg_k)
    keep = jnp.isfinite(ve) & ~mani_neg[rows, ie]
    order, neg_mask = _first_true(keep, num_neg)
    negatives = jnp.take_along_axis(ie, order, axis=1)
    return (jnp.where(pos_mask, positives, anchors[:, None]).astype(jnp.int32), pos_mask, pos_sim,
            jnp.where(neg_mask, negatives, anchors[:, None]).astype(jnp.int32), neg_mask)


def mine_on_manifold(X, *, k: int = 30, gamma: float = 3.0, alpha: float = 0.99, num_anchors: int | None = None,
                     pos_k: int = 50, neg_k: int | None = None, max_positives: int = 50, max_negatives: int = 50,
                     tol: float = 1e-6, max_iter: int = 20, batch_size: int = 128, walk_iterations: int = 1000,
                     show_progress: bool | None = None) -> MinedTuples:
    """Anchors, hard positives P+ and hard negatives P- mined on the kNN-graph manifold of X.

    Iscen et al., CVPR 2018 (see the module docstring for the definitions): A = mutual
    kNN graph of X (``k``, ``gamma``), W = D^-1/2 A D^-1/2, manifold similarities
    s_q = (I - alpha W)^-1 e_q by batched CG (``batch_size`` anchors per solve,
    ``max_iter`` steps: 20 in the reference code), then

        P+(q) = NN^m_pos_k(q) \\ NN^e_pos_k(q),   P-(q) = NN^e_neg_k(q) \\ NN^m_neg_k(q).

    Args:
      X: float[n, d] descriptors, L2-normalised rows (Euclidean order = inner product order).
      k: neighbours of the kNN graph (30 in the paper).
      gamma: similarity exponent of the affinity (3).
      alpha: diffusion parameter in (0, 1) (0.99).
      num_anchors: None: every item is an anchor (the paper's fine-grained set-up); an
        int: the strongest local maxima of the random walk on the largest component
        (`random_walk_anchors`), and the positives and negatives come from that component.
      pos_k: the k of P+ (50 in the paper).
      neg_k: the k of P- (default: the reference code's min(10000, ceil(n_pool / 2))).
      max_positives: P, the largest positive pool per anchor (50).
      max_negatives: N, the largest negative pool per anchor (50).
      tol: relative residual at which CG stops.
      max_iter: CG steps (static).
      batch_size: anchors per diffusion solve (static; one compilation for all batches).
      walk_iterations: power-iteration steps of the anchor selection.
      show_progress: progress bar over the anchor batches (None: automatic).

    Returns:
      `MinedTuples` with P = min(max_positives, pos_k), N = min(max_negatives, neg_k).

    Raises:
      ValueError: fewer than 2 items, NaN / inf or zero rows in X, k >= n, pos_k or neg_k
        not below the number of items they are drawn from, or bad sizes.
    """
    X = _checks.as_matrix(X, "X")
    n = X.shape[0]
    if n < 2:
        raise ValueError(f"mining needs at least 2 items, got {n}")
    if not _checks.is_int(k) or not 1 <= k < n:
        raise ValueError(f"k must be an int with 1 <= k < n = {n}, got {k!r}")
    for name, v in (("pos_k", pos_k), ("max_positives", max_positives), ("max_negatives", max_negatives),
                    ("max_iter", max_iter), ("batch_size", batch_size)):
        _checks.check_positive_int(v, name)
    graph = knn_graph(X, k, gamma=gamma, mutual=True, show_progress=show_progress)
    if num_anchors is None:
        anchors = np.arange(n, dtype=np.int32)
        pool = np.ones(n, bool)
    else:
        anchors = random_walk_anchors(graph, num_anchors, iterations=walk_iterations)
        if anchors.size == 0:
            raise ValueError("the stationary vector has no strict local maximum on the largest component "
                             "(a regular graph: every node ties); use num_anchors=None (every item an anchor)")
        pool = np.zeros(n, bool)
        pool[_largest_component(graph)] = True
    size = int(pool.sum())
    if neg_k is None:
        neg_k = min(10_000, max(1, math.ceil(size / 2)))
    _checks.check_positive_int(neg_k, "neg_k")
    for name, v in (("pos_k", pos_k), ("neg_k", neg_k)):
        if v >= size:
            raise ValueError(f"{name} = {v} must be smaller than the {size} items mined from "
                             f"(the anchor itself is excluded)")
    operator = diffusion_operator(normalize(graph), alpha)
    solver = CG(_checks.check_positive(tol, "tol"), int(max_iter)).validate()
    num_pos, num_neg = min(max_positives, pos_k), min(max_negatives, neg_k)
    Xd, pool_d = jnp.asarray(X), jnp.asarray(pool)
    bs = min(int(batch_size), len(anchors))
    parts = []
    starts = range(0, len(anchors), bs)
    for s in progress(starts, desc="mining on manifolds", total=len(starts), enable=show_progress):
        chunk = anchors[s:s + bs]
        padded = np.concatenate([chunk, np.full(bs - len(chunk), chunk[0], np.int32)])
        out = _mine_chunk(operator, solver, Xd, jnp.asarray(padded), pool_d, pos_k=int(pos_k), neg_k=int(neg_k),
                          num_pos=num_pos, num_neg=num_neg)
        parts.append([np.asarray(o)[:len(chunk)] for o in out])
    pos, pos_mask, pos_sim, neg, neg_mask = (np.concatenate(p) for p in zip(*parts))
    return MinedTuples(anchors=jnp.asarray(anchors), positives=jnp.asarray(pos), positive_mask=jnp.asarray(pos_mask),
                       positive_similarity=jnp.asarray(pos_sim), negatives=jnp.asarray(neg),
                       negative_mask=jnp.asarray(neg_mask))


# ----------------------------------------------------------------------------- losses
def _f32(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


def _check_tuples(anchor, positive, negative, weight, margin):
    anchor, positive, negative = check_triplets(anchor, positive, negative)
    weight = _f32(weight)
    if weight.shape != anchor.shape[:1]:
        raise ValueError(f"weight must be [P] = {anchor.shape[:1]}, got {weight.shape}")
    if isinstance(margin, (int, float)) and not margin >= 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    return anchor, positive, negative, weight


def _valid(mask, shape, dtype):
    if mask is None:
        return jnp.ones(shape, dtype)
    mask = jnp.asarray(mask)
    if mask.ndim == 1:
        mask = mask[:, None]
    return jnp.broadcast_to(mask.astype(dtype), shape)


def weighted_triplet_loss(anchor, positive, negative, weight, margin: float = 0.5, mask=None) -> jax.Array:
    """Triplet loss with each triplet weighted by its positive's manifold similarity.

      l = sum_ij v_ij w_i [m + ||a_i - p_i||^2 - ||a_i - n_ij||^2]_+ / max(sum_ij v_ij, 1)

    with v the validity mask: the mean over valid triplets of the weighted hinge, as
    ``WeightedTriplet`` in the reference code of Iscen et al. (CVPR 2018), margin 0.5,
    w_i = s_{a_i}(p_i) (`MinedTuples.positive_similarity`).

    Args:
      anchor: float[P, D] L2-normalised embeddings.
      positive: float[P, D].
      negative: float[P, D] or float[P, K, D].
      weight: float[P] weight of each anchor's positive (its manifold similarity).
      margin: m >= 0.
      mask: optional bool[P] or [P, K] valid triplets.
    Returns:
      float32 scalar.
    """
    anchor, positive, negative, weight = _check_tuples(anchor, positive, negative, weight, margin)
    d_pos = jnp.sum((anchor - positive) ** 2, axis=-1)                      # [P]
    d_neg = jnp.sum((anchor[:, None, :] - negative) ** 2, axis=-1)          # [P, K]
    hinge = jnp.maximum(margin + d_pos[:, None] - d_neg, 0.0)
    v = _valid(mask, hinge.shape, hinge.dtype)
    return jnp.sum(v * weight[:, None] * hinge) / jnp.maximum(jnp.sum(v), 1.0)


def weighted_contrastive_loss(anchor, positive, negative, weight, margin: float = 0.7, mask=None) -> jax.Array:
    """Contrastive loss (Hadsell et al., CVPR 2006) with manifold-weighted positive pairs.

      l = ( sum_i u_i w_i ||a_i - p_i||^2 + sum_ij v_ij [m - ||a_i - n_ij||]_+^2 )
          / max(sum_i u_i + sum_ij v_ij, 1)

    u_i = any_j v_ij (an anchor with a valid tuple): the mean over valid pairs, the
    positive pair of anchor i weighted by its manifold similarity w_i.

    Args:
      anchor: float[P, D] L2-normalised embeddings.
      positive: float[P, D].
      negative: float[P, D] or float[P, K, D].
      weight: float[P] weight of each positive pair.
      margin: m >= 0 on distances (0.7 in Radenovic et al.).
      mask: optional bool[P] or [P, K] valid tuples.
    Returns:
      float32 scalar (safe square root: finite gradients for identical descriptors).
    """
    anchor, positive, negative, weight = _check_tuples(anchor, positive, negative, weight, margin)
    d_pos = jnp.sum((anchor - positive) ** 2, axis=-1)
    sq = jnp.sum((anchor[:, None, :] - negative) ** 2, axis=-1)
    pos = sq > 0
    dist = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    hinge = jnp.maximum(margin - dist, 0.0) ** 2
    v = _valid(mask, hinge.shape, hinge.dtype)
    u = jnp.max(v, axis=1)
    total = jnp.sum(u * weight * d_pos) + jnp.sum(v * hinge)
    return total / jnp.maximum(jnp.sum(u) + jnp.sum(v), 1.0)


# ----------------------------------------------------------------------------- training
def _objective(loss: str, margin: float) -> Callable:
    fn = weighted_triplet_loss if loss == "triplet" else weighted_contrastive_loss

    def objective(embed, batch):
        anchor, positive, negative = batch["anchor"], batch["positive"], batch["negative"]
        p, kn = negative.shape[:2]
        flat = jnp.concatenate([anchor, positive, negative.reshape((p * kn,) + negative.shape[2:])], axis=0)
        f = embed(flat)
        return fn(f[:p], f[p:2 * p], f[2 * p:].reshape(p, kn, -1), batch["weight"], margin=margin,
                  mask=batch["mask"])
    return objective


_GROUPS = {"p": "p", "proj": "whiten", "bias": "whiten", "conv_kernel": "conv", "conv_bias": "conv"}


def _optimizer(params, train, *, lr, p_lr_scale):
    has_conv = "conv_kernel" in params
    train = (("p", "conv") if has_conv else ("p", "whiten")) if train is None else tuple(train)
    if set(train) - {"p", "whiten", "conv"} or ("conv" in train and not has_conv):
        raise ValueError(f"train must be a subset of ('p', 'whiten', 'conv') ('conv' needs conv_head), got {train!r}")
    transforms = {"p": optax.adam(lr * p_lr_scale), "whiten": optax.adam(lr), "conv": optax.adam(lr)}
    transforms = {g: (t if g in train else optax.set_to_zero()) for g, t in transforms.items()}
    return optax.multi_transform(transforms, {key: _GROUPS[key] for key in params})


@functools.partial(jax.jit, static_argnames=("negatives",))
def _rank_negatives(desc, mined: MinedTuples, *, negatives: int):
    """Each anchor's ``negatives`` hardest pool negatives under the current descriptors."""
    sims = jnp.einsum("md,mnd->mn", desc[mined.anchors], desc[mined.negatives], precision=_HIGHEST)
    sims = jnp.where(mined.negative_mask, sims, -jnp.inf)
    vals, order = jax.lax.top_k(sims, negatives)
    return jnp.take_along_axis(mined.negatives, order, axis=1), jnp.isfinite(vals)


@functools.partial(jax.jit, static_argnames=("batch", "replace"))
def _sample(key, maps, mined: MinedTuples, neg_idx, neg_ok, *, batch, replace):
    """``batch`` anchors (among those with a positive), a random positive each, their negatives."""
    k_a, k_p = jax.random.split(key)
    has = jnp.any(mined.positive_mask, axis=1)
    rows = jax.random.choice(k_a, mined.num_anchors, (batch,), replace=replace, p=has / jnp.sum(has))
    logits = jnp.where(mined.positive_mask[rows], 0.0, -jnp.inf)
    slot = jax.random.categorical(k_p, logits, axis=-1)
    positive = jnp.take_along_axis(mined.positives[rows], slot[:, None], axis=1)[:, 0]
    weight = jnp.take_along_axis(mined.positive_similarity[rows], slot[:, None], axis=1)[:, 0]
    return {"anchor": maps[mined.anchors[rows]], "positive": maps[positive], "negative": maps[neg_idx[rows]],
            "weight": weight, "mask": neg_ok[rows] & has[rows][:, None]}


def finetune_mined(feature_maps, *, epochs: int = 10, steps_per_epoch: int | None = None, batch: int = 32,
                   lr: float = 1e-3, margin: float = 0.5, loss: str = "triplet", negatives: int = 5,
                   remine: bool = False, k: int = 30, gamma: float = 3.0, alpha: float = 0.99,
                   num_anchors: int | None = None, pos_k: int = 50, neg_k: int | None = None,
                   max_positives: int = 50, max_negatives: int = 50, max_iter: int = 20,
                   dim: int | None = None, conv_head: dict | None = None, train: tuple[str, ...] | None = None,
                   p_lr_scale: float = 10.0, seed: int = 0, init_params: dict | None = None,
                   callback: Callable | None = None, show_progress: bool | None = None,
                   ) -> tuple[dict, dict]:
    """Fine-tune the GeM + whitening head (or the last conv block) without labels, by mining on manifolds.

    Iscen et al., CVPR 2018, on the head of :mod:`retrieval_jax.training.finetune`: the
    descriptors f = l2((l2(GeM_p(A)) - b) W) of the training maps are mined by
    `mine_on_manifold` (before training, and with ``remine`` at the start of every
    epoch, from the current head); each step takes ``batch`` anchors, one random
    positive of P+(anchor) each (weight w = its manifold similarity) and the
    ``negatives`` hardest members of P-(anchor) under the head of that epoch (the
    reference code picks one of the 10 hardest), and applies an Adam step of
    `weighted_triplet_loss` (or `weighted_contrastive_loss`).

    Args:
      feature_maps: float[N, H', W', C] frozen maps of the unlabelled training images
        (with ``conv_head``: the maps entering the last conv block, ``pre_head=True``).
      epochs: passes; an epoch has ``steps_per_epoch`` steps (default ceil(m / batch)
        for m mined anchors).
      steps_per_epoch: optimisation steps per epoch.
      batch: anchors per step.
      lr: learning rate (p uses ``lr * p_lr_scale``).
      margin: triplet margin on squared distances (0.5), or contrastive margin.
      loss: "triplet" or "contrastive".
      negatives: negatives per anchor and step, at most the negative pool size.
      remine: mine again from the current descriptors at every epoch (the previous
        tuples stay if the new ones hold no positive pair).
      k: kNN graph neighbours of the mining.
      gamma: affinity exponent of the mining graph.
      alpha: diffusion parameter of the mining.
      num_anchors: None (every image an anchor) or the number of random-walk anchors.
      pos_k: the k of P+.
      neg_k: the k of P- (`mine_on_manifold`).
      max_positives: largest positive pool per anchor.
      max_negatives: largest negative pool per anchor.
      max_iter: CG steps of the mining diffusion.
      dim: output dimension of the whitening (None: C, identity initialisation).
      conv_head: `conv_head_params(backbone)`: train the last conv block too.
      train: trained parameter groups, a subset of ("p", "whiten", "conv") (default as
        `finetune_head`).
      p_lr_scale: learning-rate factor of GeM p.
      seed: PRNG seed of the sampling.
      init_params: start from these head parameters instead of `init_head`.
      callback: optional ``callback(epoch, params) -> value`` after every epoch (e.g.
        the held-out mAP); the values go to ``history["callback"]``.
      show_progress: progress bar over the steps (None: automatic).

    Returns:
      (params, history) with history {"loss": float32[steps] (before each update),
      "epoch_loss": float32[epochs], "positives": int[epochs] (valid positive pairs
      mined), "callback": list}.
    """
    x = jnp.asarray(feature_maps)
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"feature_maps must be floating [N, H', W', C], got {x.dtype}{tuple(x.shape)}")
    x = x.astype(jnp.float32)
    if loss not in ("triplet", "contrastive"):
        raise ValueError(f"loss must be 'triplet' or 'contrastive', got {loss!r}")
    for name, v in (("epochs", epochs), ("batch", batch), ("negatives", negatives)):
        _checks.check_positive_int(v, name)
    if steps_per_epoch is not None:
        _checks.check_positive_int(steps_per_epoch, "steps_per_epoch")
    if negatives > max_negatives:
        raise ValueError(f"negatives = {negatives} exceeds the negative pool size max_negatives = {max_negatives}")
    if init_params is None:
        params = init_head(x, dim=dim, conv_head=conv_head)
    else:
        params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(init_params))
    mine = functools.partial(mine_on_manifold, k=k, gamma=gamma, alpha=alpha, num_anchors=num_anchors, pos_k=pos_k,
                             neg_k=neg_k, max_positives=max_positives, max_negatives=max_negatives,
                             max_iter=max_iter, show_progress=False)
    desc = embed_with_head(params, x)
    mined = mine(np.asarray(desc))
    if negatives > mined.negatives.shape[1]:
        raise ValueError(f"negatives = {negatives} exceeds the {mined.negatives.shape[1]} pool slots")
    if not bool(np.asarray(mined.positive_mask).any()):
        raise ValueError("no anchor has a manifold positive (P+ is empty everywhere): the kNN graph is too "
                         "fragmented for these settings; raise k or pos_k")
    optimizer = _optimizer(params, train, lr=lr, p_lr_scale=p_lr_scale)
    state = TrainState.create(params, optimizer)
    train_step = make_train_step(embed_with_head, _objective(loss, margin), optimizer)
    key = jax.random.PRNGKey(seed)
    history = {"loss": [], "epoch_loss": [], "positives": [], "callback": []}
    for epoch in range(int(epochs)):
        if epoch and remine:
            fresh = mine(np.asarray(desc))
            if bool(np.asarray(fresh.positive_mask).any()):   # else keep the previous tuples
                mined = fresh
        history["positives"].append(int(np.asarray(mined.positive_mask).sum()))
        neg_idx, neg_ok = _rank_negatives(desc, mined, negatives=int(negatives))
        steps = steps_per_epoch or max(1, math.ceil(mined.num_anchors / batch))
        replace = int(np.asarray(mined.positive_mask).any(axis=1).sum()) < batch
        values = []
        for _ in progress(range(steps), desc=f"mined fine-tuning, epoch {epoch + 1}/{epochs}", total=steps,
                          enable=show_progress):
            key, sub = jax.random.split(key)
            b = _sample(sub, x, mined, neg_idx, neg_ok, batch=int(batch), replace=replace)
            state, value = state.apply(train_step, b)
            values.append(value)
        values = np.asarray(jax.device_get(jnp.stack(values)), np.float32)
        history["loss"].extend(values.tolist())
        history["epoch_loss"].append(float(values.mean()))
        desc = embed_with_head(state.params, x)
        if callback is not None:
            history["callback"].append(callback(epoch, state.params))
    history["loss"] = np.asarray(history["loss"], np.float32)
    history["epoch_loss"] = np.asarray(history["epoch_loss"], np.float32)
    return state.params, history
