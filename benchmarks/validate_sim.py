"""Validate the cluster simulator against the real runtime on the demo's setting.

The same tiny DeepSeek-V2-shaped model, the same 3 servers (memory shares and emulated links of
`prism_moe.demo.demo_cluster`), the same placements and the same workload (each server's ESFT domain,
trace replay; N requests per server, all sent at once, prompts cut to P tokens, O output tokens) go
through
  (a) the simulator, its cost model calibrated on this machine (`prism_moe.sim.calibrate`: per-layer
      dense and expert time of the tiny model on CPU with torch threads=1 through the servers' dispatcher
      stack with trace replay, the serving loop's per-step cost, and what an expert call costs beyond
      its emulated link, measured through an emulated link to another process; links as in the cluster
      file), and
  (b) a real local cluster (`prism demo`'s `run_one`: 3 `prism serve` processes, `--placement`,
      `--replay`), `--repeats` times per placement (the machine is shared: the spread is reported).

Prints JSON: per placement predicted vs measured mean latency and remote fraction, the relative error,
and whether the placements rank the same.

    python benchmarks/validate_sim.py [--algorithms uniform prism flow] [--requests 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from prism_moe.config import cluster_from_dict
from prism_moe.demo import _prompts, demo_cluster, run_one, tiny_checkpoint
from prism_moe.sim import Engine, EngineConfig, SimResult, build_scenario
from prism_moe.sim.calibrate import calibrate, calibrated_cost
from prism_moe.sim.workload import Requests
from prism_moe.stats.workload import load_workload, resolve_data_dir


def sim_requests(scen, prompts: dict[str, list[list[int]]], output_tokens: int, seed: int) -> Requests:
    """Every server's prompts at t=0 (their real lengths), `output_tokens` each, trace from a random sequence."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, name in enumerate(scen.cluster.server_names):
        pool_id = scen.phases[s][0][1]
        starts = scen.pools[pool_id].seq_starts
        for p in prompts[name]:
            rows.append((s, len(p), pool_id, int(starts[rng.integers(0, len(starts) - 1)])))
    a = np.array(rows)
    n = len(a)
    return Requests(a[:, 0], np.zeros(n), a[:, 1], np.full(n, output_tokens), a[:, 2], a[:, 3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", nargs="+", default=["uniform", "prism"])
    ap.add_argument("--requests", type=int, default=4, help="requests per server, all sent at once")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="real-cluster runs per placement")
    ap.add_argument("--cache-dir", default=".prism/models")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="reports/validate_sim")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.data_dir = str(resolve_data_dir(args.data_dir))
    args.concurrency = args.requests  # all of a server's requests in flight at once, as in the simulation
    console = Console(stderr=True)
    ckpt = tiny_checkpoint(Path(args.cache_dir), console)
    cluster_dict = demo_cluster(ckpt, with_workloads=True)
    cluster = cluster_from_dict(cluster_dict)
    prompts = _prompts(ckpt, args.data_dir, True, args.requests, args.prompt_tokens)

    t0 = time.perf_counter()
    # the servers replay traces over emulated links: calibrate that path (one domain's trace will do)
    replay = load_workload(cluster.servers[0].workload, args.data_dir).trace
    cal = calibrate(ckpt, threads=1, emulated=cluster.network.emulate, batch=args.requests, replay=replay)
    console.print(f"calibration ({time.perf_counter() - t0:.0f} s): {cal.as_dict()}")
    # the same with the other servers' load on this machine's cores (an upper bound of the sharing)
    others = len(cluster.servers) - 1
    cal_loaded = calibrate(ckpt, threads=1, emulated=cluster.network.emulate, batch=args.requests, replay=replay,
                           contention=others)
    console.print(f"calibration with {others} busy processes: {cal_loaded.as_dict()}")
    scen = build_scenario(cluster, args.data_dir, seed=args.seed)
    base = scen.cost
    scen.cost = calibrated_cost(base, cal)
    # the 3 servers share this machine's cores; the simulator gives each its own "GPU"
    shared = calibrated_cost(base, cal, slowdown=max(1.0, len(cluster.servers) / (os.cpu_count() or 1)))
    loaded = calibrated_cost(base, cal_loaded)

    # the serving engine's admission: DeepSeek's latent-attention cache is served by the padded loop, which
    # prefills new requests one at a time (one forward each) before a step's decode
    from transformers import AutoConfig

    from prism_moe.runtime.engine import caches_latents

    engine_cfg = EngineConfig(max_batch_tokens=1) if caches_latents(AutoConfig.from_pretrained(ckpt)) else EngineConfig()
    rows = {}
    for algorithm in args.algorithms:
        measured, placement = [], None
        for rep in range(args.repeats):
            res, placement = run_one(algorithm, cluster_dict, prompts, args, Path(args.out) / f"rep{rep}", console,
                                     replay=True)
            measured.append(res.summary())
            console.print(f"[{algorithm} #{rep}] {measured[-1]['mean_latency_s']:.3f} s, "
                          f"remote {measured[-1]['remote_fraction']:.3f}, failed {measured[-1]['failed']}")
        reqs = sim_requests(scen, prompts, args.max_tokens, args.seed)
        first, finish, st, wall = Engine(scen.cost, placement, scen.pools, reqs, engine_cfg).run()
        sim = SimResult(tuple(cluster.server_names), reqs, first, finish, st, wall, algorithm).summary()
        shared_lat = SimResult(tuple(cluster.server_names), reqs,
                               *Engine(shared, placement, scen.pools, reqs, engine_cfg).run(),
                               algorithm).summary()["mean_latency_s"]
        loaded_lat = SimResult(tuple(cluster.server_names), reqs,
                               *Engine(loaded, placement, scen.pools, reqs, engine_cfg).run(),
                               algorithm).summary()["mean_latency_s"]
        lat = [m["mean_latency_s"] for m in measured]
        mean = statistics.fmean(lat)
        rows[algorithm] = {
            "predicted_mean_latency_s": round(sim["mean_latency_s"], 4),
            "measured_mean_latency_s": round(mean, 4),
            "measured_runs_s": [round(x, 4) for x in lat],
            "measured_spread": round((max(lat) - min(lat)) / mean, 3),
            "relative_error": round((sim["mean_latency_s"] - mean) / mean, 3),
            "predicted_shared_cpu_s": round(shared_lat, 4),
            "relative_error_shared_cpu": round((shared_lat - mean) / mean, 3),
            "predicted_calibrated_under_load_s": round(loaded_lat, 4),
            "relative_error_calibrated_under_load": round((loaded_lat - mean) / mean, 3),
            "predicted_remote_fraction": round(sim["remote_fraction"], 4),
            "measured_remote_fraction": round(statistics.fmean(m["remote_fraction"] for m in measured), 4),
            "plan_remote_fraction": round(measured[0]["predicted_remote_fraction"], 4),
            "predicted_remote_calls": sim["remote_calls"],
            "predicted_ttft_s": round(sim["mean_ttft_s"], 4),
            "measured_ttft_s": round(statistics.fmean(m["mean_ttft_s"] for m in measured), 4),
            "failed": sum(m["failed"] for m in measured),
        }
    by = sorted(rows, key=lambda a: rows[a]["predicted_mean_latency_s"])
    real = sorted(rows, key=lambda a: rows[a]["measured_mean_latency_s"])
    print(json.dumps({
        "setting": {"requests_per_server": args.requests, "prompt_tokens": args.prompt_tokens,
                    "max_tokens": args.max_tokens, "repeats": args.repeats, "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "calibration_us": cal.as_dict(),
        "calibration_under_load_us": cal_loaded.as_dict(),
        "placements": rows,
        "ranking": {"predicted": by, "measured": real, "agrees": by == real},
        "within_25pct": all(abs(r["relative_error"]) <= 0.25 for r in rows.values()),
    }, indent=1))


if __name__ == "__main__":
    main()
