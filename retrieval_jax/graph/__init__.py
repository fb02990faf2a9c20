"""kNN graphs: exact and approximate neighbour search, affinities, normalisation."""
from .affinity import affinity_graph, similarity_power, union_capacity
from .core import Graph, NormalizedGraph
from .io import load_graph, save_graph
from .knn import affinity_matrix, connected_components, isolated_nodes, knn, knn_graph, knn_traced, normalize

__all__ = ["Graph", "NormalizedGraph", "affinity_graph", "knn_traced", "similarity_power", "union_capacity", "affinity_matrix", "connected_components", "isolated_nodes", "knn", "knn_graph", "load_graph", "normalize",
           "save_graph"]
