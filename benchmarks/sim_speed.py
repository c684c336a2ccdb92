"""Simulator speed: simulated expert calls per second, and the paper-table run time.

    python benchmarks/sim_speed.py                 # expert calls/s on the paper's DeepSeek-V2-Lite cluster
    python benchmarks/sim_speed.py --paper-table   # + the full paper-table experiment's wall time
    python benchmarks/sim_speed.py --synthetic     # no routing data needed (sampled OLMoE-shaped workload)

An expert call is one (token, expert) invocation. Also prints why the engine is a heap loop: the cost
of one GPU-queue use in simpy (request, timeout, release) against the heap loop's free-at update,
measured here (simpy optional). Prints numbers and ratios; never passes or fails on a time.
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time


def resource_use_ratio(n: int = 50_000) -> tuple[float, float] | None:
    """(simpy uses/s, heap-loop uses/s) for a FIFO resource held for a fixed time by 4 processes."""
    try:
        import simpy
    except ImportError:
        return None

    def proc(env, res, k):
        for _ in range(k):
            with res.request() as r:
                yield r
                yield env.timeout(0.001)

    env = simpy.Environment()
    res = simpy.Resource(env, 1)
    for _ in range(4):
        env.process(proc(env, res, n // 4))
    t0 = time.perf_counter()
    env.run()
    simpy_rate = n / (time.perf_counter() - t0)

    heap, free, seq = [(0.0, i, i) for i in range(4)], 0.0, 4
    left = [n // 4] * 4
    t0 = time.perf_counter()
    while heap:
        t, _, p = heapq.heappop(heap)
        start = free if free > t else t
        free = start + 0.001
        left[p] -= 1
        if left[p]:
            seq += 1
            heapq.heappush(heap, (free, seq, p))
    return simpy_rate, n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--paper-table", action="store_true", help="also time `prism experiment paper-table`")
    ap.add_argument("--synthetic", action="store_true", help="use a sampled workload (no data folder needed)")
    args = ap.parse_args()

    from prism_moe.sim import scenarios as sc
    from prism_moe.sim.run import build_scenario, make_placement, simulate

    if args.synthetic:
        sys.path.insert(0, "tests/sim")
        from test_run import greedy, synthetic  # noqa: E402 - the tests' synthetic cluster

        scen = synthetic(rate=0.5)
        placements = {"greedy": greedy(scen)}
    else:
        scen = build_scenario(sc.paper_cluster("deepseek-v2-lite"))
        placements = {a: make_placement(scen, a) for a in ("latency",)}
        try:
            placements["prism"] = make_placement(scen, "prism")
        except ImportError:
            pass
    for name, pl in placements.items():
        res = simulate(scen, pl, n_requests=args.requests, seed=0)
        s = res.summary()
        print(f"{name:>8}: {s['expert_calls']:,} expert calls, {s['events']:,} events, {s['steps']:,} steps in "
              f"{s['sim_seconds']:.2f} s -> {s['expert_calls_per_s']:,.0f} expert calls/s, "
              f"{s['events'] / s['sim_seconds']:,.0f} events/s; simulated {s['makespan_s']:.0f} s "
              f"({s['makespan_s'] / s['sim_seconds']:.0f}x real time)")
    r = resource_use_ratio()
    if r:
        print(f"GPU-queue use: simpy {r[0]:,.0f}/s, heap loop {r[1]:,.0f}/s ({r[1] / r[0]:.1f}x)")
    else:
        print("simpy not installed: resource-use comparison skipped")
    if args.paper_table:
        from prism_moe.sim.experiments import paper_table

        t0 = time.perf_counter()
        exp = paper_table()
        print(f"paper-table: {len(exp.rows)} runs (2 models x {len(exp.rows) // 2} algorithms) in "
              f"{time.perf_counter() - t0:.1f} s")
        for line in exp.lines[:4]:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
