"""The matmul precision of every similarity and projection in the library.

XLA on CPU and TPU may otherwise compute float32 matmuls in reduced precision
(bfloat16 passes); ``HIGHEST`` keeps similarities exact to float32 rounding, which the
rankings (ties at the k-th neighbour) and the comparisons with scipy rely on.
"""
import jax

HIGHEST = jax.lax.Precision.HIGHEST
