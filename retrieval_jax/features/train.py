"""Compatibility alias of the old ``retrieval_jax.features.train`` (kept for one release).

Its names now live in :mod:`retrieval_jax.training.checkpoints`,
:mod:`retrieval_jax.training.step`; import them from there.
"""
from ..training.checkpoints import load_checkpoint, save_checkpoint  # noqa: F401
from ..training.step import (contrastive_objective, make_train_step, TrainState,
                             triplet_objective)  # noqa: F401

__all__ = [
    "TrainState", "make_train_step", "triplet_objective", "contrastive_objective",
    "save_checkpoint", "load_checkpoint",
]
