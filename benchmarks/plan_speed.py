"""Solve time of the plan algorithms (pipeline, pipeline-opt, hybrid) at paper and DeepSeek-V3 scale.

  paper scale   DeepSeek-V2-Lite, 3 servers: examples/paper-deepseek.yaml with its ESFT workloads
  V3 scale      DeepSeek-V3 (58 layers x 256 experts), 16 servers each with room for 20% of the experts
                beside the dense part, synthetic Zipf demand (benchmarks/placement_speed.py)

    python benchmarks/plan_speed.py [--repeats 3]

Prints one JSON line per (case, algorithm): median seconds, the plan's estimate and hand-offs.
Goals (issue 17): paper scale under 1 s, V3 scale under 10 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from placement_speed import synthetic_counts, v3_cluster  # noqa: E402

from prism_moe.config import load_cluster  # noqa: E402
from prism_moe.placement.problem import ClusterStats  # noqa: E402
from prism_moe.placement.registry import PLAN_ALGORITHMS  # noqa: E402
from prism_moe.planning import cluster_stats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    paper = load_cluster(REPO / "examples" / "paper-deepseek.yaml")
    pm = paper.model_spec()
    cases = [("paper", cluster_stats(paper, pm, args.data_dir)[0], paper, pm)]
    cluster, model = v3_cluster(16, 0.2)
    cases.append(("v3-16", ClusterStats(synthetic_counts(16, model.num_moe_layers, model.num_experts, "zipf")),
                  cluster, model))
    for label, stats, cluster, model in cases:
        for name, fn in PLAN_ALGORITHMS.items():
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = fn(stats, cluster, model)
                times.append(time.perf_counter() - t0)
            print(json.dumps({"case": label, "algorithm": name, "servers": len(cluster.servers),
                              "seconds": statistics.median(times), "chosen": plan.meta.get("chosen", name),
                              "estimate_s": plan.meta.get("estimate_s"),
                              "mean_handoffs": float(np.mean(plan.handoffs()))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
