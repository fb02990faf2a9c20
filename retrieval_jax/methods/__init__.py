"""Ranking methods with one shape: ``build(database, config) -> state``, ``search(state, queries)``.

Every method is a `Method` (see `base`): ``build`` offline, ``search`` and
``search_items`` jitted online. `METHODS` is the one registry of them, by name; the
CLI and the experiments look methods up there. An ablation is a loop over configs::

    for cfg in [DiffusionConfig(alpha=a) for a in (0.8, 0.9, 0.99)]:
        state = DIFFUSION.build(X, cfg)
        scores = DIFFUSION.search(state, Q)

or, with the shape-deciding fields fixed, one compiled program over the values
(see `retrieval_jax.diffusion.manifold_ranking` and ``experiments/ablation_grid.py``).

A new method is a `Method` (`make_method` pads and checks its online calls) with a config
dataclass whose fields declare its user options (`option`, see `options`); `register`
adds it to `METHODS`, and ``retrieval-jax rank --method <name>`` offers it with its
options, defaults and size checks, nothing else to edit::

    @dataclasses.dataclass(frozen=True)
    class PowerConfig:
        power: int = option(1, "score exponent", parse=positive_int)

    POWER = register(make_method("power", build, search, search_items, PowerConfig))
"""
from .base import Method, make_method, similarities
from .cluster_aware import CAS, CasConfig, CasState
from .discriminative_qe import DQE, DqeConfig, DqeState
from .diffusion import UnreachedQueryWarning
from .diffusion import (AUTO_INVERSE_MAX_BYTES, AUTO_INVERSE_MAX_NODES, DIFFUSION, DiffusionConfig, DiffusionParams,
                        DiffusionState, DiffusionStatic, diffusion_state_from_graph)
from .fsr import FSR, FsrConfig, FsrState, fsr_state_from_graph
from .gss import GSS, GssConfig, GssState
from .gnn_reranking import GNN, GnnConfig, GnnState
from .regularized_diffusion import RDP, RdpConfig, RdpState
from .k_reciprocal import K_RECIPROCAL, KReciprocalConfig, KReciprocalState
from .knn import KNN_SEARCH, KnnConfig, KnnState
from .offline_diffusion import (OFFLINE_DIFFUSION, OfflineDiffusionConfig, OfflineDiffusionState,
                                offline_diffusion_state_from_graph, offline_diffusion_state_from_rows)
from .query_expansion import ALPHA_QE, DBA_ALPHA_QE, AlphaQEConfig, AlphaQEState, DbaQEConfig, DbaQEState
from .query_expansion import AQE, AQEWD, AqeConfig, AqeState, AqewdConfig, AqewdState
from .superglobal import SUPERGLOBAL, SuperGlobalConfig, SuperGlobalState

from .options import Option, config_options, finite_float, nonneg_int, option, positive_int, resolve

#: Every ranking method by name; add one with `register`.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to `METHODS` under ``method.name`` and return it.

    A name already registered is refused (`unregister` it first to replace it), and so is a
    config type that is not a dataclass (its fields are the method's options).
    """
    if not isinstance(method, Method):
        raise TypeError(f"register takes a retrieval_jax.methods.Method, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name or method.name.startswith("-"):
        raise ValueError(f"a method's name must be a non-empty string not starting with '-', got {method.name!r}")
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered; unregister it first")
    config_options(method.config_type)  # a dataclass (or None), its options well formed
    METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove the method registered as ``name`` from `METHODS` and return it."""
    if name not in METHODS:
        raise KeyError(f"no method named {name!r} is registered (registered: {', '.join(METHODS)})")
    return METHODS.pop(name)


# the order of a paper's baseline table: search, query expansion, shortlist re-ranking,
# graph diffusion, learned (the command line and the baseline table list them so)
for _method in (KNN_SEARCH, AQE, AQEWD, ALPHA_QE, DBA_ALPHA_QE, DQE, SUPERGLOBAL, K_RECIPROCAL, GNN, DIFFUSION, RDP,
                CAS, OFFLINE_DIFFUSION, FSR, GSS):
    register(_method)
del _method

__all__ = ["ALPHA_QE", "AUTO_INVERSE_MAX_BYTES", "AUTO_INVERSE_MAX_NODES", "AlphaQEConfig", "AlphaQEState",
           "DBA_ALPHA_QE", "DIFFUSION", "DbaQEConfig", "DbaQEState", "DiffusionConfig", "DiffusionParams",
           "DiffusionState", "DiffusionStatic", "FSR",
           "K_RECIPROCAL", "KReciprocalConfig", "KReciprocalState",
           "CAS", "CasConfig", "CasState",
           "FsrConfig", "FsrState", "GSS", "GssConfig", "GssState",
           "KNN_SEARCH", "KnnConfig", "KnnState", "METHODS", "Method", "OFFLINE_DIFFUSION",
           "OfflineDiffusionConfig", "OfflineDiffusionState", "Option", "config_options", "diffusion_state_from_graph",
           "finite_float", "fsr_state_from_graph", "make_method", "nonneg_int", "offline_diffusion_state_from_graph",
           "offline_diffusion_state_from_rows", "option", "positive_int",
           "UnreachedQueryWarning", "register", "resolve", "similarities",
           "unregister", "GNN", "GnnConfig", "GnnState", "RDP", "RdpConfig", "RdpState",
           "AQE", "AQEWD", "AqeConfig", "AqeState", "AqewdConfig", "AqewdState", "DQE", "DqeConfig", "DqeState",
           "SUPERGLOBAL", "SuperGlobalConfig", "SuperGlobalState"]
