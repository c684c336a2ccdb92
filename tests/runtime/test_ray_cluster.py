"""`prism cluster up --ray` on a Ray cluster of three nodes started on this machine (`ray.cluster_utils`).

Each node advertises `prism-server-<name>`, so each server's actor lands on its own node. The CLI starts
the servers and the coordinator; every server answers completions with the tokens of single-process
transformers (the placement splits the experts, so every step calls peers); `kill -9` of one `prism serve`
makes Ray restart its actor, which starts the server again on the same port; the coordinator sees it come
back (rejoin) and every server serves again; `cluster down --ray` stops processes and actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml

from prism_moe.config import cluster_from_dict, load_cluster
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.runtime import ray_deploy
from prism_moe.runtime.launcher import LaunchError

NAMES = ["edge-a", "edge-b", "edge-c"]
PROMPT = [5, 9, 2, 7, 11]
MAX_TOKENS = 4
API_KEY = "ray-test-user-key"  # given as $PRISM_API_KEY to `cluster up`: Ray workers do not inherit its environment


def _cluster(hosts: list[str]):
    return cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
        {"name": n, "memory_gib": 12, "host": h} for n, h in zip(NAMES[:len(hosts)], hosts, strict=True)]})


def test_pins_by_custom_resource_first_then_node_ip():
    nodes = [{"CPU": 4, "node:10.0.0.1": 1, "prism-server-edge-a": 1}, {"CPU": 4, "node:10.0.0.2": 1}]
    pins = ray_deploy.pin_resources(_cluster(["10.0.0.9", "10.0.0.2"]), nodes)
    assert pins == {"edge-a": {"prism-server-edge-a": ray_deploy.PIN_AMOUNT},
                    "edge-b": {"node:10.0.0.2": ray_deploy.PIN_AMOUNT}}
    # loopback hosts: fine when every node has one IP (one machine), refused when the nodes have several
    one_ip = [{"node:10.0.0.1": 1}, {"node:10.0.0.1": 1}]
    assert ray_deploy.pin_resources(_cluster(["127.0.0.1", "127.0.0.1"]), one_ip)["edge-b"] == {
        "node:10.0.0.1": ray_deploy.PIN_AMOUNT}
    with pytest.raises(LaunchError, match=r"edge-b: no Ray node .*loopback.*prism-server-edge-b"):
        ray_deploy.pin_resources(_cluster(["10.0.0.1", "127.0.0.1"]), nodes)
    with pytest.raises(LaunchError, match=r"edge-b: no Ray node .*'10.0.0.7'.*--resources"):
        ray_deploy.pin_resources(_cluster(["10.0.0.1", "10.0.0.7"]), nodes)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives `import ray`
    with pytest.raises(LaunchError, match=r"pip install 'prism-moe\[ray\]'"):
        ray_deploy.import_ray()


def test_cluster_up_ray_refuses_a_network_cluster_without_keys_before_touching_ray(tmp_path, capsys, monkeypatch):
    from prism_moe.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # the refusal must come first, with or without Ray
    path = tmp_path / "lan.yaml"
    path.write_text(yaml.safe_dump({"model": "deepseek-v2-lite", "servers": [
        {"name": "a", "memory_gib": 12, "host": "10.0.0.1"}, {"name": "b", "memory_gib": 12, "host": "10.0.0.2"}]}))
    assert main(["cluster", "up", "--cluster", str(path), "--ray", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err
    assert "10.0.0.1" in err and "prism keys" in err and "prism-moe[ray]" not in err


def test_cluster_down_without_ray_points_to_ray_for_a_ray_run(tmp_path, capsys):
    from prism_moe.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ray_deploy.RAY_STATE_FILE).write_text("{}")
    assert main(["cluster", "down", "--cluster", "c.yaml", "--run-dir", str(tmp_path / "run")]) == 2
    assert "cluster down --cluster c.yaml --ray" in capsys.readouterr().err


@pytest.fixture
def ray_nodes():
    """Three one-CPU Ray nodes on this machine, one per server (custom resource), no dashboard."""
    ray = pytest.importorskip("ray", reason="the Ray deployment test needs the `ray` package (in the test extra)")
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 80 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={
        **small, "include_dashboard": False, "resources": {f"prism-server-{NAMES[0]}": 1}})
    try:
        for n in NAMES[1:]:
            cluster.add_node(**small, resources={f"prism-server-{n}": 1})
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def _prism(*args: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prism_moe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _json_block(out: str) -> dict:
    lines = out.splitlines()
    start = lines.index("{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start:end + 1]))


def _completion(url: str, model: str) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _wait(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_ray_cluster_serves_survives_a_killed_server_and_stops(ray_nodes, tiny_dir, greedy_ref, tmp_path):
    import ray

    spec = ModelSpec.from_pretrained(tiny_dir)
    hosts = np.zeros((3, spec.num_moe_layers, spec.num_experts), dtype=bool)
    for e in range(spec.num_experts):
        hosts[e % 3, :, e] = True  # no replicas: every step needs both peers
    Placement.from_hosts(NAMES, hosts, np.ones((3, 3)), algorithm="split-by-id").save(tmp_path / "placement.json")
    cluster_file = tmp_path / "ray-tiny.yaml"
    cluster_file.write_text(yaml.safe_dump({"model": str(tiny_dir), "device": "cpu",
                                            "servers": [{"name": n, "memory_gib": 1} for n in NAMES]}))
    address = ray_nodes.address
    common = ["--cluster", str(cluster_file), "--run-dir", str(tmp_path / "run")]
    want = greedy_ref(PROMPT, MAX_TOKENS)
    t0 = time.monotonic()
    phase = lambda what: print(f"ray test: {what} at {time.monotonic() - t0:.1f} s")  # noqa: E731 (shown with -s)

    up = _prism("cluster", "up", *common, "--ray", address, "--coordinator", "--placement",
                str(tmp_path / "placement.json"), "--threads", "1", "--health-timeout", "90", timeout=150,
                env={"PRISM_API_KEY": API_KEY})
    assert up.returncode == 0, up.stdout + up.stderr
    info = _json_block(up.stdout)
    phase("cluster up returned")
    endpoints, pids, coordinator = info["endpoints"], info["pids"], info["coordinator"]
    new_pids = list(pids.values())
    try:
        assert sorted(endpoints) == NAMES and set(pids) == {*NAMES, "coordinator"}
        for name, url in endpoints.items():
            assert _completion(url, tiny_dir.name) == want, name
            assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401

        ray.init(address=address, namespace=info["ray_namespace"], log_to_driver=False, logging_level="ERROR")
        dep = ray_deploy.attach(ray, info["ray_namespace"], load_cluster(cluster_file),
                                tmp_path / "run")
        assert sorted(dep.actors) == sorted([*NAMES, "coordinator"])
        status = _prism("cluster", "status", *common, "--ray", address, "--logs", "5", timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        health = _json_block(status.stdout)
        assert all(health[n]["healthy"] and health[n]["pid"] == pids[n] for n in [*NAMES, "coordinator"]), health
        assert len({health[n]["node_id"] for n in NAMES}) == 3, health  # each server on its own node
        assert "--- edge-a: last 5 lines" in status.stdout

        phase("completions and cluster status done")
        os.kill(pids["edge-b"], signal.SIGKILL)
        restarted = _wait("Ray to restart edge-b", lambda: (lambda h: h if h.get("healthy") and h["pid"] !=
                          pids["edge-b"] else None)(dep.health(timeout=5)["edge-b"]), 60)
        new_pids.append(restarted["pid"])
        phase("edge-b restarted and healthy")
        assert restarted["restarted"] is True and restarted["url"] == endpoints["edge-b"]
        assert "exited with code -9" in dep.log_tail("edge-b", 400)

        def rejoined():
            events = httpx.get(f"{coordinator}/state", timeout=5).json()["events"]
            kinds = [(e["kind"], e["server"]) for e in events]
            return ("rejoin", "edge-b") in kinds and kinds
        kinds = _wait("the coordinator to see edge-b rejoin", rejoined, 30)
        assert ("down", "edge-b") in kinds
        phase("coordinator saw the rejoin")
        # the restarted server has the same credentials (the actor's arguments and environment are replayed)
        assert httpx.post(f"{endpoints['edge-b']}/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401
        for name, url in endpoints.items():
            assert _completion(url, tiny_dir.name) == want, name
    finally:
        down = _prism("cluster", "down", *common, "--ray", address, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    phase("cluster down returned")
    assert all(n in down.stdout for n in [*NAMES, "coordinator"]), down.stdout
    _wait("every process to end", lambda: not any(_alive(p) for p in new_pids), 15)
    for url in endpoints.values():
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=2)
    assert ray_deploy.existing_actors(ray, info["ray_namespace"], [*NAMES, "coordinator"]) == {}
    assert not (tmp_path / "run" / ray_deploy.RAY_STATE_FILE).exists()
