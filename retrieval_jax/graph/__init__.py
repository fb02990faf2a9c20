"""kNN graphs: exact and approximate neighbour search, affinities on device, normalisation."""
from .affinity import affinity_graph, reciprocal_partners, similarity_power, union_capacity
from .components import ComponentBlocks, ComponentLayout, blocks_from_labels, component_blocks, dense_blocks
from .core import AffinityGraph, Graph, NormalizedGraph, neighbour_product
from .io import load_graph, save_graph
from .neighbours import (affinity_lists, affinity_matrix, check_symmetric, connected_components, isolated_nodes,
                         knn, knn_graph, knn_traced, nndescent_knn, nndescent_width, normalize, search_route)
from .order import (LOCALITY_MIN_NODES, LocalityLayout, locality_layout, locality_order, permute_graph,
                    with_locality)

__all__ = ["LOCALITY_MIN_NODES", "LocalityLayout", "locality_layout", "with_locality",
           "AffinityGraph", "ComponentBlocks", "ComponentLayout", "Graph", "NormalizedGraph", "affinity_graph",
           "affinity_lists", "affinity_matrix", "blocks_from_labels", "check_symmetric", "component_blocks",
           "connected_components",
           "dense_blocks", "isolated_nodes", "knn", "knn_graph", "knn_traced", "load_graph",
           "locality_order", "neighbour_product",
           "nndescent_knn", "nndescent_width", "normalize", "permute_graph", "reciprocal_partners", "save_graph",
           "search_route",
           "similarity_power", "union_capacity"]
