"""`smartmoe`: load-balanced placement after SmartMoE's online expert placement step.

SmartMoE (Zhai et al., USENIX ATC'23) re-maps experts to devices from the gate history with a greedy
(`greedy_gen_mapping_from_history` in thu-pacman/SmartMoE-AE, fmoe/smartmoe/mapping.py): experts in
decreasing load, each to the device with the least token load among those with a free expert slot,
preferring its current device on a tie. One copy per expert; each MoE layer is placed on its own.

Implemented here per layer, with the cluster-wide demand as the load. Servers differ in memory, so
a server's share of each layer is proportional to its memory (largest remainder, spread evenly over
layers) and "least load" is least load per slot. Extra memory stays empty (SmartMoE does not
replicate). Balances compute per layer; ignores where the requests come from.
Cost O(L x E x (S + log E)).
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import finish
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.slots import proportional, spread_over_layers


def balance_layer(load: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """One copy of each expert, greedy by decreasing load to the least loaded server per slot.

    load: float [E]; slots: int [S] summing to E. Returns bool [S, E].
    """
    s_n, e = len(slots), len(load)
    held = np.zeros((s_n, e), dtype=bool)
    used = np.zeros(s_n, dtype=np.int64)
    tokens = np.zeros(s_n)
    safe = np.maximum(slots, 1)
    for x in np.argsort(-load, kind="stable").tolist():
        s = int(np.argmin(np.where(used < slots, tokens / safe, np.inf)))
        held[s, x] = True
        used[s] += 1
        tokens[s] += load[x]
    return held


def smartmoe(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement:
    """SmartMoE-style load balancing per layer. stats.counts float [S, L, E]."""
    problem = Problem.build(stats, cluster, model)
    s_n, layers, e = problem.demand.shape
    quota = proportional(layers * e, problem.capacity.astype(np.float64), problem.capacity)  # [S]
    slots = spread_over_layers(quota, layers, e)  # [S, L], each layer sums to E
    load = problem.demand.sum(axis=0)
    hosts = np.zeros((s_n, layers, e), dtype=bool)
    for l in range(layers):
        hosts[:, l] = balance_layer(load[l], slots[:, l])
    return finish(problem, hosts, "smartmoe")
