"""Execution plans: validation, files, pipelines (hand-computed splits), exact executor paths, hybrid."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.placement.hybrid import PlanEstimate, best_paths, hybrid
from prism_moe.placement.pipeline import _split, max_layers, pipeline, pipeline_opt
from prism_moe.placement.placement import Placement, PlacementError
from prism_moe.placement.plan import ExecutionPlan, PlanSizes
from prism_moe.placement.problem import ClusterStats


def paper_cluster(rate: float = 0.05, latency_ms: float = 1.0):
    servers = [{"name": n, "gpu": "a100-40gb", "gpus": g, "memory_gib": m, "request_rate": rate}
               for n, g, m in (("a", 1, 12), ("b", 1, 12), ("c", 2, 24))]
    return cluster_from_dict({"model": "deepseek-v2-lite", "servers": servers,
                              "network": {"bandwidth_mbps": 500, "latency_ms": latency_ms}})


def skewed_stats(model, servers: int = 3, seed: int = 0) -> ClusterStats:
    rng = np.random.default_rng(seed)
    return ClusterStats(rng.gamma(0.3, size=(servers, model.num_moe_layers, model.num_experts)) + 1e-3)


def home_plan(servers=2, layers=3, experts=2):
    hosts = np.ones((servers, layers, experts), dtype=bool)
    return ExecutionPlan.from_placement(Placement.from_hosts([f"s{i}" for i in range(servers)], hosts,
                                                             np.ones((servers, servers))))


def test_an_executor_must_hold_the_layers_dense_part():
    p = home_plan()
    dense = p.dense.copy()
    dense[1, 2] = False
    with pytest.raises(PlacementError, match="requests of s1 run layer 2 on s1, which does not hold"):
        ExecutionPlan(p.placement, p.executor, dense)
    with pytest.raises(PlacementError, match="not a server index"):
        ExecutionPlan(p.placement, np.full((2, 3), 5), p.dense)
    with pytest.raises(PlacementError, match=r"executor must be \[servers, layers\]"):
        ExecutionPlan(p.placement, np.zeros((2, 2), int), p.dense)


def test_plan_round_trips_through_its_file_and_refuses_foreign_ones(tmp_path):
    p = home_plan()
    ex = p.executor.copy()
    ex[0, 1:] = 1
    plan = ExecutionPlan(p.placement, ex, p.dense, "hand")
    plan.save(tmp_path / "plan.json")
    back = ExecutionPlan.load(tmp_path / "plan.json")
    assert np.array_equal(back.executor, ex) and np.array_equal(back.placement.hosts, plan.placement.hosts)
    assert back.handoffs().tolist() == [2, 0]  # s0: out before layer 1, back after layer 2
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(PlacementError, match="not a prism-moe plan"):
        ExecutionPlan.load(tmp_path / "x.json")
    (tmp_path / "torn.json").write_text(plan.to_dict().__repr__()[:50])
    with pytest.raises(PlacementError, match="cannot read plan"):
        ExecutionPlan.load(tmp_path / "torn.json")


def test_memory_check_names_the_server_and_the_numbers():
    cluster = paper_cluster()
    model = cluster.model_spec()
    sizes = PlanSizes.of(model)
    owner = np.array([0] * 20 + [1] * 3 + [2] * 3)  # 20 whole layers do not fit 12 GiB
    hosts = np.zeros((3, 26, 64), dtype=bool)
    hosts[owner, np.arange(26)] = True
    dense = np.zeros((3, 26), dtype=bool)
    dense[owner, np.arange(26)] = True
    plan = ExecutionPlan(Placement.from_hosts(cluster.server_names, hosts, np.ones((3, 3))),
                         np.tile(owner, (3, 1)), dense)
    with pytest.raises(PlacementError, match="server a would hold .* of weights .*20 dense layers"):
        plan.check_memory(sizes, np.array([12, 12, 24]) * 2**30)


def test_pipeline_splits_by_memory_with_largest_remainders():
    # 26 layers over 12/12/24 GiB: shares 6.5, 6.5, 13 -> 6, 6, 13 and the one left to the first tie: 7, 6, 13
    cluster = paper_cluster()
    model = cluster.model_spec()
    plan = pipeline(skewed_stats(model), cluster, model)
    assert plan.meta["layers_per_server"] == [7, 6, 13]
    assert (plan.executor == np.repeat([0, 1, 2], [7, 6, 13])[None]).all()
    assert plan.placement.hosts.sum(axis=(1, 2)).tolist() == [7 * 64, 6 * 64, 13 * 64]
    assert (plan.handoffs() == [3, 4, 3]).all()  # home a: -> b -> c -> a; b: -> a -> b -> c -> b
    # whole layers fit: floor((memory - embedding and head) / (dense layer + 64 experts))
    sizes = PlanSizes.of(model)
    assert max_layers(cluster, model).tolist() == [int((g * 2**30 - sizes.base) // sizes.full_layer)
                                                   for g in (12, 12, 24)]


def test_pipeline_refuses_a_cluster_that_cannot_hold_the_layers():
    cluster = paper_cluster()
    small = cluster_from_dict({"model": "deepseek-v2-lite", "network": {"bandwidth_mbps": 500},
                               "servers": [{"name": n, "memory_gib": 10} for n in ("a", "b")]})
    with pytest.raises(Exception, match="needs 26 whole layers"):
        pipeline(skewed_stats(cluster.model_spec(), 2), small, small.model_spec())


def test_pipeline_split_dp_is_the_best_contiguous_split():
    # brute force over every owner sequence that is contiguous in the order and within the caps
    rng = np.random.default_rng(1)
    layers, s_n = 5, 3
    per = rng.uniform(1, 3, s_n)
    hop = rng.uniform(0, 2, (s_n, s_n))
    np.fill_diagonal(hop, 0)
    w = np.array([0.2, 0.3, 0.5])
    cap = np.array([3, 2, 4])

    def stage(p, n):
        return n * per[p] * (1 + 0.1 * n)

    def cost(own):
        c = float(w @ hop[:, own[0]])
        runs = [list(g) for _, g in itertools.groupby(own)]
        for i, r in enumerate(runs):
            c += stage(r[0], len(r)) + (hop[runs[i - 1][0], r[0]] if i else 0.0)
        return c + float(hop[own[-1]] @ w)

    order = (2, 0, 1)
    best = np.inf
    for own in itertools.product(range(s_n), repeat=layers):
        runs = [k for k, _ in itertools.groupby(own)]
        pos = [order.index(k) for k in runs]
        if len(set(runs)) != len(runs) or pos != sorted(pos):
            continue
        if any(own.count(p) > cap[p] for p in range(s_n)):
            continue
        best = min(best, cost(list(own)))
    got, own = _split(order, layers, cap, stage, hop, w)
    assert got == pytest.approx(best)
    assert cost(own) == pytest.approx(best)


def test_best_paths_is_the_exact_shortest_executor_sequence():
    rng = np.random.default_rng(0)
    s_n, layers = 3, 4
    cost = rng.uniform(0, 5, (s_n, layers, s_n))
    cost[0, 1, 2] = np.inf  # server 2 cannot run layer 1 for home 0
    hop = rng.uniform(0, 3, (s_n, s_n, s_n))
    for h in range(s_n):
        np.fill_diagonal(hop[h], 0)
    ex, tot = best_paths(cost, hop)
    for h in range(s_n):
        best = np.inf
        for seq in itertools.product(range(s_n), repeat=layers):
            path = [h, *seq, h]
            c = sum(cost[h, l, p] for l, p in enumerate(seq)) + sum(hop[h, a, b] for a, b in itertools.pairwise(path))
            best = min(best, c)
        assert tot[h] == pytest.approx(best)
        path = [h, *ex[h].tolist(), h]
        assert sum(cost[h, l, p] for l, p in enumerate(ex[h])) + sum(
            hop[h, a, b] for a, b in itertools.pairwise(path)) == pytest.approx(best)


@pytest.mark.parametrize("rate,latency_ms", [(0.05, 1.0), (1.0, 1.0), (0.05, 0.02)])
def test_hybrid_never_estimates_worse_than_the_plans_it_competes_with(rate, latency_ms):
    cluster = paper_cluster(rate, latency_ms)
    model = cluster.model_spec()
    stats = skewed_stats(model)
    plan = hybrid(stats, cluster, model, prompt_tokens=1000, output_tokens=128)
    est = PlanEstimate.build(stats, cluster, model, 1000, 128)
    j = est.total(plan)[0]
    assert j == pytest.approx(plan.meta["estimate_s"])
    for other in (pipeline(stats, cluster, model), pipeline_opt(stats, cluster, model, prompt_tokens=1000)):
        assert j <= est.total(other)[0] + 1e-12
    assert j <= min(plan.meta["candidates"].values()) + 1e-12
    plan.check_memory(PlanSizes.of(model), np.array([12, 12, 24]) * 2**30)


def test_place_and_simulate_commands_run_plan_algorithms(tmp_path, capsys):
    from prism_moe import cli

    f = tmp_path / "c.yaml"
    f.write_text("model: deepseek-v2-lite\nservers:\n  - {name: a, memory_gib: 16, request_rate: 0.05}\n"
                 "  - {name: b, memory_gib: 24, request_rate: 0.05}\nnetwork: {bandwidth_mbps: 500, latency_ms: 1}\n")
    assert cli.main(["place", "--cluster", str(f), "--algorithm", "pipeline", "--json",
                     "--out", str(tmp_path / "p.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["blocks"]["a"] == [[0, 9, 0], [10, 25, 1]]  # 26 layers at 16:24 -> 10.4, 15.6 -> 10, 16
    assert ExecutionPlan.load(tmp_path / "p.json").executor.tolist() == [[0] * 10 + [1] * 16] * 2
    assert cli.main(["simulate", "--cluster", str(f), "--algorithm", "pipeline", "--requests", "6", "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["requests"] == 6 and sim["handoffs"] > 0 and sim["remote_fraction"] == 0.0
    assert cli.main(["simulate", "--cluster", str(f), "--placement", str(tmp_path / "p.json"), "--requests", "6",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_latency_s"] == sim["mean_latency_s"]
    # b dies at once; a (16 GiB) cannot hold b's 16 layers beside its own 10: nothing can be served
    assert cli.main(["simulate", "--cluster", str(f), "--algorithm", "pipeline", "--requests", "6", "--json",
                     "--fail", "b@0"]) == 0
    dead = json.loads(capsys.readouterr().out)
    assert dead["failed_requests"] == 6 and dead["failures"][0]["switched_at"] is None
    assert dead["failures"][0]["stopped_homes"] == ["b", "a"]
    assert cli.main(["simulate", "--cluster", str(f), "--algorithm", "pipeline", "--fail", "c@1"]) != 0
    assert "SERVER@SECONDS" in capsys.readouterr().err
    assert cli.main(["simulate", "--cluster", str(f), "--algorithm", "pipeline", "--fail", "b@nan"]) != 0
    assert "SERVER@SECONDS" in capsys.readouterr().err
    assert cli.main(["simulate", "--cluster", str(f), "--algorithm", "pipeline", "--fail", "b@1",
                     "--detect-s", "nan"]) != 0
    assert "--detect-s" in capsys.readouterr().err


def test_backup_owners_fill_the_roomiest_other_server_block_by_block():
    from prism_moe.placement.pipeline import backup_owners

    # 6 layers on servers 0, 0, 1, 1, 1, 2; spare whole layers 1, 2, 4
    got = backup_owners(np.array([0, 0, 1, 1, 1, 2]), np.array([3, 5, 5]))
    # block 0 -> server 2 (4 spare), block 1 -> server 2 (2 left) then 0 (1 spare), block 2 -> server 1
    assert got.tolist() == [2, 2, 2, 2, 0, 1]
    # no room anywhere: -1
    assert backup_owners(np.array([0, 1]), np.array([1, 1])).tolist() == [-1, -1]


def test_replicated_pipelines_record_backups_that_hold_the_whole_layer(tmp_path):
    from prism_moe.placement.registry import plan_for

    cluster = paper_cluster()
    big = cluster.model_copy(update={"servers": [s.model_copy(update={"memory_gib": 2 * s.memory_gib})
                                                 for s in cluster.servers]})
    model = cluster.model_spec()
    sizes = PlanSizes.of(model)
    for name in ("pipeline-rep", "pipeline-opt-rep"):
        plain = plan_for(name.removesuffix("-rep"), skewed_stats(model), big, model)
        rep = plan_for(name, skewed_stats(model), big, model)
        assert rep.algorithm == name and plain.backup is None and rep.covered() == 1.0
        assert (rep.executor == plain.executor).all()  # the same split; copies only add
        assert (rep.backup != rep.executor).all()
        assert rep.dense[rep.backup[0], np.arange(model.num_moe_layers)].all()
        rep.check_memory(sizes, np.array([s.memory_gib for s in big.servers]) * 2**30)
        rep.save(tmp_path / "p.json")
        back = ExecutionPlan.load(tmp_path / "p.json")
        assert (back.backup == rep.backup).all()
    # the paper's memory: copies only where spare whole layers remain (41 of 52 layer slots in all)
    part = plan_for("pipeline-rep", skewed_stats(model), cluster, model)
    assert 0 < part.covered() < 1 and part.meta["replicated_layers"] == int((max_layers(cluster, model)).sum() - 26)


def test_a_backup_must_hold_the_whole_layer():
    plan = home_plan(servers=2, layers=2)
    hosts = plan.placement.hosts.copy()
    hosts[1, 0, 1] = False
    p = Placement.from_hosts(["s0", "s1"], hosts, np.ones((2, 2)))
    with pytest.raises(PlacementError, match="backup of layer 0"):
        ExecutionPlan(p, plan.executor, plan.dense, backup=np.array([[1, 1], [0, 0]]))


def _sizes():
    return PlanSizes(base=0.0, dense_layer=1.0, expert=1.0, kv_token_layer=0.0, num_experts=2)


def test_replan_uses_the_backup_then_a_holder_then_loads_where_memory_allows():
    from prism_moe.placement.failover import replan_without

    # 3 servers, 3 layers of 2 experts (a whole layer: 1 + 2 = 3 bytes); pipeline 0 | 1 | 2
    owner = np.array([0, 1, 2])
    hosts = np.zeros((3, 3, 2), dtype=bool)
    hosts[owner, np.arange(3)] = True
    dense = np.zeros((3, 3), dtype=bool)
    dense[owner, np.arange(3)] = True
    hosts[2, 0] = dense[2, 0] = True  # a copy of layer 0 on server 2 (its backup)
    backup = np.tile([2, -1, -1], (3, 1))
    plan = ExecutionPlan(Placement.from_hosts(["a", "b", "c"], hosts, np.ones((3, 3))), np.tile(owner, (3, 1)),
                         dense, "pipeline-rep", backup=backup)
    # server 0 dies: layer 0 moves to its backup (c), nothing loaded
    r = replan_without(plan, np.array([True, False, False]), _sizes(), np.full(3, 10.0), np.ones((3, 3)))
    assert r.plan is not None and r.loaded_bytes.sum() == 0 and r.from_backup == 2  # homes b and c
    assert r.plan.executor[1].tolist() == [2, 1, 2] and r.plan.executor[0].tolist() == r.plan.executor[1].tolist()
    # server 1 dies (no copy of layer 1): its whole layer is loaded on the previous layer's executor
    r = replan_without(plan, np.array([False, True, False]), _sizes(), np.full(3, 10.0), np.ones((3, 3)))
    assert r.plan.executor[0].tolist() == [0, 0, 2] and r.plan.executor[2].tolist() == [0, 0, 2]
    assert r.loaded_bytes.tolist() == [3.0, 0.0, 0.0] and r.moved_layers == 2
    # with 1 byte free on server 0: the dense part goes there, its experts replace c's spare copy of layer 0
    r = replan_without(plan, np.array([False, True, False]), _sizes(), np.array([4.0, 10.0, 6.0]), np.ones((3, 3)))
    assert r.loaded_bytes.tolist() == [1.0, 0.0, 2.0] and not r.plan.placement.hosts[2, 0].any()
    assert r.plan.backup is not None and (r.plan.backup == -1).all()  # c no longer holds the whole layer 0
    # ... and with no room for the dense part anywhere, no plan
    r = replan_without(plan, np.array([False, True, False]), _sizes(), np.array([3.5, 10.0, 6.0]), np.ones((3, 3)))
    assert r.plan is None and "layer 1" in r.reason


def test_replan_of_a_placement_only_reloads_orphaned_experts():
    from prism_moe.placement.failover import replan_without

    hosts = np.zeros((3, 1, 2), dtype=bool)
    hosts[0, 0, 0] = hosts[1, 0, 1] = hosts[2, 0, 1] = True  # expert 1 twice, expert 0 only on a
    plan = ExecutionPlan.from_placement(Placement.from_hosts(["a", "b", "c"], hosts, np.ones((3, 3))))
    r = replan_without(plan, np.array([False, True, False]), _sizes(), np.full(3, 5.0), np.ones((3, 3)))
    assert r.loaded_bytes.sum() == 0 and r.moved_layers == 0  # b's expert has a live copy on c
    r = replan_without(plan, np.array([True, False, False]), _sizes(), np.full(3, 5.0), np.ones((3, 3)))
    assert r.loaded_bytes.sum() == 1.0 and r.plan.placement.hosts[1:, 0, 0].sum() == 1


def test_replan_evicts_a_spare_replica_when_no_memory_is_free():
    from prism_moe.placement.failover import replan_without

    # every server full (2 experts of 1 byte, budget 2 + 1 dense byte); expert 0 only on a, expert 1 on b and c
    hosts = np.zeros((3, 1, 2), dtype=bool)
    hosts[0, 0, :] = True
    hosts[1, 0, 1] = hosts[2, 0, 1] = True
    hosts[1, 0, 0] = False
    plan = ExecutionPlan.from_placement(Placement.from_hosts(["a", "b", "c"], hosts, np.ones((3, 3))))
    budget = np.array([3.0, 2.0, 2.0])  # b and c: dense 1 + one expert
    r = replan_without(plan, np.array([True, False, False]), _sizes(), budget, np.ones((3, 3)))
    assert r.plan is not None and r.loaded_bytes.sum() == 1.0
    assert r.plan.placement.hosts[1:, 0].sum(axis=0).tolist() == [1, 1]  # one copy of 1 gave way to expert 0


def test_plan_migration_counts_dense_blocks_and_experts_from_the_fastest_holder():
    from prism_moe.placement.cost import plan_fetched_bytes, plan_migration_seconds

    def pipe(owner):
        hosts = np.zeros((3, 2, 2), dtype=bool)
        hosts[owner, np.arange(2)] = True
        dense = np.zeros((3, 2), dtype=bool)
        dense[owner, np.arange(2)] = True
        return ExecutionPlan(Placement.from_hosts(["a", "b", "c"], hosts, np.ones((3, 3))), np.tile(owner, (3, 1)),
                             dense)

    sizes = PlanSizes(base=0.0, dense_layer=100.0, expert=10.0, kv_token_layer=0.0, num_experts=2)
    old, new = pipe([0, 1]), pipe([2, 1])  # layer 0 moves a -> c: its dense part and both experts
    assert plan_fetched_bytes(old, new, sizes).tolist() == [0.0, 0.0, 120.0]
    bw = np.full((3, 3), 8.0)  # 1 byte/s
    bw[0, 2] = 80.0  # a -> c: 10 bytes/s
    assert plan_migration_seconds(old, new, bw, sizes) == pytest.approx(12.0)
    assert plan_migration_seconds(old, old, bw, sizes) == 0.0



def test_remote_fraction_and_expert_slots_follow_the_executors():
    """By hand: 2 servers, 2 layers x 2 experts; s0 holds layer 0's experts and expert 1 of layer 1, s1 expert 0
    of layer 1."""
    hosts = np.zeros((2, 2, 2), dtype=bool)
    hosts[0, 0] = True
    hosts[0, 1, 1] = True
    hosts[1, 1, 0] = True
    placement = Placement.from_hosts(["s0", "s1"], hosts, np.ones((2, 2)))
    executor = np.array([[0, 1], [0, 1]])  # both homes: layer 0 on s0, layer 1 on s1
    dense = np.array([[True, False], [False, True]])
    plan = ExecutionPlan(placement, executor, dense)
    demand = np.zeros((2, 2, 2))
    demand[0, 1] = [3.0, 1.0]  # s0's tokens at layer 1 (run on s1): expert 0 held there, expert 1 not
    demand[1, 0] = [2.0, 2.0]  # s1's tokens at layer 0 (run on s0): both held there
    assert plan.remote_fraction(demand) == pytest.approx(1.0 / 8.0)
    at_home = ExecutionPlan.from_placement(placement)  # every layer at home: s0 lacks expert 0 of layer 1 (3),
    # s1 every expert of layer 0 (4): the placement's own share
    assert at_home.remote_fraction(demand) == pytest.approx(placement.remote_fraction(demand)) == 7.0 / 8.0
    sizes = PlanSizes(base=10.0, dense_layer=5.0, expert=2.0, kv_token_layer=0.0, num_experts=2)
    # budget 30: base 10 + one dense layer 5 leaves 15 -> 7 experts; a placement holds both dense layers -> 5
    assert plan.expert_slots(sizes, np.array([30.0, 30.0])).tolist() == [7, 7]
    assert at_home.expert_slots(sizes, np.array([30.0, 19.0])).tolist() == [5, 0]
