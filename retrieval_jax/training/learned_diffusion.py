"""Learned diffusion: alpha, gamma and a descriptor projection trained through the graph.

The whole retrieval pipeline of Iscen et al. (CVPR 2017) as one differentiable
function of its parameters,

    Z = rows_l2(X P),   W = normalize(knn_graph(Z, k, gamma)),   S = (I - alpha W)^-1 Y^T,

with alpha = ALPHA_MAX sigmoid(a), gamma = softplus(g) and P = I + D
(`LearnedDiffusionParams`). The kNN graph is rebuilt in the trace from the projected
descriptors (`graph.knn_graph` on traced arrays: an exact search, fixed widths), so
gradients reach P through the graph's weights and alpha, gamma through the solve,
whose derivative is implicit (`diffusion.diffuse`: the backward pass is one more CG
solve). Manifold ranking is Zhou et al. (NIPS 2003).

The objective (`listwise_loss`) is a listwise softmax cross-entropy over the
diffusion scores of every item as a query, so training needs no pairs or triplets:
only class labels of the training collection.

Everything here is pure and composes with ``jax.jit``, ``vmap`` and ``grad``: the
shape-deciding arguments (k, mutual, max_iter) are static, the values (the
parameters, tol, temperature) may be traced. ``experiments/learn_diffusion.py``
trains and evaluates it on COIL-20 and MPEG-7.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _checks
from ..descriptors.pooling import l2_normalize
from ..diffusion import diffuse
from ..graph import knn_graph, normalize

__all__ = ["ALPHA_MAX", "LearnedDiffusionParams", "learned_diffusion_scores", "learned_diffusion_step",
           "listwise_loss", "listwise_objective", "project"]

# alpha = ALPHA_MAX sigmoid(a) stays below 1: at alpha = 1 (a saturated float32 sigmoid)
# I - alpha W is singular, CG diverges and the gradient is NaN
ALPHA_MAX = 0.9995


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LearnedDiffusionParams:
    """Unconstrained parameters of a learned diffusion (a pytree: optax updates them as is).

      alpha = ALPHA_MAX sigmoid(a) in (0, ALPHA_MAX),  gamma = softplus(g) > 0,  P = I + D.

    Attributes:
      a: float scalar; g: float scalar; D: float[d, d] (0 at the start: P = I).
    """

    a: jax.Array
    g: jax.Array
    D: jax.Array

    @property
    def alpha(self) -> jax.Array:
        return ALPHA_MAX * jax.nn.sigmoid(self.a)

    @property
    def gamma(self) -> jax.Array:
        return jax.nn.softplus(self.g)

    @property
    def projection(self) -> jax.Array:
        """P = I + D, float[d, d]."""
        return jnp.eye(self.D.shape[0], dtype=self.D.dtype) + self.D

    @classmethod
    def create(cls, d: int, alpha: float = 0.99, gamma: float = 3.0,
               dtype=jnp.float32) -> "LearnedDiffusionParams":
        """The parameters of plain diffusion at (alpha, gamma) on the unprojected descriptors (D = 0).

        a = logit(alpha / ALPHA_MAX), g = log(exp(gamma) - 1) (the inverse of softplus).
        """
        d = _checks.check_positive_int(d, "d")
        alpha = float(alpha)
        if not 0.0 < alpha < ALPHA_MAX:
            raise ValueError(f"alpha must be in (0, {ALPHA_MAX}) (the sigmoid's range), got {alpha}")
        gamma = float(_checks.check_gamma(gamma))
        a0 = alpha / ALPHA_MAX
        return cls(a=jnp.asarray(np.log(a0 / (1.0 - a0)), dtype),
                   g=jnp.asarray(np.log(np.expm1(gamma)), dtype),
                   D=jnp.zeros((d, d), dtype))

    @classmethod
    def labels(cls, a="a", g="g", D="D") -> "LearnedDiffusionParams":
        """The same structure holding one label per field, for ``optax.multi_transform``."""
        return cls(a=a, g=g, D=D)


def project(X, P) -> jax.Array:
    """Z = rows_l2(X P): the projected, L2-normalised descriptors.

    Args:
      X: float[n, d] descriptors; P: float[d, d'] projection.
    Returns:
      float[n, d'] unit rows (a zero row stays 0, with a finite gradient: `l2_normalize`).
    Cost O(n d d').
    """
    X, P = jnp.asarray(X), jnp.asarray(P)
    if X.ndim != 2 or P.ndim != 2 or X.shape[1] != P.shape[0]:
        raise ValueError(f"X must be [n, d] and P [d, d'], got {tuple(X.shape)} and {tuple(P.shape)}")
    return l2_normalize(X @ P, axis=1)


def _check_params(params):
    if not isinstance(params, LearnedDiffusionParams):
        raise TypeError(f"params must be LearnedDiffusionParams (LearnedDiffusionParams.create(d)), "
                        f"got {type(params).__name__}")


def learned_diffusion_scores(params: LearnedDiffusionParams, X, y, *, k: int, mutual: bool = True,
                             tol: float = 1e-6, max_iter: int = 300) -> jax.Array:
    """Diffusion scores of the learned pipeline: S = (I - alpha W)^-1 applied to each row of y.

      Z = rows_l2(X P),  A = knn_graph(Z, k, gamma) (A_ij = max(<z_i, z_j>, 0)^gamma on
      the (mutual) kNN pairs),  W = D^-1/2 A D^-1/2,  (I - alpha W) s_q = y_q.

    Iscen et al. (CVPR 2017), with the graph rebuilt from the projected descriptors.
    Differentiable with respect to ``params`` (a, g, D), X and y; the solve's
    derivative is implicit (one more CG solve). Cost: the kNN search O(n^2 d) plus
    at most ``max_iter`` CG steps of O(n k nq).

    Args:
      params: `LearnedDiffusionParams` (traced or concrete).
      X: float[n, d] descriptors; y: float[nq, n] observations (``jnp.eye(n)``: every
        item a query).
      k: neighbours per node (static, 1 <= k < n); mutual: reciprocal pairs only (static).
      tol: CG relative residual (may be traced); max_iter: CG steps (static).
    Returns:
      float[nq, n] scores.
    """
    _check_params(params)
    W = normalize(knn_graph(project(X, params.projection), k, gamma=params.gamma, mutual=mutual))
    return diffuse(W, y, alpha=params.alpha, tol=tol, max_iter=max_iter)


def _positives(labels, n: int):
    labels = jnp.asarray(labels)
    if labels.ndim == 1 and labels.shape[0] == n:
        same = labels[:, None] == labels[None, :]
    elif labels.ndim == 2 and labels.shape[0] == n:
        same = (labels @ labels.T) > 0           # multi-hot: sharing any class
    else:
        raise ValueError(f"labels must be [n] class ids or [n, c] one-hot rows with n = {n}, "
                         f"got shape {tuple(labels.shape)}")
    return same & ~jnp.eye(n, dtype=bool)


def listwise_loss(S, labels, temperature=0.05) -> jax.Array:
    """Listwise softmax cross-entropy of every item's scores against its own class.

    With every item q a query of the collection (S[q] its scores to all items), the
    query's own entry is masked and each row scaled by its largest other score
    (diffusion scores grow like 1 / (1 - alpha); the scaling keeps the temperature
    meaningful for every alpha; a row whose largest other score is <= 0, e.g. an
    isolated node of a mutual graph, is left unscaled):

      m_q = max_{j != q} S_qj,  l_qj = S_qj / (m_q if m_q > 0 else 1) / T  (j != q),
      L = -1/n sum_q 1/|P_q| sum_{p in P_q} log softmax_{j != q}(l_q)_p

    with P_q the other items of q's class (a query without positives adds 0 but is
    counted in the 1/n): the cross-entropy of ListNet's top-one probabilities (Cao et
    al., ICML 2007) against the uniform distribution on P_q. Differentiable everywhere
    (no -inf enters the softmax). Cost O(n^2).

    Args:
      S: float[n, n] scores, rows the queries (`learned_diffusion_scores` with y = I).
      labels: int[n] class ids, or float[n, c] one-hot / multi-hot rows (positives
        share a class).
      temperature: T > 0 (may be traced).
    Returns:
      float scalar.
    """
    S = jnp.asarray(S)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be [n, n] (every item a query), got shape {tuple(S.shape)}")
    if not _checks.is_traced(temperature):
        _checks.check_positive(temperature, "temperature")
    n = S.shape[0]
    eye = jnp.eye(n, dtype=bool)
    pos = _positives(labels, n)
    S = jnp.where(eye, 0.0, S)                     # never -inf: its gradient would be NaN
    # an isolated query has max S = 0: a floor like 1e-30 makes d(S / m)/dm = -S / m^2
    # overflow float32 (0 * inf = NaN), so such a row is divided by 1 instead
    scale = jnp.max(S, axis=1, keepdims=True)     # = m_q when m_q > 0 (the diagonal is 0)
    S = S / jnp.where(scale > 0, scale, 1.0)
    logits = jnp.where(eye, -1e4, S / temperature)
    logp = jax.nn.log_softmax(logits, axis=1)
    per_query = jnp.sum(jnp.where(pos, logp, 0.0), axis=1) / jnp.maximum(jnp.sum(pos, axis=1), 1)
    return -jnp.mean(per_query)


def listwise_objective(params: LearnedDiffusionParams, X, labels, *, k: int, mutual: bool = True,
                       tol: float = 1e-6, max_iter: int = 300, temperature=0.05) -> jax.Array:
    """`listwise_loss` of `learned_diffusion_scores` with every item a query (y = I).

    X: float[n, d]; labels: int[n] or float[n, c]; the rest as in the two functions.
    Its gradient with respect to ``params`` costs about two diffusions (forward and
    the implicit backward solve).
    """
    X = jnp.asarray(X)
    y = jnp.eye(X.shape[0], dtype=X.dtype if jnp.issubdtype(X.dtype, jnp.floating) else jnp.float32)
    S = learned_diffusion_scores(params, X, y, k=k, mutual=mutual, tol=tol, max_iter=max_iter)
    return listwise_loss(S, labels, temperature)


def learned_diffusion_step(optimizer: optax.GradientTransformation, *, k: int, mutual: bool = True,
                           tol: float = 1e-6, max_iter: int = 300, temperature: float = 0.05) -> Callable:
    """A jitted optimisation step of `listwise_objective`.

      step(params, opt_state, X, labels) -> (params', opt_state', loss, finite)

    with loss the objective at ``params`` (before the update) and ``finite`` whether
    the loss and every gradient entry are finite (wrap the optimizer in
    ``optax.apply_if_finite`` to skip the others). One XLA program: the kNN graph,
    the diffusion, its implicit backward solve and the update.
    """
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("optimizer must be an optax.GradientTransformation (with init and update)")

    def objective(params, X, labels):
        return listwise_objective(params, X, labels, k=k, mutual=mutual, tol=tol, max_iter=max_iter,
                                  temperature=temperature)

    @jax.jit
    def step(params, opt_state, X, labels):
        loss, grads = jax.value_and_grad(objective)(params, X, labels)
        finite = jnp.isfinite(loss)
        for g in jax.tree_util.tree_leaves(grads):
            finite = finite & jnp.all(jnp.isfinite(g))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, finite

    return step
