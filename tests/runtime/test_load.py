"""Many concurrent streams through a real uvicorn server: none fails while the waiting queue has room; beyond it,
clear 503s (with Retry-After) and every admitted stream still completes. The minutes-long run with memory
readings is benchmarks/load.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from prism_moe.runtime.engine import Engine
from prism_moe.runtime.http_api import create_app
from prism_moe.runtime.metrics import ServerMetrics

MODEL = "tiny-mixtral"
PROMPTS = ["Hello, how are", "Edge servers", "Which experts are popular", "Pack my box"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks the port
    server = uvicorn.Server(uvicorn.Config(create_app(engine, ServerMetrics(), MODEL), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


async def stream_one(client: httpx.AsyncClient, prompt: str) -> tuple[int, list[int] | str]:
    """(status, generated ids) for a completed stream, (status, error message) otherwise."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, json.loads(await r.aread())["error"]["message"]
        ids, done = [], False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                ids += chunk["choices"][0]["token_ids"]
        assert done
        return r.status_code, ids


def run_streams(base_url: str, n: int) -> list[tuple[int, list[int] | str]]:
    async def go():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*[stream_one(client, PROMPTS[i % len(PROMPTS)]) for i in range(n)])

    return asyncio.run(go())


def test_64_concurrent_streams_all_complete(base_url: str, engine: Engine, greedy_ref) -> None:
    results = run_streams(base_url, 64)
    assert [status for status, _ in results] == [200] * 64
    refs = {p: greedy_ref(engine.encode(p), MAX_TOKENS) for p in PROMPTS}
    for i, (_, ids) in enumerate(results):
        assert ids == refs[PROMPTS[i % len(PROMPTS)]]
    assert engine.num_running == engine.num_waiting == 0


def test_full_queue_answers_503_and_admitted_streams_complete(base_url: str, engine: Engine) -> None:
    # Hold the loop so no request gets its first token: exactly max_waiting are admitted, the rest refused.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine.paused():
            held.set()
            release.wait(120)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10)

    async def go():
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=httpx.Limits(max_connections=40)) as c:
            tasks = [asyncio.create_task(stream_one(c, PROMPTS[i % len(PROMPTS)])) for i in range(40)]
            for _ in range(1200):  # the refused ones answer while the loop is still held
                if sum(t.done() for t in tasks) >= 36:
                    break
                await asyncio.sleep(0.05)
            release.set()
            return await asyncio.gather(*tasks)

    engine.max_waiting = 4
    try:
        results = asyncio.run(go())
    finally:
        release.set()
        engine.max_waiting = 64
        holder.join(10)
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 4 and statuses.count(503) == 36
    for status, out in results:
        if status == 503:
            assert "waiting for their first token" in out and "retry later" in out
        else:
            assert len(out) == MAX_TOKENS
    assert engine.num_running == engine.num_waiting == 0
