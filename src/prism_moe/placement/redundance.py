"""`redundance`: `uniform`, then replicas of the most popular experts in the memory left over.

Popularity is the cluster-wide load of an expert (demand summed over servers). Replicas are added in
rounds: round k gives the (k+1)-th copy to experts in decreasing popularity until memory runs out; an
expert's copies go to the servers after its first one in cyclic order (skipping full servers and
servers that hold it), so replicas spread evenly. Blind to which server asks for which expert: the
classic "replicate hot experts" baseline. Cost O(S x L x E) plus one sort.
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import finish
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.uniform import round_robin_hosts


def replicate_popular(hosts: np.ndarray, capacity: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Fill free slots with extra copies of the most loaded experts.

    hosts: bool [S, N] (one copy each); capacity: int [S]; load: float [N]. Returns bool [S, N].
    """
    hosts = hosts.copy()
    s_n, n = hosts.shape
    room = (np.asarray(capacity, dtype=np.int64) - hosts.sum(axis=1)).tolist()
    home = hosts.argmax(axis=0).tolist()  # the server of each expert's first copy
    order = np.argsort(-np.asarray(load), kind="stable").tolist()
    rows = [bytearray(r.tobytes()) for r in hosts.astype(np.uint8)]
    free = sum(room)
    for k in range(1, s_n):
        if free == 0:
            break
        for j in order:
            if free == 0:
                break
            for step in range(k, k + s_n):  # the k-th server after its home, or the next with room
                s = (home[j] + step) % s_n
                if room[s] and not rows[s][j]:
                    rows[s][j] = 1
                    room[s] -= 1
                    free -= 1
                    break
    return np.array([np.frombuffer(bytes(r), dtype=np.uint8) for r in rows], dtype=bool)


def redundance(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement:
    """Uniform plus replicas of hot experts. stats.counts float [S, L, E]."""
    problem = Problem.build(stats, cluster, model)
    base = round_robin_hosts(problem.capacity, problem.num_layers, problem.num_experts)
    load = problem.demand.sum(axis=0).reshape(-1)
    hosts = replicate_popular(base.reshape(problem.num_servers, -1), problem.capacity, load)
    return finish(problem, hosts, "redundance")
