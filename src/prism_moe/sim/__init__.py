"""Discrete-event model of the cluster: GPU profiles (roofline), links, queues, Poisson arrivals,
replayed routing. See docs/simulator.md.

    from prism_moe.sim import build_scenario, make_placement, simulate
    scen = build_scenario(cluster)                 # workloads from the cluster file
    result = simulate(scen, make_placement(scen, "prism"), n_requests=200, seed=0)
    result.summary()["mean_latency_s"]
"""

from prism_moe.sim.cost import CostModel
from prism_moe.sim.engine import Engine, EngineConfig, PlacementChange
from prism_moe.sim.metrics import SimResult
from prism_moe.sim.run import Scenario, build_scenario, make_placement, simulate

__all__ = ["CostModel", "Engine", "EngineConfig", "PlacementChange", "Scenario", "SimResult", "build_scenario",
           "make_placement", "simulate"]
