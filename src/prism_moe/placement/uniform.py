"""`uniform`: one copy of every expert, dealt round-robin over the servers; extra slots stay empty.

Experts in layer-major order (l x E + e) go to servers 0, 1, ..., S-1, 0, ...; a server whose memory is
full is skipped, so unequal capacities are respected (small servers fill first, big ones take the
rest). Ignores the workload: the baseline that every locality-aware method is measured against.
Cost O(L x E x S).
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import finish
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem


def round_robin_hosts(capacity: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """One copy of each expert, round-robin over servers with room. capacity: int [S] (sum >= L x E).

    Returns bool [S, L, E].
    """
    cap = np.asarray(capacity, dtype=np.int64)
    s_n, n = len(cap), num_layers * num_experts
    if int(cap.sum()) < n:
        raise ValueError(f"{int(cap.sum())} slots cannot hold one copy of each of {n} experts")
    hosts = np.zeros((s_n, n), dtype=bool)
    room = cap.tolist()
    server = 0
    for j in range(n):
        while room[server] == 0:
            server = (server + 1) % s_n
        hosts[server, j] = True
        room[server] -= 1
        server = (server + 1) % s_n
    return hosts.reshape(s_n, num_layers, num_experts)


def uniform(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement:
    """One copy of each expert, round-robin. stats.counts float [S, L, E] (only its shape is used)."""
    problem = Problem.build(stats, cluster, model)
    return finish(problem, round_robin_hosts(problem.capacity, problem.num_layers, problem.num_experts),
                  "uniform")
