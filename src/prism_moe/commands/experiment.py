"""`prism experiment NAME --out DIR`: paper-scale simulator experiments (table, PNG, CSV, JSON)."""

from __future__ import annotations

import argparse

NAMES = ["paper-table", "migration", "scale", "heterogeneity", "crossover", "failures"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a simulator experiment (paper-table, migration, scale, heterogeneity, crossover, "
                                             "failures)",
                       description="Run a paper-scale experiment in the cluster simulator; prints a table and "
                                   "writes NAME.png, NAME.csv and NAME.json into --out.")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--out", required=True, help="folder for the plot and the numbers")
    p.add_argument("--requests", type=int, default=None, help="requests per run (default: the experiment's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--algorithms", default=None, help="comma-separated algorithms (default: the experiment's)")
    p.add_argument("--data-dir", default=None, help="routing data folder (default: $PRISM_DATA_DIR or shared/data)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import csv
    import json
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from prism_moe.sim.experiments import EXPERIMENTS
    from prism_moe.sim.plots import plot

    kw = {"data_dir": args.data_dir, "seed": args.seed, "jobs": args.jobs}
    if args.requests:
        kw["requests"] = args.requests
    if args.algorithms:
        kw["algorithms"] = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    exp = EXPERIMENTS[args.name](**kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    table = Table(title=f"{exp.name} ({exp.wall_s:.0f} s)")
    for _, header, _ in exp.columns:
        table.add_column(header, justify="left" if header in ("model", "algorithm", "variant") else "right")
    for r in exp.rows:
        table.add_row(*[_fmt(r.get(k), f) for k, _, f in exp.columns])
    con = Console() if sys.stdout.isatty() else Console(width=200)
    con.print(table)
    for line in exp.lines:
        con.print(line)

    plot(exp, out / f"{exp.name}.png")
    flat = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in exp.rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with open(out / f"{exp.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    rows = [{k: v for k, v in r.items() if k != "series"} for r in exp.rows]
    (out / f"{exp.name}.json").write_text(json.dumps(
        {"experiment": exp.name, "wall_s": exp.wall_s, "meta": exp.meta, "findings": exp.lines, "rows": rows},
        indent=1))
    con.print(f"wrote {out / exp.name}.png, .csv, .json")
    return 0


def _fmt(v, f: str) -> str:
    if v is None or v == "":
        return "-"
    if f == "ms":
        return f"{v * 1e3:.1f}"
    if f == "GB":
        return f"{v / 1e9:.2f}"
    return f.format(v)
