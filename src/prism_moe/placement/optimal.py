"""`optimal`: the exact optimum of the paper's proxy objective, solved as an LP with HiGHS.

    minimise   sum_{s,l,e} demand[s,l,e] x [e not on s]
    subject to every expert hosted at least once; server s holds at most capacity[s] experts.

Equivalently maximise the local demand sum demand x hosts (demand on a grid of 2^-36 of its largest
value, shared with `flow`; see `common.VALUE_BITS`). The constraint matrix is the incidence
matrix of the bipartite graph servers x experts (one cover row per expert, one memory row per
server, every column in exactly one row of each kind): totally unimodular, so every vertex of the LP
relaxation is integral. HiGHS' dual simplex returns a vertex; the solution is checked to be integral
within 1e-6 and rounded (a fractional value raises: it would mean a solver fault, not a hard instance).

Reductions that keep the optimum: when each server's top-`capacity` experts already cover every
expert, that greedy choice is optimal (it is optimal without the cover rows) and no LP is solved; the
LP matrix is built column-wise in CSC form directly (two non-zeros per column).

Size: S x L x E columns, L x E + S rows; a few hundredths of a second at paper scale (3 x 26 x 64),
seconds at DeepSeek-V3 scale (16 x 58 x 256). `flow` solves the same problem exactly without an LP.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.common import (
    VALUE_BITS,
    check_current,
    current_hosts,
    drop_idle_duplicates,
    finish,
    flat,
    greedy_top,
    integer_value,
)
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats, Problem

INTEGRALITY_TOL = 1e-6


def solve_lp(value: np.ndarray, capacity: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """Hosts maximising the held value, every expert held at least once (exact, via HiGHS).

    Solved for the value on the grid of `common.integer_value`, scaled to about [0, 1] (where HiGHS is
    fastest), like `mincost.max_local_value`: both return the same optimum up to HiGHS' tolerances.
    `prefer` (bool [S, N]) wins near-ties. value: float [S, N] >= 0; capacity: int [S] with
    sum >= N. Returns bool [S, N].
    """
    value = integer_value(np.asarray(value, dtype=np.float64), prefer) / 2.0**VALUE_BITS
    s_n, n = value.shape
    cap = np.minimum(np.asarray(capacity, dtype=np.int64), n)
    if int(cap.sum()) < n:
        raise ValueError(f"{int(cap.sum())} slots cannot hold one copy of each of {n} experts")
    greedy = greedy_top(value, cap)
    if greedy.any(axis=0).all():
        return greedy
    cols = s_n * n
    # column s*N + j = x[s, j]: row j (cover, written as -sum <= -1) and row N + s (memory)
    rows = np.empty(2 * cols, dtype=np.int64)
    rows[0::2] = np.tile(np.arange(n), s_n)
    rows[1::2] = n + np.repeat(np.arange(s_n), n)
    vals = np.empty(2 * cols)
    vals[0::2], vals[1::2] = -1.0, 1.0
    a = sp.csc_array((vals, rows, np.arange(0, 2 * cols + 1, 2)), shape=(n + s_n, cols))
    b = np.concatenate([-np.ones(n), cap.astype(np.float64)])
    res = linprog(-value.ravel(), A_ub=a, b_ub=b, bounds=(0.0, 1.0), method="highs-ds")
    if res.status != 0 or res.x is None:
        raise RuntimeError(f"HiGHS did not solve the placement LP: {res.message}")
    x = res.x.reshape(s_n, n)
    off = float(np.abs(x - np.round(x)).max())
    if off > INTEGRALITY_TOL:
        raise RuntimeError(f"the placement LP returned a fractional value (off by {off:.2e}); its matrix is "
                           f"totally unimodular, so this is a solver fault")
    return x > 0.5


def optimal(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *,
            current: Placement | None = None) -> Placement:
    """Exact optimum of the remote-invocation objective. stats.counts float [S, L, E].

    current: among equally good placements, prefer keeping what this one holds (minimal migration).
    """
    problem = Problem.build(stats, cluster, model)
    check_current(current, problem)
    value, prefer = flat(problem.demand), current_hosts(current)
    hosts = drop_idle_duplicates(solve_lp(value, problem.capacity, prefer), value, prefer)
    return finish(problem, hosts, "optimal", solver="highs-ds")
