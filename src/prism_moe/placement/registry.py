"""Every placement algorithm by name, behind one signature:

    fn(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, **options) -> Placement

`place(name, ...)` runs one. Algorithms that accept `current=` (a Placement) prefer keeping its experts
among equally good answers, for minimal migration; `keeps_current(name)` says which do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.eplb import eplb
from prism_moe.placement.flow import flow
from prism_moe.placement.hybrid import hybrid
from prism_moe.placement.latency import latency
from prism_moe.placement.optimal import optimal
from prism_moe.placement.pipeline import pipeline, pipeline_opt
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.placement.prism import prism
from prism_moe.placement.problem import ClusterStats
from prism_moe.placement.redundance import redundance
from prism_moe.placement.smartmoe import smartmoe
from prism_moe.placement.uniform import uniform

PlacementAlgorithm = Callable[..., Placement]

ALGORITHMS: dict[str, PlacementAlgorithm] = {
    # baselines, blind to where requests come from
    "uniform": uniform,
    "redundance": redundance,
    "eplb": eplb,
    "smartmoe": smartmoe,
    # the paper's method, as published
    "prism": prism,
    # exact optimum of the paper's proxy objective (remote invocations): LP (HiGHS) and min-cost flow
    "optimal": optimal,
    "flow": flow,
    # other objectives: add one line here, e.g. the simulator's latency-aware placement
    "latency": latency,  # estimated request latency (layer stalls, links, GPU speed): placement/latency.py
}

# Execution plans (placement/plan.py): where each layer runs for each home server, not only which experts
# each server holds. Same signature, returning an ExecutionPlan; `plan_for(name, ...)` runs any name and
# wraps a placement as the plan whose layers all run at home.
PLAN_ALGORITHMS: dict[str, Callable[..., ExecutionPlan]] = {
    "pipeline": pipeline,  # memory-proportional contiguous layer blocks (exo, llama.cpp RPC)
    "pipeline-opt": pipeline_opt,  # the best contiguous split over GPUs and links (prima.cpp's Halda)
    "hybrid": hybrid,  # per home and layer: at home, remote experts, or a hand-off (placement/hybrid.py)
    # the same splits with a second copy of each block where memory allows (a backup executor per layer)
    "pipeline-rep": partial(pipeline, replicate=True),
    "pipeline-opt-rep": partial(pipeline_opt, replicate=True),
}


def is_plan_algorithm(name: str) -> bool:
    return name in PLAN_ALGORITHMS


def plan_for(name: str, stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, **options: Any) -> ExecutionPlan:
    """An execution plan by any algorithm name (placements become plans with every layer at home)."""
    if name in PLAN_ALGORITHMS:
        return PLAN_ALGORITHMS[name](stats, cluster, model, **options)
    return ExecutionPlan.from_placement(place(name, stats, cluster, model, **options))


# Exact (same objective value as `optimal`), no LP solver, fastest at every measured scale.
DEFAULT_ALGORITHM = "flow"


def keeps_current(name: str) -> bool:
    """Whether algorithm `name` accepts `current=` (prefers keeping a current placement on ties)."""
    return "current" in inspect.signature(_get(name)).parameters


def _get(name: str) -> PlacementAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        if name in PLAN_ALGORITHMS:
            raise ValueError(f"{name!r} makes an execution plan, not a placement; use plan_for") from None
        raise ValueError(f"unknown placement algorithm {name!r}; choose one of "
                         f"{', '.join([*ALGORITHMS, *PLAN_ALGORITHMS])}") from None


def place(name: str, stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *,
          current: Placement | None = None, **options: Any) -> Placement:
    """Run algorithm `name`. `current` goes to algorithms that accept it (see `keeps_current`); giving
    it to one that does not is an error rather than silently ignored."""
    fn = _get(name)
    if current is not None:
        if not keeps_current(name):
            keepers = [n for n in ALGORITHMS if keeps_current(n)]
            raise ValueError(f"algorithm {name!r} cannot keep a current placement; use one of {', '.join(keepers)}")
        options["current"] = current
    return fn(stats, cluster, model, **options)
