"""The API process of `prism serve`: the HTTP port, the OpenAI routes and the `Engine` frontend, apart from the model.

`prism serve` starts it as a child (`python -m prism_moe.runtime.api_process`, `start_api_process`). It holds no
weights: the checkpoint's tokenizer and config (`model_skeleton`, parameters on the meta device) are enough for
admission, detokenisation, stop strings and the API's checks. Its `Engine` drives the batching loop of the model's
process through a `RemoteRunner` (engine/remote.py says why: the GIL). Everything that is not `/v1/...` (health,
metrics, the control routes, the OpenAPI schema's other half) goes, unchanged, to the model process's own app on a
Unix socket in a private folder; the client's address goes along as `X-Forwarded-For` (overwritten, never passed
through), so the model process's loopback-only control rule still sees who asked. The OpenAPI schema served here is
both apps' schemas merged. The process exits when its parent does.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import Request, Response

log = logging.getLogger(__name__)

API_KEY_ENV = "PRISM_API_PROCESS_API_KEY"  # the API key travels in the environment, not on the command line
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "host", "content-length", "x-forwarded-for",
               "date", "server"}  # the last two: this process's own uvicorn adds them


class ForwardedMetrics:
    """What the API process's app records (ended requests, answered HTTP requests), sent to the model's process,
    whose `/metrics` shows them."""

    def __init__(self, remote: Any) -> None:
        self.remote = remote

    def observe_generation(self, stats: Any) -> None:
        self.remote.send_stats(stats)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.remote.send_http(endpoint, status, seconds)


def build_app(checkpoint: Path, model_name: str, core_socket: str, to_host: str, from_host: str, max_running: int,
              api_key: str | None) -> Any:
    """The API process's FastAPI app (see the module docstring)."""
    import httpx
    from fastapi.responses import StreamingResponse
    from starlette.background import BackgroundTask
    from transformers import AutoTokenizer

    from prism_moe.model.loading import model_skeleton
    from prism_moe.runtime.engine import Engine
    from prism_moe.runtime.engine.remote import RemoteRunner
    from prism_moe.runtime.http_api import APIError, create_app

    remote = RemoteRunner(to_host, from_host)
    engine = Engine(model_skeleton(checkpoint), AutoTokenizer.from_pretrained(checkpoint), device=None,
                    max_running=max_running, slot_runner=lambda *_: remote)
    app = create_app(engine, ForwardedMetrics(remote), model_name, api_key=api_key, status=False)  # type: ignore[arg-type]
    core = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=core_socket), base_url="http://model-process",
                             timeout=httpx.Timeout(10.0, read=None))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def to_model_process(path: str, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["x-forwarded-for"] = request.client.host if request.client else ""
        upstream = core.build_request(request.method, "/" + path, params=request.query_params, headers=headers,
                                      content=await request.body())
        try:
            reply = await core.send(upstream, stream=True)
        except httpx.TransportError as e:
            return APIError(503, f"the model's process is not answering yet ({type(e).__name__}); retry",
                            "server_error").response()
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=kept,
                                 background=BackgroundTask(reply.aclose))

    own_schema = app.openapi
    merged: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        """This app's routes and the model process's, one schema (the model process's is fetched once)."""
        if "schema" in merged:
            return merged["schema"]
        schema = copy.deepcopy(own_schema())
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=core_socket), timeout=10.0) as client:
                other = client.get("http://model-process/openapi.json").raise_for_status().json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("OpenAPI schema without the model process's routes (not answering: %s)", e)
            return schema
        for path, ops in other.get("paths", {}).items():
            schema["paths"].setdefault(path, ops)
        mine = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, body in other.get("components", {}).get("schemas", {}).items():
            mine.setdefault(name, body)
        merged["schema"] = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    log.error("the model's process (pid %d) is gone; the API process exits", parent)
    os._exit(1)


def start_api_process(checkpoint: Path, model_name: str, host: str, port: int, core_socket: str, to_host: str,
                      from_host: str, max_running: int, api_key: str | None) -> subprocess.Popen:
    """Start the API process as a child of this (the model's) process."""
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    cmd = [sys.executable, "-m", "prism_moe.runtime.api_process", "--checkpoint", str(checkpoint),
           "--model-name", model_name, "--host", host, "--port", str(port), "--core-socket", core_socket,
           "--to-host", to_host, "--from-host", from_host, "--max-running", str(max_running),
           "--parent-pid", str(os.getpid())]
    return subprocess.Popen(cmd, env=env)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m prism_moe.runtime.api_process",
                                 description="prism serve's API process (started by prism serve; not run by hand)")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--core-socket", required=True, help="the model process's HTTP app (a Unix socket path)")
    ap.add_argument("--to-host", required=True, help="the RunnerHost's request socket (ipc://...)")
    ap.add_argument("--from-host", required=True, help="the RunnerHost's output socket (ipc://...)")
    ap.add_argument("--max-running", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s api-process: %(message)s")
    if os.getppid() != args.parent_pid:
        sys.exit("the API process runs as a child of `prism serve`")
    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), name="prism-parent-watch", daemon=True).start()

    import torch
    import uvicorn

    torch.set_num_threads(1)  # no model compute here
    app = build_app(args.checkpoint, args.model_name, args.core_socket, args.to_host, args.from_host,
                    args.max_running, os.environ.get(API_KEY_ENV) or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
