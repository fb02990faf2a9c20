"""kNN graphs: exact and approximate neighbour search, affinities, normalisation."""
from .core import Graph
from .knn import affinity_matrix, isolated_nodes, knn, knn_graph, normalize

__all__ = ["Graph", "affinity_matrix", "isolated_nodes", "knn", "knn_graph", "normalize"]
