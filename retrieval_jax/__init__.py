"""retrieval_jax: image retrieval by diffusion on nearest-neighbour graphs, in JAX.

The core of every stage from the top, the long tail one level down::

    import retrieval_jax as rj
    W = rj.normalize(rj.knn_graph(X, k=50))              # graphs
    scores = rj.diffuse(W, rj.indicator_vectors(ids, n))  # diffusion
    rj.revisited_map(rj.ranking_from_scores(scores), gnd) # evaluation

Stages: `graph` (kNN search and affinity graphs), `diffusion` (the operator, its
solvers, offline rows), `spectral` (Lanczos, FSR), `methods` (build/search pairs and
their registry), `evaluation` (mAP protocols), `data` (loaders), descriptors and
backbones (imported on first use: they pull in Flax).
"""
import importlib as _importlib

from . import data, diffusion, evaluation, graph, methods, spectral
from .diffusion import (CG, Auto, ExactInverse, Solution, Spectral, diffuse, diffusion_inverse, diffusion_operator,
                        indicator_vectors, katz_centrality, observe_items, observe_neighbours, query_vectors,
                        ranking_from_scores, solve, truncated_diffuse)
from .evaluation import average_precision, bullseye_score, classic_map, label_map, revisited_map
from .graph import Graph, NormalizedGraph, knn, knn_graph, normalize
from .methods import DIFFUSION, FSR, KNN_SEARCH, METHODS, DiffusionConfig, FsrConfig, KnnConfig
from .spectral import fast_spectral_ranking, graph_eigenpairs, spectral_embedding

__version__ = "0.1.0"

# descriptor extraction and backbones pull in Flax: imported when first used
_LAZY = {
    "extract": ("retrieval_jax.descriptors", "extract"),
    "gem": ("retrieval_jax.descriptors", "gem"),
    "load_efficientnet_lite": ("retrieval_jax.backbones", "load_efficientnet_lite"),
    "backbones": ("retrieval_jax.backbones", None),
    "descriptors": ("retrieval_jax.descriptors", None),
    "training": ("retrieval_jax.training", None),
    "explanation": ("retrieval_jax.explanation", None),
    "discovery": ("retrieval_jax.discovery", None),
    "sharding": ("retrieval_jax.sharding", None),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = _importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'retrieval_jax' has no attribute {name!r}")


__all__ = [
    "Auto", "CG", "DIFFUSION", "DiffusionConfig", "ExactInverse", "FSR", "FsrConfig", "Graph", "KNN_SEARCH",
    "KnnConfig", "METHODS", "NormalizedGraph", "Solution", "Spectral", "average_precision", "bullseye_score",
    "classic_map", "data", "diffuse", "discovery", "diffusion", "diffusion_inverse", "diffusion_operator", "evaluation",
    "extract", "fast_spectral_ranking", "gem", "graph", "graph_eigenpairs", "indicator_vectors",
    "katz_centrality", "knn", "knn_graph", "label_map", "load_efficientnet_lite", "methods", "normalize",
    "observe_items", "observe_neighbours", "query_vectors", "ranking_from_scores", "revisited_map", "solve",
    "spectral", "spectral_embedding", "truncated_diffuse",
]
