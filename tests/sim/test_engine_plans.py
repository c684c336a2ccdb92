"""Hand-computed simulator cases for execution plans: hand-offs between executors and back home."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.placement.plan import ExecutionPlan
from prism_moe.sim.cost import HEADER_BYTES
from prism_moe.sim.engine import Engine

from .helpers import MS, const_pool, cost_model, placement, requests


def pipeline_plan(owner: list[int], servers: int, experts: int = 2) -> ExecutionPlan:
    layers = len(owner)
    hosts = np.zeros((servers, layers, experts), dtype=bool)
    hosts[owner, np.arange(layers)] = True
    dense = np.zeros((servers, layers), dtype=bool)
    dense[owner, np.arange(layers)] = True
    return ExecutionPlan(placement(hosts), np.tile(owner, (servers, 1)), dense, "pipeline")


def test_pipeline_hands_the_prompt_over_and_the_last_row_back():
    # 2 layers, layer 0 on s0 and layer 1 on s1; a request of s0 with a 3-token prompt, 1 output token.
    # Each layer: dense 1 ms + experts {0, 1} 2 ms = 3 ms. 1 byte = 1 us on the wire, latency 1 ms.
    bw, lat = 8e6, 1 * MS
    cost = cost_model(2, layers=2, bandwidth_bps=bw, latency_s=lat)
    plan = pipeline_plan([0, 1], 2)
    eng = Engine(cost, plan, [const_pool(2, [0, 1])], requests([(0, 0.0, 3, 1)]))
    first, finish, stats, _ = eng.run()
    fwd = (3 * 1000 + HEADER_BYTES) * 8 / bw + lat  # 3 hidden states s0 -> s1
    back = (1 * 1000 + HEADER_BYTES) * 8 / bw + lat  # the request's last row s1 -> s0
    assert first[0] == pytest.approx(3 * MS + fwd + 3 * MS + back)
    assert stats.handoffs == 2 and stats.remote_calls == 0
    assert stats.cross_bytes == stats.handoff_bytes == pytest.approx(4 * 1000 + 2 * HEADER_BYTES)
    assert stats.busy_s == pytest.approx([3 * MS, 3 * MS])


def test_a_home_whose_blocks_all_run_elsewhere_pays_the_way_out_and_back():
    # both layers on s1 for a request of s0: one hop out before layer 0, one back after layer 1
    bw, lat = 8e6, 1 * MS
    cost = cost_model(2, layers=2, bandwidth_bps=bw, latency_s=lat)
    plan = pipeline_plan([1, 1], 2)
    first, finish, stats, _ = Engine(cost, plan, [const_pool(2, [0, 1])], requests([(0, 0.0, 2, 2)])).run()
    out = (2 * 1000 + HEADER_BYTES) * 8 / bw + lat
    back = (1000 + HEADER_BYTES) * 8 / bw + lat
    assert first[0] == pytest.approx(out + 6 * MS + back)
    # the decode step: one token out, 6 ms, back
    assert finish[0] - first[0] == pytest.approx(back + 6 * MS + back)
    assert stats.handoffs == 4


def test_two_homes_share_a_stage_gpu_in_fifo_order():
    # layer 0 on s1 for both homes; requests of s0 and s1 arrive together (prompt 1, output 1)
    bw, lat = 8e6, 1 * MS
    cost = cost_model(2, layers=1, bandwidth_bps=bw, latency_s=lat)
    plan = pipeline_plan([1], 2)
    reqs = requests([(1, 0.0, 1, 1), (0, 0.0, 1, 1)])
    first, _, stats, _ = Engine(cost, plan, [const_pool(1, [0, 1])], reqs).run()
    assert first[0] == pytest.approx(3 * MS)  # s1's own request runs at once
    hop = (1000 + HEADER_BYTES) * 8 / bw + lat  # 2.064 ms: s1's GPU is free again at 3 ms
    assert first[1] == pytest.approx(3 * MS + 3 * MS + hop)
    assert stats.busy_s == pytest.approx([0.0, 6 * MS])


def test_a_placement_is_the_plan_with_every_layer_at_home():
    cost = cost_model(2, layers=2)
    hosts = np.zeros((2, 2, 2), dtype=bool)
    hosts[0, :, 0] = hosts[1, :, 1] = True
    reqs = requests([(0, 0.0, 3, 4), (1, 0.001, 2, 3)])
    pool = [const_pool(2, [0, 1])]
    a = Engine(cost, placement(hosts), pool, reqs).run()
    b = Engine(cost, ExecutionPlan.from_placement(placement(hosts)), pool, reqs).run()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[2].cross_bytes == b[2].cross_bytes and b[2].handoffs == 0


def test_kv_peak_counts_each_layer_on_its_executor_while_requests_overlap():
    from prism_moe.model.spec import load_model_spec
    from prism_moe.placement.plan import PlanSizes
    from prism_moe.sim.run import kv_peak_bytes

    model = load_model_spec("deepseek-v2-lite")
    owner = [0] * 10 + [1] * 16
    plan = pipeline_plan(owner, 2, experts=64)
    reqs = requests([(0, 0.0, 100, 10), (1, 1.0, 50, 10), (0, 5.0, 30, 10)])
    finish = np.array([2.0, 3.0, 6.0])  # the first two overlap in [1, 2); the third is alone
    per = PlanSizes.of(model).kv_token_layer
    got = kv_peak_bytes(plan, model, reqs, finish)
    assert got == pytest.approx([10 * (110 + 60) * per, 16 * (110 + 60) * per])
