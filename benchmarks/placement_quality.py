"""Placement quality on real routing data: the share of expert invocations left remote by every
algorithm, with the exact optimum as the floor.

Families (each server's users send one domain; domains are dealt to servers in turn):
  esft           DeepSeek-V2-Lite (26 x 64, top-6): ESFT intent, law, summary, translation
  olmoe          OLMoE-1B-7B (16 x 64, top-8): MoE-Lens domains
  qwen           Qwen1.5-MoE-A2.7B (24 x 60, top-4): MoE-Lens domains
  deepseek-moe   DeepSeek-MoE-16B base (27 x 64, top-6): MoE-Lens domains
  mixtral        Mixtral-8x7B (32 x 8, top-2): Fiddler MMLU subjects and OLMoE-routing domains (the latter
                 measured at layers 0, 7 and 15 only; other layers copy the nearest: an approximation)
Cluster shapes: 2, 3, 4, 8 and 16 servers, each with room for 20%..90% of the routed experts (memory
= dense part + that many experts); shapes that cannot hold one copy of every expert are skipped.
Also the paper's own setting (examples/paper-deepseek.yaml).

    python benchmarks/placement_quality.py [--data-dir D] [--json out.json] [--quick]

Prints ratios measured in this run; nothing passes or fails on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from prism_moe.config import cluster_from_dict, load_cluster
from prism_moe.model.spec import GIB, load_model_spec
from prism_moe.placement.problem import ClusterStats, Problem
from prism_moe.placement.registry import ALGORITHMS, DEFAULT_ALGORITHM, place
from prism_moe.stats.workload import list_workloads, load_workload

SERVERS = (2, 3, 4, 8, 16)
MEMORY = (0.2, 0.3, 0.5, 0.7, 0.9)
REPO = Path(__file__).resolve().parents[1]


def families(data_dir) -> dict[str, tuple[str, list[str]]]:
    names = list_workloads(data_dir)
    pick = lambda prefix: [n for n in names if n.startswith(prefix) and not n.endswith(":top1")]  # noqa: E731
    return {
        "esft": ("deepseek-v2-lite", pick("esft:")),
        "olmoe": ("olmoe-1b-7b", pick("moe-lens:olmoe:")),
        "qwen": ("qwen1.5-moe-a2.7b", pick("moe-lens:qwen:")),
        "deepseek-moe": ("deepseek-moe-16b", pick("moe-lens:base:")),
        "mixtral": ("mixtral-8x7b", pick("fiddler:original:") + pick("olmoe-routing:mistral:")),
    }


def shape_cluster(model_name: str, slots: list[int]):
    model = load_model_spec(model_name)
    servers = [{"name": f"s{i}", "memory_gib": (model.dense_bytes + k * model.expert_bytes + 1024) / GIB}
               for i, k in enumerate(slots)]
    return cluster_from_dict({"model": model_name, "servers": servers}), model


def evaluate(stats: ClusterStats, cluster, model, algorithms) -> dict[str, dict[str, float]]:
    demand = Problem.build(stats, cluster, model).demand
    out = {}
    for name in algorithms:
        t0 = time.perf_counter()
        p = place(name, stats, cluster, model)
        out[name] = {"remote": p.remote_fraction(demand), "seconds": time.perf_counter() - t0}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="write every measured row to this file")
    ap.add_argument("--quick", action="store_true", help="3 and 8 servers, 30%% and 70%% memory only")
    ap.add_argument("--with-latency", action="store_true", help="also run `latency` (slow; other objective)")
    args = ap.parse_args()
    algorithms = [n for n in ALGORITHMS if n != "latency" or args.with_latency]
    servers, memory = ((3, 8), (0.3, 0.7)) if args.quick else (SERVERS, MEMORY)
    rows = []

    # the paper's setting, exactly as the example cluster file
    paper = load_cluster(REPO / "examples" / "paper-deepseek.yaml")
    pmodel = paper.model_spec()
    counts = np.stack([load_workload(s.workload, args.data_dir).fit_to(pmodel.num_moe_layers, pmodel.num_experts).counts
                       for s in paper.servers])
    paper_res = evaluate(ClusterStats(counts), paper, pmodel, algorithms)

    for family, (model_name, workloads) in families(args.data_dir).items():
        model = load_model_spec(model_name)
        n = model.total_experts
        counts = [load_workload(w, args.data_dir).fit_to(model.num_moe_layers, model.num_experts).counts
                  for w in workloads]
        for s in servers:
            for frac in memory:
                slots = [int(round(frac * n))] * s
                if sum(slots) < n:
                    continue
                cluster, model = shape_cluster(model_name, slots)
                stats = ClusterStats(np.stack([counts[i % len(counts)] for i in range(s)]))
                res = evaluate(stats, cluster, model, algorithms)
                rows.append({"family": family, "servers": s, "memory": frac, **{k: v["remote"] for k, v in res.items()},
                             "seconds": {k: v["seconds"] for k, v in res.items()}})
                print(f"  {family:13s} S={s:2d} mem={frac:.0%}  optimal {res['optimal']['remote']:.3f}  "
                      f"{DEFAULT_ALGORITHM} {res[DEFAULT_ALGORITHM]['remote']:.3f}  prism {res['prism']['remote']:.3f}",
                      file=sys.stderr)

    report(rows, paper_res, algorithms)
    if args.json:
        Path(args.json).write_text(json.dumps({"paper": paper_res, "rows": rows}, indent=1))
    return 0


def gap(value: float, best: float) -> float:
    return value / best - 1.0 if best > 0 else (0.0 if value <= 0 else float("inf"))


def report(rows, paper_res, algorithms) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(title="Paper setting (examples/paper-deepseek.yaml): remote fraction")
    for name in algorithms:
        t.add_column(name)
    t.add_row(*(f"{paper_res[n]['remote']:.1%}" for n in algorithms))
    console.print(t)

    fams = list(dict.fromkeys(r["family"] for r in rows))
    for title, cell in (
            ("Remote fraction, mean over cluster shapes", lambda rs, n: f"{np.mean([r[n] for r in rs]):.1%}"),
            ("Gap to optimal, max over cluster shapes (relative: remote / optimal remote - 1)",
             lambda rs, n: f"{max(gap(r[n], r['optimal']) for r in rs):+.1%}")):
        t = Table(title=title)
        t.add_column("family")
        t.add_column("shapes")
        for name in algorithms:
            t.add_column(name)
        for fam in fams:
            rs = [r for r in rows if r["family"] == fam]
            t.add_row(fam, str(len(rs)), *(cell(rs, n) for n in algorithms))
        console.print(t)

    worst = max(rows, key=lambda r: gap(r[DEFAULT_ALGORITHM], r["optimal"]))
    g = gap(worst[DEFAULT_ALGORITHM], worst["optimal"])
    console.print(f"default ({DEFAULT_ALGORITHM}): max gap to optimal {g:.2e} (relative) over {len(rows)} shapes, "
                  f"worst at {worst['family']} S={worst['servers']} memory {worst['memory']:.0%}")
    for name in ("prism", "eplb", "redundance"):
        if name in algorithms:
            w = max(rows, key=lambda r: gap(r[name], r["optimal"]))
            console.print(f"{name}: max gap {gap(w[name], w['optimal']):+.1%} at {w['family']} S={w['servers']} "
                          f"memory {w['memory']:.0%}")
    slow = {n: max(r["seconds"][n] for r in rows) for n in algorithms}
    console.print("max solve seconds: " + ", ".join(f"{n} {s:.3f}" for n, s in slow.items()))


if __name__ == "__main__":
    sys.exit(main())
