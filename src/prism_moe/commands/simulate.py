"""`prism simulate`: run the discrete-event cluster simulator for one placement."""

from __future__ import annotations

import argparse
import json
import math


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate the cluster serving Poisson requests with a placement",
                       description="Replay each server's workload (real per-token traces, or tokens sampled "
                                   "from per-layer counts) against a placement in a discrete-event model of "
                                   "the cluster: GPUs (roofline), links (bandwidth, latency, FIFO), queues.")
    p.add_argument("--cluster", required=True, help="cluster YAML file")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--algorithm", help="placement algorithm (uniform, redundance, eplb, smartmoe, prism, "
                                         "optimal, flow, latency) or plan algorithm (pipeline, pipeline-opt, hybrid, "
                                         "pipeline-rep, pipeline-opt-rep)")
    how.add_argument("--placement", help="a saved placement or plan JSON (prism place --out)")
    p.add_argument("--requests", type=int, default=200, help="requests to simulate (all servers together)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and sampled routing")
    p.add_argument("--data-dir", default=None, help="routing data folder (default: $PRISM_DATA_DIR or shared/data)")
    p.add_argument("--save-placement", default=None, help="write the placement used to this JSON file")
    p.add_argument("--fail", action="append", default=[], metavar="SERVER@SECONDS",
                   help="server SERVER dies at simulated time SECONDS (repeatable); its blocks and experts are "
                        "re-planned onto the survivors when memory allows, else the requests that need it fail")
    p.add_argument("--detect-s", type=float, default=1.0, help="seconds until peers notice a failure (default 1)")
    p.add_argument("--load-gb-s", type=float, default=2.0,
                   help="GB/s at which survivors load lost weights from their checkpoint (default 2)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def parse_failures(specs: list[str], names: list[str], detect_s: float, load_gb_s: float) -> list:
    """--fail SERVER@SECONDS values -> ServerFailure list; UserError on a bad value."""
    from prism_moe.cli import UserError
    from prism_moe.sim.engine import ServerFailure

    if not (math.isfinite(detect_s) and detect_s >= 0 and math.isfinite(load_gb_s) and load_gb_s > 0):
        raise UserError("--detect-s must be >= 0 and --load-gb-s > 0 (finite numbers)")
    out = []
    for spec in specs:
        name, sep, when = spec.rpartition("@")
        try:
            t = float(when)
        except ValueError:
            t = -1.0
        if not sep or name not in names or not (math.isfinite(t) and t >= 0):  # nan would pass `t < 0`
            raise UserError(f"--fail {spec!r}: expected SERVER@SECONDS with SERVER one of {', '.join(names)} "
                            f"and SECONDS >= 0, e.g. --fail {names[0]}@60")
        out.append(ServerFailure(t, names.index(name), detect_s, load_gb_s))
    return out


def run(args: argparse.Namespace) -> int:
    from prism_moe.cli import UserError
    from prism_moe.config import load_cluster
    from prism_moe.sim.run import build_scenario, make_placement, simulate

    if args.requests < 1:
        raise UserError("--requests must be at least 1")
    cluster = load_cluster(args.cluster)
    failures = parse_failures(args.fail, cluster.server_names, args.detect_s, args.load_gb_s)
    scen = build_scenario(cluster, data_dir=args.data_dir, seed=args.seed)
    if args.placement:
        placement = _load_placement_or_plan(args.placement)
        if list(placement.server_names) != cluster.server_names:
            raise UserError(f"placement servers {list(placement.server_names)} differ from the cluster's "
                            f"{cluster.server_names}")
        if (placement.num_layers, placement.num_experts) != (scen.model.num_moe_layers, scen.model.num_experts):
            raise UserError(f"placement is for {placement.num_layers} layers x {placement.num_experts} experts, "
                            f"{scen.model.name} has {scen.model.num_moe_layers} x {scen.model.num_experts}")
    else:
        try:
            placement = make_placement(scen, args.algorithm)
        except KeyError as e:
            raise UserError(f"unknown algorithm {args.algorithm!r}: {e}") from None
    if args.save_placement:
        placement.save(args.save_placement)
    result = simulate(scen, placement, n_requests=args.requests, seed=args.seed, failures=failures)
    summary = result.summary()
    summary["algorithm"] = placement.algorithm
    summary["notes"] = scen.notes
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    _print_table(summary, cluster.server_names)
    return 0


def _load_placement_or_plan(path: str):
    """A placement file, or a plan file (`prism place --algorithm pipeline|pipeline-opt|hybrid --out`)."""
    from prism_moe.placement.placement import Placement
    from prism_moe.placement.plan import FORMAT as PLAN_FORMAT
    from prism_moe.placement.plan import ExecutionPlan

    try:
        is_plan = json.loads(open(path).read()).get("format") == PLAN_FORMAT
    except (OSError, ValueError, AttributeError):
        is_plan = False  # Placement.load says what is wrong with the file
    if is_plan:
        return ExecutionPlan.load(path)
    return Placement.load(path)


def _print_table(s: dict, servers: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"simulated: {s['algorithm']} ({s['requests']} requests)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [("mean latency", f"{s['mean_latency_s']:.3f} s"), ("p50 latency", f"{s['p50_latency_s']:.3f} s"),
            ("p95 latency", f"{s['p95_latency_s']:.3f} s"), ("p99 latency", f"{s['p99_latency_s']:.3f} s"),
            ("mean TTFT", f"{s['mean_ttft_s']:.3f} s"), ("mean TPOT", f"{s['mean_tpot_s'] * 1e3:.1f} ms"),
            ("remote fraction", f"{s['remote_fraction']:.1%}"),
            ("cross-server bytes", f"{s['cross_server_bytes'] / 1e9:.2f} GB"),
            ("remote calls", f"{s['remote_calls']:,}")]
    rows += [(f"utilisation {n}", f"{s['utilisation'][n]:.1%}") for n in servers]
    if "failed_requests" in s:
        rows.append(("failed requests", f"{s['failed_requests']:,}"))
        for f in s["failures"]:
            after = (f"re-planned at {f['switched_at']:.1f} s, {f['loaded_bytes'] / 1e9:.2f} GB loaded"
                     if f["switched_at"] is not None else f"not re-plannable: {f['reason']}")
            rows.append((f"{f['server']} died at {f['time']:.1f} s", after))
    rows += [("simulator run time", f"{s['sim_seconds']:.2f} s"),
             ("expert calls / s", f"{s['expert_calls_per_s']:,.0f}")]
    for r in rows:
        t.add_row(*r)
    con = Console()
    con.print(t)
    for n in s.get("notes", []):
        con.print(f"[dim]note: {n}[/dim]")
