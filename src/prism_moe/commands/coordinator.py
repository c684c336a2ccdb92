"""`prism coordinator`: the global scheduler of a running cluster (statistics, re-placement, migration,
failures). See docs/operations.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("coordinator", help="run the global scheduler of a running cluster",
                       description="Poll every server's activation counts, re-place experts when the gain beats "
                                   "the cost of moving them, migrate them live, and handle servers that fail or "
                                   "come back. Serves its state over HTTP (GET /state, POST /replan).")
    p.add_argument("--cluster", required=True, help="cluster YAML file (with every server's http_port), e.g. "
                                                    "the run folder's cluster.yaml written by `prism cluster up`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700, help="HTTP port of the coordinator API")
    p.add_argument("--period", type=float, default=180.0, help="seconds between periodic re-placements")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls of the servers")
    p.add_argument("--down-after", type=float, default=3.0, help="seconds without an answer before a server is down")
    p.add_argument("--half-life", type=float, default=300.0, help="half-life of the decayed counts, seconds")
    p.add_argument("--window", type=float, default=30.0, help="recent window for shift detection, seconds")
    p.add_argument("--shift-threshold", type=float, default=0.3, help="mean TV distance that is a shift")
    p.add_argument("--settle", type=float, default=5.0,
                   help="after a detected shift, seconds without another shift before the one re-plan (folds "
                        "servers whose workloads change together into one migration; 0: re-plan at once)")
    p.add_argument("--margin", type=float, default=0.1, help="migrate only if C(P')+T_mig < C(P)(1-margin)")
    p.add_argument("--algorithm", default=None, help="placement algorithm (default: the recommended one), or a plan "
                                                     "algorithm (hybrid, pipeline, pipeline-opt): re-plans then switch "
                                                     "execution plans when C(new)+T_mig < C(current)(1-margin)")
    p.add_argument("--transfer", choices=["auto", "checkpoint", "peer"], default="auto",
                   help="how a new holder gets an expert: its checkpoint when it has one (auto), or a peer")
    p.add_argument("--placement", default=None, help="the placement or plan the servers run (default: ask them)")
    p.add_argument("--admin-key-file", default=None, metavar="PATH",
                   help="the servers' control credential (admin.key from `prism keys`; default: $PRISM_ADMIN_KEY, "
                        "else KEYS/admin.key with --keys); it also guards this coordinator's POST routes")
    p.add_argument("--keys", default=None, help="the cluster key folder from `prism keys` (for its admin.key)")
    p.add_argument("--insecure", action="store_true",
                   help="start without an admin key although the cluster file has non-loopback hosts")
    p.add_argument("--lease", type=float, default=6.0,
                   help="seconds of the control lease it holds on every server (renewed every poll); a second "
                        "coordinator waits until it lapses")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from prism_moe.config import ConfigError, load_cluster
    from prism_moe.placement.plan import load_plan
    from prism_moe.runtime.auth import resolve_admin_key
    from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cluster = load_cluster(args.cluster)
    missing = [s.name for s in cluster.servers if not s.http_port]
    if missing:
        raise ValueError(f"servers {missing} have no http_port in {args.cluster}; use the cluster.yaml that "
                         f"`prism cluster up` wrote in its run folder")
    admin_key = resolve_admin_key(args.admin_key_file, args.keys)
    hosts = cluster.non_loopback_hosts()
    if hosts and admin_key is None and not args.insecure:
        raise ConfigError(f"prism coordinator: the cluster has hosts other machines reach ({', '.join(hosts)}) and "
                          f"no admin key: the servers refuse control from other hosts without one. Make it with "
                          f"`prism keys --cluster CLUSTER.yaml --out keys/` and pass --keys keys/ (or "
                          f"--admin-key-file keys/admin.key) here and to every server; --insecure starts anyway")
    config = CoordinatorConfig(period=args.period, poll_interval=args.poll, down_after=args.down_after,
                               half_life=args.half_life, window=args.window, shift_threshold=args.shift_threshold,
                               settle=args.settle, margin=args.margin, algorithm=args.algorithm,
                               transfer=args.transfer, admin_key=admin_key, lease_seconds=args.lease)
    coord = Coordinator(cluster, config, plan=load_plan(args.placement) if args.placement else None)
    coord.start()
    try:
        uvicorn.run(coord.app(), host=args.host, port=args.port, log_level="warning")
    finally:
        coord.stop()
    return 0


if __name__ == "__main__":  # `python -m prism_moe.commands.coordinator ...` until cli.py lists it
    import sys

    parser = argparse.ArgumentParser(prog="prism")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["coordinator", *sys.argv[1:]])
    sys.exit(ns.func(ns))
