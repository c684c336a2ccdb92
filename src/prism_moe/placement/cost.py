"""The cost model beside the algorithms: expected remote cost of a placement, and what moving from one
placement to another costs.

Migration model (an assumption, stated so callers can judge it): every expert a server holds in `new`
but not in `old` is fetched by that server from the `old` holder with the fastest link to it, whole
(`expert_bytes`), one expert after another; different receivers fetch in parallel. So a migration
takes max over receivers r of sum over fetched experts of bytes x 8 / bandwidth(best source -> r).
Link latency, senders' upload contention and the copy-before-switch overlap with serving are ignored:
it is the time until every receiver has its new experts, with links as the only bottleneck.
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan, PlanSizes
from prism_moe.placement.problem import Problem


def expected_remote_cost(placement: Placement, problem: Problem) -> float:
    """Expected seconds of remote round trips per unit time: sum demand [S,L,E] x link_cost of the route."""
    return placement.remote_cost(problem.demand, problem.link_cost)


def _same_layout(old: Placement, new: Placement) -> None:
    if old.hosts.shape != new.hosts.shape or tuple(old.server_names) != tuple(new.server_names):
        raise ValueError(f"placements differ in servers or shape: {list(old.server_names)} {old.hosts.shape} "
                         f"vs {list(new.server_names)} {new.hosts.shape}")


def _expert_bytes(problem_or_cluster: Problem | ClusterSpec, model: ModelSpec | None) -> int:
    if model is not None:
        return model.expert_bytes
    if isinstance(problem_or_cluster, Problem):
        return problem_or_cluster.expert_bytes
    raise ValueError("give the model (ModelSpec) to size the experts")


def fetched_bytes(old: Placement, new: Placement, expert_bytes: int) -> np.ndarray:
    """Bytes each server must fetch to go from `old` to `new`: int [S]."""
    _same_layout(old, new)
    return new.moved_from(old).sum(axis=(1, 2)).astype(np.int64) * int(expert_bytes)


def migration_bytes(old: Placement, new: Placement, problem_or_cluster: Problem | ClusterSpec | None = None,
                    model: ModelSpec | None = None) -> int:
    """Total bytes of experts that new holders must fetch."""
    return int(fetched_bytes(old, new, _expert_bytes(problem_or_cluster, model)).sum())


def migration_seconds(old: Placement, new: Placement, problem_or_cluster: Problem | ClusterSpec,
                      model: ModelSpec | None = None) -> float:
    """Seconds until every receiver holds its new experts (see the module docstring for the model)."""
    _same_layout(old, new)
    if isinstance(problem_or_cluster, Problem):
        bw = problem_or_cluster.bandwidth
        if bw is None:
            raise ValueError("this Problem has no bandwidth matrix; build it with Problem.build or pass the cluster")
    else:
        bw = problem_or_cluster.link_matrices()[0]
    bits = 8.0 * _expert_bytes(problem_or_cluster, model)
    moved = new.moved_from(old)  # [S, L, E]
    worst = 0.0
    for r in np.flatnonzero(moved.any(axis=(1, 2))).tolist():
        sources = old.hosts[:, moved[r]]  # [S, M]: old holders of each expert r fetches
        best_bw = np.where(sources, bw[:, r][:, None], 0.0).max(axis=0)  # [M]
        worst = max(worst, float((bits / best_bw).sum()))
    return worst


def plan_fetched_bytes(old: ExecutionPlan, new: ExecutionPlan, sizes: PlanSizes) -> np.ndarray:
    """Bytes each server fetches to go from plan `old` to `new`: the experts it gains and the dense part of
    each layer it gains (a plan's blocks move with their attention, norms, router and shared experts):
    float [S]."""
    _same_layout(old.placement, new.placement)
    experts = new.placement.moved_from(old.placement).sum(axis=(1, 2))
    dense = (new.dense & ~old.dense).sum(axis=1)
    return experts * sizes.expert + dense * sizes.dense_layer


def plan_migration_seconds(old: ExecutionPlan, new: ExecutionPlan, bandwidth_bps: np.ndarray, sizes: PlanSizes) -> float:
    """Seconds until every receiver holds what `new` adds: the same model as `migration_seconds` (one item
    after another per receiver, each from the old holder with the fastest link), dense blocks included.
    bandwidth_bps: float [S, S] (`ClusterSpec.link_matrices()[0]`)."""
    _same_layout(old.placement, new.placement)
    bw = np.asarray(bandwidth_bps, dtype=np.float64)
    worst = 0.0
    moved = new.placement.moved_from(old.placement)  # [S, L, E]
    dense_new = new.dense & ~old.dense  # [S, L]
    for r in np.flatnonzero(moved.any(axis=(1, 2)) | dense_new.any(axis=1)).tolist():
        src = old.placement.hosts[:, moved[r]]  # [S, M]
        secs = float((8.0 * sizes.expert / np.where(src, bw[:, r][:, None], 0.0).max(axis=0)).sum())
        dsrc = old.dense[:, dense_new[r]]  # [S, D]
        secs += float((8.0 * sizes.dense_layer / np.where(dsrc, bw[:, r][:, None], 0.0).max(axis=0)).sum())
        worst = max(worst, secs)
    return worst
