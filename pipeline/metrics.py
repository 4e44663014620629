"""How well a clustering follows the synthetic world's attributes: NMI and purity per attribute.

The samples' attributes come as the JSON strings that pipeline.embed stores ("" when a
sample has none, in which case no score is given)."""
from __future__ import annotations

import json

import numpy as np


def attribute_nmi(assignments: np.ndarray, attributes: list[str]) -> dict[str, float]:
    """NMI between cluster ids and each attribute found in the samples' labels."""
    from sklearn.metrics import normalized_mutual_info_score

    return _per_attribute(assignments, attributes, normalized_mutual_info_score)


def attribute_purity(assignments: np.ndarray, attributes: list[str]) -> dict[str, float]:
    """Purity of the clusters for each attribute: the share of samples whose value is their
    cluster's most common one (1.0: every cluster holds one value)."""
    from sklearn.metrics.cluster import contingency_matrix

    def purity(values, clusters):
        table = contingency_matrix(values, clusters)
        return table.max(axis=0).sum() / table.sum()

    return _per_attribute(assignments, attributes, purity)


def _per_attribute(assignments: np.ndarray, attributes: list[str], score) -> dict[str, float]:
    parsed = [json.loads(a) if a else None for a in attributes]
    if not parsed or any(p is None for p in parsed):
        return {}
    return {name: round(float(score([str(p.get(name)) for p in parsed], assignments)), 4)
            for name in sorted(parsed[0])}
