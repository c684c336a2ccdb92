"""Run a cluster's `prism serve` processes and its coordinator on a Ray cluster (`prism cluster up --ray`).

Ray only places and supervises; serving is unchanged. Each server of the cluster file gets one detached
Ray actor (`ProcessActor`) pinned to its node, which runs the same `prism serve` command line that the
local launcher runs, with the same flags (keys, admin key, API key: `commands/serve.py` builds them for
both paths). When that process dies, the actor exits on purpose, so Ray restarts it (`max_restarts`) and
the new actor starts `prism serve` again on the same ports; the coordinator, another such actor, sees the
server come back and gives it a placement (its rejoin path). A dead actor takes its process with it
(the kernel's parent-death signal). Health and log tails are actor methods; `prism cluster down --ray`
stops the processes (SIGTERM, then SIGKILL) and kills the actors without restart.

Pinning: a node that advertises the custom resource `prism-server-<name>` runs that server; otherwise the
node whose IP is the server's `host` (Ray's built-in `node:<ip>` resource). The custom resource comes
first because it is what the operator said explicitly and it also works where several nodes share an IP
(several nodes on one machine, containers behind one address) or a host is a name rather than an IP.

Ray is an optional dependency (`pip install 'prism-moe[ray]'`), imported only here and only when used.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prism_moe.config import ClusterSpec, is_loopback_host
from prism_moe.fileio import atomic_write_text
from prism_moe.runtime.launcher import LaunchError, write_cluster_file

RAY_STATE_FILE = "ray.json"
SERVER_RESOURCE = "prism-server-{name}"
PIN_AMOUNT = 0.001  # a resource's presence pins; the amount is small so a server and the coordinator share a node
# What a local `prism serve` would take from the environment of `cluster up`: Ray workers get the raylet's
# environment instead, so these are handed on explicitly (a server started without its $PRISM_API_KEY would be open).
SERVER_ENV = ("PRISM_API_KEY", "PRISM_ADMIN_KEY", "PRISM_DATA_DIR")
COORDINATOR_ENV = ("PRISM_ADMIN_KEY",)  # the users' API key never reaches control
MAX_RESTARTS = 5  # per actor: a server that crashes more often than this stays down (its log says why)


def import_ray() -> Any:
    """Ray, or a LaunchError that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise LaunchError("--ray needs Ray, which is not installed: `pip install 'prism-moe[ray]'` (or `pip "
                          "install ray`) on this machine and every node of the Ray cluster; without Ray use "
                          "`prism cluster up` (local processes) or `prism serve` on each machine") from None
    return ray


def namespace_for(cluster_path: str) -> str:
    """The Ray namespace of a cluster file's actors (one deployment per cluster file name)."""
    return f"prism-{Path(cluster_path).stem}"


def connect(address: str, namespace: str) -> Any:
    """Connect this process to a running Ray cluster (never start one: its actors would die with us)."""
    ray = import_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise LaunchError(f"cannot connect to the Ray cluster at {address!r} ({e}); start one with `ray start "
                              f"--head` and give its address (`--ray HOST:6379`), or set RAY_ADDRESS") from None
    return ray


# --- the actor ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the actor process dies, however it dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: `cluster down --ray` still stops the process through the actor


class ProcessActor:
    """One long-running prism command on one Ray node; made a Ray actor by `_actor_class`.

    `files` (name -> text) are written to the actor's folder on its node, "{dir}" in `argv` becomes that
    folder and an argument "{python}" the Python that runs this actor. The command's output goes to `<dir>/<name>.log` (appended across restarts)."""

    def __init__(self, name: str, argv: list[str], files: dict[str, str], folder: str, env: dict[str, str],
                 health_url: str) -> None:
        self.name, self.health_url = name, health_url
        self.dir = Path(folder if os.path.isabs(folder) else Path(tempfile.gettempdir()) / folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            atomic_write_text(self.dir / fname, text)
        self.log_path = self.dir / f"{name}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        if child_env.get("CUDA_VISIBLE_DEVICES") == "" and "CUDA_VISIBLE_DEVICES" not in env:
            del child_env["CUDA_VISIBLE_DEVICES"]  # Ray hides GPUs from an actor with num_gpus=0: the server may use them
        if "OMP_NUM_THREADS" not in env:
            child_env.pop("OMP_NUM_THREADS", None)  # Ray's default of 1 for actors; `--threads` sets the server's
        self.stopping = False
        with open(self.log_path, "a") as logf:
            logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name} (actor pid {os.getpid()})\n")
            logf.flush()
            argv = [sys.executable if a == "{python}" else a.replace("{dir}", str(self.dir)) for a in argv]
            self.proc = subprocess.Popen(argv, stdout=logf,
                                         stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        threading.Thread(target=self._watch, daemon=True, name=f"watch-{name}").start()

    def _watch(self) -> None:
        code = self.proc.wait()
        if not self.stopping:  # a crash: exit this actor so that Ray restarts it (and with it the command)
            with open(self.log_path, "a") as logf:
                logf.write(f"--- {self.name} exited with code {code}; the actor exits for Ray to restart it\n")
            os._exit(1)

    def health(self) -> dict[str, Any]:
        """The process and its /health answer (None when it does not answer yet)."""
        import httpx
        import ray

        out: dict[str, Any] = {"name": self.name, "pid": self.proc.pid, "running": self.proc.poll() is None,
                               "node_ip": ray.util.get_node_ip_address(),
                               "node_id": ray.get_runtime_context().get_node_id(), "url": self.health_url,
                               "restarted": ray.get_runtime_context().was_current_actor_reconstructed,
                               "log": str(self.log_path), "status": None, "healthy": False}
        try:
            r = httpx.get(f"{self.health_url}/health", timeout=2.0)
            out["status"], out["healthy"] = r.status_code, r.status_code == 200
            out["body"] = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
        except (httpx.HTTPError, ValueError) as e:
            out["error"] = str(e)
        return out

    def log_tail(self, lines: int = 50) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the command's process group, SIGKILL after `timeout`; returns its exit code."""
        self.stopping = True
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                return self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.poll()


def _actor_class(ray: Any) -> Any:
    return ray.remote(ProcessActor)


# --- placement on nodes --------------------------------------------------------------------------------------
def node_resources(ray: Any) -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _host_ip(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def pin_resources(cluster: ClusterSpec, nodes: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Server name -> the Ray resources that pin its actor: `prism-server-<name>` when a node has it, else
    `node:<ip of host>`. Refuses a server no node can run, saying how to fix it."""
    have = set().union(*nodes) if nodes else set()
    node_ips = sorted(k.removeprefix("node:") for k in have if k.startswith("node:") and k != "node:__internal_head__")
    out = {}
    for s in cluster.servers:
        custom = SERVER_RESOURCE.format(name=s.name)
        ip = node_ips[0] if is_loopback_host(s.host) and len(node_ips) == 1 else _host_ip(s.host)
        if custom in have:
            out[s.name] = {custom: PIN_AMOUNT}
        elif ip and not is_loopback_host(ip) and f"node:{ip}" in have:
            out[s.name] = {f"node:{ip}": PIN_AMOUNT}
        else:
            why = (f"its host {s.host} is loopback and the nodes have several IPs" if is_loopback_host(s.host)
                   else f"no node has the IP of its host {s.host!r}")
            raise LaunchError(
                f"server {s.name}: no Ray node to run it on: no node has the custom resource {custom!r} and {why} "
                f"(node IPs: {', '.join(node_ips) or 'none'}). Set `host:` to the IP of its machine in the cluster "
                f"file, or start that machine's node with `ray start --address HEAD:6379 --resources "
                f"'{{\"{custom}\": 1}}'`")
    return out


def _free_ports(host: str) -> tuple[int, int]:
    """Two ports free on this node for `host` (run as a Ray task on the server's node)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in socks:
            s.bind((host, 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def resolve_ports(ray: Any, cluster: ClusterSpec, pins: dict[str, dict[str, float]], timeout: float = 60.0) -> ClusterSpec:
    """The cluster with every server's unset ports filled in by a free port of its own node."""
    probe = ray.remote(num_cpus=0)(_free_ports)
    refs = {s.name: probe.options(resources=pins[s.name]).remote(s.host) for s in cluster.servers
            if not (s.http_port and s.expert_port)}
    try:
        found = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout), strict=True))
    except ray.exceptions.GetTimeoutError:
        raise LaunchError(f"the Ray nodes did not answer a port probe in {timeout:.0f} s (are they alive, with "
                          f"the resources {pins}?)") from None
    servers = [s.model_copy(update={"http_port": s.http_port or found[s.name][0],
                                    "expert_port": s.expert_port or found[s.name][1]}) if s.name in found else s
               for s in cluster.servers]
    return cluster.model_copy(update={"servers": servers})


# --- deployment ----------------------------------------------------------------------------------------------
@dataclass
class RayDeployment:
    """Handles of a deployment's actors (by name, `coordinator` included)."""

    ray: Any
    namespace: str
    actors: dict[str, Any]
    urls: dict[str, str]

    def health(self, timeout: float = 10.0) -> dict[str, Any]:
        """Name -> the actor's health dict, or {"error": ...} when the actor does not answer in time."""
        refs = {n: a.health.remote() for n, a in self.actors.items()}
        out = {}
        for n, ref in refs.items():
            try:
                out[n] = self.ray.get(ref, timeout=timeout)
            except Exception as e:  # an actor restarting, dead, or slow: say so, never hang
                out[n] = {"name": n, "healthy": False, "error": f"{type(e).__name__}: {e}"}
        return out

    def log_tail(self, name: str, lines: int = 50, timeout: float = 10.0) -> str:
        try:
            return self.ray.get(self.actors[name].log_tail.remote(lines), timeout=timeout)
        except Exception as e:
            return f"(log of {name} unavailable: {type(e).__name__}: {e})"

    def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop the commands (coordinator first, so it does not mark the servers down), then kill the actors
        without restart. Returns the names stopped."""
        groups = [[n for n in self.actors if n == "coordinator"], [n for n in self.actors if n != "coordinator"]]
        stopped = []
        for group in groups:  # the servers of a group stop in parallel
            refs = {n: self.actors[n].stop.remote(timeout) for n in group}
            for n, ref in refs.items():
                try:
                    self.ray.get(ref, timeout=timeout + 10)
                    stopped.append(n)
                except Exception:  # dead or restarting: killing the actor ends its process (parent-death signal)
                    pass
                self.ray.kill(self.actors[n], no_restart=True)
        return stopped


def _actor_name(name: str) -> str:
    return f"prism-{name}"


def existing_actors(ray: Any, namespace: str, names: list[str]) -> dict[str, Any]:
    out = {}
    for n in names:
        try:
            out[n] = ray.get_actor(_actor_name(n), namespace=namespace)
        except ValueError:
            pass
    return out


def deploy(ray: Any, cluster: ClusterSpec, namespace: str, run_dir: Path, placement_json: str,
           server_args: list[str], coordinator_args: list[str] | None = None, coordinator_port: int = 0,
           num_gpus: float = 0, health_timeout: float = 300.0, log=print) -> RayDeployment:
    """Start one `prism serve` actor per server and, with `coordinator_args` (not None), a `prism coordinator`
    actor on the first server's node; wait until every server is healthy. `server_args` and
    `coordinator_args` are the flags the local launcher would pass (keys, admin key, ...), with absolute
    paths that must exist on every node. Writes the resolved cluster file and `ray.json` to `run_dir`."""
    names = [*cluster.server_names, *(["coordinator"] if coordinator_args is not None else [])]
    running = existing_actors(ray, namespace, names)
    if running:
        raise LaunchError(f"{sorted(running)} already run in Ray namespace {namespace!r}; stop them first with "
                          f"`prism cluster down --ray`")
    pins = pin_resources(cluster, node_resources(ray))
    cluster = resolve_ports(ray, cluster, pins)
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster_file = run_dir / "cluster.yaml"
    write_cluster_file(cluster, cluster_file)
    files = {"cluster.yaml": cluster_file.read_text(), "placement.json": placement_json}
    folder = f"prism-ray/{namespace}"
    env_of = lambda names: {k: os.environ[k] for k in names if os.environ.get(k)}  # noqa: E731
    actor_cls = _actor_class(ray)
    dep = RayDeployment(ray, namespace, {}, {})
    py = ["{python}", "-m", "prism_moe.cli"]  # the node's own Python (its path may differ from this one's)
    try:
        for s in cluster.servers:
            url = f"http://{s.host}:{s.http_port}"
            argv = [*py, "serve", "--cluster", "{dir}/cluster.yaml", "--server", s.name,
                    "--placement", "{dir}/placement.json", *server_args]
            dep.actors[s.name] = actor_cls.options(
                name=_actor_name(s.name), namespace=namespace, lifetime="detached", max_restarts=MAX_RESTARTS,
                num_cpus=0, num_gpus=num_gpus, resources=pins[s.name]).remote(
                    s.name, argv, files, folder, env_of(SERVER_ENV), url)
            dep.urls[s.name] = url
        if coordinator_args is not None:  # at once: it waits for servers it has not seen yet, never marks them down
            first = cluster.servers[0]
            port = coordinator_port or ray.get(ray.remote(num_cpus=0)(_free_ports).options(
                resources=pins[first.name]).remote(first.host), timeout=60)[0]
            url = f"http://{first.host}:{port}"
            argv = [*py, "coordinator", "--cluster", "{dir}/cluster.yaml", "--host", first.host, "--port", str(port),
                    "--placement", "{dir}/placement.json", *coordinator_args]
            dep.actors["coordinator"] = actor_cls.options(
                name=_actor_name("coordinator"), namespace=namespace, lifetime="detached",
                max_restarts=MAX_RESTARTS, num_cpus=0, resources=pins[first.name]).remote(
                    "coordinator", argv, files, folder, env_of(COORDINATOR_ENV), url)
            dep.urls["coordinator"] = url
        _wait_healthy(dep, list(dep.actors), health_timeout, log)
    except BaseException:
        dep.stop()
        raise
    state = {"address": ray.get_runtime_context().gcs_address, "namespace": namespace, "urls": dep.urls}
    atomic_write_text(run_dir / RAY_STATE_FILE, json.dumps(state, indent=2))
    return dep


def _wait_healthy(dep: RayDeployment, names: list[str], timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending:
        health = RayDeployment(dep.ray, dep.namespace, {n: dep.actors[n] for n in pending}, {}).health()
        for n, h in health.items():
            if h.get("healthy"):
                log(f"{n} healthy at {dep.urls[n]} (Ray node {h.get('node_ip')}, pid {h.get('pid')})")
                pending.remove(n)
            elif h.get("restarted") or "ActorDiedError" in h.get("error", ""):
                # a crash before it ever answered: restarting the same command would only crash again
                raise LaunchError(f"{n} exited during start-up; its log ends with:\n{dep.log_tail(n, 25)}")
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{dep.log_tail(n, 15)}" for n in pending)
            raise LaunchError(f"{pending} not healthy after {timeout:.0f} s; their logs end with:\n{tails}")
        if pending:
            time.sleep(0.5)


def attach(ray: Any, namespace: str, cluster: ClusterSpec, run_dir: Path) -> RayDeployment:
    """The deployment of `cluster` that runs in `namespace` (what `down` and `status` use)."""
    actors = existing_actors(ray, namespace, [*cluster.server_names, "coordinator"])
    urls = {}
    state_path = run_dir / RAY_STATE_FILE
    if state_path.is_file():
        try:
            urls = yaml.safe_load(state_path.read_text()).get("urls", {})
        except (OSError, yaml.YAMLError, AttributeError):
            urls = {}
    return RayDeployment(ray, namespace, actors, urls)
