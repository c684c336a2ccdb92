"""Re-planning after servers fail: the survivors take over the dead servers' layers and experts.

`replan_without(plan, dead, sizes, weight_budget, link_cost)` keeps what survivors hold and changes only
what the failure broke (fewest loads, no solver):

1. Every (live home h, layer l) whose executor died moves to the plan's backup executor when it is
   alive (it holds a copy: nothing to load); else to a live server that already holds the layer's dense
   part (the neighbouring layer's executor first, to keep blocks together: fewer hand-offs); else the
   layer's dense part is loaded on the previous layer's executor, the home, or the survivor with most
   free memory, in that order among those where it fits (with the layer's lost experts if possible).
2. Every expert left without a live copy is loaded on a survivor that executes its layer (then any
   survivor) with free memory, most free first; with none free, a spare replica (an expert with another
   live copy) is evicted for it, on a server that does not execute that replica's layer first (as the
   scheduler's `repair_hosts` does for placements).

Loads come from each survivor's own checkpoint (the weights are on its disk, as `prism serve` loads
them): `loaded_bytes [S]`. When the survivors' memory (`weight_budget`, bytes [S]) cannot hold what is
needed, the result has `plan = None` and says why; dead homes' requests fail either way. A placement
is the plan with every layer at home, so Prism placements take the same path (their executors never
die for a live home: only orphaned experts are loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_moe.model.spec import format_bytes
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan, PlanSizes


@dataclass(frozen=True)
class Repair:
    plan: ExecutionPlan | None  # None: the survivors cannot hold the model
    loaded_bytes: np.ndarray  # float [S]: weights each survivor loads from its checkpoint
    moved_layers: int  # (home, layer) pairs whose executor changed
    from_backup: int  # of those, taken over by the plan's backup executor
    reason: str = ""


def replan_without(plan: ExecutionPlan, dead: np.ndarray, sizes: PlanSizes, weight_budget: np.ndarray,
                   link_cost: np.ndarray) -> Repair:
    """The plan after losing the servers with dead[s] (bool [S]); see the module docstring."""
    dead = np.asarray(dead, dtype=bool)
    live = ~dead
    s_n, layers = plan.executor.shape
    names = plan.server_names
    loaded = np.zeros(s_n)
    if not live.any():
        return Repair(None, loaded, 0, 0, "no server is left")
    hosts = plan.placement.hosts & live[:, None, None]
    dense = plan.dense & live[:, None]
    ex = plan.executor.copy()
    free = np.where(live, np.asarray(weight_budget, dtype=np.float64) - _weights(hosts, dense, sizes), -np.inf)
    moved = from_backup = 0
    homes = np.flatnonzero(live)
    for h in homes.tolist():
        for l in range(layers):
            if live[ex[h, l]]:
                continue
            moved += 1
            bk = -1 if plan.backup is None else int(plan.backup[h, l])
            if bk >= 0 and live[bk] and dense[bk, l]:
                ex[h, l] = bk
                from_backup += 1
                continue
            near = [int(ex[h, l - 1])] if l > 0 else [h]
            holders = np.flatnonzero(dense[:, l]).tolist()
            if holders:
                ex[h, l] = next((p for p in near if p in holders),
                                max(holders, key=lambda p: (hosts[p, l].sum(), free[p])))
                continue
            lost = float((~hosts[:, l].any(axis=0)).sum()) * sizes.expert
            order = [*near, h, *np.argsort(-free).tolist()]
            fits = [p for p in order if live[p] and free[p] >= sizes.dense_layer + lost]
            fits = fits or [p for p in order if live[p] and free[p] >= sizes.dense_layer]
            if not fits:
                return Repair(None, loaded, moved, from_backup,
                              f"no survivor has {format_bytes(sizes.dense_layer)} free for layer {l}'s dense part "
                              f"(lost with {', '.join(n for n, d in zip(names, dead, strict=True) if d)})")
            p = fits[0]
            dense[p, l] = True
            free[p] -= sizes.dense_layer
            loaded[p] += sizes.dense_layer
            ex[h, l] = p
    runs = np.zeros((s_n, layers), dtype=bool)  # runs[p, l]: p executes layer l for some live home
    for h in homes.tolist():
        runs[ex[h], np.arange(layers)] = True
    for l, e in np.argwhere(~hosts.any(axis=0)).tolist():
        cand = [p for p in np.argsort(-free).tolist() if live[p] and free[p] >= sizes.expert]
        if not cand:  # evict a spare replica (its expert keeps another live copy), one its server does not run first
            spare = np.argwhere(hosts & (hosts.sum(axis=0, keepdims=True) >= 2))
            if not len(spare):
                return Repair(None, loaded, moved, from_backup,
                              f"the survivors' memory cannot hold a copy of expert {e} of layer {l}: "
                              f"{format_bytes(float(np.where(live, free, 0).sum()))} free and no spare replica")
            q, lq, eq = spare[np.argmin(runs[spare[:, 0], spare[:, 1]])]
            hosts[q, lq, eq] = False
            free[q] += sizes.expert
            cand = [int(q)]
        p = next((q for q in cand if runs[q, l]), cand[0])
        hosts[p, l, e] = True
        free[p] -= sizes.expert
        loaded[p] += sizes.expert
    for h in np.flatnonzero(dead).tolist():  # a dead home's row stays valid (its requests fail)
        ex[h] = ex[homes[0]]
    placement = Placement.from_hosts(names, hosts, link_cost, algorithm=plan.placement.algorithm,
                                     meta=dict(plan.placement.meta))
    backup = None
    if plan.backup is not None:
        backup = plan.backup.copy()
        ok = backup >= 0
        safe = np.where(ok, backup, 0)
        keep = ok & live[safe] & (safe != ex) & dense[safe, np.arange(layers)[None, :]]
        keep &= hosts[safe, np.arange(layers)[None, :]].all(axis=2)
        backup[~keep] = -1
    new = ExecutionPlan(placement, ex, dense, plan.algorithm, dict(plan.meta), backup)
    return Repair(new, loaded, moved, from_backup)


def _weights(hosts: np.ndarray, dense: np.ndarray, sizes: PlanSizes) -> np.ndarray:
    return sizes.base + dense.sum(axis=1) * sizes.dense_layer + hosts.sum(axis=(1, 2)) * sizes.expert
