"""`prism serve`, `prism cluster up|down|status` (local processes or Ray actors), `prism keys`: run edge servers."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--placement", help="a placement or plan JSON (from `prism place --out`); default: compute one")
    p.add_argument("--algorithm", default=None, help="placement or plan algorithm when no --placement is given "
                                                     "(default: the recommended placement; pipeline, pipeline-opt and "
                                                     "hybrid make plans that run layer blocks on peers)")
    p.add_argument("--data-dir", default=None, help="routing data folder (default: $PRISM_DATA_DIR or ../shared/data)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="'auto' (cuda when present), 'cpu', 'cuda:0' (default: the "
                                                  "cluster file's `device`)")
    p.add_argument("--keys", default=None, help="cluster key folder from `prism keys`: peers authenticate and "
                                                "encrypt with CurveZMQ (default: plaintext, for local use)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on the OpenAI API "
                                                   "(default: $PRISM_API_KEY, else open)")
    p.add_argument("--admin-key-file", default=None, metavar="PATH",
                   help="the control routes' credential (admin.key from `prism keys`; default: $PRISM_ADMIN_KEY, "
                        "else KEYS/admin.key with --keys); without one, control is open to this machine only")
    p.add_argument("--insecure", action="store_true",
                   help="allow a cluster file with non-loopback hosts without --keys (plaintext, unauthenticated "
                        "peers: only on a network you trust)")
    p.add_argument("--replay", action="store_true",
                   help="benchmark mode: routers take their top-k from the server's workload trace "
                        "(for tiny random models; shown in /metrics and /health)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per remote expert call attempt")
    p.add_argument("--record-trace", default=None, metavar="PATH",
                   help="record the top-k expert ids and router weights of every token this server routes, at every "
                        "MoE layer, and write them as a prism-moe trace (.safetensors) to PATH on shutdown and on "
                        "POST /prism/trace/save; '{server}' in PATH becomes the server name (needed by `cluster up` "
                        "with several servers). Continuous batching does not tag a forward's rows by request, so "
                        "each forward (a prefill or decode step) is one sequence of the trace. Use it as a workload "
                        "(`workload: PATH` in the cluster file) for `prism place`")
    p.add_argument("--record-max-tokens", type=int, default=1_000_000, metavar="N",
                   help="stop recording after N tokens (memory bound: about N * layers * k * 6 bytes; default 1e6)")
    p.add_argument("--max-running", type=int, default=None, metavar="N",
                   help="most requests decoded together in one step (continuous batching; later ones wait for a "
                        "place); the KV cache holds N x the longest request so far (default 64)")
    p.add_argument("--api-in-process", action="store_true",
                   help="serve HTTP from the model's own process (one process; by default an API process of its "
                        "own answers HTTP so that it never holds the model loop's GIL: 1.1-1.2x the tokens/s at 16 "
                        "and 64 streams, docs/results.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; `cluster up` gives each local server its share "
                        "of the cores so servers on one machine do not oversubscribe it)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one edge server of a cluster",
                       description="Run one edge server: the dense model plus its placed experts, an expert "
                                   "service for peers and the OpenAI-compatible HTTP API.")
    p.add_argument("--cluster", required=True, help="cluster YAML file")
    p.add_argument("--server", required=True, help="the name of this server in the cluster file")
    _add_placement_args(p)
    _add_server_args(p)
    p.set_defaults(func=run_serve)

    c = sub.add_parser("cluster", help="start or stop every server of a cluster file on this machine (or on Ray)")
    csub = c.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    up = csub.add_parser("up", help="start all servers as local processes and wait until healthy")
    up.add_argument("--cluster", required=True, help="cluster YAML file")
    up.add_argument("--run-dir", default=None, help="folder for logs and state (default: .prism/<cluster name>)")
    up.add_argument("--health-timeout", type=float, default=300.0, help="seconds to wait for all servers")
    up.add_argument("--coordinator", nargs="?", type=int, const=0, default=None, metavar="PORT",
                    help="also start `prism coordinator` (on PORT, default a free one); `cluster down` stops it")
    up.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                    help="run each server (and the coordinator) as a Ray actor on its own node of the Ray cluster "
                         "at ADDRESS (default: RAY_ADDRESS or the local `ray start` cluster) instead of local "
                         "processes; needs `pip install 'prism-moe[ray]'` (docs/operations.md)")
    up.add_argument("--ray-gpus", type=float, default=0, metavar="N",
                    help="with --ray: GPUs Ray reserves for each server actor (default 0: it sees its node's GPUs)")
    _add_placement_args(up)
    _add_server_args(up)
    up.set_defaults(func=run_cluster_up)
    down = csub.add_parser("down", help="stop the servers started by `prism cluster up`")
    down.add_argument("--cluster", required=True, help="the cluster YAML file given to `up`")
    down.add_argument("--run-dir", default=None)
    down.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                      help="stop the Ray actors started by `cluster up --ray` (their processes first)")
    down.set_defaults(func=run_cluster_down)
    st = csub.add_parser("status", help="health (and log tails) of the servers started by `cluster up --ray`")
    st.add_argument("--cluster", required=True, help="the cluster YAML file given to `up`")
    st.add_argument("--run-dir", default=None)
    st.add_argument("--ray", nargs="?", const="auto", default="auto", metavar="ADDRESS",
                    help="the Ray cluster's address (default: RAY_ADDRESS or the local one)")
    st.add_argument("--logs", type=int, default=0, metavar="N", help="also print the last N lines of each log")
    st.set_defaults(func=run_cluster_status)

    k = sub.add_parser("keys", help="make a CurveZMQ key set and the admin key for a cluster",
                       description="Write one keypair per server (private/<name>.key_secret), the public keys "
                                   "(public/<name>.key) and the control plane's admin credential (admin.key). Copy "
                                   "the folder to each server, keeping only its own secret key, and start servers "
                                   "and the coordinator with --keys. Users get the --api-key, never admin.key.")
    k.add_argument("--cluster", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--overwrite", action="store_true", help="replace existing keys")
    k.set_defaults(func=run_keys)


def default_run_dir(cluster_path: str) -> Path:
    return Path(".prism") / Path(cluster_path).stem


def _plan(args: argparse.Namespace, cluster: Any) -> Any:
    from prism_moe.placement.plan import load_plan
    from prism_moe.planning import execution_plan

    if args.placement:
        return load_plan(args.placement)
    return execution_plan(cluster, args.algorithm, args.data_dir)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from prism_moe.config import load_cluster
    from prism_moe.runtime.server import ServeOptions, run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.max_running is not None and args.max_running < 1:
        raise ValueError("--max-running must be at least 1")
    cluster = load_cluster(args.cluster)
    cluster.server(args.server)  # a clear error for an unknown name, before loading anything
    cluster.require_secure(args.keys is not None, args.insecure)
    admin_key = _admin_key(args, cluster, f"server {args.server}")
    plan = _plan(args, cluster)
    options = ServeOptions(
        placement=plan.placement, plan=plan, device=args.device or cluster.device,
        api_key=args.api_key or os.environ.get("PRISM_API_KEY") or None, admin_key=admin_key,
        keys_dir=Path(args.keys) if args.keys else None,
        replay=cluster.server(args.server).workload if args.replay else None,
        data_dir=args.data_dir, call_timeout=args.timeout, record_trace=args.record_trace,
        record_max_tokens=args.record_max_tokens, api_process=not args.api_in_process,
        **({"max_running": args.max_running} if args.max_running is not None else {}))
    if args.record_max_tokens < 1:
        raise ValueError("--record-max-tokens must be at least 1")
    if args.replay and not options.replay:
        raise ValueError(f"--replay needs a `workload:` for server {args.server} in the cluster file")
    run_server(cluster, args.server, options)
    return 0


def _admin_key(args: argparse.Namespace, cluster: Any, who: str) -> str | None:
    import logging

    from prism_moe.runtime.auth import resolve_admin_key

    key = resolve_admin_key(args.admin_key_file, args.keys)
    if key is None and cluster.non_loopback_hosts():
        logging.getLogger(__name__).warning(
            "%s: no admin key: its control routes answer this machine only, so a coordinator elsewhere cannot "
            "drive it (`prism keys` writes admin.key; pass --admin-key-file)", who)
    return key


def forwarded_server_args(args: argparse.Namespace) -> list[str]:
    """The serve flags that `cluster up` passes on to every server."""
    out = []
    for flag, value in (("--device", args.device), ("--api-key", args.api_key), ("--timeout", args.timeout),
                        ("--threads", args.threads), ("--max-running", args.max_running)):
        if value is not None:
            out += [flag, str(value)]
    for flag, folder in (("--keys", args.keys), ("--data-dir", args.data_dir)):
        if folder is not None:  # absolute, like the coordinator's: Ray actors do not run in this folder
            out += [flag, os.path.abspath(os.path.expanduser(folder))]
    if args.admin_key_file:  # absolute: the servers may run in another folder
        out += ["--admin-key-file", os.path.abspath(os.path.expanduser(args.admin_key_file))]
    if args.api_in_process:
        out.append("--api-in-process")
    if args.insecure:
        out.append("--insecure")
    if args.replay:
        out.append("--replay")
    if getattr(args, "record_trace", None):
        # absolute: the servers may run in another folder; '{server}' is filled in by each server
        out += ["--record-trace", os.path.abspath(os.path.expanduser(args.record_trace)),
                "--record-max-tokens", str(args.record_max_tokens)]
    return out


def run_cluster_up(args: argparse.Namespace) -> int:
    from prism_moe.config import load_cluster
    from prism_moe.runtime.launcher import start_local_cluster

    cluster = load_cluster(args.cluster)
    cluster.require_secure(args.keys is not None, args.insecure, "prism cluster up")
    if args.record_trace and len(cluster.servers) > 1 and "{server}" not in args.record_trace:
        raise ValueError("--record-trace: with several servers put '{server}' in the path (e.g. "
                         "traces/{server}.safetensors), else they would all write the same file")
    if args.threads is None and args.ray is None:  # on Ray each server has its own node's cores
        args.threads = max(1, (os.cpu_count() or 1) // len(cluster.servers))
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.cluster)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(args, cluster)
    placement_path = run_dir / "placement.json"
    (plan.placement if plan.at_home else plan).save(placement_path)  # a plan file when layers run on peers
    print(f"{'placement' if plan.at_home else 'plan'}: {plan.algorithm or 'given'}, saved to {placement_path}")
    if args.ray is not None:
        return _cluster_up_ray(args, cluster, run_dir, placement_path)
    lc = start_local_cluster(cluster, run_dir, ["--placement", str(placement_path.resolve()),
                                                *forwarded_server_args(args)],
                             health_timeout=args.health_timeout)
    out: dict[str, Any] = {"run_dir": str(run_dir), "endpoints": lc.endpoints()}
    if args.coordinator is not None:
        from prism_moe.runtime.launcher import start_coordinator

        out["coordinator"] = start_coordinator(lc, args.coordinator or None,
                                               ["--placement", str(placement_path.resolve()),
                                                *coordinator_key_args(args)])
        out["coordinator_log"] = str(run_dir / "coordinator.log")
    print(json.dumps(out, indent=2))
    print(f"stop with: prism cluster down --cluster {args.cluster}"
          + (f" --run-dir {args.run_dir}" if args.run_dir else ""))
    return 0


def coordinator_key_args(args: argparse.Namespace) -> list[str]:
    """The credential flags `cluster up` passes to the coordinator (the users' --api-key never reaches control)."""
    key = ["--insecure"] if args.insecure else []
    for flag, value in (("--admin-key-file", args.admin_key_file), ("--keys", args.keys)):
        if value:
            key += [flag, os.path.abspath(os.path.expanduser(value))]
    return key


def _cluster_up_ray(args: argparse.Namespace, cluster: Any, run_dir: Path, placement_path: Path) -> int:
    from prism_moe.runtime import ray_deploy

    ray = ray_deploy.connect(args.ray, ray_deploy.namespace_for(args.cluster))
    dep = ray_deploy.deploy(
        ray, cluster, ray_deploy.namespace_for(args.cluster), run_dir, placement_path.read_text(),
        forwarded_server_args(args),
        coordinator_key_args(args) if args.coordinator is not None else None, args.coordinator or 0,
        num_gpus=args.ray_gpus, health_timeout=args.health_timeout)
    health = dep.health()
    out = {"run_dir": str(run_dir), "ray_namespace": dep.namespace,
           "endpoints": {n: u for n, u in dep.urls.items() if n != "coordinator"},
           "pids": {n: h.get("pid") for n, h in health.items()},
           "logs": {n: f"{h.get('node_ip')}:{h.get('log')}" for n, h in health.items()}}
    if "coordinator" in dep.urls:
        out["coordinator"] = dep.urls["coordinator"]
    print(json.dumps(out, indent=2))
    print(f"status: prism cluster status --cluster {args.cluster} --ray {args.ray} --logs 20\n"
          f"stop with: prism cluster down --cluster {args.cluster} --ray {args.ray}"
          + (f" --run-dir {args.run_dir}" if args.run_dir else ""))
    return 0


def _attach_ray(args: argparse.Namespace) -> tuple[Any, Path]:
    from prism_moe.config import load_cluster
    from prism_moe.runtime import ray_deploy

    namespace = ray_deploy.namespace_for(args.cluster)
    ray = ray_deploy.connect(args.ray, namespace)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.cluster)
    return ray_deploy.attach(ray, namespace, load_cluster(args.cluster), run_dir), run_dir


def run_cluster_status(args: argparse.Namespace) -> int:
    dep, _ = _attach_ray(args)
    if not dep.actors:
        print(f"nothing of {args.cluster} runs on this Ray cluster (namespace {dep.namespace})")
        return 1
    health = dep.health()
    print(json.dumps(health, indent=2, default=str))
    if args.logs > 0:
        for n in dep.actors:
            print(f"--- {n}: last {args.logs} lines\n{dep.log_tail(n, args.logs)}")
    return 0 if all(h.get("healthy") for h in health.values()) else 1


def run_cluster_down(args: argparse.Namespace) -> int:
    from prism_moe.runtime.launcher import stop_cluster

    if args.ray is not None:
        from prism_moe.runtime.ray_deploy import RAY_STATE_FILE

        dep, run_dir = _attach_ray(args)
        stopped = dep.stop()
        (run_dir / RAY_STATE_FILE).unlink(missing_ok=True)
        print(f"stopped {', '.join(stopped) or 'nothing (already gone)'}")
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.cluster)
    if (run_dir / "ray.json").is_file() and not (run_dir / "state.json").is_file():
        raise ValueError(f"{args.cluster} was started on Ray (`cluster up --ray`): stop it with "
                         f"`prism cluster down --cluster {args.cluster} --ray [ADDRESS]`")
    stopped = stop_cluster(run_dir)
    print(f"stopped {', '.join(stopped) or 'nothing (already gone)'}")
    return 0


def run_keys(args: argparse.Namespace) -> int:
    from prism_moe.config import load_cluster
    from prism_moe.runtime.keys import ADMIN_KEY_FILE, make_admin_key, make_cluster_keys

    cluster = load_cluster(args.cluster)
    paths = make_cluster_keys(args.out, cluster.server_names, overwrite=args.overwrite)
    admin = make_admin_key(Path(args.out) / ADMIN_KEY_FILE, overwrite=args.overwrite)
    print(f"wrote keys for {', '.join(paths)} in {args.out} (public/ for everyone, private/ one per server) and "
          f"the admin key {admin} (servers and coordinator only)")
    return 0
