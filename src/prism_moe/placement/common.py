"""Helpers the placement algorithms share: flat views, the keep-current tie-break, finishing a Placement.

Shapes: S servers, L MoE layers, E experts per layer, N = L x E experts in all ("flat" expert index
l x E + e).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import Problem

# The exact solvers work on integer values: demand in units of 2^-36 of the largest demand, plus 2^16
# units (2^-20, about 1e-6 of the largest demand) where the current placement holds the expert.
# Integers (< 2^53 along any path) make the min-cost flow's arithmetic exact; the LP sees the same
# values / 2^36, whose tie-break bonus stays ten times above HiGHS' 1e-7 tolerance. So both solvers
# optimise the same objective, and placements within ~1e-6 of the largest demand per changed expert
# count as ties that the current placement wins (minimal migration).
VALUE_BITS = 36
KEEP_UNITS = 2.0**16


def flat(a: np.ndarray) -> np.ndarray:
    """[S, L, E] -> [S, L x E] (a view when possible)."""
    return a.reshape(a.shape[0], -1)


def check_current(current: Placement | None, problem: Problem) -> None:
    if current is None:
        return
    want = (problem.num_servers, problem.num_layers, problem.num_experts)
    if current.hosts.shape != want or tuple(current.server_names) != tuple(problem.server_names):
        raise ValueError(f"current placement is for servers {list(current.server_names)} and shape "
                         f"{current.hosts.shape}; this problem has servers {list(problem.server_names)} and "
                         f"shape {want}")


def integer_value(value: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """value float [S, N] >= 0 in integer units (see VALUE_BITS), + KEEP_UNITS where prefer (bool [S, N]).

    Returns float [S, N] holding integers (exact in float64).
    """
    value = np.asarray(value, dtype=np.float64)
    top = float(value.max()) if value.size else 0.0
    units = np.rint(value * (2.0**VALUE_BITS / top)) if top > 0 else np.zeros_like(value)
    return units if prefer is None else units + KEEP_UNITS * np.asarray(prefer, dtype=bool)


def current_hosts(current: Placement | None) -> np.ndarray | None:
    """Flat hosts [S, N] of the current placement, or None."""
    return None if current is None else flat(current.hosts)


def drop_idle_duplicates(hosts: np.ndarray, value: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """Free slots holding a zero-value copy of an expert that is held elsewhere too.

    Such copies change no objective but would cost a migration; copies in `prefer` (already there)
    stay. Every expert keeps at least one holder. hosts: bool [S, N]; value: float [S, N];
    prefer: bool [S, N] or None. Returns a new bool [S, N].
    """
    hosts = hosts.copy()
    idle = hosts & (value <= 0)
    if prefer is not None:
        idle &= ~np.asarray(prefer, dtype=bool)
    if not idle.any():
        return hosts
    useful = (hosts & ~idle).any(axis=0)  # [N]
    # experts held only idly keep their first idle holder
    first = np.argmax(idle, axis=0)
    keep = np.zeros_like(idle)
    cols = np.flatnonzero(~useful & idle.any(axis=0))
    keep[first[cols], cols] = True
    hosts &= ~(idle & ~keep)
    return hosts


def finish(problem: Problem, hosts: np.ndarray, algorithm: str, **meta: Any) -> Placement:
    """A validated Placement (routes over the cheapest links) from hosts bool [S, L, E] or [S, N]."""
    shaped = np.asarray(hosts, dtype=bool).reshape(problem.demand.shape)
    return Placement.from_hosts(problem.server_names, shaped, problem.link_cost, problem.capacity,
                                algorithm, meta=meta)


def greedy_top(value: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Each server holds its `capacity` highest-value experts (ties: lower index first).

    value: float [S, N]; capacity: int [S]. Returns bool [S, N].
    """
    s_n, n = value.shape
    cap = np.minimum(np.asarray(capacity, dtype=np.int64), n)
    order = np.argsort(-value, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), (s_n, n)), axis=1)
    return rank < cap[:, None]
