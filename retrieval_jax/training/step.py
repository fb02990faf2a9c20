"""Fine-tuning loop pieces: a jitted optax train step and a train-state pytree
(checkpointed by :mod:`retrieval_jax.training.checkpoints`).

The step is backbone-agnostic: ``embed_fn(params, images) -> descriptors`` can be
a projection head on frozen features, a backbone + pooling (`pooling.gem`, ...),
or anything differentiable; ``loss(embed, batch) -> scalar`` gets ``embed``, the
embedding function with the current parameters closed over, so it decides which
images of the batch to embed (see `triplet_objective`, `contrastive_objective`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .losses import contrastive_loss, triplet_loss

__all__ = ["TrainState", "make_train_step", "triplet_objective", "contrastive_objective"]


# ----------------------------------------------------------------------------- train state
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, optimizer state and step counter, as one pytree (checkpointable).

    Attributes:
      params: any pytree of arrays.
      opt_state: the optax state of ``params``.
      step: int32 scalar, number of updates applied.
    """

    params: Any
    opt_state: Any
    step: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> "TrainState":
        return cls(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def apply(self, train_step: Callable, batch) -> tuple["TrainState", jax.Array]:
        """Run ``train_step`` (from `make_train_step`) on this state: (new_state, loss)."""
        params, opt_state, loss = train_step(self.params, self.opt_state, batch)
        return TrainState(params=params, opt_state=opt_state, step=self.step + 1), loss


def make_train_step(embed_fn: Callable, loss: Callable, optimizer: optax.GradientTransformation,
                    *, donate: bool = False) -> Callable:
    """A jitted optimisation step for descriptor learning.

      step(params, opt_state, batch) -> (params', opt_state', loss_value)

    with loss_value = loss(lambda images: embed_fn(params, images), batch) and
    params' = params + optimizer.update(grad loss_value). The whole step (forward,
    backward, update) is one XLA computation: nothing leaves the device.

    Args:
      embed_fn: (params, images) -> float[B, D] descriptors.
      loss: (embed, batch) -> float scalar, e.g. `triplet_objective()`.
      optimizer: an ``optax.GradientTransformation``.
      donate: donate params and opt_state buffers to the step (saves memory on
        accelerators; the inputs must not be reused afterwards).
    """
    if not callable(embed_fn):
        raise TypeError(f"embed_fn must be callable (params, images) -> descriptors, got {embed_fn!r}")
    if not callable(loss):
        raise TypeError(f"loss must be callable (embed, batch) -> scalar, got {loss!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError("optimizer must be an optax.GradientTransformation (with init and update)")

    def step(params, opt_state, batch):
        def objective(p):
            value = loss(lambda images: embed_fn(p, images), batch)
            if jnp.ndim(value) != 0:
                raise ValueError(f"loss must return a scalar, got shape {jnp.shape(value)}")
            return value

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _embed_groups(embed, groups):
    """Embed several image arrays with one call (one forward pass, shared batch stats)."""
    sizes = [g.shape[0] for g in groups]
    desc = embed(jnp.concatenate(groups, axis=0))
    out, start = [], 0
    for s in sizes:
        out.append(desc[start:start + s])
        start += s
    return out


def triplet_objective(margin: float = 0.1) -> Callable:
    """Loss for `make_train_step` on triplet batches (`losses.triplet_loss`).

    batch: {"anchor": [P, ...], "positive": [P, ...], "negative": [P, K, ...] or
    [P, ...], optional "mask": [P] or [P, K] valid triplets}, "..." being the image
    (or feature) shape that ``embed_fn`` takes.
    """
    def objective(embed, batch):
        anchor, positive, negative = (jnp.asarray(batch[k]) for k in ("anchor", "positive", "negative"))
        p = anchor.shape[0]
        if negative.shape[1:] == anchor.shape[1:]:
            negative = negative[:, None]
        k = negative.shape[1]
        a, pos, neg = _embed_groups(embed, [anchor, positive, negative.reshape((p * k,) + anchor.shape[1:])])
        return triplet_loss(a, pos, neg.reshape(p, k, -1), margin=margin, mask=batch.get("mask"))
    return objective


def contrastive_objective(margin: float = 0.7) -> Callable:
    """Loss for `make_train_step` on pair batches (`losses.contrastive_loss`).

    batch: {"a": [P, ...], "b": [P, ...], "target": [P] (1 match, 0 non-match),
    optional "mask": [P]}.
    """
    def objective(embed, batch):
        a, b = _embed_groups(embed, [jnp.asarray(batch["a"]), jnp.asarray(batch["b"])])
        return contrastive_loss(a, b, batch["target"], margin=margin, mask=batch.get("mask"))
    return objective
