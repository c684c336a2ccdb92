"""Toy models and clusters with round numbers: a 1 GiB dense part, 1 GiB experts, so a server with
memory 1 + k GiB has exactly k expert slots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prism_moe.config import ClusterSpec, cluster_from_dict
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.placement.problem import ClusterStats


def toy_model(layers: int, experts: int) -> ModelSpec:
    return ModelSpec(name="toy", model_type="toy", num_moe_layers=layers, num_experts=experts, top_k=1,
                     hidden_size=8, expert_intermediate_size=8, expert_params=GIB // 2, dense_params=GIB // 2,
                     moe_layer_ids=tuple(range(layers)), num_hidden_layers=layers)


def toy_cluster(capacities: Sequence[int], rates: Sequence[float] | None = None,
                links: list[dict] | None = None) -> ClusterSpec:
    servers = [{"name": f"s{i}", "memory_gib": 1 + int(c), "request_rate": 1.0 if rates is None else float(rates[i])}
               for i, c in enumerate(capacities)]
    return cluster_from_dict({"model": "toy", "servers": servers,
                              "network": {"bandwidth_mbps": 1000, "latency_ms": 1, "links": links or []}})


def toy(counts, capacities: Sequence[int], rates: Sequence[float] | None = None):
    """(stats, cluster, model) for counts float [S, L, E]."""
    counts = np.asarray(counts, dtype=np.float64)
    s, layers, experts = counts.shape
    return ClusterStats(counts), toy_cluster(capacities, rates), toy_model(layers, experts)
