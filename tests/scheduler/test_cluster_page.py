"""The coordinator's live cluster page (GET /), rendered by headless Chromium against a real coordinator app
(its servers answered by a scripted client): heat map, health, local share, migrations, and a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

from prism_moe.config import cluster_from_dict
from prism_moe.planning import plan
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig
from prism_moe.scheduler.executor import MigrationReport

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class ScriptedServers:
    """What the servers' /prism/stats would answer: local and remote invocations grow by 100 and 30 per poll."""

    def __init__(self, placement):
        self.placement_ = placement
        self.polls: dict[str, int] = {}
        self.down: set[str] = set()

    def stats(self, server: str, timeout: float) -> dict:
        if server in self.down:
            raise ConnectionError(f"{server} is not answering")
        k = self.polls[server] = self.polls.get(server, 0) + 1
        i = self.placement_.server_names.index(server)
        return {"counts": np.full((self.placement_.num_layers, self.placement_.num_experts), k).tolist(),
                "routed_local": 100 * k, "routed_remote": 30 * k, "peer_bytes_sent": 1000 * k,
                "peer_bytes_received": 1000 * k, "placement_version": 1, "started_at": 1.0,
                "experts_held": int(self.placement_.hosts[i].sum())}

    def placement(self, server: str, timeout: float = 10.0):
        return self.placement_

    def lease(self, server: str, ttl: float, timeout: float = 2.0) -> dict:
        return {}

    def release(self, server: str, timeout: float = 2.0) -> dict:
        return {}

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def coordinator():
    cluster = cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
        {"name": "edge-a", "memory_gib": 12, "workload": "embedded:esft:intent"},
        {"name": "edge-b", "memory_gib": 12, "workload": "embedded:esft:law"},
        {"name": "edge-c", "memory_gib": 24, "workload": "embedded:esft:translation"}]})
    placement = plan(cluster, "prism").placement
    servers = ScriptedServers(placement)
    coord = Coordinator(cluster, CoordinatorConfig(down_after=0.0), placement=placement, client=servers)
    coord.poll()
    time.sleep(0.05)
    coord.poll()
    servers.down.add("edge-b")
    coord.poll()  # edge-b went down
    coord.migrations.append(MigrationReport(reason="workload shift on edge-a", from_version=1, to_version=2,
                                            ok=True, experts_loaded=12, bytes_moved=3_000_000))
    return coord, placement


def test_page_is_served_with_the_data_it_reads(coordinator):
    coord, placement = coordinator
    with TestClient(coord.app()) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert 'fetch("state")' in r.text and 'fetch("placement")' in r.text and "<script src" not in r.text
        state = c.get("/state").json()
        assert state["servers"]["edge-a"]["local_hit_rate"] == pytest.approx(100 / 130)
        assert state["servers"]["edge-b"]["live"] is False
        assert c.get("/placement").json()["num_layers"] == 26


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt install chromium)")
def test_chromium_renders_the_live_page(coordinator, tmp_path):
    coord, placement = coordinator
    server = uvicorn.Server(uvicorn.Config(coord.app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
        flags = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--virtual-time-budget=8000", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"]
        dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "cluster.png"
        subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    # heat map: one cell per (server, layer), holding what the placement holds
    cells = re.findall(r'<tr data-server="([^"]+)">((?:(?!</tr>).)*)</tr>', dom.split('id="heatmap"')[1], re.S)
    assert [name for name, _ in cells] == list(placement.server_names)
    for i, (_, row) in enumerate(cells):
        held = [int(x) for x in re.findall(r'data-held="(\d+)"', row)]
        assert held == placement.hosts[i].sum(axis=1).tolist()
    # health and local share per server
    servers = dom.split('id="servers"')[1].split("</table>")[0]
    assert re.search(r'data-server="edge-b">.*?data-health="down"', servers, re.S)
    assert re.search(r'data-server="edge-a">.*?data-health="live"', servers, re.S)
    assert re.search(r'data-local-share="edge-a">76\.9%<', servers)
    assert "v1 → v2 (workload shift on edge-a): done, 12 experts loaded, 3.0 MB" in dom
    assert "down edge-b: edge-b is not answering" in dom  # the events list
    state = coord.state()
    assert f'id="summary">placement version {state["placement_version"]} ({state["algorithm"]})<' in dom
    assert re.search(r'<div id="status"[^>]*>updated ', dom)  # the last refresh reached the coordinator
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ordered_migration_needs_control(coordinator):
    """POST /migrate and /replan act only while this coordinator holds the leases and has rebuilt its state
    (the fixture's never started: it holds none); a dry run still answers."""
    coord, placement = coordinator
    before = (len(coord.migrations), coord.placement)
    with TestClient(coord.app(), client=("127.0.0.1", 50000)) as c:  # no admin key: control from loopback
        r = c.post("/migrate", json={"placement": placement.to_dict()})
        assert r.status_code == 409 and "control lease" in r.json()["detail"]
        assert c.post("/replan").status_code == 409
        assert c.post("/replan?dry_run=true").status_code == 200
        # the body is read (a malformed placement is named), not taken for a missing query parameter
        bad = c.post("/migrate", json={"placement": {"servers": "x"}})
        assert bad.status_code == 400, bad.text
    assert (len(coord.migrations), coord.placement) == before
