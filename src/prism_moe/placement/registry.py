"""Every placement algorithm by name, behind one signature:

    fn(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, **options) -> Placement

`place(name, ...)` runs one. Algorithms that accept `current=` (a Placement) prefer keeping its experts
among equally good answers, for minimal migration; `keeps_current(name)` says which do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.eplb import eplb
from prism_moe.placement.flow import flow
from prism_moe.placement.latency import latency
from prism_moe.placement.optimal import optimal
from prism_moe.placement.placement import Placement
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

# Exact (same objective value as `optimal`), no LP solver, fastest at every measured scale.
DEFAULT_ALGORITHM = "flow"


def keeps_current(name: str) -> bool:
    """Whether algorithm `name` accepts `current=` (prefers keeping a current placement on ties)."""
    return "current" in inspect.signature(_get(name)).parameters


def _get(name: str) -> PlacementAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown placement algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}") from None


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
