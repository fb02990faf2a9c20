"""Compatibility alias of the old ``retrieval_jax.features.torch_pickle`` (kept for one release).

Its names now live in :mod:`retrieval_jax.backbones.torch_pickle`; import them from
there.
"""
from ..backbones.torch_pickle import (load_torch_pickle, load_torch_state_dict, save_torch_zip)  # noqa: F401

__all__ = ["load_torch_state_dict", "load_torch_pickle", "save_torch_zip"]
