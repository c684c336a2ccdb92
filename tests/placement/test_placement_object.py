"""Placement: validation messages, JSON round trip, routes; the cost model; the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from placement_toys import toy, toy_cluster, toy_model

from prism_moe.placement.cost import expected_remote_cost, fetched_bytes, migration_bytes, migration_seconds
from prism_moe.placement.placement import Placement, PlacementError, compute_routes
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.registry import ALGORITHMS, DEFAULT_ALGORITHM, keeps_current, place

NAMES = ("a", "b", "c")


def hosts_of(rows):
    """[[experts of server 0], ...] for one layer of 4 experts -> bool [S, 1, 4]."""
    h = np.zeros((len(rows), 1, 4), dtype=bool)
    for s, ids in enumerate(rows):
        h[s, 0, ids] = True
    return h


def test_orphan_expert_is_named():
    h = hosts_of([[0, 1], [1, 2]])
    with pytest.raises(PlacementError, match="1 experts have no server, e.g. layer 0 expert 3"):
        Placement.from_hosts(NAMES[:2], h, np.ones((2, 2)))


def test_route_to_a_server_without_the_expert():
    h = hosts_of([[0, 1], [1, 2, 3]])
    route = compute_routes(h, np.ones((2, 2)))
    route[0, 0, 1] = 1  # a holds expert 1 but sends it to b
    with pytest.raises(PlacementError, match="server a layer 0 expert 1: a held expert must be served locally"):
        Placement(NAMES[:2], h, route)
    route = compute_routes(h, np.ones((2, 2)))
    route[1, 0, 2] = 0  # b sends expert 2 to a, which lacks it
    with pytest.raises(PlacementError, match="server b routes layer 0 expert 2 to a, which does not hold it"):
        Placement(NAMES[:2], h, route)


def test_memory_is_checked():
    with pytest.raises(PlacementError, match="server a holds 3 experts but has memory for 2"):
        Placement.from_hosts(NAMES[:2], hosts_of([[0, 1, 2], [3]]), np.ones((2, 2)), capacity=[2, 2])


def test_names_and_shapes_are_checked():
    with pytest.raises(PlacementError, match="3 server names for 2 servers"):
        Placement.from_hosts(NAMES, hosts_of([[0, 1], [2, 3]]), np.ones((2, 2)))


def test_json_round_trip(tmp_path):
    p = Placement.from_hosts(NAMES, hosts_of([[0, 1], [2, 3], [0, 3]]), np.ones((3, 3)), capacity=[2, 2, 3],
                             algorithm="flow", version=4, meta={"k": 1})
    path = tmp_path / "p.json"
    p.save(path)
    q = Placement.load(path)
    assert q.server_names == p.server_names and q.algorithm == "flow" and q.version == 4 and q.meta == {"k": 1}
    assert (q.hosts == p.hosts).all() and (q.route == p.route).all() and (q.capacity == p.capacity).all()


def test_json_errors(tmp_path):
    p = Placement.from_hosts(NAMES[:2], hosts_of([[0, 1], [2, 3]]), np.ones((2, 2)))
    d = p.to_dict()
    with pytest.raises(PlacementError, match="not a prism-moe placement"):
        Placement.from_dict({"format": "other"})
    with pytest.raises(PlacementError, match="format_version 9 is not supported"):
        Placement.from_dict({**d, "format_version": 9})
    with pytest.raises(PlacementError, match="an expert is listed twice"):
        Placement.from_dict({**d, "placement": {"a": {"0": [0, 0, 1]}, "b": {"0": [2, 3]}}})
    with pytest.raises(PlacementError, match="expert ids must be in 0..3"):
        Placement.from_dict({**d, "placement": {"a": {"0": [0, 7]}, "b": {"0": [2, 3]}}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlacementError, match="not valid JSON"):
        Placement.load(bad)
    missing = dict(d)
    del missing["route"]
    with pytest.raises(PlacementError, match="missing or mistypes a field"):
        Placement.from_dict(json.loads(json.dumps(missing)))


def test_routes_prefer_local_then_cheapest_link():
    h = hosts_of([[0, 1], [1, 2, 3], [3]])
    cost = np.array([[0, 5, 1], [5, 0, 1], [1, 1, 0]], dtype=float)
    r = compute_routes(h, cost)[:, 0]
    assert r[0].tolist() == [0, 0, 1, 2]  # expert 3: c (cost 1) beats b (5)
    assert r[1].tolist() == [0, 1, 1, 1]  # local always wins
    assert r[2].tolist() == [0, 1, 1, 2]


def test_routes_spread_ties_over_experts():
    # every expert of 2 layers x 4 on both b and c, equally far from a: a's calls alternate
    h = np.zeros((3, 2, 4), dtype=bool)
    h[1:] = True
    r = compute_routes(h, np.ones((3, 3)))[0]
    assert set(np.unique(r)) == {1, 2}
    assert abs(int((r == 1).sum()) - int((r == 2).sum())) <= 1
    assert (compute_routes(h, np.ones((3, 3)))[0] == r).all()  # deterministic


# ---- cost model -------------------------------------------------------------------------------------------

def test_expected_remote_cost_by_hand():
    counts = np.array([[[3.0, 1.0]], [[0.0, 4.0]]])
    stats, cluster, model = toy(counts, [1, 1])
    problem = Problem.build(stats, cluster, model)
    p = Placement.from_hosts(problem.server_names, np.array([[[1, 0]], [[0, 1]]], dtype=bool), problem.link_cost)
    # s0 sends 1/4 of its calls to s1; s1 sends none
    assert expected_remote_cost(p, problem) == pytest.approx(0.25 * problem.link_cost[0, 1])


def test_migration_bytes_and_seconds():
    cluster = toy_cluster([2, 2, 2], links=[{"between": ["s0", "s2"], "bandwidth_mbps": 4000}])
    model = toy_model(1, 4)
    lc = np.ones((3, 3))
    old = Placement.from_hosts(cluster.server_names, hosts_of([[0, 1], [2, 3], [0]]), lc)
    new = Placement.from_hosts(cluster.server_names, hosts_of([[0, 1], [2, 3], [1, 2]]), lc)
    # s2 fetches expert 1 (from s0 over 4000 Mbps) and expert 2 (from s1 over 1000 Mbps)
    assert fetched_bytes(old, new, model.expert_bytes).tolist() == [0, 0, 2 * model.expert_bytes]
    assert migration_bytes(old, new, cluster, model) == 2 * model.expert_bytes
    bits = model.expert_bytes * 8
    expected = bits / 4000e6 + bits / 1000e6
    assert migration_seconds(old, new, cluster, model) == pytest.approx(expected)
    counts = np.ones((3, 1, 4))
    problem = Problem.build(ClusterStats(counts), cluster, model)
    assert migration_seconds(old, new, problem) == pytest.approx(expected)
    assert migration_seconds(old, old, cluster, model) == 0.0


# ---- registry -----------------------------------------------------------------------------------------------

def test_registry_lists_choices_for_unknown_names():
    stats, cluster, model = toy(np.ones((2, 1, 2)), [1, 1])
    with pytest.raises(ValueError, match="unknown placement algorithm 'nope'; choose one of uniform, redundance"):
        place("nope", stats, cluster, model)
    assert DEFAULT_ALGORITHM in ALGORITHMS
    for name in ("uniform", "redundance", "eplb", "smartmoe", "prism", "optimal", "flow"):
        assert name in ALGORITHMS


def test_default_keeps_current_placement_among_equal_ones():
    # two identical servers, symmetric demand: many optima; the current one must be kept
    counts = np.ones((2, 2, 4))
    stats, cluster, model = toy(counts, [5, 5])
    problem = Problem.build(stats, cluster, model)
    h = np.zeros((2, 2, 4), dtype=bool)
    h[0, 0, [1, 3]] = h[0, 1, [0, 1, 2]] = True
    h[1, 0, [0, 2, 3]] = h[1, 1, [2, 3]] = True
    current = Placement.from_hosts(problem.server_names, h, problem.link_cost, problem.capacity)
    for name in ("flow", "optimal"):
        assert keeps_current(name)
        p = place(name, stats, cluster, model, current=current)
        assert (p.hosts == h).all(), name
    assert not keeps_current("uniform")
    with pytest.raises(ValueError, match="cannot keep a current placement"):
        place("uniform", stats, cluster, model, current=current)
