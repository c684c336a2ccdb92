"""`prism`: the two-stage placement of the Prism paper (arXiv 2508.12851), as published.

Stage 1, slots per layer: each server splits its expert slots over the layers in proportion to the
entropy of its own activation distribution at each layer (a layer whose requests spread over many
experts needs more of them locally; a peaked layer is served by a few). Rounded by largest
remainder, at most E per layer. Then a repair makes every layer have at least E slots cluster-wide,
so each expert can be hosted: a slot moves from the layer with the largest surplus (from the server
with the most slots there) to a short layer, until no layer is short.
Stage 2, experts: each server takes its most-activated experts in each layer, as many as its slots.
Every expert nobody took (in decreasing cluster-wide demand) replaces the least useful duplicate of
its layer: the copy, held by a server whose copy is not the only one, with the lowest demand from
that server.

A heuristic: the slot split ignores what the other servers hold, and stage 2 never revisits stage 1.
Cost O(S x L x E log E + U x S x E) for U experts nobody took.
"""

from __future__ import annotations

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import finish
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.slots import proportional


def layer_entropy(freq: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row. freq: float [..., E], rows sum to 1. Returns float [...]."""
    p = np.clip(freq, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def entropy_slots(freq: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Stage 1: slots per server and layer, int [S, L], rows summing to capacity (<= L x E).

    freq: float [S, L, E] per-layer activation frequencies of each server.
    """
    s_n, layers, e = freq.shape
    ent = layer_entropy(freq)  # [S, L]
    cap_row = np.full(layers, e, dtype=np.int64)
    slots = np.stack([proportional(int(min(capacity[s], layers * e)), ent[s], cap_row) for s in range(s_n)])
    return cover_every_layer(slots, e)


def cover_every_layer(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """Move slots until every layer has >= E cluster-wide (possible when the total is >= L x E).

    slots: int [S, L], entries <= E. Returns int [S, L] with the same row sums.
    """
    slots = slots.copy()
    while True:
        total = slots.sum(axis=0)  # [L]
        short = np.flatnonzero(total < num_experts)
        if short.size == 0:
            return slots
        l = int(short[0])
        # donors: layers with surplus; pick the largest surplus, then the server with most slots there
        # that can still take one more expert of layer l
        can_take = slots[:, l] < num_experts
        surplus = np.where(total > num_experts, total - num_experts, 0)
        best = None
        for donor in np.argsort(-surplus, kind="stable").tolist():
            if surplus[donor] == 0:
                break
            ok = can_take & (slots[:, donor] > 0)
            if ok.any():
                best = (donor, int(np.argmax(np.where(ok, slots[:, donor], -1))))
                break
        if best is None:
            raise ValueError("cannot give every layer E slots: not enough memory for one copy of each expert")
        donor, s = best
        slots[s, donor] -= 1
        slots[s, l] += 1


def fill_and_cover(demand: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Stage 2: top experts per server and layer, then uncovered experts replace the least useful duplicate.

    demand: float [S, L, E]; slots: int [S, L] (every layer >= E in total). Returns bool [S, L, E].
    """
    s_n, layers, e = demand.shape
    order = np.argsort(-demand, axis=2, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(e), order.shape), axis=2)
    hosts = rank < slots[:, :, None]
    cluster_demand = demand.sum(axis=0)  # [L, E]
    for l in range(layers):
        h = hosts[:, l]  # view [S, E]
        missing = np.flatnonzero(~h.any(axis=0))
        for x in missing[np.argsort(-cluster_demand[l, missing], kind="stable")].tolist():
            dup = h & (h.sum(axis=0) >= 2)[None, :]
            # least useful duplicate; ties: the server that wants x most, then lower ids
            score = np.where(dup, demand[:, l], np.inf)
            best = score.min()
            cand = np.argwhere(score == best)
            s, y = max(cand.tolist(), key=lambda sy: (demand[sy[0], l, x], -sy[0], -sy[1]))
            h[s, y], h[s, x] = False, True
    return hosts


def prism(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement:
    """The paper's entropy-guided two-stage placement. stats.counts float [S, L, E]."""
    problem = Problem.build(stats, cluster, model)
    slots = entropy_slots(stats.frequencies(), problem.capacity)
    return finish(problem, fill_and_cover(problem.demand, slots), "prism")
