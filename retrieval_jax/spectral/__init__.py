"""Fast Spectral Ranking (Iscen, Avrithis, Tolias, Furon, Chum, CVPR 2018).

Offline: the r largest eigenpairs of the normalised kNN affinity W (`graph_eigenpairs`,
thick-restart Lanczos, `lanczos` for any symmetric matvec), filtered by a transfer
function h (`regularized_laplacian_filter`, `heat_kernel_filter`) into a
`SpectralEmbedding`. Online: `fast_spectral_ranking` (dense y) and
`fast_spectral_ranking_sparse` (k-NN query observations) compute
x = U_r h(L_r) U_r^T y (rank-r) or U_r (h(L_r) - h(0)) U_r^T y + h(0) y (approx).
On graphs with many connected components, ``spectral_embedding(per_component=True)``
keeps every component's own top eigenpairs (`component_eigenpairs`).
"""
from .components import (ComponentEigenpairs, ComponentSpectralEmbedding, component_eigenpairs,
                         component_fsr_scores_dense, component_fsr_scores_sparse, filter_component_pairs)
from .filters import (HeatKernelFilter, RegularizedLaplacianFilter, ResolventFilter, heat_kernel_filter,
                      regularized_laplacian_filter)
from .fsr import (SpectralEmbedding, fast_spectral_ranking, fast_spectral_ranking_sparse, filter_embedding,
                  fsr_scores_dense, fsr_scores_sparse, sparsify_embedding, spectral_embedding)
from .decomposition import Eigenpairs, graph_eigenpairs, lanczos

__all__ = [
    "ComponentEigenpairs", "ComponentSpectralEmbedding", "Eigenpairs", "HeatKernelFilter", "RegularizedLaplacianFilter",
    "ResolventFilter", "SpectralEmbedding", "component_eigenpairs",
    "component_fsr_scores_dense", "component_fsr_scores_sparse", "fast_spectral_ranking",
    "fast_spectral_ranking_sparse", "filter_component_pairs", "filter_embedding", "fsr_scores_dense",
    "fsr_scores_sparse", "graph_eigenpairs", "heat_kernel_filter", "lanczos", "regularized_laplacian_filter",
    "sparsify_embedding", "spectral_embedding",
]
