"""calibrated_cost maps measured CPU times onto the unchanged CostModel (no model, no cluster)."""

import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.sim.calibrate import Calibration, calibrated_cost
from prism_moe.sim.cost import CostModel


def test_calibrated_cost_reproduces_the_measured_times():
    cluster = cluster_from_dict({"model": "olmoe-1b-7b", "servers": [
        {"name": "a", "gpu": "a100-40gb", "memory_gib": 8}, {"name": "b", "gpu": "a100-40gb", "memory_gib": 8}],
        "network": {"bandwidth_mbps": 500, "latency_ms": 2}})
    cost = CostModel.build(cluster, cluster.model_spec())
    cal = Calibration(dense_layer_s=700e-6, dense_token_s=40e-6, expert_call_s=100e-6, expert_s=150e-6,
                      call_overhead_s=250e-6, step_overhead_s=3e-3)
    c = calibrated_cost(cost, cal)
    assert c.dense_s(0, 1) == pytest.approx(700e-6)
    assert c.dense_s(0, 100) == pytest.approx(100 * 40e-6 + 100e-6)
    assert c.experts_s(1, 5, 30) == pytest.approx(100e-6 + 5 * 150e-6)
    assert c.latency_s[0, 1] == pytest.approx(2e-3 + 125e-6)
    assert c.latency_s[0, 0] == 0
    assert all(p.step_overhead_s == pytest.approx(3e-3) for p in c.profiles)
    assert calibrated_cost(cost, cal, slowdown=2).experts_s(0, 5, 30) == pytest.approx(2 * c.experts_s(0, 5, 30))
