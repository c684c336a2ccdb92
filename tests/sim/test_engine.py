"""Hand-computed simulator cases: step times, a remote call, link queueing, placement switches."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.sim.cost import HEADER_BYTES, PAIR_BYTES
from prism_moe.sim.engine import Engine, PlacementChange

from .helpers import MS, const_pool, cost_model, placement, requests


def run(cost, hosts, reqs, pools, changes=None):
    eng = Engine(cost, placement(hosts), pools, reqs, changes=changes)
    first, finish, stats, _ = eng.run()
    return first, finish, stats


def test_one_server_one_request_exact_latency():
    # 2 layers; each layer: dense 1 ms + experts {0, 1} read once 2 ms = 3 ms; a step is 6 ms.
    cost = cost_model(1, layers=2)
    hosts = np.ones((1, 2, 4), dtype=bool)
    reqs = requests([(0, 0.5, 3, 3)])  # 3 prompt tokens, 3 output tokens
    first, finish, stats = run(cost, hosts, reqs, [const_pool(2, [0, 1])])
    assert first[0] - 0.5 == pytest.approx(6 * MS)  # prefill step
    assert finish[0] - 0.5 == pytest.approx(18 * MS)  # + 2 decode steps
    assert stats.cross_bytes == 0 and stats.remote_calls == 0
    assert stats.pairs == 2 * (3 * 2) + 2 * 2 * (1 * 2)  # (token, expert) pairs over both layers


def test_step_overhead_comes_before_every_step():
    # the same case with 0.5 ms of serving-loop work per step: 3 steps of 6.5 ms
    from dataclasses import replace

    base = cost_model(1, layers=2)
    cost = replace(base, profiles=(replace(base.profiles[0], step_overhead_s=0.5 * MS),))
    hosts = np.ones((1, 2, 4), dtype=bool)
    first, finish, _ = run(cost, hosts, requests([(0, 0.5, 3, 3)]), [const_pool(2, [0, 1])])
    assert first[0] - 0.5 == pytest.approx(6.5 * MS)
    assert finish[0] - 0.5 == pytest.approx(19.5 * MS)


def test_remote_call_adds_wire_latency_and_peer_compute():
    # Server 0 holds expert 0, server 1 holds expert 1; the token needs both (k = 2), one layer.
    bw, lat = 8e6, 1 * MS  # 1 byte = 1 us on the wire
    cost = cost_model(2, layers=1, bandwidth_bps=bw, latency_s=lat)
    hosts = np.zeros((2, 1, 2), dtype=bool)
    hosts[0, 0, 0] = hosts[1, 0, 1] = True
    reqs = requests([(0, 0.0, 1, 1)])
    first, finish, stats = run(cost, hosts, reqs, [const_pool(1, [0, 1])])
    out_b = 1000 + PAIR_BYTES + HEADER_BYTES  # one token, one pair
    back_b = 1000 + HEADER_BYTES
    # dense 1 ms, send, latency, peer reads expert 1 (1 ms), reply, latency; local expert done at 2 ms.
    expect = 1 * MS + out_b * 8 / bw + lat + 1 * MS + back_b * 8 / bw + lat
    assert finish[0] == pytest.approx(expect)
    assert stats.cross_bytes == out_b + back_b
    assert stats.remote_calls == 1 and stats.remote_pairs == 1 and stats.pairs == 2


def test_two_requests_queue_on_one_link():
    # Server 0 needs expert 1 (at server 1); server 1 needs expert 0 (at server 0). Wire 10 ms, latency 1 ms.
    # s0: dense [0,1], call 0->1 [1,11], arrives 12, s1 computes [12,13], reply on 1->0 must wait:
    # s1's own call (arrived t=5, dense [5,6]) holds link 1->0 over [6,16], so the reply goes [16,26] +1 = 27.
    # s1: call arrives at s0 at 17, computed [17,18], reply 0->1 [18,28] + 1 = 29 (latency 24).
    out_b = 1000 + PAIR_BYTES + HEADER_BYTES
    bw = out_b * 8 / (10 * MS)  # calls take exactly 10 ms on the wire
    cost = cost_model(2, layers=1, bandwidth_bps=bw, latency_s=1 * MS)
    hosts = np.zeros((2, 1, 2), dtype=bool)
    hosts[0, 0, 0] = hosts[1, 0, 1] = True
    pools = [const_pool(1, [1]), const_pool(1, [0])]
    reqs = requests([(0, 0.0, 1, 1), (1, 5 * MS, 1, 1)], pool=[0, 1])
    _, finish, _ = run(cost, hosts, reqs, pools)
    back = (1000 + HEADER_BYTES) * 8 / bw
    assert finish[0] == pytest.approx(16 * MS + back + 1 * MS)  # queued behind s1's call
    assert finish[1] - 5 * MS == pytest.approx(18 * MS + back + 1 * MS - 5 * MS)
    # without the other request, server 0 would have finished at 13 ms + reply + 1 ms
    _, alone, _ = run(cost, hosts, requests([(0, 0.0, 1, 1)]), pools)
    assert alone[0] == pytest.approx(13 * MS + back + 1 * MS)


def test_peer_gpu_is_shared_with_its_own_steps():
    # Server 1's own step occupies its GPU when server 0's call arrives: the call waits.
    cost = cost_model(2, layers=1, bandwidth_bps=1e12, latency_s=0.0)  # network ~free
    hosts = np.zeros((2, 1, 3), dtype=bool)
    hosts[0, 0, 0] = True
    hosts[1, 0, [1, 2]] = True
    pools = [const_pool(1, [1]), const_pool(1, [2])]
    reqs = requests([(1, 0.0, 1, 1), (0, 0.0, 1, 1)], pool=[1, 0])
    _, finish, _ = run(cost, hosts, reqs, pools)
    # s1: dense [0,1], expert 2 [1,2]. s0: dense [0,1], call arrives at 1, waits for s1's GPU until 2,
    # expert 1 [2,3] -> back at 3.
    assert finish[1] == pytest.approx(3 * MS, abs=1e-6)
    assert finish[0] == pytest.approx(2 * MS)


def test_batching_admits_waiting_requests_together():
    cost = cost_model(1, layers=1)
    hosts = np.ones((1, 1, 4), dtype=bool)
    # request 1 arrives during request 0's prefill: it joins the next step (prefill with 0's decode)
    reqs = requests([(0, 0.0, 2, 2), (0, 1 * MS, 2, 2)])
    first, finish, stats = run(cost, hosts, reqs, [const_pool(1, [0, 1])])
    assert first[0] == pytest.approx(3 * MS)  # dense 1 + experts 2
    assert finish[0] == pytest.approx(6 * MS)  # one shared step (same two experts)
    assert first[1] == pytest.approx(6 * MS)
    assert finish[1] == pytest.approx(9 * MS)
    assert stats.steps == 3


def test_separate_prefill_runs_each_prompt_then_the_decodes_as_forwards_of_their_own():
    """The padded loop's step: a forward per new prompt (first token at its end), then one forward decoding
    the requests that were running. Each forward here costs 3 ms whatever its tokens (dense 1 + experts 2)."""
    from prism_moe.sim.engine import EngineConfig

    cost = cost_model(1, layers=1)
    hosts = np.ones((1, 1, 4), dtype=bool)
    reqs = requests([(0, 0.0, 2, 3), (0, 1 * MS, 2, 2)])
    eng = Engine(cost, placement(hosts), [const_pool(1, [0, 1])], reqs, EngineConfig(separate_prefill=True))
    first, finish, stats, _ = eng.run()
    # step 1: prefill 0 [0, 3]; step 2: prefill 1 [3, 6], decode 0 [6, 9]; step 3: decode 0 and 1 [9, 12]
    assert first.tolist() == pytest.approx([3 * MS, 6 * MS])
    assert finish.tolist() == pytest.approx([12 * MS, 12 * MS])
    assert stats.steps == 3 and stats.layer_steps == 4  # 4 forwards of the one layer


def test_placement_switch_with_migration_costs_link_time():
    cost = cost_model(2, layers=1, bandwidth_bps=8e9, latency_s=0.0)  # 1 GB/s: an expert (1 MB) = 1 ms
    old = np.zeros((2, 1, 4), dtype=bool)
    old[0, 0, :2] = old[1, 0, 2:] = True
    new = old.copy()
    new[0, 0, 2:] = True  # server 0 gains experts 2, 3 (copied from server 1)
    reqs = requests([(0, 0.0, 1, 1), (0, 1.0, 1, 1)])
    for migrate, end in ((True, 0.5 + 2 * MS), (False, 0.5)):
        eng = Engine(cost, placement(old), [const_pool(1, [2, 3])], reqs,
                     changes=[PlacementChange(0.5, placement(new), migrate)])
        _, finish, stats, _ = eng.run()
        m = stats.migrations[0]
        assert m["end"] == pytest.approx(end)
        assert m["bytes"] == (2e6 if migrate else 0.0)
        assert finish[1] - 1.0 == pytest.approx(3 * MS)  # all local after the switch: 1 + 2 ms


@pytest.mark.parametrize("e", [16, 80])  # expert bitmasks fit one uint64, or need Python big ints
def test_small_and_large_routing_paths_agree(e):
    rng = np.random.default_rng(3)
    s, layers, k = 4, 3, 4
    hosts = rng.random((s, layers, e)) < 0.4
    hosts[0] |= ~hosts.any(axis=0)
    ex = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(200)]) for _ in range(layers)]).astype(np.int16)
    from prism_moe.sim.workload import TokenPool

    pool = TokenPool("r", ex, np.array([0, 200]), True)
    eng = Engine(cost_model(s, layers), placement(hosts), [pool], requests([(0, 0.0, 1, 1)]))
    for srv in range(s):
        for l in range(layers):
            for t in (1, 5, 40, 150):
                idx = rng.integers(0, 200, t)
                assert eng._route_small(srv, l, idx.tolist()) == eng._route_large(srv, l, idx)
