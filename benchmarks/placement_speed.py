"""Solve time of every placement algorithm at paper scale and at DeepSeek-V3 scale.

  paper scale   DeepSeek-V2-Lite (26 x 64), 3 servers: examples/paper-deepseek.yaml with its ESFT workloads
  V3 scale      DeepSeek-V3 (58 x 256 = 14,848 routed experts), 16 servers, each with room for 20%, 50%
                or 90% of the experts. No V3 routing trace is public, so demand is synthetic: per server
                and layer, Zipf(1.2) popularity over a random permutation of the experts ("zipf": servers
                disagree), or one shared Zipf ranking times log-normal noise per server ("shared": servers
                agree, so the greedy top experts leave many uncovered: the solvers' hard case).

    python benchmarks/placement_speed.py [--data-dir D] [--repeats 3] [--json out.json] [--with-latency]

Times are medians of --repeats runs (one run for calls over 2 s), wall clock on this machine; the
ratios (optimal / default) are measured in the same run. Nothing passes or fails on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from prism_moe.config import cluster_from_dict, load_cluster
from prism_moe.model.spec import GIB, load_model_spec
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.registry import ALGORITHMS, DEFAULT_ALGORITHM, place
from prism_moe.stats.workload import load_workload

REPO = Path(__file__).resolve().parents[1]


def synthetic_counts(servers: int, layers: int, experts: int, kind: str, seed: int = 0) -> np.ndarray:
    """Token counts float [S, L, E] with Zipf(1.2) expert popularity (see the module docstring)."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, experts + 1) ** 1.2
    counts = np.empty((servers, layers, experts))
    shared = np.stack([zipf[rng.permutation(experts)] for _ in range(layers)])  # [L, E]
    for s in range(servers):
        if kind == "zipf":
            counts[s] = np.stack([zipf[rng.permutation(experts)] for _ in range(layers)])
        else:
            counts[s] = shared * rng.lognormal(0.0, 0.5, (layers, experts))
    return np.round(counts / counts.sum(axis=2, keepdims=True) * 100_000)


def v3_cluster(servers: int, fraction: float):
    model = load_model_spec("deepseek-v3")
    slots = int(round(fraction * model.total_experts))
    mem = (model.dense_bytes + slots * model.expert_bytes + 1024) / GIB
    return cluster_from_dict({"model": "deepseek-v3", "servers": [{"name": f"s{i}", "memory_gib": mem}
                                                                  for i in range(servers)]}), model


def time_algorithm(name, stats, cluster, model, repeats: int) -> tuple[float, float]:
    """(median seconds, remote fraction)."""
    demand = Problem.build(stats, cluster, model).demand
    times, remote = [], 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = place(name, stats, cluster, model)
        times.append(time.perf_counter() - t0)
        remote = p.remote_fraction(demand)
        if times[-1] > 2.0:
            break
    return statistics.median(times), remote


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--with-latency", action="store_true", help="also time `latency` (slow)")
    args = ap.parse_args()
    algorithms = [n for n in ALGORITHMS if n != "latency" or args.with_latency]

    cases = []
    paper = load_cluster(REPO / "examples" / "paper-deepseek.yaml")
    pm = paper.model_spec()
    counts = np.stack([load_workload(s.workload, args.data_dir).fit_to(pm.num_moe_layers, pm.num_experts).counts
                       for s in paper.servers])
    cases.append(("paper: V2-Lite 3 srv, ESFT", ClusterStats(counts), paper, pm))
    for kind in ("zipf", "shared"):
        for frac in (0.2, 0.5, 0.9):
            cluster, model = v3_cluster(16, frac)
            stats = ClusterStats(synthetic_counts(16, model.num_moe_layers, model.num_experts, kind))
            cases.append((f"V3: 16 srv, {frac:.0%} mem, {kind}", stats, cluster, model))

    results = []
    for label, stats, cluster, model in cases:
        row = {"case": label}
        for name in algorithms:
            seconds, remote = time_algorithm(name, stats, cluster, model, args.repeats)
            row[name] = {"seconds": seconds, "remote_fraction": remote}
            print(f"  {label:32s} {name:11s} {seconds * 1000:9.1f} ms  remote {remote:.4f}", file=sys.stderr)
        results.append(row)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    t = Table(title="Solve time, ms (median)")
    t.add_column("case")
    for name in algorithms:
        t.add_column(name, justify="right")
    t.add_column(f"optimal / {DEFAULT_ALGORITHM}", justify="right")
    for row in results:
        ratio = row["optimal"]["seconds"] / row[DEFAULT_ALGORITHM]["seconds"]
        t.add_row(row["case"], *(f"{row[n]['seconds'] * 1000:.1f}" for n in algorithms), f"{ratio:.1f}x")
    console.print(t)
    t = Table(title="Remote fraction in the same runs")
    t.add_column("case")
    for name in algorithms:
        t.add_column(name, justify="right")
    for row in results:
        t.add_row(row["case"], *(f"{row[n]['remote_fraction']:.2%}" for n in algorithms))
    console.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
