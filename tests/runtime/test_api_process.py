"""prism serve's API process: what it forwards to the model's process, and the two processes' shared fate."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.runtime.api_process import build_app
from prism_moe.runtime.launcher import start_local_cluster


def _stand_in_model_process(sock: str) -> tuple[uvicorn.Server, threading.Thread]:
    """An app on a Unix socket, served as `prism serve` serves the model process's app; it says who asked."""
    app = FastAPI(title="stand-in")

    @app.get("/prism/whoami")
    async def whoami(request: Request) -> dict:
        return {"client": request.client.host if request.client else None}

    @app.post("/prism/echo")
    async def echo(body: dict) -> dict:
        return body

    server = uvicorn.Server(uvicorn.Config(app, uds=sock, log_level="warning", proxy_headers=True,
                                           forwarded_allow_ips="*"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    return server, thread


def test_forwards_the_callers_address_bodies_and_one_schema(tiny_dir: Path, tmp_path: Path) -> None:
    sock = str(tmp_path / "model.sock")
    server, thread = _stand_in_model_process(sock)
    app = build_app(tiny_dir, "tiny", sock, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out", 4, api_key="k")
    try:
        with TestClient(app) as client:
            # a spoofed X-Forwarded-For is replaced by the real caller (TestClient's "testclient"), so the model
            # process's loopback-only control rule cannot be fooled through the proxy
            r = client.get("/prism/whoami", headers={"X-Forwarded-For": "127.0.0.1"})
            assert r.status_code == 200 and r.json() == {"client": "testclient"}
            assert client.post("/prism/echo", json={"a": [1, 2]}).json() == {"a": [1, 2]}
            paths = client.get("/openapi.json").json()["paths"]
            assert {"/v1/completions", "/v1/chat/completions", "/prism/whoami", "/prism/echo"} <= set(paths)
            assert client.get("/v1/models").status_code == 401  # the API key is checked here
    finally:
        server.should_exit = True
        thread.join(10)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "model's process is not answering" in r.json()["error"]["message"]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the API process")
def test_the_two_processes_go_down_together(tiny_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec.from_pretrained(tiny_dir)
    placement = Placement.from_hosts(["edge"], np.ones((1, spec.num_moe_layers, spec.num_experts), dtype=bool),
                                     np.zeros((1, 1)), algorithm="all-local")
    placement.save(tmp_path / "placement.json")
    cluster = cluster_from_dict({"model": str(tiny_dir), "device": "cpu", "servers": [{"name": "edge",
                                                                                        "memory_gib": 1}]})
    args = ["--placement", str(tmp_path / "placement.json")]
    for victim in ("api", "model"):
        with start_local_cluster(cluster, tmp_path / victim, args, health_timeout=180, log=lambda *_: None) as lc:
            url = lc.endpoints()["edge"]
            r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            model_pid = lc.procs["edge"].pid
            (api_pid,) = _children(model_pid)
            if victim == "api":  # the model's process stops too: no server left half alive
                os.kill(api_pid, signal.SIGKILL)
                assert lc.procs["edge"].wait(30) != 0
            else:  # the API process notices its parent is gone and exits
                os.kill(model_pid, signal.SIGKILL)
                assert _gone(api_pid, 10)
