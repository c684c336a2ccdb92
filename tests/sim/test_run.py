"""Whole runs on synthetic workloads: determinism, locality accounting, remote fraction, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.placement.latency import sample_topk
from prism_moe.placement.placement import Placement
from prism_moe.sim.run import Scenario, Source, build_scenario, simulate
from prism_moe.sim.workload import LengthModel, pool_from_counts

SHORT = LengthModel(prompt_mean=64, output_mean=16)


def synthetic(rate: float = 2.0, memory: float = 6.0, seed: int = 0, servers: int = 3) -> Scenario:
    """OLMoE-shaped (16 layers x 64 experts, top-8) cluster with skewed random per-server counts."""
    cluster = cluster_from_dict({
        "model": "olmoe-1b-7b",
        "servers": [{"name": f"s{i}", "gpu": "a100-40gb", "memory_gib": memory, "request_rate": rate}
                    for i in range(servers)],
        "network": {"bandwidth_mbps": 500, "latency_ms": 1},
    })
    scen = build_scenario(cluster, seed=seed, lengths=SHORT)
    rng = np.random.default_rng(seed)
    m = scen.model
    sources = []
    for s in range(servers):
        counts = rng.gamma(0.3, size=(m.num_moe_layers, m.num_experts)) + 1e-3
        pool = pool_from_counts(f"syn{s}", counts, m.top_k, 4096, rng)
        sources.append(Source(f"syn{s}", pool, SHORT, counts, None))
    scen.sources = sources
    scen.phases = [((0.0, s),) for s in range(servers)]
    return scen


def greedy(scen: Scenario) -> Placement:
    """Each server: its most-demanded experts; uncovered experts go round-robin."""
    st = scen.stats()
    cap = scen.cluster.check_feasible(scen.model)
    s, layers, e = st.counts.shape
    hosts = np.zeros((s, layers, e), dtype=bool)
    for i in range(layers * e):
        hosts[i % s].flat[i] = True
    for i in range(s):
        for f in np.argsort(-st.counts[i].ravel()):
            if hosts[i].sum() >= cap[i]:
                break
            hosts[i].flat[f] = True
    bw, lat = scen.cluster.link_matrices()
    return Placement.from_hosts(scen.cluster.server_names, hosts, 2 * lat + 1 / bw, cap, "greedy")


def test_deterministic_for_a_seed():
    scen = synthetic()
    pl = greedy(scen)
    a = simulate(scen, pl, n_requests=40, seed=5).summary()
    b = simulate(scen, pl, n_requests=40, seed=5).summary()
    c = simulate(scen, pl, n_requests=40, seed=6).summary()
    drop = ("sim_seconds", "expert_calls_per_s")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["mean_latency_s"] != c["mean_latency_s"]


def test_all_local_placement_moves_no_bytes():
    scen = synthetic(memory=14.0)  # room for every expert on every server
    hosts = np.ones((3, scen.model.num_moe_layers, scen.model.num_experts), dtype=bool)
    pl = Placement.from_hosts(scen.cluster.server_names, hosts, np.ones((3, 3)))
    s = simulate(scen, pl, n_requests=30, seed=1).summary()
    assert s["cross_server_bytes"] == 0 and s["remote_calls"] == 0 and s["remote_fraction"] == 0
    assert s["mean_latency_s"] > 0 and s["mean_ttft_s"] > 0 and s["mean_tpot_s"] > 0


def test_remote_fraction_matches_placement_on_replayed_counts():
    scen = synthetic()
    pl = greedy(scen)
    res = simulate(scen, pl, n_requests=120, seed=2)
    req = res.requests
    tokens = np.array([(req.prompt + req.output - 1)[req.server == s].sum() for s in range(3)], dtype=float)
    demand = scen.stats().frequencies() * tokens[:, None, None]
    want = pl.remote_fraction(demand)
    assert res.summary()["remote_fraction"] == pytest.approx(want, abs=0.02)


def test_sample_topk_matches_inclusion_probabilities():
    rng = np.random.default_rng(0)
    freq = rng.gamma(0.5, size=32)
    freq /= freq.sum()
    x = sample_topk(freq, 4, 20000, rng)
    assert all(len(set(row)) == 4 for row in x[:500].tolist())
    got = np.bincount(x.ravel(), minlength=32) / 20000
    from prism_moe.placement.latency import inclusion_probs

    np.testing.assert_allclose(got, inclusion_probs(freq, 4), atol=0.015)


def test_cli_json_fields(tmp_path, capsys):
    from prism_moe.cli import main

    cfile = tmp_path / "c.yaml"
    cfile.write_text("model: olmoe-1b-7b\nservers:\n"
                     "  - {name: a, memory_gib: 8, request_rate: 2}\n"
                     "  - {name: b, memory_gib: 8, request_rate: 2}\n"
                     "network: {bandwidth_mbps: 500, latency_ms: 1}\n")
    import argparse

    from prism_moe.commands import simulate as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    out = tmp_path / "p.json"
    args = parser.parse_args(["simulate", "--cluster", str(cfile), "--algorithm", "latency", "--requests", "8",
                              "--json", "--save-placement", str(out)])
    assert args.func(args) == 0
    s = json.loads(capsys.readouterr().out)
    for k in ("mean_latency_s", "p50_latency_s", "p95_latency_s", "p99_latency_s", "mean_ttft_s", "mean_tpot_s",
              "cross_server_bytes", "remote_fraction", "sim_seconds", "remote_calls", "utilisation"):
        assert k in s, k
    args = parser.parse_args(["simulate", "--cluster", str(cfile), "--placement", str(out), "--requests", "8",
                              "--json"])
    assert args.func(args) == 0
    s2 = json.loads(capsys.readouterr().out)
    assert s2["mean_latency_s"] == pytest.approx(s["mean_latency_s"])
    assert callable(main)
