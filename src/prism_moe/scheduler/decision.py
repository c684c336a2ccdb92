"""The migration decision: move to candidate P' only when C(P') + T_mig < C(P) x (1 - margin).

C(P): expected seconds of remote round trips over the next period, from recent rates:
      period x sum_{s,l,e} rate[s,l,e] x link_cost[s, route[s,l,e]]  (local invocations cost 0).
T_mig: seconds until every receiver holds its new experts. Same model as `placement/cost.py`: each
      receiver fetches its new experts one after another, whole, from the live old holder with the
      fastest link to it; receivers fetch in parallel. Only live servers are sources; an expert with no
      live copy is read from the receiver's checkpoint at `disk_bandwidth` bits/s.
The margin keeps noise from moving experts back and forth (Petals moves blocks only past a quality
threshold for the same reason). Pure functions; shapes in the docstrings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from prism_moe.placement.placement import Placement

DISK_BANDWIDTH = 8e9  # bits/s (1 GB/s): reading an expert from a local checkpoint


@dataclass(frozen=True)
class Decision:
    migrate: bool
    reason: str
    cost_current: float  # C(P), seconds of remote round trips over the period
    cost_candidate: float  # C(P')
    migration_seconds: float  # T_mig
    migration_bytes: int
    experts_moved: int
    margin: float
    period: float

    def to_dict(self) -> dict:
        return asdict(self)


def expected_cost(placement: Placement, rates: np.ndarray, link_cost: np.ndarray, period: float) -> float:
    """C(P) over `period` seconds. rates: invocations/s [S, L, E]; link_cost: s per token round trip [S, S]."""
    cost = np.array(link_cost, dtype=np.float64)
    np.fill_diagonal(cost, 0.0)  # a local expert needs no round trip
    return period * placement.remote_cost(np.asarray(rates, dtype=np.float64), cost)


def transfer_seconds(old_hosts: np.ndarray, new_hosts: np.ndarray, bandwidth: np.ndarray, expert_bytes: int,
                     live: np.ndarray | None = None, disk_bandwidth: float = DISK_BANDWIDTH) -> float:
    """T_mig: old/new hosts bool [S, L, E], bandwidth bits/s [S, S], live bool [S] (default all)."""
    old_hosts, new_hosts = np.asarray(old_hosts, bool), np.asarray(new_hosts, bool)
    s = old_hosts.shape[0]
    live = np.ones(s, dtype=bool) if live is None else np.asarray(live, bool)
    bits = 8.0 * expert_bytes
    moved = new_hosts & ~old_hosts
    worst = 0.0
    for r in np.flatnonzero(moved.any(axis=(1, 2)) & live).tolist():
        sources = old_hosts[:, moved[r]] & live[:, None]  # [S, M]
        bw = np.where(sources, np.asarray(bandwidth, float)[:, r][:, None], 0.0).max(axis=0)  # [M]
        bw = np.where(bw > 0, bw, disk_bandwidth)
        worst = max(worst, float((bits / bw).sum()))
    return worst


def decide(current: Placement, candidate: Placement, rates: np.ndarray, link_cost: np.ndarray,
           bandwidth: np.ndarray, expert_bytes: int, period: float, margin: float,
           live: np.ndarray | None = None) -> Decision:
    """Whether to migrate from `current` to `candidate` (see the module docstring for the rule)."""
    c_now = expected_cost(current, rates, link_cost, period)
    c_new = expected_cost(candidate, rates, link_cost, period)
    moved = candidate.moved_from(current)
    n = int(moved.sum())
    t_mig = transfer_seconds(current.hosts, candidate.hosts, bandwidth, expert_bytes, live)
    common = dict(cost_current=c_now, cost_candidate=c_new, migration_seconds=t_mig,
                  migration_bytes=n * int(expert_bytes), experts_moved=n, margin=margin, period=period)
    if n == 0:
        return Decision(False, "the candidate holds nothing new", **common)
    if c_now <= 0:
        return Decision(False, "no remote cost to save", **common)
    bound = c_now * (1.0 - margin)
    if c_new + t_mig < bound:
        return Decision(True, f"C(P')+T_mig = {c_new + t_mig:.4g} s < C(P)(1-margin) = {bound:.4g} s", **common)
    return Decision(False, f"C(P')+T_mig = {c_new + t_mig:.4g} s >= C(P)(1-margin) = {bound:.4g} s", **common)
