"""Execution plans on the real cluster: `prism`, `latency`, `pipeline` and `hybrid` over emulated links.

The demo's 3 local servers (`prism_moe.demo`: the tiny DeepSeek-V2-shaped model, memory shares, each server
replaying its ESFT domain's routing trace with `--replay`) with every link emulated at one bandwidth and
latency per setting (500 Mbps / 1 ms among them). For each plan (`planning.execution_plan`, computed for the
setting's links) the servers start once with `--placement plan.json`; each link setting is then set live
on every server (`POST /prism/links`, the same emulation the cluster file's `network: emulate: true` starts
with) and the same workload runs: every server's own prompts, all sent at once, greedy, `--max-tokens` each.
A plan that the planner changes with the links gets a cluster start of its own.

Every (plan, setting) runs `--repeats` times, interleaved (each repeat starts every plan's cluster again, the
plans' order reversed every other repeat: the machine is shared and noisy); one JSON line per (plan, setting)
on stdout with --json: measured latency, TTFT, time per output token (means over the repeats, each repeat's
mean in `runs_mean_latency_s`), failed requests, bytes between servers (expert calls and block hand-offs, both
directions, from the servers' `/prism/stats` peer byte counters), the servers' measured remote share and
hand-offs, and `predicted_mean_latency_s`: the simulator (`prism_moe.sim`) running the same plan, links and
requests with its cost model calibrated on this machine (`sim.calibrate`: `measure_server_path` for the
per-layer compute and the expert call overhead, `measure_handoff` for a block hand-off's own cost). The 3
servers share this machine's cores: each server's CPU terms are slowed by how busy the others are while it
computes (`shared_cores_slowdown`, the calls' and hand-offs' own work counted as CPU; a few damped rounds of
the simulation), reported as `core_sharing_slowdown`. Then a summary line: the goals' ratios at
500 Mbps / 1 ms, the prediction error per row and whether predicted and measured rank the plans alike.

    python benchmarks/plans.py --json [--settings 500:1 100:5 1000:0.5] [--plans prism latency pipeline hybrid]
        [--requests 4] [--max-tokens 16] [--prompt-tokens 32] [--repeats 2] [--no-predict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from prism_moe.config import cluster_from_dict
from prism_moe.demo import _prompts, demo_cluster, demo_workloads, drive, tiny_checkpoint
from prism_moe.placement.plan import ExecutionPlan

PLANS = ("prism", "latency", "pipeline", "hybrid")
SETTINGS = ("500:1", "100:5", "1000:0.5")
GOAL_SETTING = (500.0, 1.0)


def parse_setting(text: str) -> tuple[float, float]:
    """'MBPS:MS' -> (bandwidth Mbit/s, one-way latency ms)."""
    try:
        bw, lat = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a link setting is BANDWIDTH_MBPS:LATENCY_MS, e.g. 500:1; got {text!r}") from None
    if not (np.isfinite(bw) and np.isfinite(lat) and bw > 0 and lat >= 0):
        raise argparse.ArgumentTypeError(f"need bandwidth > 0 and latency >= 0 (finite), got {text!r}")
    return bw, lat


def with_links(cluster_dict: dict[str, Any], bw: float, lat: float) -> dict[str, Any]:
    """The demo cluster with every link emulated at bw Mbit/s and lat ms one way."""
    return {**cluster_dict, "network": {"bandwidth_mbps": bw, "latency_ms": lat, "emulate": True}}


def set_links(endpoints: dict[str, str], bw: float, lat: float) -> None:
    """Every server emulates its side of every link at (bw, lat), live."""
    for name, url in endpoints.items():
        for peer in endpoints:
            if peer != name:
                r = httpx.post(f"{url}/prism/links", json={"peer": peer, "delay_ms": lat, "bandwidth_mbps": bw},
                               timeout=10)
                r.raise_for_status()


def snapshot(endpoints: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {n: httpx.get(f"{u}/prism/stats", timeout=30).json() for n, u in endpoints.items()}


def counters(before: dict[str, dict], after: dict[str, dict]) -> dict[str, float]:
    """What the servers counted between two snapshots: bytes between servers, invocations, hand-offs."""
    def total(snap: dict[str, dict], key: str) -> float:
        return float(sum(s[key] for s in snap.values()))

    def runner(snap: dict[str, dict], key: str) -> float:
        return float(sum((s.get("plan") or {}).get("runner", {}).get(key, 0) for s in snap.values()))

    d = {k: total(after, k) - total(before, k) for k in
         ("peer_bytes_sent", "peer_bytes_received", "invocations", "local_invocations")}
    return {"cross_server_mb": (d["peer_bytes_sent"] + d["peer_bytes_received"]) / 1e6,
            "remote_fraction": 1 - d["local_invocations"] / d["invocations"] if d["invocations"] else 0.0,
            "handoffs": runner(after, "handoffs") - runner(before, "handoffs"),
            "resumed": runner(after, "resumed") - runner(before, "resumed")}


def summarize(results: list[Any]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    lat = [r.latency_s for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1]
    nan = float("nan")
    return {"requests": len(results), "failed_requests": len(results) - len(ok),
            "mean_latency_s": statistics.fmean(lat) if lat else nan,
            "p95_latency_s": float(np.percentile(lat, 95)) if lat else nan,
            "mean_ttft_s": statistics.fmean(r.ttft_s for r in ok) if ok else nan,
            "mean_tpot_s": statistics.fmean(tpot) if tpot else nan}


class Predictor:
    """The simulator's mean request latency for a plan on a link setting, calibrated on this machine."""

    def __init__(self, ckpt: Path, base: dict[str, Any], prompts: dict[str, list[list[int]]], args: Any,
                 console: Console) -> None:
        from prism_moe.sim.calibrate import calibrate

        cluster = cluster_from_dict(base)
        t0 = time.perf_counter()
        self.cal = calibrate(ckpt, threads=1, emulated=True, batch=args.requests, replay=cluster.servers[0].workload,
                             data_dir=args.data_dir, prompt_tokens=args.prompt_tokens, handoff=True)
        console.print(f"calibration ({time.perf_counter() - t0:.0f} s): {self.cal.as_dict()}")
        self.base, self.prompts, self.args = base, prompts, args
        self.cores = os.cpu_count() or 1

    def __call__(self, plan: ExecutionPlan, bw: float, lat: float) -> dict[str, Any]:
        """The simulator's summary of the benchmark's workload under `plan` on (bw, lat) links."""
        from dataclasses import replace

        from validate_sim import sim_requests  # benchmarks/ is the script's folder: on sys.path

        from prism_moe.runtime.server import ServeOptions
        from prism_moe.sim import Engine, EngineConfig, SimResult, build_scenario
        from prism_moe.sim.calibrate import calibrated_cost, shared_cores_slowdown

        cluster = cluster_from_dict(with_links(self.base, bw, lat))
        scen = build_scenario(cluster, self.args.data_dir, seed=0)
        reqs = sim_requests(scen, self.prompts, self.args.max_tokens)
        # A server's first request starts its engine's first step alone; the others come in (HTTP) during it:
        # 1 ms apart, well below a step, as on the real servers.
        arrival = np.zeros(len(reqs.server))
        for s in range(len(cluster.servers)):
            mine = np.flatnonzero(reqs.server == s)
            arrival[mine] = np.arange(len(mine)) * 1e-3
        reqs = replace(reqs, arrival=arrival)
        # the slot runner: one step decodes the running requests, then prefills the waiting ones in one forward
        cfg = EngineConfig(max_batch_requests=ServeOptions.__dataclass_fields__["max_running"].default)
        # The 3 servers share this machine's cores: each one's CPU work runs slower by how busy the others are
        # while it computes (`shared_cores_slowdown`), found by a few damped rounds from one core each.
        f = used = np.ones(len(cluster.servers))
        for _ in range(6):
            used = f
            cost = calibrated_cost(scen.cost, self.cal, slowdown=f)
            first, finish, stats, *rest = Engine(cost, plan, scen.pools, reqs, cfg).run()
            res = SimResult(tuple(cluster.server_names), reqs, first, finish, stats, *rest, plan.algorithm).summary()
            host = (stats.remote_calls * self.cal.call_overhead_s + stats.handoffs / 2 * self.cal.handoff_s) * f.mean()
            f = (f + shared_cores_slowdown(stats.busy_s, res["makespan_s"], self.cores, host)) / 2
        return {"predicted_mean_latency_s": float(res["mean_latency_s"]), "predicted_ttft_s": float(res["mean_ttft_s"]),
                "predicted_tpot_s": float(res["mean_tpot_s"]), "core_sharing_slowdown": np.round(used, 3).tolist()}


def plans_for(base: dict[str, Any], names: list[str], settings: list[tuple[float, float]], data_dir: str | None
              ) -> dict[str, list[tuple[ExecutionPlan, list[tuple[float, float]]]]]:
    """Per plan name, its distinct plans over the settings, each with the settings it is the plan for."""
    from prism_moe.planning import execution_plan

    out: dict[str, list[tuple[ExecutionPlan, list[tuple[float, float]]]]] = {}
    for name in names:
        groups: list[tuple[ExecutionPlan, list[tuple[float, float]]]] = []
        for bw, lat in settings:
            p = execution_plan(cluster_from_dict(with_links(base, bw, lat)), name, data_dir)
            same = next((g for g in groups if (g[0].executor == p.executor).all()
                         and (g[0].placement.hosts == p.placement.hosts).all()), None)
            if same is None:
                groups.append((p, [(bw, lat)]))
            else:
                same[1].append((bw, lat))
        out[name] = groups
    return out


def run_plan(plan: ExecutionPlan, name: str, base: dict[str, Any], settings: list[tuple[float, float]],
             prompts: dict[str, list[list[int]]], args: Any, console: Console, run_dir: Path
             ) -> list[dict[str, Any]]:
    """Start the cluster on `plan`, run the workload on each link setting; one row per setting."""
    from rich.progress import Progress

    from prism_moe.runtime.launcher import LaunchError, start_local_cluster

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"plan-{name}.json"
    plan.save(path)
    cluster = cluster_from_dict(with_links(base, *settings[0]))
    extra = ["--placement", str(path.resolve()), "--threads", "1", "--replay"]
    extra += ["--data-dir", args.data_dir] if args.data_dir else []
    model = Path(cluster.model).name
    rows = []
    with console.status(f"\\[{name}] starting 3 servers ..."):
        for attempt in range(3):  # free ports are picked at start: another job on the machine may take one first
            try:
                lc = start_local_cluster(cluster, run_dir / name, extra, health_timeout=300, log=lambda *_: None)
                break
            except LaunchError as err:
                if attempt == 2 or "address already in use" not in str(err):
                    raise
                console.print(f"\\[{name}] a port was taken meanwhile, starting again: {str(err)[-120:]}")
    with lc:
        urls = lc.endpoints()
        warm = {n: p[:1] for n, p in prompts.items()}  # first forwards (allocations, lazy imports) out of the timing
        asyncio.run(drive(urls, warm, args.max_tokens, 1, model))
        for bw, lat in settings:
            set_links(urls, bw, lat)
            before = snapshot(urls)
            n = sum(len(v) for v in prompts.values())
            with Progress(console=console, transient=True) as prog:
                task = prog.add_task(f"\\[{name} {bw:g} Mbps {lat:g} ms] requests", total=n)
                results = asyncio.run(drive(urls, prompts, args.max_tokens, args.requests, model,
                                            on_done=lambda _, t=task: prog.advance(t)))
            row = {"plan": name, "bandwidth_mbps": bw, "latency_ms": lat, **summarize(results),
                   **counters(before, snapshot(urls)), "blocks": [plan_blocks(plan, h) for h in range(plan.num_servers)]}
            console.print(f"\\[{name} {bw:g} Mbps {lat:g} ms] mean {row['mean_latency_s']:.3f} s, TTFT "
                          f"{row['mean_ttft_s']:.3f} s, TPOT {row['mean_tpot_s'] * 1e3:.1f} ms, "
                          f"{row['cross_server_mb']:.2f} MB, failed {row['failed_requests']}")
            rows.append(row)
    return rows


def merge(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a (plan, setting): means of the measures, failures and requests summed."""
    out = dict(reps[0])
    for key, value in reps[0].items():
        if key in ("requests", "failed_requests"):
            out[key] = sum(r[key] for r in reps)
        elif isinstance(value, float) and key not in ("bandwidth_mbps", "latency_ms"):
            out[key] = statistics.fmean(r[key] for r in reps)
    out["runs_mean_latency_s"] = [round(r["mean_latency_s"], 4) for r in reps]
    return out


def plan_blocks(plan: ExecutionPlan, home: int) -> list[list[Any]]:
    from prism_moe.placement.plan import blocks

    names = plan.server_names
    return [[a, b, names[s]] for a, b, s in blocks(plan.executor[home])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON line per (plan, setting) and a summary on stdout")
    ap.add_argument("--plans", nargs="+", default=list(PLANS), help=f"plan algorithms (default {' '.join(PLANS)})")
    ap.add_argument("--settings", nargs="+", type=parse_setting, default=[parse_setting(s) for s in SETTINGS],
                    help="link settings BANDWIDTH_MBPS:LATENCY_MS (default 500:1 100:5 1000:0.5)")
    ap.add_argument("--requests", type=int, default=4, help="requests per server, all sent at once (default 4)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="runs of every (plan, setting), interleaved (default 2)")
    ap.add_argument("--no-predict", action="store_true", help="skip the simulator's calibration and predictions")
    ap.add_argument("--cache-dir", default=".prism/models")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="reports/plans")
    args = ap.parse_args()
    for key in ("requests", "prompt_tokens", "max_tokens", "repeats"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1")
    from prism_moe.placement.registry import ALGORITHMS, PLAN_ALGORITHMS

    unknown = [p for p in args.plans if p not in ALGORITHMS and p not in PLAN_ALGORITHMS]
    if unknown:
        ap.error(f"unknown plans {unknown}; choose from {', '.join([*ALGORITHMS, *PLAN_ALGORITHMS])}")

    console = Console(stderr=True)
    t0 = time.perf_counter()
    workloads, args.data_dir, words = demo_workloads(args.data_dir)
    console.print(f"routing data: {words}")
    ckpt = tiny_checkpoint(Path(args.cache_dir), console)
    base = demo_cluster(ckpt, workloads)
    prompts = _prompts(ckpt, args.data_dir, workloads, args.requests, args.prompt_tokens)
    groups = plans_for(base, args.plans, args.settings, args.data_dir)
    predict = None if args.no_predict else Predictor(ckpt, base, prompts, args, console)
    runs: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for rep in range(args.repeats):  # interleaved: every plan once per repeat, the order reversed every other
        for name in args.plans if rep % 2 == 0 else args.plans[::-1]:
            for plan, settings in groups[name]:
                for row in run_plan(plan, name, base, settings, prompts, args, console, Path(args.out) / f"rep{rep}"):
                    runs.setdefault((name, row["bandwidth_mbps"], row["latency_ms"]), []).append(row)
    rows = []
    for name in args.plans:
        for plan, settings in groups[name]:
            for bw, lat in settings:
                row = merge(runs[(name, bw, lat)])
                if predict is not None:
                    row.update(predict(plan, bw, lat))
                rows.append(row)
                if args.json:
                    print(json.dumps(_rounded(row)), flush=True)
    summary = goals(rows, args)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        console.print_json(json.dumps(summary))


def goals(rows: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """The issue's ratios at 500 Mbps / 1 ms and the prediction error of every row."""
    at = {r["plan"]: r for r in rows if (r["bandwidth_mbps"], r["latency_ms"]) == GOAL_SETTING}

    def ratio(a: str, b: str) -> float | None:
        if a in at and b in at:
            return round(at[a]["mean_latency_s"] / at[b]["mean_latency_s"], 3)
        return None

    err = {f"{r['plan']}@{r['bandwidth_mbps']:g}/{r['latency_ms']:g}":
           round(r["predicted_mean_latency_s"] / r["mean_latency_s"] - 1, 3)
           for r in rows if "predicted_mean_latency_s" in r}
    ranking = {}
    for bw, lat in args.settings:
        mine = [r for r in rows if (r["bandwidth_mbps"], r["latency_ms"]) == (bw, lat)]
        if mine and all("predicted_mean_latency_s" in r for r in mine):
            measured = [r["plan"] for r in sorted(mine, key=lambda r: r["mean_latency_s"])]
            predicted = [r["plan"] for r in sorted(mine, key=lambda r: r["predicted_mean_latency_s"])]
            ranking[f"{bw:g}/{lat:g}"] = {"measured": measured, "predicted": predicted, "agrees": measured == predicted}
    return {"summary": True, "setting": f"{GOAL_SETTING[0]:g} Mbps / {GOAL_SETTING[1]:g} ms",
            "prism_over_pipeline": ratio("prism", "pipeline"), "prism_over_hybrid": ratio("prism", "hybrid"),
            "hybrid_over_pipeline": ratio("hybrid", "pipeline"),
            "prediction_error": err, "within_25pct": all(abs(e) <= 0.25 for e in err.values()) if err else None,
            "ranking": ranking, "failed_requests": sum(r["failed_requests"] for r in rows),
            "requests_per_server": args.requests, "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
            "cpus": os.cpu_count()}


def _rounded(row: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


if __name__ == "__main__":
    sys.exit(main())
