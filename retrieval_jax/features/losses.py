"""Compatibility alias of the old ``retrieval_jax.features.losses`` (kept for one release).

Its names now live in :mod:`retrieval_jax.training.losses`; import them from there.
"""
from ..training.losses import contrastive_loss, mine_hard_negatives, triplet_loss  # noqa: F401

__all__ = ["contrastive_loss", "triplet_loss", "mine_hard_negatives"]
