"""Fine-tuning a GeM + whitening head on frozen CNN feature maps (metric learning).

The recipe of Radenovic, Tolias & Chum ("Fine-tuning CNN image retrieval with no
human annotation", TPAMI 2018), restricted to the cheap part of the network so it
runs on a CPU in seconds:

1. the backbone (EfficientNet-Lite0, ImageNet weights) is frozen and its last
   conv feature maps ``A [N, H', W', C]`` are computed once
   (:func:`retrieval_jax.data.feature_maps.coil20_feature_maps`,
   :func:`retrieval_jax.backbones.surgery.backbone_feature_maps`);
2. the descriptor of an image is

       g_c(p) = ( mean_{h,w} max(A[h, w, c], eps)^p )^(1/p)        (GeM, learnable p)
       f      = l2( (l2(g(p)) - b) W )                            (learned whitening)

   with ``W [C, D]`` initialised to the identity (``D = C``) and ``b = 0``, so
   that at step 0 ``f`` is exactly the ImageNet GeM descriptor ``l2(g(3))``; with
   ``dim = D < C``, ``W`` starts as the top-D (uncentred) PCA basis of the
   training descriptors instead (an orthonormal projection, so step 0 is GeM
   restricted to its main subspace);
   Optionally the last conv block of the backbone is trained too (cheap: for
   EfficientNet-Lite0 it is a 1x1 conv 320 -> 1280 + batch norm + ReLU6, i.e. a
   per-position affine map). The frozen maps are then the block's *input*
   ``B [N, H', W', 320]`` (``backbone_feature_maps(..., pre_head=True)``), batch
   norm is folded into the conv (inference statistics) and

       A = relu6( B K + c ),   K = K_conv diag(gamma / sqrt(var + eps)),
                               c = beta - mu gamma / sqrt(var + eps),

   which reproduces ``backbone.features`` exactly at step 0
   (:func:`retrieval_jax.backbones.surgery.conv_head_params`);
3. the parameters ``theta = (p, W, b[, K, c])`` are trained with optax (Adam) on the
   triplet loss (Schroff et al., CVPR 2015)

       l = [ m + ||f_a - f_p||^2 - ||f_a - f_n||^2 ]_+

   (or the contrastive loss of Hadsell et al., CVPR 2006, as in Radenovic et al.)
   where every anchor ``a`` gets a random positive ``p`` of its class and its
   ``K`` hardest negatives ``n``: the most similar images of other classes under
   the *current* descriptors, re-mined every ``mine_every`` steps (Radenovic et
   al. re-mine once per epoch).

The optimisation step is :func:`retrieval_jax.training.step.make_train_step`
(one XLA computation per step); batch sampling and mining are jitted as well,
so the host loop only dispatches work (no device -> host transfer until the end).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._precision import HIGHEST as _HIGHEST
from .. import _checks
from ..backbones.surgery import check_lite, pre_head_maps
from ..descriptors.pooling import gem, l2_normalize
from .checkpoints import load_checkpoint, save_checkpoint
from .losses import mine_hard_negatives
from .step import TrainState, contrastive_objective, make_train_step, triplet_objective

__all__ = [
    "init_head", "embed_with_head", "finetune_head", "load_head", "head_model", "apply_conv_head",
]



# ----------------------------------------------------------------------------- the head
def _check_maps(feature_maps) -> jax.Array:
    x = jnp.asarray(feature_maps)
    if x.ndim != 4:
        raise ValueError(f"feature_maps must be [N, H', W', C], got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"feature_maps must be floating point, got {x.dtype}")
    return x


def init_head(feature_maps=None, *, channels: int | None = None, dim: int | None = None,
              p: float = 3.0, conv_head: dict | None = None) -> dict:
    """Initial head parameters ``{"p": f32[], "proj": f32[C, D], "bias": f32[C]}``.

    ``dim=None``: W = I (C x C), so `embed_with_head` equals l2(GeM_p) exactly.
    ``dim=D < C``: W = top-D eigenvectors of the uncentred second moment
    sum_i g_i g_i^T of the (L2-normalised) GeM descriptors of ``feature_maps``.
    ``conv_head``: `conv_head_params` of the backbone; then ``feature_maps`` are
    the pre-head maps and the result also holds ``conv_kernel`` and ``conv_bias``.
    """
    if conv_head is not None:
        conv_head = {k: jnp.asarray(conv_head[k], jnp.float32) for k in ("conv_kernel", "conv_bias")}
        if feature_maps is not None:
            if jnp.shape(feature_maps)[-1] != conv_head["conv_kernel"].shape[0]:
                raise ValueError(f"the conv head takes C_in = {conv_head['conv_kernel'].shape[0]} "
                                 f"channels, feature maps have {jnp.shape(feature_maps)[-1]}; use "
                                 "backbone_feature_maps(..., pre_head=True)")
            feature_maps = _conv(conv_head, _check_maps(feature_maps))
        channels = int(conv_head["conv_kernel"].shape[1])
    elif feature_maps is not None:
        channels = int(jnp.shape(feature_maps)[-1])
    if channels is None:
        raise ValueError("give feature_maps or channels")
    if not p >= 1.0:
        raise ValueError(f"GeM p must be >= 1, got {p}")
    if dim is None or dim == channels:
        proj = jnp.eye(channels, dtype=jnp.float32)
    else:
        if feature_maps is None:
            raise ValueError("a PCA initialisation (dim < C) needs feature_maps")
        if not 1 <= dim <= channels:
            raise ValueError(f"dim must lie in [1, C = {channels}], got {dim}")
        g = np.asarray(l2_normalize(gem(_check_maps(feature_maps), p)), np.float64)
        evals, evecs = np.linalg.eigh(g.T @ g)
        proj = jnp.asarray(evecs[:, np.argsort(evals)[::-1][:dim]], jnp.float32)
    params = {"p": jnp.asarray(p, jnp.float32), "proj": proj,
              "bias": jnp.zeros((channels,), jnp.float32)}
    if conv_head is not None:
        params.update(conv_head)
    return params


def _conv(params, maps):
    """A = relu6(B K + c), the (BN-folded) last conv block."""
    a = jnp.einsum("nhwi,io->nhwo", maps.astype(jnp.float32), params["conv_kernel"],
                   precision=_HIGHEST) + params["conv_bias"]
    return jnp.clip(a, 0.0, 6.0)


def apply_conv_head(params: dict, pre_maps) -> jax.Array:
    """Last conv maps A = relu6(B K + c) [N, H', W', C] from pre-head maps B [N, H', W', C_in]
    (``params`` from `conv_head_params` or a fine-tuned head). Jitted."""
    return _conv_jit(params, _check_maps(pre_maps))


def _embed(params, maps):
    """f = l2( (l2(GeM_p(A)) - b) W ), p clamped to >= 1; A = maps or _conv(maps)."""
    if "conv_kernel" in params:
        maps = _conv(params, maps)
    p = jnp.maximum(params["p"], jnp.float32(1.0))
    g = l2_normalize(gem(maps.astype(jnp.float32), p))
    return l2_normalize(jnp.matmul(g - params["bias"], params["proj"], precision=_HIGHEST))


_embed_jit = jax.jit(_embed)
_conv_jit = jax.jit(_conv)


def embed_with_head(params: dict, feature_maps) -> jax.Array:
    """Descriptors float32[N, D] of feature maps ``[N, H', W', C]`` under ``params``.

    f = l2( (l2(GeM_p(A)) - b) W ) (see the module docstring). Jitted.
    """
    x = _check_maps(feature_maps)
    c = params["conv_kernel"].shape[0] if "conv_kernel" in params else params["proj"].shape[0]
    if x.shape[-1] != c:
        raise ValueError(f"head expects C = {c} channels, feature maps have {x.shape[-1]}")
    return _embed_jit(params, x)


# ----------------------------------------------------------------------------- training
@functools.partial(jax.jit, static_argnames=("num",))
def _mine_all(params, maps, labels, *, num):
    desc = _embed(params, maps)
    sims, idx = mine_hard_negatives(desc, labels, desc, labels, num)
    return idx, jnp.isfinite(sims)


@functools.partial(jax.jit, static_argnames=("batch", "loss"))
def _sample(key, maps, labels, neg_idx, neg_ok, *, batch, loss):
    """One batch: ``batch`` random anchors, a random positive each (same label, not
    itself), and the pre-mined hard negatives of each anchor."""
    n = labels.shape[0]
    k_a, k_p = jax.random.split(key)
    anchors = jax.random.choice(k_a, n, (batch,), replace=False)
    la = labels[anchors]
    same = (labels[None, :] == la[:, None]) & (jnp.arange(n)[None, :] != anchors[:, None])
    logits = jnp.where(same, jnp.float32(0.0), -jnp.inf)
    positives = jax.random.categorical(k_p, logits, axis=-1)
    pos_ok = jnp.any(same, axis=-1)
    if loss == "triplet":
        return {"anchor": maps[anchors], "positive": maps[positives],
                "negative": maps[neg_idx[anchors]],                   # [P, K, H', W', C]
                "mask": neg_ok[anchors] & pos_ok[:, None]}
    # contrastive: P positive pairs and P * K negative pairs (Radenovic et al. tuples)
    k = neg_idx.shape[1]
    a = jnp.concatenate([anchors, jnp.repeat(anchors, k)])
    b = jnp.concatenate([positives, neg_idx[anchors].reshape(-1)])
    target = jnp.concatenate([jnp.ones((batch,), jnp.float32), jnp.zeros((batch * k,), jnp.float32)])
    mask = jnp.concatenate([pos_ok, neg_ok[anchors].reshape(-1)])
    return {"a": maps[a], "b": maps[b], "target": target, "mask": mask}


def finetune_head(feature_maps, labels, *, steps: int = 200, lr: float = 1e-3,
                  margin: float = 0.3, seed: int = 0, loss: str = "triplet",
                  batch: int = 32, negatives: int = 5, mine_every: int = 20,
                  dim: int | None = None, p_lr_scale: float = 10.0,
                  weight_decay: float = 0.0, conv_head: dict | None = None,
                  train: tuple[str, ...] | None = None, checkpoint=None, init_params=None,
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Fine-tune GeM p and the whitening head (and optionally the last conv block).

    Args:
      feature_maps: float[N, H', W', C] frozen backbone maps of the training images
        (with ``conv_head``: the maps entering the last conv block, ``pre_head=True``).
      labels: int[N] class (object / landmark) of each image; every class should have
        at least 2 images (anchors of singleton classes are masked out).
      steps: optimisation steps (Adam; one batch each).
      lr: learning rate of W and b; p uses ``lr * p_lr_scale`` (a single scalar
        moves slowly otherwise; Radenovic et al. also give p a larger rate).
      margin: triplet margin m on squared distances of unit vectors (in [0, 4]), or
        the contrastive margin on distances (``loss="contrastive"``; 0.7 in the paper).
      seed: PRNG seed of batch sampling (the initialisation is deterministic).
      loss: "triplet" (`triplet_objective`) or "contrastive" (`contrastive_objective`).
      batch: anchors per step P; negatives: hard negatives per anchor K.
      mine_every: re-mine the K hardest negatives of every training image with the
        current head every so many steps (an N x N similarity matrix: meant for
        training sets of up to a few ten thousand images).
      dim: output dimension D (None: C, identity initialisation; else PCA init).
      weight_decay: decoupled (AdamW) decay of the trained matrices (0 disables it).
      conv_head: `conv_head_params(backbone)`: also fine-tune the last conv block.
      train: which parameter groups are updated, a subset of ("p", "whiten", "conv");
        default ("p", "conv") with ``conv_head`` (on COIL-20 this transfers to unseen
        objects better than training the whitening too), else ("p", "whiten").
      checkpoint: optional ``.npz`` path; the final `TrainState` is written there
        atomically with `save_checkpoint` (read it back with `load_head`).
      init_params: start from these parameters instead of `init_head`.
    Returns:
      (params, history) with history {"loss": float32[steps], "p": float32[steps]}
      (the loss and p *before* each update, so ``history["loss"][0]`` is the loss of
      the ImageNet GeM descriptor).
    """
    x, y = _check_training_set(feature_maps, labels, loss=loss, steps=steps, batch=batch,
                               negatives=negatives, mine_every=mine_every)
    params = _initial_params(x, dim=dim, conv_head=conv_head, init_params=init_params)
    optimizer = _head_optimizer(params, train, lr=lr, p_lr_scale=p_lr_scale,
                                weight_decay=weight_decay)
    objective = triplet_objective(margin) if loss == "triplet" else contrastive_objective(margin)
    train_step = make_train_step(_embed, objective, optimizer)
    state = TrainState.create(params, optimizer)
    state, history = _train_loop(state, train_step, x, jnp.asarray(y, jnp.int32), steps=int(steps),
                                 seed=seed, loss=loss, batch=int(batch), negatives=int(negatives),
                                 mine_every=mine_every)
    if checkpoint is not None:
        save_checkpoint(checkpoint, state)
    return state.params, history


def _check_training_set(feature_maps, labels, *, loss, steps, batch, negatives, mine_every):
    """(float32 maps, int labels) after checking the arguments of `finetune_head`."""
    x = _check_maps(feature_maps).astype(jnp.float32)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be [N] = [{x.shape[0]}], got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers, got {y.dtype}")
    if loss not in ("triplet", "contrastive"):
        raise ValueError(f"loss must be 'triplet' or 'contrastive', got {loss!r}")
    for name, v in (("steps", steps), ("batch", batch), ("negatives", negatives),
                    ("mine_every", mine_every)):
        _checks.check_positive_int(v, name)
    n = x.shape[0]
    if batch > n:
        raise ValueError(f"batch = {batch} exceeds the {n} training images")
    if not negatives <= n - 1:
        raise ValueError(f"negatives = {negatives} must be < N = {n}")
    if len(np.unique(y)) < 2:
        raise ValueError("need at least two classes to mine negatives")
    return x, y


def _initial_params(x, *, dim, conv_head, init_params) -> dict:
    """`init_head` parameters, or ``init_params`` as float32 arrays."""
    if init_params is None:
        return init_head(x, dim=dim, conv_head=conv_head)
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), dict(init_params))


_GROUPS = {"p": "p", "proj": "whiten", "bias": "whiten", "conv_kernel": "conv", "conv_bias": "conv"}


def _head_optimizer(params, train, *, lr, p_lr_scale, weight_decay):
    """Adam (AdamW with ``weight_decay``) on the trained groups, p at ``lr * p_lr_scale``,
    the groups not in ``train`` frozen."""
    has_conv = "conv_kernel" in params
    train = (("p", "conv") if has_conv else ("p", "whiten")) if train is None else tuple(train)
    unknown = set(train) - {"p", "whiten", "conv"}
    if unknown or ("conv" in train and not has_conv):
        raise ValueError(f"train must be a subset of ('p', 'whiten', 'conv') ('conv' needs "
                         f"conv_head), got {train!r}")
    main = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    transforms = {"p": optax.adam(lr * p_lr_scale), "whiten": main, "conv": main}
    transforms = {g: (t if g in train else optax.set_to_zero()) for g, t in transforms.items()}
    return optax.multi_transform(transforms, {k: _GROUPS[k] for k in params})


def _train_loop(state, train_step, x, labels, *, steps, seed, loss, batch, negatives, mine_every):
    """``steps`` updates, re-mining the hard negatives every ``mine_every`` steps:
    (final state, {"loss": float32[steps], "p": float32[steps]})."""
    key = jax.random.PRNGKey(seed)
    losses, ps = [], []
    neg_idx = neg_ok = None
    for step in range(steps):
        if step % mine_every == 0:
            neg_idx, neg_ok = _mine_all(state.params, x, labels, num=negatives)
        key, sub = jax.random.split(key)
        b = _sample(sub, x, labels, neg_idx, neg_ok, batch=batch, loss=loss)
        ps.append(state.params["p"])
        state, value = state.apply(train_step, b)
        losses.append(value)
    history = {"loss": np.asarray(jax.device_get(jnp.stack(losses)), np.float32),
               "p": np.asarray(jax.device_get(jnp.stack(ps)), np.float32)}
    return state, history


class _HeadFeatures:
    """images -> fine-tuned last conv maps (hashable by identity: a static jit argument)."""

    def __init__(self, backbone, params):
        self.backbone, self.params = backbone, params

    def __call__(self, images):
        b = self.backbone
        if "conv_kernel" not in self.params:
            return b.features(images)
        x = images.astype(jnp.float32)
        pre = pre_head_maps(b.graphdef, b.state, x, mean=b.mean, std=b.std)
        return _conv(self.params, pre.astype(jnp.float32))


class _HeadPooling:
    """maps -> (l2(GeM_p(maps)) - b) W (the caller L2-normalises)."""

    def __init__(self, params):
        self.params = params

    def __call__(self, maps):
        p = jnp.maximum(self.params["p"], jnp.float32(1.0))
        g = l2_normalize(gem(maps.astype(jnp.float32), p))
        return jnp.matmul(g - self.params["bias"], self.params["proj"], precision=_HIGHEST)


def head_model(backbone, params) -> tuple:
    """(features_fn, pooling_fn) with l2(pooling_fn(features_fn(images))) the fine-tuned
    descriptor of images [B, H, W, 3] in [0, 1] (end to end, differentiable), e.g. for
    `retrieval_jax.explanation.saliency.similarity_saliency(features_fn, pooling_fn, ...)`.
    Build it once per ``params`` (the pair is a static jit argument there)."""
    if "conv_kernel" in params:
        check_lite(backbone)
    return _HeadFeatures(backbone, params), _HeadPooling(params)


def load_head(path) -> dict:
    """Head parameters from a checkpoint written by ``finetune_head(checkpoint=...)``."""
    tree = load_checkpoint(os.fspath(path))
    params = tree["params"] if "params" in tree else tree
    missing = {"p", "proj", "bias"} - set(params)
    if missing:
        raise ValueError(f"{path} holds no head parameters (missing {sorted(missing)})")
    keys = ("p", "proj", "bias", "conv_kernel", "conv_bias")
    return {k: params[k] for k in keys if k in params}
