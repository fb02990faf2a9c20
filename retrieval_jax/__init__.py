"""retrieval_jax: image retrieval by diffusion on nearest-neighbour graphs, in JAX."""
__version__ = "0.1.0"
