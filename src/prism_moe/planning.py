"""From a cluster file to a placement: load each server's workload, build the stats, run an algorithm.

The glue between the cluster file (config), the routing data (stats) and the pure placement functions,
shared by `prism place`, `prism serve`, `prism cluster up`, the simulator and the demo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.placement.problem import ClusterStats, Problem


@dataclass
class Plan:
    placement: Placement
    problem: Problem
    stats: ClusterStats
    solve_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def remote_fraction(self) -> float:
        return self.placement.remote_fraction(self.problem.demand)


def cluster_stats(cluster: ClusterSpec, model: ModelSpec, data_dir: str | None = None) -> tuple[ClusterStats, list[str]]:
    """Each server's workload counts fitted to the model: counts [S, L, E], plus traces where they exist.

    A server without a workload gets uniform counts (nothing known, nothing preferred); workload files are
    relative to the cluster file; the notes say what was assumed or approximated.
    """
    from prism_moe.stats.workload import load_workload

    layers, experts = model.num_moe_layers, model.num_experts
    counts, traces, notes = [], [], []
    for srv in cluster.servers:
        if not srv.workload:
            counts.append(np.ones((layers, experts)))
            traces.append(None)
            notes.append(f"server {srv.name} has no workload: uniform expert counts assumed")
            continue
        source = srv.workload
        if source.endswith((".json", ".safetensors", ".pt")) or "/" in source:
            source = str(cluster.resolve_path(source))
        w = load_workload(source, data_dir).fit_to(layers, experts)
        if w.model_hint and w.model_hint != model.name:
            notes.append(f"server {srv.name}: {srv.workload} was measured on {w.model_hint}, used for {model.name}")
        notes.extend(f"server {srv.name}: {n}" for n in w.notes)
        counts.append(np.asarray(w.counts, dtype=np.float64))
        traces.append(w.trace)
    return ClusterStats(np.stack(counts), tuple(traces)), notes


def plan(cluster: ClusterSpec, algorithm: str | None = None, data_dir: str | None = None,
         model: ModelSpec | None = None, stats: ClusterStats | None = None) -> Plan:
    """Run a placement algorithm (the registry's default when None) on the cluster's workloads."""
    from prism_moe.placement.registry import DEFAULT_ALGORITHM, place

    model = model or cluster.model_spec()
    notes: list[str] = []
    if stats is None:
        stats, notes = cluster_stats(cluster, model, data_dir)
    problem = Problem.build(stats, cluster, model)
    t0 = time.perf_counter()
    placement = place(algorithm or DEFAULT_ALGORITHM, stats, cluster, model)
    return Plan(placement, problem, stats, time.perf_counter() - t0, notes)


def execution_plan(cluster: ClusterSpec, algorithm: str | None = None, data_dir: str | None = None,
                   model: ModelSpec | None = None) -> ExecutionPlan:
    """An execution plan by any algorithm name (placements become plans that run every layer at home)."""
    from prism_moe.placement.registry import DEFAULT_ALGORITHM, PLAN_ALGORITHMS, plan_for

    name = algorithm or DEFAULT_ALGORITHM
    if name not in PLAN_ALGORITHMS:
        return ExecutionPlan.from_placement(plan(cluster, name, data_dir, model).placement)
    model = model or cluster.model_spec()
    stats, _ = cluster_stats(cluster, model, data_dir)
    return plan_for(name, stats, cluster, model)
