"""`prism demo`: the main job, end to end on this machine (see prism_moe/demo.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from prism_moe.demo import DEFAULT_ALGORITHMS

    p = sub.add_parser("demo", help="run a local 3-server cluster under several placements and plans and compare them",
                       description="Start a local cluster of 3 heterogeneous servers serving a tiny MoE model, "
                                   "drive each with its own domain's requests under each placement or plan, and write "
                                   "a report (table, CSV, plots).")
    p.add_argument("--out", default="reports/demo", help="report folder")
    p.add_argument("--cache-dir", default=".prism/models", help="where the tiny checkpoint is cached")
    p.add_argument("--data-dir", default=None, help="routing data folder (default: $PRISM_DATA_DIR or ../shared/data)")
    p.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS))
    p.add_argument("--requests", type=int, default=6, help="requests per server")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens generated per request")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens kept per request")
    p.add_argument("--concurrency", type=int, default=3, help="requests in flight per server")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_moe.demo import run_demo

    for name in ("requests", "max_tokens", "prompt_tokens", "concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return run_demo(args)
