"""`prism place`: compute an expert placement for a cluster file and report it."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("place", help="compute an expert placement for a cluster",
                       description="Load the cluster file, each server's workload (real routing data) and the "
                                   "model, run a placement algorithm, and report how many expert invocations "
                                   "stay local. --compare runs every algorithm.")
    p.add_argument("--cluster", required=True, help="cluster YAML file (see examples/)")
    p.add_argument("--algorithm", default=None,
                   help="placement algorithm: uniform, redundance, eplb, smartmoe, prism, optimal, flow "
                        "(default: the registry's DEFAULT_ALGORITHM, flow)")
    p.add_argument("--data-dir", default=None, help="routing data folder (default: $PRISM_DATA_DIR or shared/data)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--out", default=None, help="save the placement to this JSON file")
    p.add_argument("--compare", action="store_true",
                   help="also run every algorithm: remote fraction, gap to optimal, solve time, replicas")
    p.add_argument("--export", choices=("sglang", "eplb"), default=None,
                   help="also write the placement for an engine (clusters of equal GPUs): sglang = SGLang's "
                        "--init-expert-location JSON, eplb = DeepSeek EPLB's phy2log/log2phy/logcnt (JSON)")
    p.add_argument("--export-out", default=None,
                   help="file for --export (default: expert-location-sglang.json / eplb-tables.json)")
    p.set_defaults(func=run)


def _timed_place(name, stats, cluster, model):
    from prism_moe.placement.registry import place

    t0 = time.perf_counter()
    placement = place(name, stats, cluster, model)
    return placement, time.perf_counter() - t0


def _compare(stats, cluster, model, problem, chosen=None) -> list[dict[str, Any]]:
    from prism_moe.placement.registry import ALGORITHMS

    rows = []
    for name in ALGORITHMS:
        if chosen is not None and name == chosen[0].algorithm:
            placement, seconds = chosen
        else:
            placement, seconds = _timed_place(name, stats, cluster, model)
        rows.append({"algorithm": name, "remote_fraction": placement.remote_fraction(problem.demand),
                     "solve_seconds": seconds,
                     "replicas": int(placement.hosts.sum()) - problem.num_layers * problem.num_experts})
    best = next(r["remote_fraction"] for r in rows if r["algorithm"] == "optimal")
    for r in rows:
        r["gap_to_optimal"] = (r["remote_fraction"] / best - 1.0) if best > 0 else r["remote_fraction"]
    return rows


def run(args: argparse.Namespace) -> int:
    from prism_moe.config import load_cluster
    from prism_moe.model.spec import GIB
    from prism_moe.placement.problem import Problem
    from prism_moe.placement.registry import ALGORITHMS, DEFAULT_ALGORITHM, PLAN_ALGORITHMS

    name = args.algorithm or DEFAULT_ALGORITHM
    if name not in ALGORITHMS and name not in PLAN_ALGORITHMS:  # before any data is read
        raise ValueError(f"unknown placement algorithm {name!r}; choose one of "
                         f"{', '.join([*ALGORITHMS, *PLAN_ALGORITHMS])}")
    cluster = load_cluster(args.cluster)
    if name in PLAN_ALGORITHMS:
        return _run_plan(name, cluster, args)
    model = cluster.model_spec()
    cluster.check_feasible(model)  # the ConfigError with the numbers, before any data is read
    from prism_moe.planning import cluster_stats

    stats, notes = cluster_stats(cluster, model, args.data_dir)
    placement, seconds = _timed_place(name, stats, cluster, model)
    problem = Problem.build(stats, cluster, model)
    if args.out:
        placement.save(args.out)
    export = _export(args, placement, problem, cluster, model) if args.export else None
    used = placement.experts_used()
    names = list(placement.server_names)
    result: dict[str, Any] = {
        "algorithm": placement.algorithm,
        "model": model.name,
        "remote_fraction": placement.remote_fraction(problem.demand),
        "solve_seconds": seconds,
        "memory_used_gib": {n: (model.dense_bytes + int(used[i]) * model.expert_bytes) / GIB
                            for i, n in enumerate(names)},
        "expert_slots": {n: {"used": int(used[i]), "capacity": int(problem.capacity[i])} for i, n in enumerate(names)},
        "placement": {n: {str(layer): ids for layer, ids in placement.held(i).items()} for i, n in enumerate(names)},
        "notes": notes,
    }
    if args.compare:
        result["compare"] = _compare(stats, cluster, model, problem, chosen=(placement, seconds))
    if export:
        result["export"] = export
    if args.json:
        print(json.dumps(result))
        return 0
    _print_summary(result, cluster, problem, placement)
    if args.out:
        print(f"placement saved to {args.out}")
    if export:
        print(f"{args.export} file written to {export['path']}: {export['gpus']} GPUs x {export['slots_per_gpu']} "
              f"slots per MoE layer ({export['padding']} padding replicas); {export['usage']}")
    return 0


def _export(args, placement, problem, cluster, model) -> dict[str, Any]:
    """Write the placement in an engine's format (prism_moe.placement.export); returns what was written."""
    from pathlib import Path

    from prism_moe.placement.export import (
        ExportError,
        check_sglang_map,
        eplb_tables,
        physical_layout,
        sglang_physical_to_logical,
    )

    kinds = {(s.gpu, round(s.memory_gib / s.gpus, 9)) for s in cluster.servers}
    if len(kinds) != 1:
        listing = ", ".join(f"{s.name}: {s.gpus}x {s.gpu}, {s.memory_gib / s.gpus:g} GiB per GPU" for s in cluster.servers)
        raise ExportError(f"--export {args.export} needs equal GPUs (same gpu profile and memory per GPU): "
                          f"{args.export} gives every GPU the same expert slots; this cluster has {listing}")
    gpus = np.array([s.gpus for s in cluster.servers])
    layout = physical_layout(placement.hosts, gpus, problem.demand.sum(axis=0))
    n_gpus, e = layout.num_gpus, model.num_experts
    path = Path(args.export_out or ("expert-location-sglang.json" if args.export == "sglang" else "eplb-tables.json"))
    p_slots = layout.phy2log.shape[1]
    if args.export == "sglang":
        m = sglang_physical_to_logical(layout, model.moe_layer_ids, model.num_hidden_layers, e)
        check_sglang_map(m, e, n_gpus)
        path.write_text(json.dumps({"physical_to_logical_map": m.tolist()}))
        usage = (f"start SGLang with --ep-size {n_gpus} --ep-num-redundant-experts {p_slots - e} "
                 f"--init-expert-location {path}, EP rank r on GPU r (servers in cluster-file order)")
    else:
        phy2log, log2phy, logcnt = eplb_tables(layout, e)
        path.write_text(json.dumps({"phy2log": phy2log.tolist(), "log2phy": log2phy.tolist(),
                                    "logcnt": logcnt.tolist()}))
        usage = f"num_replicas={p_slots}, num_gpus={n_gpus}; GPU g holds slots g*{layout.slots_per_gpu}.."
    return {"format": args.export, "path": str(path), "gpus": n_gpus, "slots_per_gpu": layout.slots_per_gpu,
            "physical_slots": p_slots, "padding": layout.padding, "usage": usage}


def _run_plan(name: str, cluster, args) -> int:
    """An execution-plan algorithm (pipeline, pipeline-opt, hybrid): where each home's layers run."""
    import time

    from prism_moe.placement.plan import PlanSizes
    from prism_moe.placement.registry import PLAN_ALGORITHMS
    from prism_moe.planning import cluster_stats

    model = cluster.model_spec()
    stats, notes = cluster_stats(cluster, model, args.data_dir)
    t0 = time.perf_counter()
    plan = PLAN_ALGORITHMS[name](stats, cluster, model)
    seconds = time.perf_counter() - t0
    if args.out:
        plan.save(args.out)
    result = {"algorithm": name, "model": model.name, "solve_seconds": seconds, **plan.summary(PlanSizes.of(model)),
              "estimate_s": plan.meta.get("estimate_s"), "notes": notes}
    if args.json:
        print(json.dumps(result))
        return 0
    from rich.console import Console

    con = Console()
    con.print(f"[bold]{name}[/bold] plan of {model.name} (solved in {seconds * 1000:.0f} ms)"
              + (f", estimated mean request latency {result['estimate_s']:.2f} s" if result["estimate_s"] else ""))
    for srv in cluster.servers:
        runs = ", ".join(f"layers {a}-{b} on {cluster.server_names[p]}" for a, b, p in result["blocks"][srv.name])
        con.print(f"  requests of {srv.name}: {runs}; it holds {result['dense_layers'][srv.name]} dense layers, "
                  f"{result['experts'][srv.name]} experts, {result['weight_gib'][srv.name]:.2f} / {srv.memory_gib:g} GiB")
    if args.out:
        con.print(f"plan saved to {args.out}")
    return 0


def _print_summary(result, cluster, problem, placement) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{result['algorithm']}[/bold] placement of {result['model']}: "
                  f"{result['remote_fraction']:.1%} of expert invocations remote "
                  f"(solved in {result['solve_seconds'] * 1000:.1f} ms)")
    table = Table("server", "gpu", "workload", "memory GiB", "expert slots", "experts/layer", "own calls local")
    demand = problem.demand
    for i, srv in enumerate(cluster.servers):
        per_layer = placement.hosts[i].sum(axis=1)
        own = demand[i].sum()
        local = float((demand[i] * placement.hosts[i]).sum() / own) if own > 0 else 0.0
        slots = result["expert_slots"][srv.name]
        table.add_row(srv.name, f"{srv.gpus}x {srv.gpu}", srv.workload or "-",
                      f"{result['memory_used_gib'][srv.name]:.2f} / {srv.memory_gib:g}",
                      f"{slots['used']} / {slots['capacity']}", f"{per_layer.min()}-{per_layer.max()}", f"{local:.1%}")
    console.print(table)
    if "compare" in result:
        cmp = Table("algorithm", "remote fraction", "gap to optimal", "solve ms", "replicas")
        for r in result["compare"]:
            cmp.add_row(r["algorithm"], f"{r['remote_fraction']:.2%}", f"{r['gap_to_optimal']:+.2%}",
                        f"{r['solve_seconds'] * 1000:.1f}", str(r["replicas"]))
        console.print(cmp)
    for note in result["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
