"""Start and stop a cluster of `prism serve` processes on this machine.

`prism cluster up` uses this: it fills in free loopback ports where the cluster file gives none, writes
the resolved cluster file and a state file into a run folder, starts one `prism serve` per server in its
own process group, and waits until every server answers `/health`. `prism cluster down` reads the state
file and stops the process groups. A server that dies during start-up stops the whole start, with the
tail of its log in the error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from prism_moe.config import ClusterSpec
from prism_moe.fileio import atomic_write_text

STATE_FILE = "state.json"


class LaunchError(RuntimeError):
    """A cluster that could not start; the message says which server and why."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (another process could take it before we bind; rare on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_ports(cluster: ClusterSpec) -> ClusterSpec:
    """A copy of the cluster with an HTTP and an expert port for every server (free ones where unset)."""
    servers = []
    for s in cluster.servers:
        servers.append(s.model_copy(update={
            "http_port": s.http_port or free_port(s.host),
            "expert_port": s.expert_port or free_port(s.host),
        }))
    return cluster.model_copy(update={"servers": servers})


def write_cluster_file(cluster: ClusterSpec, path: Path) -> None:
    """Write a cluster file that loads back to the same cluster (paths made absolute)."""
    data = cluster.model_dump(mode="json", exclude={"base_dir"}, exclude_none=True)
    if cluster.checkpoint:
        data["checkpoint"] = str(cluster.resolve_path(cluster.checkpoint).resolve())
    model_path = cluster.resolve_path(cluster.model)
    if model_path.exists():
        data["model"] = str(model_path.resolve())
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@dataclass
class LocalCluster:
    """Processes of a local cluster; `stop()` ends them all (also on error and Ctrl-C)."""

    run_dir: Path
    cluster: ClusterSpec
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    coordinator: subprocess.Popen | None = None  # `prism coordinator`, when started with the servers
    started: tuple[str, ...] | None = None  # the servers started here (None: all of the cluster file)

    def endpoints(self) -> dict[str, str]:
        return {s.name: f"http://{s.host}:{s.http_port}" for s in self.cluster.servers
                if self.started is None or s.name in self.started}

    def stop(self, timeout: float = 10.0) -> None:
        extra = {"coordinator": self.coordinator} if self.coordinator is not None else {}
        stop_processes({n: p.pid for n, p in {**extra, **self.procs}.items()}, timeout)
        for p in [*extra.values(), *self.procs.values()]:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_local_cluster(cluster: ClusterSpec, run_dir: Path, extra_args: list[str] | None = None,
                        health_timeout: float = 300.0, log=print, only: list[str] | None = None) -> LocalCluster:
    """Start every server of `cluster` (or those named in `only`: the caller runs the others itself, on the
    ports of `lc.cluster`) as a local `prism serve` process and wait until they are healthy."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = with_ports(cluster)
    unknown = sorted(set(only or ()) - set(cluster.server_names))
    if unknown:
        raise LaunchError(f"servers {unknown} are not in the cluster file (it has {cluster.server_names})")
    cluster_file = run_dir / "cluster.yaml"
    write_cluster_file(cluster, cluster_file)
    lc = LocalCluster(run_dir, cluster, started=tuple(only) if only is not None else None)
    # Servers on one machine share its cores: without a cap each OpenMP pool takes them all and the
    # processes stall each other (measured: 16 tokens in 55 s instead of 4 s with three servers on 2 cores).
    share = max(1, (os.cpu_count() or 1) // len(cluster.servers))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(share))}
    try:
        for s in cluster.servers:
            if only is not None and s.name not in only:
                continue
            log_path = run_dir / f"{s.name}.log"
            cmd = [sys.executable, "-m", "prism_moe.cli", "serve", "--cluster", str(cluster_file), "--server", s.name,
                   *(extra_args or [])]
            with open(log_path, "w") as logf:
                lc.procs[s.name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                                    start_new_session=True, env=env)
        state = {"cluster_file": str(cluster_file),
                 "servers": {n: {"pid": p.pid, "http": lc.endpoints()[n]} for n, p in lc.procs.items()}}
        atomic_write_text(run_dir / STATE_FILE, json.dumps(state, indent=2))
        wait_healthy(lc, health_timeout, log)
    except BaseException:
        lc.stop()
        raise
    return lc


def start_coordinator(lc: LocalCluster, port: int | None = None, extra_args: list[str] | None = None,
                      host: str = "127.0.0.1") -> str:
    """Start `prism coordinator` on the cluster of `lc` in its own process group (stopped with the servers,
    recorded in the state file for `cluster down`). Returns its URL; its log is coordinator.log."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "prism_moe.cli", "coordinator", "--cluster", str(lc.run_dir / "cluster.yaml"),
           "--host", host, "--port", str(port), *(extra_args or [])]
    with open(lc.run_dir / "coordinator.log", "w") as logf:
        lc.coordinator = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://{host}:{port}"
    state_path = lc.run_dir / STATE_FILE
    state = read_state(lc.run_dir) if state_path.is_file() else {}
    state["coordinator"] = {"pid": lc.coordinator.pid, "http": url}
    atomic_write_text(state_path, json.dumps(state, indent=2))
    return url


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(lc: LocalCluster, timeout: float, log=print) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(lc.endpoints())
    while pending:
        for name, url in list(pending.items()):
            proc = lc.procs[name]
            if proc.poll() is not None:
                raise LaunchError(f"server {name} exited with code {proc.returncode} during start-up; "
                                  f"its log ({lc.run_dir / (name + '.log')}) ends with:\n"
                                  f"{_log_tail(lc.run_dir / (name + '.log'))}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    log(f"server {name} healthy at {url}")
                    del pending[name]
            except httpx.HTTPError:
                pass
        if pending and time.monotonic() > deadline:
            raise LaunchError(f"servers {sorted(pending)} not healthy after {timeout:.0f} s; logs in {lc.run_dir}")
        if pending:
            time.sleep(0.5)


def stop_processes(pids: dict[str, int], timeout: float = 10.0) -> list[str]:
    """SIGTERM each process group, then SIGKILL what is left after `timeout`. Returns the names stopped."""
    stopped = []
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    for pid in pids.values():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return stopped


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own children so they do not linger as zombies
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def read_state(run_dir: Path) -> dict:
    """The state file of `run_dir`, checked: a torn or foreign file is refused, never half-used (its pids
    name process groups to kill)."""
    path = run_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LaunchError(f"{path} is not a readable cluster state file ({e}); stop the processes by hand "
                          f"(their pids are in the logs) and delete it") from None
    problem = _state_problem(state)
    if problem:
        raise LaunchError(f"{path} is not a prism-moe cluster state file: {problem}; stop the processes by hand "
                          f"and delete it")
    return state


def _state_problem(state: object) -> str | None:
    if not isinstance(state, dict) or not isinstance(state.get("servers"), dict):
        return "no 'servers' mapping"
    entries = [(f"servers.{n}", s) for n, s in state["servers"].items()]
    if "coordinator" in state:
        entries.append(("coordinator", state["coordinator"]))
    for where, s in entries:
        pid = s.get("pid") if isinstance(s, dict) else None
        if type(pid) is not int or pid <= 1:
            return f"{where}.pid is {pid!r}, not a process id"
    return None


def stop_cluster(run_dir: Path) -> list[str]:
    """Stop the cluster whose state file is in `run_dir` (what `prism cluster down` does)."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise LaunchError(f"no running cluster recorded in {run_dir} (no {STATE_FILE}); nothing to stop")
    state = read_state(run_dir)
    pids = {n: s["pid"] for n, s in state["servers"].items()}
    if "coordinator" in state:  # first, so it does not mark the servers down as they stop
        pids = {"coordinator": state["coordinator"]["pid"], **pids}
    stopped = stop_processes(pids)
    state_path.unlink(missing_ok=True)
    return stopped
