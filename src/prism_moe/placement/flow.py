"""`flow`: the exact optimum of the paper's proxy objective, as a min-cost flow (the default).

Same objective and constraints as `optimal` (remote invocations, memory, every expert hosted), solved
combinatorially by `mincost.max_local_value`: each server's top experts, then one shortest augmenting
path per expert that nobody took. No LP solver; tens of milliseconds at paper scale, about a second
at DeepSeek-V3 scale (see docs/placement.md). Ties are broken towards `current` when it is given.
"""

from __future__ import annotations

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import check_current, current_hosts, drop_idle_duplicates, finish, flat
from prism_moe.placement.mincost import max_local_value
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem


def flow(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *,
         current: Placement | None = None) -> Placement:
    """Exact optimum of the remote-invocation objective. stats.counts float [S, L, E].

    current: among equally good placements, prefer keeping what this one holds (minimal migration).
    """
    problem = Problem.build(stats, cluster, model)
    check_current(current, problem)
    value, prefer = flat(problem.demand), current_hosts(current)
    hosts = drop_idle_duplicates(max_local_value(value, problem.capacity, prefer), value, prefer)
    return finish(problem, hosts, "flow", solver="successive shortest paths")
