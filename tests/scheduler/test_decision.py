"""The decision rule C(P') + T_mig < C(P)(1 - margin), the candidate and the repair: hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.cost import migration_seconds
from prism_moe.placement.placement import Placement
from prism_moe.placement.problem import ClusterStats
from prism_moe.placement.registry import DEFAULT_ALGORITHM, place
from prism_moe.scheduler.candidate import (
    ClusterCapacityError,
    candidate_placement,
    candidate_plan,
    fewest_moves,
    repair_hosts,
    sub_cluster,
)
from prism_moe.scheduler.decision import decide, expected_cost, transfer_seconds

NAMES = ["a", "b"]
LINK = np.array([[0.0, 0.01], [0.01, 0.0]])  # 10 ms per token round trip
BW = np.array([[np.inf, 8e6], [8e6, np.inf]])  # 1 MB/s


def _p(hosts) -> Placement:
    return Placement.from_hosts(NAMES, np.array(hosts, dtype=bool), LINK)


# one layer, two experts. a uses expert 1 only (10/s), b uses expert 0 only (10/s)
RATES = np.array([[[0.0, 10.0]], [[10.0, 0.0]]])
WRONG = _p([[[True, False]], [[False, True]]])  # each holds what the other needs
RIGHT = _p([[[False, True]], [[True, False]]])


def test_expected_cost_by_hand():
    # 20 remote invocations/s x 10 ms x 60 s = 12 s of round trips; the right placement has none
    assert expected_cost(WRONG, RATES, LINK, period=60) == pytest.approx(12.0)
    assert expected_cost(RIGHT, RATES, LINK, period=60) == 0.0


def test_transfer_seconds_receivers_in_parallel():
    # each server fetches one 1 MB expert at 1 MB/s, in parallel: 1 s
    assert transfer_seconds(WRONG.hosts, RIGHT.hosts, BW, 10**6) == pytest.approx(1.0)
    # a fetches two experts from b: 2 s (one after another)
    old = np.array([[[False, False]], [[True, True]]])
    new = np.array([[[True, True]], [[True, True]]])
    assert transfer_seconds(old, new, BW, 10**6) == pytest.approx(2.0)
    # b is down: a reads both from its checkpoint at 8e9 bit/s
    assert transfer_seconds(old, new, BW, 10**6, live=np.array([True, False])) == pytest.approx(2e-3)


def test_transfer_seconds_matches_the_placement_cost_model():
    cluster = cluster_from_dict({"model": "deepseek-v2-lite", "network": {"bandwidth_mbps": 100},
                                 "servers": [{"name": n, "memory_gib": 40} for n in NAMES]})
    model = cluster.model_spec()
    hosts_old = np.zeros((2, model.num_moe_layers, model.num_experts), dtype=bool)
    hosts_old[0] = True
    hosts_new = hosts_old.copy()
    hosts_new[1, :3, :5] = True
    link = np.ones((2, 2))
    old = Placement.from_hosts(NAMES, hosts_old, link)
    new = Placement.from_hosts(NAMES, hosts_new, link)
    want = migration_seconds(old, new, cluster, model)
    assert transfer_seconds(hosts_old, hosts_new, cluster.link_matrices()[0], model.expert_bytes) == pytest.approx(want)


def test_decide_migrates_when_gain_beats_cost_and_margin():
    d = decide(WRONG, RIGHT, RATES, LINK, BW, expert_bytes=10**6, period=60, margin=0.1)
    # 0 + 1 s < 12 s x 0.9
    assert d.migrate and d.experts_moved == 2 and d.migration_bytes == 2 * 10**6
    assert d.cost_current == pytest.approx(12.0) and d.migration_seconds == pytest.approx(1.0)


def test_decide_stays_when_the_move_costs_more_than_it_saves():
    # 11 MB experts take 11 s: 0 + 11 >= 12 x 0.9 = 10.8
    assert not decide(WRONG, RIGHT, RATES, LINK, BW, 11 * 10**6, period=60, margin=0.1).migrate
    # a shorter period saves less: 1 s of transfer against 2 s x 0.5
    assert not decide(WRONG, RIGHT, RATES, LINK, BW, 10**6, period=10, margin=0.5).migrate
    # nothing to gain without traffic, nothing to move when identical
    assert not decide(WRONG, RIGHT, RATES * 0, LINK, BW, 1, period=60, margin=0.1).migrate
    assert decide(WRONG, WRONG, RATES, LINK, BW, 1, 60, 0.1).reason == "the candidate holds nothing new"


def test_fewest_moves_permutes_interchangeable_servers():
    old = np.array([[[True, False]], [[False, True]]])
    new = np.array([[[False, True]], [[True, False]]])  # the same sets, on the other servers
    perm = fewest_moves(new, old, capacity=np.array([1, 1]))
    assert perm.tolist() == [1, 0]
    # a set that does not fit the other server's capacity stays
    new2 = np.array([[[True, True]], [[False, True]]])
    assert fewest_moves(new2, old, capacity=np.array([2, 1])).tolist() == [0, 1]


def test_repair_rehosts_orphans_within_slots():
    # 3 servers, 1 layer, 4 experts; c (down) held the only copy of expert 3
    hosts = np.zeros((3, 1, 4), dtype=bool)
    hosts[0, 0, [0, 1]] = True
    hosts[1, 0, [1, 2]] = True
    hosts[2, 0, [3]] = True
    demand = np.zeros((3, 1, 4))
    demand[1, 0, 3] = 5.0  # b uses expert 3
    live = np.array([True, True, False])
    out = repair_hosts(hosts, live, capacity=np.array([2, 3, 2]), demand=demand)
    assert out[1, 0, 3] and not out[2].any() and out.any(axis=0).all()
    # b has no free slot: a spare replica (expert 1, on a and b) makes room
    out = repair_hosts(hosts, live, capacity=np.array([2, 2, 2]), demand=demand)
    assert out.any(axis=0).all() and (out.sum(axis=(1, 2)) <= 2).all() and not out[2].any()
    with pytest.raises(ClusterCapacityError, match="4 experts"):
        repair_hosts(hosts, live, capacity=np.array([1, 2, 9]), demand=demand)


def test_candidate_placement_keeps_current_when_nothing_changed():
    cluster = cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
        {"name": n, "memory_gib": 40} for n in ["a", "b", "c"]]})
    model: ModelSpec = cluster.model_spec()
    rng = np.random.default_rng(0)
    rates = rng.gamma(0.3, size=(3, model.num_moe_layers, model.num_experts))
    live = np.ones(3, dtype=bool)
    first = place(DEFAULT_ALGORITHM, ClusterStats(rates), sub_cluster(cluster, live, rates), model)
    again = candidate_placement(DEFAULT_ALGORITHM, rates, cluster, model, first, live)
    assert int(again.moved_from(first).sum()) == 0
    # with one server down, the candidate lives on the other two and holds every expert
    live2 = np.array([True, False, True])
    p = candidate_placement(DEFAULT_ALGORITHM, rates, cluster, model, first, live2)
    assert not p.hosts[1].any() and p.hosts.any(axis=0).all()


def _plan_cluster():
    cluster = cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
        {"name": n, "memory_gib": 24} for n in ["a", "b", "c"]]})
    return cluster, cluster.model_spec()


def test_candidate_plan_without_a_down_server_never_routes_through_it():
    cluster, model = _plan_cluster()
    rates = np.random.default_rng(0).gamma(0.3, size=(3, model.num_moe_layers, model.num_experts))
    full = candidate_plan("pipeline", rates, cluster, model, np.ones(3, bool))
    assert not full.at_home and set(np.unique(full.executor)) == {0, 1, 2}  # blocks on every server
    live = np.array([True, False, True])
    p = candidate_plan("pipeline", rates, cluster, model, live)
    assert not (p.executor[live] == 1).any()  # live homes' layers run on a or c
    assert not p.placement.hosts[1].any() and p.placement.hosts.any(axis=0).all()  # every expert on a survivor
    assert (p.placement.hosts.sum(axis=(1, 2)) <= cluster.expert_slots(model)).all()


def test_replan_under_a_plan_algorithm_applies_the_plan_rule():
    from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

    cluster, model = _plan_cluster()
    hosts = np.zeros((3, model.num_moe_layers, model.num_experts), bool)
    for e in range(model.num_experts):
        hosts[e % 3, :, e] = True
    placement = Placement.from_hosts(["a", "b", "c"], hosts, np.ones((3, 3)))
    coord = Coordinator(cluster, CoordinatorConfig(algorithm="pipeline", margin=0.0), placement, model,
                        client=object())  # a dry run calls no server
    for st in coord.servers.values():
        st.live = True
    out = coord.replan("requested", dry_run=True)
    assert out["plan"]["algorithm"] == "pipeline" and "migration" not in out
    # the rule of placement/hybrid.py plan_decision: switch iff C(new) + T_mig < C(current)
    assert out["migrate"] == (out["cost_candidate"] + out["migration_seconds"] < out["cost_current"])
    assert out["migration_seconds"] > 0 and "C(new)+T_mig" in out["reason"]
    with pytest.raises(ValueError, match="unknown algorithm"):
        CoordinatorConfig(algorithm="no-such")
