"""kNN graphs: exact and approximate neighbour search, affinities, normalisation."""
from .core import Graph
from .io import load_graph, save_graph
from .knn import affinity_matrix, connected_components, isolated_nodes, knn, knn_graph, normalize

__all__ = ["Graph", "affinity_matrix", "connected_components", "isolated_nodes", "knn", "knn_graph", "load_graph", "normalize",
           "save_graph"]
