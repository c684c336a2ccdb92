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


def test_a_hand_off_pays_the_cost_models_block_call_overhead_each_way():
    # as above, with 0.5 ms of hand-off overhead per hop (what sim.calibrate.measure_handoff measures, halved)
    from dataclasses import replace

    bw, lat = 8e6, 1 * MS
    cost = replace(cost_model(2, layers=2, bandwidth_bps=bw, latency_s=lat), handoff_overhead_s=0.5 * MS)
    eng = Engine(cost, pipeline_plan([0, 1], 2), [const_pool(2, [0, 1])], requests([(0, 0.0, 3, 1)]))
    first, *_ = eng.run()
    fwd = (3 * 1000 + HEADER_BYTES) * 8 / bw + lat + 0.5 * MS
    back = (1 * 1000 + HEADER_BYTES) * 8 / bw + lat + 0.5 * MS
    assert first[0] == pytest.approx(3 * MS + fwd + 3 * MS + back)


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


def _repair(servers: int, budget: float = 10e6):
    from functools import partial

    from prism_moe.placement.failover import replan_without
    from prism_moe.placement.plan import PlanSizes

    sizes = PlanSizes(base=0.0, dense_layer=1e6, expert=1e6, kv_token_layer=0.0, num_experts=2)
    return partial(replan_without, sizes=sizes, weight_budget=np.full(servers, budget),
                   link_cost=np.ones((servers, servers)))


def test_a_dead_stage_fails_its_requests_and_the_survivor_loads_the_layer_then_serves():
    from prism_moe.sim.engine import ServerFailure
    from prism_moe.sim.metrics import SimResult

    # layer 0 runs on s1 for both homes. s0's first request (prompt 1, 100 tokens) is decoding when s1
    # dies at 10 ms; s1's own request waits in its queue. The survivor s0 loads layer 0 (dense 1 MB + 2
    # experts of 1 MB) at 1 GB/s = 3 ms after 100 ms of detection: the plan switches at 113 ms, and s0's
    # request arriving at 20 ms runs at home then: 3 ms (dense 1 ms + experts 2 ms), no hop.
    cost = cost_model(2, layers=1)
    reqs = requests([(0, 0.0, 1, 100), (1, 0.005, 1, 100), (0, 0.020, 1, 1)])
    fail = ServerFailure(time=0.010, server=1, detect_s=0.100, load_gb_s=1.0)
    eng = Engine(cost, pipeline_plan([1], 2), [const_pool(1, [0, 1])], reqs, failures=[fail], repair=_repair(2))
    first, finish, stats, wall = eng.run()
    assert eng.failed.tolist() == [True, True, False]
    assert np.isnan(finish[:2]).all()
    assert first[2] == pytest.approx(0.113 + 3 * MS) and finish[2] == first[2]
    rec = stats.failures[0]
    assert rec["switched_at"] == pytest.approx(0.113) and rec["loaded_bytes"] == 3e6
    assert rec["failed_requests"] == 2 and rec["paused_homes"] == [0] and rec["moved_layers"] == 1
    assert rec["failed_own"] == 1 and rec["failed_in_flight"] == 1  # s1's own; s0's with its KV cache on s1
    res = SimResult(("s0", "s1"), reqs, first, finish, stats, wall, "pipeline", None, eng.failed)
    summ = res.summary()
    assert summ["failed_requests"] == 2 and summ["requests"] == 3
    assert summ["mean_latency_s"] == pytest.approx(0.113 + 3 * MS - 0.020)
    assert summ["failures"][0]["server"] == "s1" and summ["failures"][0]["paused_homes"] == ["s0"]


def test_a_dead_server_without_room_on_the_survivors_stops_the_homes_that_needed_it():
    from prism_moe.sim.engine import ServerFailure

    cost = cost_model(2, layers=1)
    reqs = requests([(0, 0.0, 1, 100), (0, 0.020, 1, 1)])
    fail = ServerFailure(time=0.010, server=1)
    eng = Engine(cost, pipeline_plan([1], 2), [const_pool(1, [0, 1])], reqs, failures=[fail],
                 repair=_repair(2, budget=2e6))  # s0 cannot hold the 3 MB layer
    _, finish, stats, _ = eng.run()
    assert eng.failed.all() and np.isnan(finish).all()
    assert stats.failures[0]["switched_at"] is None and stats.failures[0]["stopped_homes"] == [1, 0]
    assert "layer 0" in stats.failures[0]["reason"]


def test_with_a_placement_only_the_dead_home_loses_requests_the_others_pause_then_finish():
    from prism_moe.sim.engine import ServerFailure

    # s0 holds expert 0, s1 expert 1, s2 both; s0's tokens call s1 for expert 1 (the first of equal links).
    # s1 dies at 10 ms while s0 decodes: s0's request keeps its KV cache at home, pauses until the repaired
    # placement (routes to s2, nothing to load) is in place at 10 + 50 ms, then finishes.
    hosts = np.zeros((3, 1, 2), dtype=bool)
    hosts[0, 0, 0] = hosts[1, 0, 1] = hosts[2, 0, :] = True
    cost = cost_model(3, layers=1)
    reqs = requests([(0, 0.0, 1, 30), (1, 0.001, 1, 30)])
    fail = ServerFailure(time=0.010, server=1, detect_s=0.050)
    eng = Engine(cost, placement(hosts), [const_pool(1, [0, 1])], reqs, failures=[fail], repair=_repair(3))
    first, finish, stats, _ = eng.run()
    assert eng.failed.tolist() == [False, True]
    assert finish[0] > 0.060 and stats.failures[0]["loaded_bytes"] == 0.0
    assert stats.failures[0]["failed_requests"] == 1 and stats.failures[0]["moved_layers"] == 0
    assert stats.failures[0]["failed_in_flight"] == 0  # a placement keeps every KV cache at home
    assert (eng.plan.placement.route[0, 0] == [0, 2]).all()
