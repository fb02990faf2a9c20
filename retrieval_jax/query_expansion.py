"""Moved to `retrieval_jax.methods.query_expansion`; this import path is kept for one release."""
from .methods.query_expansion import *  # noqa: F401,F403
from .methods.query_expansion import __all__  # noqa: F401
