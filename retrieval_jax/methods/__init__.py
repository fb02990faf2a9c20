"""Ranking methods with one shape: ``build(database, config) -> state``, ``search(state, queries)``.

Every method is a `Method` (see `base`): ``build`` offline, ``search`` and
``search_items`` jitted online. `METHODS` is the one registry of them, by name; the
CLI and the experiments look methods up there. An ablation is a loop over configs::

    for cfg in [DiffusionConfig(alpha=a) for a in (0.8, 0.9, 0.99)]:
        state = DIFFUSION.build(X, cfg)
        scores = DIFFUSION.search(state, Q)

or, with the shape-deciding fields fixed, one compiled program over the values
(see `retrieval_jax.diffusion.manifold_ranking` and ``experiments/ablation_grid.py``).
"""
from .base import Method, bucket_size, check_config, check_items, check_queries, make_method, similarities
from .diffusion import (AUTO_INVERSE_MAX_BYTES, AUTO_INVERSE_MAX_NODES, DIFFUSION, DiffusionConfig, DiffusionParams,
                        DiffusionState, DiffusionStatic, diffusion_state_from_graph)
from .fsr import FSR, FsrConfig, FsrState, fsr_state_from_graph
from .knn import KNN_SEARCH, KnnConfig, KnnState
from .offline_diffusion import (OFFLINE_DIFFUSION, OfflineDiffusionConfig, OfflineDiffusionState,
                                offline_diffusion_state_from_graph, offline_diffusion_state_from_rows)
from .query_expansion import ALPHA_QE, DBA_ALPHA_QE, AlphaQEConfig, AlphaQEState, DbaQEConfig, DbaQEState

METHODS = {m.name: m for m in (KNN_SEARCH, DIFFUSION, FSR, ALPHA_QE, DBA_ALPHA_QE, OFFLINE_DIFFUSION)}

__all__ = ["ALPHA_QE", "AUTO_INVERSE_MAX_BYTES", "AUTO_INVERSE_MAX_NODES", "AlphaQEConfig", "AlphaQEState",
           "DBA_ALPHA_QE", "DIFFUSION", "DbaQEConfig", "DbaQEState", "DiffusionConfig", "DiffusionParams",
           "DiffusionState", "DiffusionStatic", "FSR",
           "FsrConfig", "FsrState", "KNN_SEARCH", "KnnConfig", "KnnState", "METHODS", "Method", "OFFLINE_DIFFUSION",
           "OfflineDiffusionConfig", "OfflineDiffusionState", "bucket_size",
           "check_config", "check_items", "check_queries", "diffusion_state_from_graph", "fsr_state_from_graph",
           "make_method", "offline_diffusion_state_from_graph", "offline_diffusion_state_from_rows", "similarities"]
