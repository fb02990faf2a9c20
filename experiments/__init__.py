"""Experiments behind the README's tables and figures, one module each.

Run from the repository root, e.g. ``python -m experiments.reproduce --quick``;
:mod:`experiments.common` holds the helpers they share (timing, peak memory, data
loaders, CSV / JSON / PNG writing).
"""
