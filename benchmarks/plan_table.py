"""Per-token decode latency and TTFT of expert placements against layer pipelines and the hybrid plan,
on the paper's DeepSeek setting (issue 17's table), in the simulator.

For each link setting and algorithm, every server gets `b` requests at t = 0 (a 1,000-token prompt,
128 output tokens, its own ESFT domain's routing) and nothing else: b = 1 and b = 8 decoding requests
per server, as in the table. Prints one JSON line per (link, algorithm): mean TPOT for b = 1 and
b = 8, the TTFT range over servers (b = 1), hand-offs and remote calls, and the ratio to `prism`.

    python benchmarks/plan_table.py [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from prism_moe.sim import scenarios as sc
from prism_moe.sim.engine import Engine
from prism_moe.sim.run import build_scenario, make_placement
from prism_moe.sim.workload import Requests

LINKS = [(500, 0.1), (500, 1.0), (500, 10.0), (100, 1.0), (5000, 1.0)]  # (Mbps, one-way ms)
ALGORITHMS = ["prism", "latency", "pipeline", "pipeline-opt", "hybrid"]


def burst(scen, per_server: int, prompt: int = 1000, output: int = 128) -> Requests:
    s_n = len(scen.cluster.servers)
    server = np.repeat(np.arange(s_n), per_server)
    n = len(server)
    pool = np.array([scen.phases[s][0][1] for s in server])
    starts = np.array([scen.sources[p].pool.seq_starts[i % (len(scen.sources[p].pool.seq_starts) - 1)]
                       for i, p in enumerate(pool)])
    return Requests(server, np.zeros(n), np.full(n, prompt), np.full(n, output), pool, starts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    for mbps, ms in LINKS:
        cluster = sc.paper_cluster("deepseek-v2-lite", mbps, sc.RATE, ms)
        scen = build_scenario(cluster, data_dir=args.data_dir)
        rows = {}
        for algo in ALGORITHMS:
            plan = make_placement(scen, algo)
            row = {"bandwidth_mbps": mbps, "latency_ms": ms, "algorithm": algo}
            for b in (1, 8):
                reqs = burst(scen, b)
                first, finish, st, _ = Engine(scen.cost, plan, scen.pools, reqs).run()
                tpot = (finish - first) / (reqs.output - 1)
                row[f"tpot_b{b}_ms"] = float(tpot.mean() * 1e3)
                if b == 1:
                    row["ttft_min_s"], row["ttft_max_s"] = float(first.min()), float(first.max())
                    row["handoffs"], row["remote_calls"] = st.handoffs, st.remote_calls
                    row["cross_mb_per_request"] = st.cross_bytes / len(reqs) / 1e6
            rows[algo] = row
        for row in rows.values():
            row["tpot_b1_vs_prism"] = row["tpot_b1_ms"] / rows["prism"]["tpot_b1_ms"]
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
