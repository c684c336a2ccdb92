"""Validate the cluster simulator against the real runtime on the demo's setting.

The same tiny DeepSeek-V2-shaped model, the same 3 servers (memory shares and emulated links of
`prism_moe.demo.demo_cluster`), the same placements and the same workload (each server's ESFT domain,
trace replay; N requests per server, all sent at once, prompts cut to P tokens, O output tokens) go
through
  (a) the simulator, its cost model calibrated on this machine (`prism_moe.sim.calibrate`: a server of
      the same model with trace replay, torch threads=1, in this process, calling a peer `prism serve`
      process over an emulated link; from its forwards and MoE layers: the dense part per layer and per
      prefill token, the local expert work, the serving loop's per-step cost, and what a remote call
      costs beyond its link and the peer's compute; links as in the cluster file), each request on
      the trace rows its server replays; the 3 servers share this machine's cores, so every CPU term is
      taken servers / cores x slower (the simulator gives each server a device of its own: the
      `own_device` prediction is without that factor), and
  (b) a real local cluster (`prism demo`'s `run_one`: 3 `prism serve` processes, `--placement`,
      `--replay`), `--repeats` times per placement (the machine is shared: the spread is reported).

Prints JSON: per placement predicted vs measured mean latency and remote fraction, the relative error,
and whether the placements rank the same.

    python benchmarks/validate_sim.py [--algorithms uniform prism flow] [--requests 4] [--repeats 2] [--under-load]
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
from prism_moe.demo import _prompts, demo_cluster, demo_workloads, run_one, tiny_checkpoint
from prism_moe.sim import Engine, EngineConfig, SimResult, build_scenario
from prism_moe.sim.calibrate import calibrate, calibrated_cost
from prism_moe.sim.workload import Requests


def sim_requests(scen, prompts: dict[str, list[list[int]]], output_tokens: int) -> Requests:
    """Every server's prompts at t=0 (their real lengths), `output_tokens` each, on the trace rows the real
    servers replay: a server's replay has one cursor from row 0 that every forward advances by its tokens,
    so its requests together take the rows 0, 1, ... in turn (a request's prompt, then its decode tokens
    but the last, which no forward sees). Given as consecutive blocks: the same rows, split by request."""
    rows = []
    for s, name in enumerate(scen.cluster.server_names):
        pool_id = scen.phases[s][0][1]
        cursor = 0
        for p in prompts[name]:
            rows.append((s, len(p), pool_id, cursor))
            cursor += len(p) + output_tokens - 1
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
    ap.add_argument("--under-load", action="store_true",
                    help="also calibrate while the other servers' load runs on this machine (about 40 s more)")
    args = ap.parse_args()
    workloads, args.data_dir, _ = demo_workloads(args.data_dir)
    args.concurrency = args.requests  # all of a server's requests in flight at once, as in the simulation
    console = Console(stderr=True)
    ckpt = tiny_checkpoint(Path(args.cache_dir), console)
    cluster_dict = demo_cluster(ckpt, workloads)
    cluster = cluster_from_dict(cluster_dict)
    prompts = _prompts(ckpt, args.data_dir, workloads, args.requests, args.prompt_tokens)

    t0 = time.perf_counter()
    # the servers replay traces over emulated links: calibrate that path (one domain's trace will do)
    replay = cluster.servers[0].workload
    cal = calibrate(ckpt, threads=1, emulated=cluster.network.emulate, batch=args.requests, replay=replay,
                    data_dir=args.data_dir, prompt_tokens=args.prompt_tokens)
    console.print(f"calibration ({time.perf_counter() - t0:.0f} s): {cal.as_dict()}")
    cal_loaded = None
    if args.under_load:  # the same with the other servers' load on this machine's cores (an upper bound)
        others = len(cluster.servers) - 1
        cal_loaded = calibrate(ckpt, threads=1, emulated=cluster.network.emulate, batch=args.requests,
                               replay=replay, data_dir=args.data_dir, prompt_tokens=args.prompt_tokens,
                               contention=others)
        console.print(f"calibration with {others} busy processes: {cal_loaded.as_dict()}")
    scen = build_scenario(cluster, args.data_dir, seed=args.seed)
    # The simulator gives every server a device of its own; here the servers' processes share this
    # machine's cores, so every CPU term runs servers / cores x slower (when all are busy: they are here,
    # each server has requests all along). That is the prediction; `own_device` is the one without it.
    sharing = max(1.0, len(cluster.servers) / (os.cpu_count() or 1))
    costs = {"predicted": calibrated_cost(scen.cost, cal, slowdown=sharing),
             "own_device": calibrated_cost(scen.cost, cal)}
    if cal_loaded is not None:
        costs["calibrated_under_load"] = calibrated_cost(scen.cost, cal_loaded)

    # the serving engine's steps: DeepSeek's latent-attention cache is served by the padded loop, which
    # prefills each new request in a forward of its own, then decodes the running ones in one more forward
    from transformers import AutoConfig

    from prism_moe.runtime.engine import caches_latents
    from prism_moe.runtime.server import ServeOptions

    max_running = ServeOptions.__dataclass_fields__["max_running"].default  # what `prism serve` runs with
    engine_cfg = EngineConfig(max_batch_requests=max_running,
                              separate_prefill=caches_latents(AutoConfig.from_pretrained(ckpt)))
    rows = {}
    for algorithm in args.algorithms:
        measured, placement = [], None
        for rep in range(args.repeats):
            res, placement = run_one(algorithm, cluster_dict, prompts, args, Path(args.out) / f"rep{rep}", console,
                                     replay=True)
            measured.append(res.summary())
            console.print(f"[{algorithm} #{rep}] {measured[-1]['mean_latency_s']:.3f} s, "
                          f"remote {measured[-1]['remote_fraction']:.3f}, failed {measured[-1]['failed']}")
        reqs = sim_requests(scen, prompts, args.max_tokens)
        sims = {k: SimResult(tuple(cluster.server_names), reqs, *Engine(c, placement, scen.pools, reqs, engine_cfg).run(),
                             algorithm).summary() for k, c in costs.items()}
        sim = sims["predicted"]
        lat = [m["mean_latency_s"] for m in measured]
        mean = statistics.fmean(lat)
        rows[algorithm] = {
            "predicted_mean_latency_s": round(sim["mean_latency_s"], 4),
            "measured_mean_latency_s": round(mean, 4),
            "measured_runs_s": [round(x, 4) for x in lat],
            "measured_spread": round((max(lat) - min(lat)) / mean, 3),
            "relative_error": round((sim["mean_latency_s"] - mean) / mean, 3),
            **{f"{k}_mean_latency_s": round(v["mean_latency_s"], 4) for k, v in sims.items() if k != "predicted"},
            **{f"relative_error_{k}": round((v["mean_latency_s"] - mean) / mean, 3)
               for k, v in sims.items() if k != "predicted"},
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
        "core_sharing_slowdown": sharing,
        **({"calibration_under_load_us": cal_loaded.as_dict()} if cal_loaded is not None else {}),
        "placements": rows,
        "ranking": {"predicted": by, "measured": real, "agrees": by == real},
        "within_25pct": all(abs(r["relative_error"]) <= 0.25 for r in rows.values()),
    }, indent=1))


if __name__ == "__main__":
    main()
