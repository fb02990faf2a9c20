"""Sizes chosen from the database when the user gives none: k, query_k, truncate, FSR's rank.

Iscen et al. (CVPR 2017) use k = 50 graph neighbours, query_k = 10 and a rank of a few
hundred eigenpairs (CVPR 2018) on 5k - 1M images of landmarks photographed hundreds of
times. A folder of a few dozen photos, a few per object, is another regime: with k = 50 on
56 images every node links to nearly every other, diffusion spreads over the whole
database and ranks by centrality (measured: 22 mAP where kNN search scores 79). The rules
here are the ones the command line applies, measured on labelled folders built from
COIL-20 and MPEG-7 (``graph`` + ``rank --items``, label mAP with the query excluded, the
items diffusion cannot reach ranked after the others by similarity; EfficientNet-Lite0 +
GeM descriptors unless marked "pixels"):

=========================  ====  =====  ======================  ===========================
folder                     n     kNN    diffusion, default k    note
=========================  ====  =====  ======================  ===========================
MPEG-7 12 classes x 4      48    97.6   k=3: 100.0
COIL-20 14 objects x 4     56    79.2   k=3: 78.2               warned (components of 4.5)
COIL-20 20 x 8             160   86.0   k=3: 85.3               warned
MPEG-7 60 x 4              240   71.8   k=3: 71.6               warned (components of 5.2)
MPEG-7 20 x 20             364   90.8   k=4: 93.0
COIL-20 20 x 24            480   91.6   k=4: 99.6
COIL-20, pixels            1440  61.5   k=5: 98.7, k=7: 95.8    the rule gives 6
MPEG-7, pixels             1400  55.6   k=5: 58.4, k=7: 59.6    the rule gives 6
=========================  ====  =====  ======================  ===========================

The old default k = 50 gave 22.5 / 43.6 / 33.0 / 76.1 / 65.0 mAP on the COIL-20 x 4,
COIL-20 x 8, MPEG-7 x 4, MPEG-7 x 20 and COIL-20 x 24 folders. Diffusion gains where each
object has many images linked in chains; with four images an object it can at best match
kNN search, and `graph_warnings` says so from the graph alone (its components).
"""
from __future__ import annotations

import numpy as np

__all__ = ["MIN_COMPONENT", "default_k", "default_query_k", "default_rank", "default_truncate",
           "graph_warnings", "k_warning", "large_k"]

#: Below this mean component size (seen from a node) diffusion cannot do much better than kNN.
MIN_COMPONENT = 10


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2 (database items), got {n!r}")
    return int(n)


def default_k(n: int, cap: int = 50) -> int:
    """Graph neighbours for a database of n items: ``clip(round(n ** (1/3) / 2), 3, cap)``, < n.

    Why: the neighbours of a node should stay among the images of its own object, whose
    number grows far more slowly than n. With few images an object (4 a class) any k > 3
    links objects together and diffusion ranks below kNN search; with many (20-72 a class)
    k = 3-7 is where diffusion gains most (see the module docstring). The rule gives 3 up
    to ~340 items, 6 for 1400, 9 for 5000 and Iscen et al.'s k = 50 (``cap``) at a million;
    3 is the fewest neighbours that still chain a mutual kNN graph (k = 2 lost 20-60 mAP
    on every folder measured).
    """
    n = _check_n(n)
    k = int(np.clip(round(n ** (1.0 / 3.0) / 2.0), 3, cap))
    return max(1, min(k, n - 1))


def default_query_k(k: int, n: int | None = None) -> int:
    """Database neighbours forming an out-of-graph query: ``min(10, k)`` (and < n).

    Why: Iscen et al.'s query_k = 10 goes with k = 50; a query linked to more items than
    a node of the graph is linked to reaches into other objects (measured with every
    fourth image held out as a query: at k = 3-7, query_k = k is within 1 mAP of the
    best query_k, query_k = 10 lost up to 17 mAP on the small folders).
    """
    q = min(10, int(k))
    return max(1, q if n is None else min(q, _check_n(n)))


def default_truncate(n: int) -> int | None:
    """Shortlist of truncated diffusion: None (the full solve) up to 100,000 items, else 2000.

    Why: the full CG solve costs O(n k) per query and is exact; truncation only pays when
    n is large (Iscen et al. truncate to a few thousand items on 100k - 1M images). A
    shortlist of 2000 keeps the query's component and then some at that scale.
    """
    n = _check_n(n)
    return None if n <= 100_000 else 2000


def default_rank(n: int) -> int:
    """Eigenpairs kept by fast spectral ranking: ``min(400, n)``.

    Why: Iscen et al. (CVPR 2018) keep a few hundred eigenpairs; a rank cannot exceed n,
    and at rank n FSR is exact (the default must work for every database size).
    """
    n = _check_n(n)
    return min(400, n)


def large_k(n: int) -> int:
    """The largest k `k_warning` lets pass silently: ``max(2 * default_k(n), n // 20)``."""
    n = _check_n(n)
    return max(2 * default_k(n), n // 20)


def k_warning(k: int, n: int) -> str | None:
    """Why ``k`` neighbours is large for n items (a sentence), or None when it is not.

    A node's k neighbours then cover ``k / n`` of the database: beyond the images of one
    object in a typical folder, so the graph links different objects and diffusion spreads
    across them (measured: k = 50 on 56 images, 22 mAP against kNN search's 79).
    """
    n = _check_n(n)
    k = int(k)
    if k <= large_k(n):
        return None
    return (f"k = {k} is large for {n} items: each node is linked to {100 * k / n:.0f}% of the "
            f"database, more than the images of one object usually are, so diffusion spreads "
            f"across objects and can rank far below kNN search; without --k the rule "
            f"picks k = {default_k(n)} for n = {n}")


def graph_warnings(graph) -> list[str]:
    """Sentences on what a built kNN graph lets diffusion do (empty when nothing stands out).

    The graph's connected components bound diffusion: a query's scores are 0 outside its
    component. When the component a node belongs to has on average fewer than
    ``MIN_COMPONENT`` items, diffusion re-ranks only a handful of items per query and
    ranks close to kNN search or below (measured on 4 images an object); isolated nodes
    (no mutual neighbour) are reached by nothing.
    """
    from scipy.sparse.csgraph import connected_components

    n = graph.num_nodes
    _, comp = connected_components(graph.to_scipy(), directed=False)
    sizes = np.bincount(comp)
    seen = float(sizes[comp].mean())
    isolated = int((sizes == 1).sum())
    out = []
    if seen < MIN_COMPONENT:
        out.append(f"the graph splits into {sizes.size} components of {seen:.1f} items on "
                   f"average (seen from a node): diffusion only re-ranks a query's own "
                   f"component, so on this database it can do little better than kNN search "
                   f"(this happens when each object has only a few images); compare with "
                   f"`rank --method knn`")
    if isolated > 0.1 * n:
        out.append(f"{isolated} of {n} nodes have no mutual neighbour; their rankings are "
                   f"plain similarity order (try a larger --k or --no-mutual)")
    return out
