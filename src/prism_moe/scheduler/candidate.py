"""Which placement to move to: the configured algorithm on the live servers with the measured rates,
kept close to the current placement; and the repair placement when a server is lost.

Shapes: S servers, L MoE layers, E experts; hosts bool [S, L, E]; rates invocations/s [S, L, E].
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.placement.problem import ClusterStats
from prism_moe.scheduler.decision import expected_cost


class ClusterCapacityError(RuntimeError):
    """The live servers cannot hold one copy of every expert: the cluster cannot serve the model."""


def sub_cluster(cluster: ClusterSpec, live: np.ndarray, rates: np.ndarray | None = None,
                slots: np.ndarray | None = None, model: ModelSpec | None = None) -> ClusterSpec:
    """The cluster of the live servers only; with `rates`, each server's request_rate is its measured
    load (invocations/s per layer), so placement weighs busy servers more; with `slots` (int [S]) and
    the model, each server's memory is cut to that many expert slots."""
    servers = []
    for i, s in enumerate(cluster.servers):
        if not live[i]:
            continue
        update: dict = {}
        if rates is not None:
            update["request_rate"] = max(float(rates[i].sum()) / rates.shape[1], 1e-6)
        if slots is not None and model is not None:  # half a slot over: the floor in expert_slots lands on it
            update["memory_gib"] = (model.dense_bytes + (int(slots[i]) + 0.5) * model.expert_bytes) / GIB
        servers.append(s.model_copy(update=update))
    return cluster.model_copy(update={"servers": servers})


def restrict(placement: Placement, live: np.ndarray, link_cost: np.ndarray,
             capacity: np.ndarray | None = None) -> Placement | None:
    """`placement` seen by the live servers only, or None when some expert has no live holder."""
    hosts = placement.hosts[live]
    if not hosts.any(axis=0).all():
        return None
    names = [n for n, ok in zip(placement.server_names, live, strict=True) if ok]
    return Placement.from_hosts(names, hosts, np.asarray(link_cost)[np.ix_(live, live)],
                                None if capacity is None else np.asarray(capacity)[live],
                                placement.algorithm, version=placement.version)


def embed(sub: Placement, names: list[str], live: np.ndarray, link_cost: np.ndarray,
          capacity: np.ndarray | None = None, version: int = 0) -> Placement:
    """A placement over every server from one over the live servers (down servers hold nothing)."""
    hosts = np.zeros((len(names), sub.num_layers, sub.num_experts), dtype=bool)
    hosts[np.asarray(live, bool)] = sub.hosts
    return Placement.from_hosts(names, hosts, link_cost, capacity, sub.algorithm, version=version, meta=sub.meta)


def fewest_moves(new_hosts: np.ndarray, old_hosts: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """The server permutation of `new_hosts` rows that keeps most experts where they are: int [S].

    Row perm[i] of the result is row i of `new_hosts` (server i's new set goes to server perm[i]); only
    assignments within that server's capacity. For placements blind to where requests come from (e.g.
    EPLB), servers are interchangeable and this alone can save most of a migration.
    """
    new_hosts, old_hosts = np.asarray(new_hosts, bool), np.asarray(old_hosts, bool)
    s = new_hosts.shape[0]
    a = new_hosts.reshape(s, -1).astype(np.int64)
    b = old_hosts.reshape(s, -1).astype(np.int64)
    overlap = a @ b.T  # [S new rows, S servers]
    fits = a.sum(axis=1)[:, None] <= np.asarray(capacity)[None, :]
    cost = np.where(fits, -overlap, 10**12)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(s, dtype=np.int64)
    perm[rows] = cols
    return perm


def reserved_slots(capacity: np.ndarray, live: np.ndarray, total_experts: int, reserve: float) -> np.ndarray:
    """Slots the placement may use per server, keeping `reserve` (a fraction) of each free: int [S].

    Free slots let a migration between full servers proceed (a swap of two only-copies needs one free
    slot somewhere). No reserve when the live servers could not hold every expert with it.
    """
    cap = np.asarray(capacity, np.int64)
    usable = cap - np.floor(cap * reserve).astype(np.int64)
    return usable if usable[np.asarray(live, bool)].sum() >= total_experts else cap


def candidate_placement(algorithm: str, rates: np.ndarray, cluster: ClusterSpec, model: ModelSpec,
                        current: Placement, live: np.ndarray, reserve: float = 0.0) -> Placement:
    """The algorithm's placement for the live servers and measured rates, with the fewest moves.

    Algorithms that accept `current=` keep it among equally good answers; for the others the servers'
    new sets are permuted onto the servers that hold most of them already, when that costs nothing.
    `reserve`: fraction of each server's slots left free (see `reserved_slots`). The result spans every
    server (down ones hold nothing); its version is `current.version`.
    """
    from prism_moe.placement.registry import keeps_current, place

    live = np.asarray(live, bool)
    names = list(cluster.server_names)
    link_cost, capacity = link_cost_matrix(cluster, model), cluster.expert_slots(model)
    usable = reserved_slots(capacity, live, model.total_experts, reserve)
    sub = sub_cluster(cluster, live, rates, usable if (usable < capacity).any() else None, model)
    stats = ClusterStats(np.asarray(rates, float)[live])
    cur = restrict(current, live, link_cost, capacity)
    if cur is not None and keeps_current(algorithm):
        p = place(algorithm, stats, sub, model, current=cur)
    else:
        p = place(algorithm, stats, sub, model)
        if cur is not None:
            perm = fewest_moves(p.hosts, cur.hosts, usable[live])
            hosts = np.empty_like(p.hosts)
            hosts[perm] = p.hosts
            sub_cost = link_cost[np.ix_(live, live)]
            mapped = Placement.from_hosts(p.server_names, hosts, sub_cost, p.capacity, p.algorithm, meta=p.meta)
            r = np.asarray(rates, float)[live]
            if expected_cost(mapped, r, sub_cost, 1.0) <= expected_cost(p, r, sub_cost, 1.0) * (1 + 1e-9):
                p = mapped
    return embed(p, names, live, link_cost, capacity, version=current.version)


def candidate_plan(algorithm: str, rates: np.ndarray, cluster: ClusterSpec, model: ModelSpec,
                   live: np.ndarray) -> ExecutionPlan:
    """The plan algorithm's plan for the measured rates (invocations/s [S, L, E]; none measured yet: uniform),
    over every server, then without the down ones (`plan_without`). Its version is 0: the coordinator numbers
    what it switches."""
    from prism_moe.placement.registry import plan_for

    live = np.asarray(live, bool)
    r = np.asarray(rates, float)
    plan = plan_for(algorithm, ClusterStats(np.maximum(r if r.sum() > 0 else np.ones_like(r), 1e-9)), cluster, model)
    if live.all():
        return plan
    return plan_without(plan, live, model, cluster.expert_slots(model), link_cost_matrix(cluster, model))


def plan_without(plan: ExecutionPlan, live: np.ndarray, model: ModelSpec, slots: np.ndarray,
                 link_cost: np.ndarray) -> ExecutionPlan:
    """`plan` without the down servers (placement/failover.py `replan_without`: their layers go to the backup
    executors or stay with the neighbouring block, experts left with no live copy are re-hosted). Every server
    holds the whole dense part, so what it has for experts is its `slots` (int [S]); the result's `dense` is
    the plan's plus the layers survivors now run or back up. Raises ClusterCapacityError when the survivors
    cannot hold the model."""
    from prism_moe.placement.failover import replan_without
    from prism_moe.placement.plan import PlanSizes

    sizes = PlanSizes.of(model)
    budget = sizes.base + plan.num_layers * sizes.dense_layer + (np.asarray(slots) + 0.5) * sizes.expert
    full = ExecutionPlan(plan.placement, plan.executor, np.ones_like(plan.dense), plan.algorithm, plan.meta,
                         plan.backup)
    repair = replan_without(full, ~np.asarray(live, bool), sizes, budget, link_cost)
    if repair.plan is None:
        raise ClusterCapacityError(repair.reason)
    fixed = repair.plan
    dense = plan.dense.copy()
    for row in (fixed.executor, fixed.backup):
        if row is not None:
            for h, l in np.argwhere(row >= 0).tolist():
                dense[row[h, l], l] = True
    return ExecutionPlan(fixed.placement, fixed.executor, dense, plan.algorithm, dict(plan.meta), fixed.backup)


def repair_hosts(hosts: np.ndarray, live: np.ndarray, capacity: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """Hosts after losing the down servers: survivors keep what they hold; every expert left without a live
    copy goes to the live server that uses it most and has a free slot, evicting a spare replica (one whose
    expert keeps another live copy, least used first) when no slot is free. Minimal moves, no solver.

    hosts bool [S, L, E]; live bool [S]; capacity int [S]; demand float [S, L, E]. Returns bool [S, L, E].
    Raises ClusterCapacityError when the survivors' slots cannot hold one copy of every expert.
    """
    live = np.asarray(live, bool)
    h = np.asarray(hosts, bool) & live[:, None, None]
    s, layers, experts = h.shape
    cap = np.where(live, np.asarray(capacity, np.int64), 0)
    if int(cap.sum()) < layers * experts:
        names = np.flatnonzero(live).tolist()
        raise ClusterCapacityError(
            f"the live servers {names} have {int(cap.sum())} expert slots but the model has {layers * experts} "
            f"experts: {layers * experts - int(cap.sum())} cannot be hosted; bring a server back or add memory")
    demand = np.asarray(demand, float)
    orphans = np.argwhere(~h.any(axis=0))
    order = np.argsort(-demand[:, orphans[:, 0], orphans[:, 1]].sum(axis=0), kind="stable") if len(orphans) else []
    for l, e in orphans[order]:
        free = cap - h.sum(axis=(1, 2))
        if (free > 0).any():
            score = np.where(live & (free > 0), demand[:, l, e] + 1e-12 * free, -np.inf)
            h[int(np.argmax(score)), l, e] = True
            continue
        spare = h & (h.sum(axis=0, keepdims=True) >= 2)  # copies whose expert has another live copy
        cand = np.argwhere(spare)
        i = int(np.argmin(demand[cand[:, 0], cand[:, 1], cand[:, 2]]))
        t, lt, et = cand[i]
        h[t, lt, et] = False
        h[t, l, e] = True
    return h


def link_cost_matrix(cluster: ClusterSpec, model: ModelSpec) -> np.ndarray:
    """Seconds per token round trip [S, S] (the same formula as `Problem.build`)."""
    bw, lat = cluster.link_matrices()
    payload_bits = 2 * model.hidden_size * model.bytes_per_param * 8
    return 2 * lat + payload_bits / bw
