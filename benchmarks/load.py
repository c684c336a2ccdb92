"""Load: many concurrent streams against one server for minutes: failed requests, 503s, throughput, memory.

Issue 13's load goal: under 64 concurrent streams per server for several minutes, no failed request, a bounded
queue answering a clear 503 when full, memory flat. The server (tiny random-weight checkpoint, `create_app` over
an `Engine` under uvicorn, as `prism serve --api-in-process` runs it, every expert local; `prism serve`'s default API
process is driven at 64 streams by benchmarks/vs_vllm.py) runs in its own process; this process
drives `--streams` clients, each sending streaming `/v1/completions` requests back to back until `--duration`
is over, and samples the server's resident memory (VmRSS) every few seconds. A request fails if it answers
anything but 200 and 503, or its stream carries an error chunk, ends without `[DONE]` or with a wrong token
count. Memory is compared with the first sample after a warm-up minute (`rss_growth_ratio`, measured in the same
run); the goal reads as `failed == 0` and `rss_growth_ratio` close to 1.

    python benchmarks/load.py [--duration 180] [--streams 64] [--max-tokens 32] [--max-waiting 64] [--arch mixtral]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from typing import Any

import httpx

MODEL = "tiny"
PROMPTS = ["Hello, how are", "The quick brown fox jumps over the lazy dog. Pack my box", "Edge",
           "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation", "Which experts are popular"]


def serve(path: str, sock: socket.socket, max_waiting: int, max_running: int) -> None:
    """The server process: one Engine behind the OpenAI app, on the socket the parent bound."""
    import uvicorn

    from prism_moe.runtime.engine import Engine
    from prism_moe.runtime.http_api import create_app
    from prism_moe.runtime.metrics import ServerMetrics

    engine = Engine.from_pretrained(path, device="cpu", dtype="float32", max_waiting=max_waiting,
                                    max_running=max_running)
    uvicorn.run(create_app(engine, ServerMetrics(), MODEL), fd=sock.fileno(), log_level="warning")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int, stats: dict[str, Any]) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 503:
                stats["http_503"] += 1
                await r.aread()
                await asyncio.sleep(0.2)
                return
            if r.status_code != 200:
                stats["failed"] += 1
                stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            ids, done, first = 0, False, None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    ids += len(chunk["choices"][0].get("token_ids", []))
                    if first is None and ids:
                        first = time.perf_counter() - t0
            if not done or ids != max_tokens:
                raise RuntimeError(f"stream ended early: done={done}, {ids}/{max_tokens} tokens")
    except Exception as e:
        stats["failed"] += 1
        stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
        return
    stats["ok"] += 1
    stats["tokens"] += ids
    stats["ttft"].append(first)
    stats["latency"].append(time.perf_counter() - t0)


async def drive(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    stats: dict[str, Any] = {"ok": 0, "failed": 0, "http_503": 0, "tokens": 0, "ttft": [], "latency": [],
                             "errors": []}
    rss: list[tuple[float, float]] = []
    limits = httpx.Limits(max_connections=args.streams, max_keepalive_connections=args.streams)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        end = start + args.duration

        async def user(i: int) -> None:
            k = i
            while time.perf_counter() < end:
                await one_request(client, PROMPTS[k % len(PROMPTS)], args.max_tokens, stats)
                k += 1

        async def sample_memory() -> None:
            while time.perf_counter() < end:
                rss.append((round(time.perf_counter() - start, 1), round(rss_mib(pid), 1)))
                await asyncio.sleep(5)

        await asyncio.gather(sample_memory(), *[user(i) for i in range(args.streams)])
        elapsed = time.perf_counter() - start
    warm = [m for t, m in rss if t >= min(args.warmup, args.duration / 2)] or [m for _, m in rss]
    q = lambda xs, p: round(statistics.quantiles(xs, n=100)[p - 1], 4) if len(xs) > 1 else None  # noqa: E731
    return {
        "streams": args.streams, "duration_s": round(elapsed, 1), "max_tokens": args.max_tokens,
        "max_waiting": args.max_waiting, "requests_ok": stats["ok"], "requests_failed": stats["failed"],
        "http_503": stats["http_503"], "tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "ttft_p50_s": q(stats["ttft"], 50), "ttft_p99_s": q(stats["ttft"], 99),
        "latency_p50_s": q(stats["latency"], 50), "latency_p99_s": q(stats["latency"], 99),
        "rss_mib_after_warmup": warm[0], "rss_mib_end": warm[-1], "rss_mib_max": max(warm),
        "rss_growth_ratio": round(warm[-1] / warm[0], 4), "rss_samples": rss,
        "first_errors": stats["errors"][:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the memory baseline")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-waiting", type=int, default=64, help="the engine's waiting-queue bound")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--arch", default="mixtral")
    args = parser.parse_args()

    from prism_moe.model.tiny import make_tiny_model

    path = str(make_tiny_model(args.arch, tempfile.mkdtemp(prefix="prism-load-"), seed=0))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    proc = mp.get_context("fork").Process(target=serve, args=(path, sock, args.max_waiting, args.max_running),
                                          daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit("the server did not come up")
        out = asyncio.run(drive(url, proc.pid, args))
    finally:
        proc.terminate()
        proc.join(10)
    out["arch"], out["cpus"] = args.arch, os.cpu_count()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
