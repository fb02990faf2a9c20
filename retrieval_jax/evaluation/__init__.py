"""Retrieval evaluation on the host: Oxford AP, Revisited Oxford/Paris, label mAP,
precision / recall@k, bull's-eye, UKBench N-S.

Rankings are integer arrays [n_queries, m] of database indices, best first; all
scores are fractions in [0, 1].
"""
from .metrics import (
    MapResult,
    RevisitedResult,
    average_precision,
    bullseye_score,
    classic_map,
    label_map,
    mean_average_precision,
    precision_at_k,
    recall_at_k,
    revisited_map,
    ukbench_score,
)

__all__ = [
    "MapResult",
    "RevisitedResult",
    "average_precision",
    "bullseye_score",
    "classic_map",
    "label_map",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "revisited_map",
    "ukbench_score",
]
