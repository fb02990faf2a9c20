"""Progress bars for the host-side loops (feature extraction, graph building)."""
from __future__ import annotations

import os
import sys


def progress(iterable, *, desc: str = "", total: int | None = None, enable: bool | None = None,
             auto_threshold: int = 20):
    """Wrap ``iterable`` in a tqdm bar.

    ``enable=None`` shows the bar only for loops of at least ``auto_threshold`` steps
    and never when ``RETRIEVAL_JAX_NO_PROGRESS`` is set.
    """
    if enable is None:
        enable = (total or 0) >= auto_threshold and not os.environ.get("RETRIEVAL_JAX_NO_PROGRESS")
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
