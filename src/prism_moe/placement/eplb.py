"""`eplb`: DeepSeek's Expert Parallelism Load Balancer, adapted to servers of unequal memory.

Follows `rebalance_experts` of github.com/deepseek-ai/EPLB (eplb.py, global policy), layer by layer:
  1. replicate_experts: every expert gets one replica, then each further replica goes to the expert
     with the largest load / replicas (weight / logcnt), until the layer's physical slots are used;
  2. balanced_packing: replicas in decreasing load per replica each go to the pack (server) with the
     least load among those with room.
Adapted here: a server's memory is split evenly over the layers (its slots per layer, at most one
apart, layer totals at most one apart); packing picks the least load *per slot* (servers differ in
size); a server never holds two replicas of one expert (EPLB on GPUs may; here they would waste
memory), so an expert has at most as many replicas as the layer has servers with slots; and when the
replica counts are first evened out where the servers' slots could not hold them on distinct servers
(Gale-Ryser), and a replica that every server with room already holds is placed by shifting experts
along an augmenting path. Load is the cluster-wide demand. Locality-blind, like the original: it
balances compute, it does not try to keep invocations local.

Cost O(L x (E S log(E S) + R S)) for R replicas per layer.
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import finish
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.slots import spread_over_layers


def replica_counts(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """EPLB's replicate_experts: replicas per expert, one each, the rest to the max load / replicas.

    Adding the r-th replica (r >= 2) is worth load / (r - 1), decreasing in r, so the greedy sequence
    takes the largest such quotients: computed at once (ties: lower expert id, fewer replicas first).
    load: float [E]; slots >= E. Returns int [E] summing to min(slots, E x max_replicas).
    """
    e = len(load)
    extra = min(slots, e * max_replicas) - e
    counts = np.ones(e, dtype=np.int64)
    if extra <= 0 or max_replicas <= 1:
        return counts
    divisors = np.arange(1, max_replicas)  # r - 1 for r = 2..max_replicas
    quotient = np.asarray(load, dtype=np.float64)[:, None] / divisors[None, :]  # [E, R-1]
    # order: quotient descending, then expert id, then replica number (stable over the flat index)
    flat_order = np.argsort(-quotient, axis=None, kind="stable")[:extra]
    np.add.at(counts, flat_order // (max_replicas - 1), 1)
    return counts


def make_packable(counts: np.ndarray, load: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Move replicas until the servers can hold them with no expert twice on one server.

    A packing exists iff for every k the k largest slot counts sum to at most sum_e min(counts_e, k)
    (Gale-Ryser). While the condition fails at k, the replica least worth having (expert with more than
    k, smallest load / (count - 1)) moves to the expert that most wants one (fewer than k, largest
    load / count). counts: int [E]; load: float [E]; slots: int [S]. Returns int [E].
    """
    counts = counts.copy()
    load = np.asarray(load, dtype=np.float64)
    prefix = np.cumsum(np.sort(slots)[::-1])
    for k in range(1, len(slots) + 1):
        while np.minimum(counts, k).sum() < prefix[k - 1]:
            give = np.where(counts > k, load / np.maximum(counts - 1, 1), np.inf)
            take = np.where(counts < k, load / counts, -np.inf)
            counts[int(np.argmin(give))] -= 1
            counts[int(np.argmax(take))] += 1
    return counts


def pack_replicas(counts: np.ndarray, load: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """EPLB's balanced_packing with unequal packs and at most one replica of an expert per pack.

    Replicas in decreasing load per replica, each to the server with the least load per slot among those
    with room that lack it. counts: int [E] (packable, see `make_packable`); load: float [E];
    slots: int [S] (sum == counts.sum()). Returns bool [S, E].
    """
    s_n, e = len(slots), len(counts)
    per_replica = np.asarray(load, dtype=np.float64) / counts
    replicas = np.repeat(np.arange(e), counts)
    replicas = replicas[np.argsort(-per_replica[replicas], kind="stable")]
    held = np.zeros((s_n, e), dtype=bool)
    used = np.zeros(s_n, dtype=np.int64)
    pack_load = np.zeros(s_n)
    safe_slots = np.maximum(slots, 1)
    for x in replicas.tolist():
        ok = (used < slots) & ~held[:, x]
        if ok.any():
            s = int(np.argmin(np.where(ok, pack_load / safe_slots, np.inf)))
        else:
            s = _make_room(held, slots, x)
            used = held.sum(axis=1)
        held[s, x] = True
        used[s] += 1
        pack_load[s] += per_replica[x]
    return held


def _make_room(held: np.ndarray, slots: np.ndarray, x: int) -> int:
    """Every server with room holds x: shift experts along a chain v0 -> v1 -> ... -> (server with
    room), each handing one expert the next lacks (an augmenting path; one exists when the counts are
    packable). Returns v0, which lacks x and now has a free slot. Pack loads are left as they were."""
    s_n = held.shape[0]
    room = held.sum(axis=1) < slots
    start = [v for v in range(s_n) if not held[v, x] and slots[v] > 0]
    parent: dict[int, tuple[int, int]] = {}  # server -> (previous server, expert it received)
    frontier, seen = list(start), set(start)
    while frontier:
        nxt = []
        for v in frontier:
            for u in range(s_n):
                if u in seen:
                    continue
                movable = np.flatnonzero(held[v] & ~held[u])
                if movable.size == 0:
                    continue
                parent[u] = (v, int(movable[0]))
                if room[u]:
                    while u in parent:  # walk back, moving each expert one step down the chain
                        v_prev, y = parent[u]
                        held[v_prev, y], held[u, y] = False, True
                        u = v_prev
                    return u
                seen.add(u)
                nxt.append(u)
        frontier = nxt
    raise RuntimeError(f"cannot pack a replica of expert {x}: the replica counts are not packable")


def eplb(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement:
    """DeepSeek EPLB per layer, adapted to unequal memory. stats.counts float [S, L, E]."""
    problem = Problem.build(stats, cluster, model)
    s_n, layers, e = problem.demand.shape
    slots = spread_over_layers(problem.capacity, layers, e)  # [S, L]
    load = problem.demand.sum(axis=0)  # [L, E]
    hosts = np.zeros((s_n, layers, e), dtype=bool)
    for l in range(layers):
        packs = int((slots[:, l] > 0).sum())
        # a server holds at most E experts of a layer, so the slots fit E x packs replicas
        counts = replica_counts(load[l], int(slots[:, l].sum()), packs)
        counts = make_packable(counts, load[l], slots[:, l])
        hosts[:, l] = pack_replicas(counts, load[l], slots[:, l])
    return finish(problem, hosts, "eplb")
