"""The region graph of a collection and the centrality of its regions.

Simeoni, Iscen, Tolias, Avrithis & Chum, "Unsupervised object discovery for instance
recognition", WACV 2018 (arXiv 1709.04725), Sec. 3.2: the (whitened, L2-normalised)
descriptors v_i of the EGM regions of all images are the nodes of a reciprocal kNN
graph with affinities max(<v_i, v_j>, 0)^gamma (Iscen et al., CVPR 2017), symmetrically
normalised to W; the saliency of a region in the collection is its Katz centrality,
the solution g of

    L_alpha g = 1,  i.e.  (I - alpha W) g = (1 - alpha) 1

(`retrieval_jax.diffusion.katz_centrality`, conjugate gradient on the sparse W). An
object that recurs across images is a densely linked group of regions, clutter is
linked to little.

Edges between two regions of the same image are dropped by default
(``same_image_edges=False``): our reading of the paper, whose graph relates regions
across images, so a pattern repeated inside one image (a facade's windows) does not
make itself central; ``True`` keeps them. The search returns k plus (the most regions
of one image - 1) neighbours so that after dropping, each region still has its k
nearest regions of other images.

Memory: the graph holds n K neighbour slots and the search runs in blocks
(`retrieval_jax.graph.knn`) or by NN-descent (`retrieval_jax.graph.nndescent_knn`);
nothing [n, n] is formed. The exact search is O(n^2 d): minutes at 100,000 regions on a
2-core CPU, hours at a million, where NN-descent takes minutes (the measured times:
docs/benchmarks/discovery_scale.md), so "auto" switches to it from
`NNDESCENT_MIN_REGIONS` regions on.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .. import _checks
from ..diffusion import katz_centrality
from ..graph import Graph, NormalizedGraph, knn, nndescent_knn, normalize

__all__ = ["GRAPH_METHODS", "NNDESCENT_MIN_REGIONS", "other_image_neighbours", "region_graph", "region_centrality"]

# the neighbour searches of the region graph; "nndescent" only as a self-search
GRAPH_METHODS = ("auto", "exact", "faiss", "nndescent")

# "auto" searches a self-search of this many regions or more by NN-descent (approximate):
# the exact search is O(n^2 d), a quarter of an hour or more from here on a 2-core CPU
# (docs/benchmarks/discovery_scale.md)
NNDESCENT_MIN_REGIONS = 200_000


def _check_images(image_ids, n: int, name: str = "image_ids") -> np.ndarray:
    ids = np.asarray(image_ids)
    if ids.shape != (n,):
        raise ValueError(f"{name} must give one image id per row, shape ({n},), got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {ids.dtype}")
    return ids


def _check_method(method) -> str:
    if method not in GRAPH_METHODS:
        raise ValueError(f"method must be one of {GRAPH_METHODS}, got {method!r}")
    return method


def _is_self_search(q, qi, db, di) -> bool:
    """The queries are the database: the same rows with the same image ids."""
    return q.shape == db.shape and (q is db or (np.array_equal(qi, di) and np.array_equal(q, db)))


def _route(method: str, self_search: bool, n: int) -> str:
    """The search run for ``method``: "nndescent", or a `knn` method."""
    if method == "nndescent" and not self_search:
        raise ValueError("method='nndescent' is a self-search (the queries are the database, row for row); "
                         "search other queries with 'auto', 'exact' or 'faiss'")
    if method == "auto" and self_search and n >= NNDESCENT_MIN_REGIONS:
        return "nndescent"
    return method


def other_image_neighbours(queries, query_images, database, database_images, k: int, *,
                           method: str = "auto", seed: int = 0, show_progress: bool | None = None):
    """The k nearest database rows of each query by inner product, among rows of OTHER images.

    idx[q] = the k rows j of largest <queries[q], database[j]> with
    database_images[j] != query_images[q], from a search of width k + m, m the most
    rows of one image (so that dropping the query's own image leaves k).

    Args:
      queries: float[nq, d].
      query_images: int[nq] image id of each query.
      database: float[n, d].
      database_images: int[n] image id of each database row.
      k: neighbours kept per query (<= the rows of other images).
      method: the search, one of `GRAPH_METHODS`: "exact" / "faiss" (`retrieval_jax.graph.knn`,
        exact), "nndescent" (`retrieval_jax.graph.nndescent_knn`, approximate; only when
        the queries are the database, row for row, and a row is then never its own
        neighbour) or "auto": "nndescent" for such a self-search of
        `NNDESCENT_MIN_REGIONS` (200,000) rows or more, else `knn`'s "auto".
      seed: the random state of NN-descent.
      show_progress: the exact search's progress bar (None: by size).

    Returns:
      (sims float32[nq, k], idx int32[nq, k], valid bool[nq, k]) in decreasing similarity;
      a slot is invalid (similarity 0) when a query has fewer than k rows of other images
      within the search width.

    Raises:
      ValueError: bad shapes or values (`knn`), a bad method, "nndescent" for queries
        that are not the database, or every row from a single image.
    """
    method = _check_method(method)
    q = _checks.as_matrix(queries, "queries")
    db = _checks.as_matrix(database, "database")
    qi = _check_images(query_images, q.shape[0], "query_images")
    di = _check_images(database_images, db.shape[0], "database_images")
    k = _checks.check_k(k, db.shape[0], what="database rows")
    route = _route(method, _is_self_search(q, qi, db, di), db.shape[0])
    _, per_image = np.unique(di, return_counts=True)
    if per_image.size < 2 and np.all(np.isin(qi, di)):
        raise ValueError("every region comes from one image: there are no other images to match against; "
                         "object discovery needs a collection of at least 2 images")
    if route == "nndescent":   # a self-search: the row itself is excluded (it is of its own image)
        sims, idx = nndescent_knn(db, min(db.shape[0] - 1, k + int(per_image.max())), seed=seed)
    else:
        sims, idx = knn(q, db, min(db.shape[0], k + int(per_image.max())), method=route,
                        show_progress=show_progress)
        sims, idx = np.asarray(sims), np.asarray(idx)
    other = (idx >= 0) & (di[np.maximum(idx, 0)] != qi[:, None])
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]      # other-image slots first, in rank order
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int32)
    valid = np.take_along_axis(other, order, axis=1)
    return np.where(valid, sims, 0.0).astype(np.float32), idx, valid


def region_graph(descriptors, image_ids, k: int = 10, *, gamma: float = 3.0, mutual: bool = True,
                 same_image_edges: bool = False, method: str = "auto", seed: int = 0,
                 show_progress: bool | None = None) -> Graph:
    """Reciprocal kNN graph over all regions of a collection (not normalised).

    A_ij = min(a_ij, a_ji), a_ij = max(<v_i, v_j>, 0)^gamma when j is among the k nearest
    regions of i (of other images unless ``same_image_edges``) and i among those of j
    (``mutual``; else the union with max), assembled as a sparse matrix (O(n k)).

    Args:
      descriptors: float[n, d] regional descriptors (whitened, L2-normalised).
      image_ids: int[n] the image of each region.
      k: neighbours per region.
      gamma: similarity exponent (> 0).
      mutual: reciprocal pairs only (the paper's graph).
      same_image_edges: keep edges between regions of one image (default: dropped).
      method: the neighbour search, one of `GRAPH_METHODS`: "exact" / "faiss" (exact,
        `retrieval_jax.graph.knn`), "nndescent" (approximate,
        `retrieval_jax.graph.nndescent_knn`, lists of width k + the most regions of one
        image, same-image neighbours then dropped) or "auto": "nndescent" from
        `NNDESCENT_MIN_REGIONS` (200,000) regions on, else `knn`'s "auto" (faiss on a CPU
        host when installed, else the JAX search).
      seed: the random state of NN-descent.
      show_progress: the exact search's progress bar (None: by size).

    Returns:
      A `retrieval_jax.graph.Graph` on n nodes (some may be isolated).

    Raises:
      ValueError: bad shapes or values, a bad method, or a collection of one image.
    """
    method = _check_method(method)
    v = _checks.as_matrix(descriptors, "descriptors")
    n = v.shape[0]
    ids = _check_images(image_ids, n)
    if np.unique(ids).size < 2:
        raise ValueError("every region comes from one image: object discovery links regions across images, "
                         "so the collection needs at least 2 images")
    k = _checks.check_k(k, n - 1, what="other regions")
    if same_image_edges:
        if _route(method, True, n) == "nndescent":
            sims, idx = nndescent_knn(v, k, seed=seed)
        else:
            sims, idx = knn(v, v, k, exclude_self=True, method=method, show_progress=show_progress)
        sims, idx = np.asarray(sims), np.asarray(idx)
        valid = idx >= 0
    else:
        sims, idx, valid = other_image_neighbours(v, ids, v, ids, k, method=method, seed=seed,
                                                  show_progress=show_progress)
    gamma = _checks.check_gamma(gamma)
    a = np.maximum(sims, 0.0).astype(np.float64) ** gamma
    keep = valid & (a > 0)
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    directed = sp.csr_matrix((a[keep], (rows[keep], idx[keep])), shape=(n, n))
    sym = directed.minimum(directed.T) if mutual else directed.maximum(directed.T)
    return Graph.from_scipy(sym.tocsr())


def region_centrality(graph: Graph | NormalizedGraph, alpha: float = 0.99, *, tol: float = 1e-6,
                      max_iter: int = 500) -> np.ndarray:
    """Katz centrality g of every region: (I - alpha W) g = (1 - alpha) 1 on W = `normalize`(graph).

    An isolated region gets 1 - alpha. Returns float32[n] on the host. ``graph`` may be
    already normalised.
    """
    w = graph if isinstance(graph, NormalizedGraph) else normalize(graph)
    return np.asarray(katz_centrality(w, alpha, tol=tol, max_iter=max_iter))
