"""Overhead of the expert transport against raw pyzmq, measured in one run on loopback.

For hidden states of [tokens, 2048] (float32 and bfloat16) it times one round trip:
  raw          a sync pyzmq DEALER sends the same bytes (hidden + expert ids) to a ROUTER that echoes
               the hidden frame back (no header, no validation, no thread hop): the baseline;
  raw_asyncio  the same with a zmq.asyncio DEALER on the transport loop (what asyncio alone costs);
  async        `PeerClient.call` awaited on the transport loop (msgpack header, validation, request
               ids, identity handler run in the service's thread pool);
  sync         `SyncPeerPool.call` from a plain thread (what the model's forward uses: adds the hop
               onto the transport loop and back).
Both servers run in their own child process, like a peer would. The methods are interleaved sample by
sample so load spikes on a shared machine hit them alike. Prints JSON: per-size medians (us) and
ratios to raw. Ratios only; no pass/fail.

    python benchmarks/transport_overhead.py [--hidden 2048] [--tokens 1 16 256] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import zmq
import zmq.asyncio

from prism_moe.runtime.transport import ExpertService, LoopThread, SyncPeerPool


def serve_raw() -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    print(sock.get(zmq.LAST_ENDPOINT).decode(), flush=True)
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2 and frames[1].bytes == b"stop":
                return
            sock.send_multipart([frames[0], frames[1]], copy=False)  # echo the hidden frame
    finally:
        sock.close(0)
        ctx.term()


def serve_prism(hidden: int, handler_kind: str) -> None:
    def identity(layer: int, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h

    async def identity_async(layer: int, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h

    handler = identity if handler_kind == "sync" else identity_async
    with LoopThread() as lt:
        svc = ExpertService("tcp://127.0.0.1:*", handler, num_layers=64, num_experts=256, hidden_size=hidden)
        print(lt.run(svc.start()), flush=True)
        sys.stdin.readline()  # parent closes stdin to stop us
        lt.run(svc.close())


def _spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per size and method")
    ap.add_argument("--min-samples", type=int, default=100)
    ap.add_argument("--handler", choices=["sync", "async"], default="sync", help="identity handler kind")
    ap.add_argument("--serve", choices=["raw", "prism"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "raw":
        return serve_raw()
    if args.serve == "prism":
        return serve_prism(args.hidden, args.handler)

    torch.manual_seed(0)
    raw_proc, raw_ep = _spawn("--serve", "raw")
    prism_proc, prism_ep = _spawn("--serve", "prism", "--hidden", str(args.hidden), "--handler", args.handler)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(raw_ep)
    pool = SyncPeerPool({"peer": prism_ep}, timeout=10.0, retries=0)
    client = pool.pool["peer"]
    lt = pool.loop_thread
    actx = zmq.asyncio.Context()
    araw = lt.run(_async_socket(actx, raw_ep))
    results = []
    try:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n in args.tokens:
                hidden = torch.randn(n, args.hidden).to(dtype)
                ids = torch.randint(0, 256, (n,))
                hb = hidden.view(torch.int16).numpy() if dtype == torch.bfloat16 else hidden.numpy()
                ib = ids.numpy()

                def raw_once(hb=hb, ib=ib) -> float:
                    t = time.perf_counter()
                    raw.send_multipart([hb, ib], copy=False)
                    raw.recv_multipart(copy=False)
                    return time.perf_counter() - t

                async def raw_async_once(hb=hb, ib=ib) -> float:
                    t = time.perf_counter()
                    await araw.send_multipart([hb, ib], copy=False)
                    await araw.recv_multipart(copy=False)
                    return time.perf_counter() - t

                async def async_once(hidden=hidden, ids=ids) -> float:
                    t = time.perf_counter()
                    await client.call(0, ids, hidden)
                    return time.perf_counter() - t

                def sync_once(hidden=hidden, ids=ids) -> float:
                    t = time.perf_counter()
                    pool.call("peer", 0, ids, hidden)
                    return time.perf_counter() - t

                methods = {
                    "raw": raw_once,
                    "raw_asyncio": lambda f=raw_async_once: lt.run(f()),
                    "async": lambda f=async_once: lt.run(f()),
                    "sync": sync_once,
                }
                samples: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(20):  # warm up
                    for f in methods.values():
                        f()
                # interleave one sample of each method at a time: load spikes hit all of them alike
                budget = time.perf_counter() + args.seconds
                while time.perf_counter() < budget or len(samples["raw"]) < args.min_samples:
                    for m, f in methods.items():
                        samples[m].append(f())
                med = {m: statistics.median(v) * 1e6 for m, v in samples.items()}
                results.append(
                    {
                        "tokens": n,
                        "dtype": dtype_name,
                        "bytes": hidden.numel() * hidden.element_size(),
                        "samples": len(samples["raw"]),
                        "median_us": {m: round(v, 1) for m, v in med.items()},
                        "ratio_raw_asyncio": round(med["raw_asyncio"] / med["raw"], 3),
                        "ratio_async": round(med["async"] / med["raw"], 3),
                        "ratio_sync": round(med["sync"] / med["raw"], 3),
                    }
                )
    finally:
        lt.run(_close_async(araw))
        pool.close()
        actx.term()
        raw.send_multipart([b"stop"])
        raw.close(0)
        ctx.term()
        prism_proc.communicate(timeout=10)
        raw_proc.wait(timeout=10)
    print(
        json.dumps(
            {
                "hidden": args.hidden,
                "handler": args.handler,
                "sizes": results,
                "median_ratio_raw_asyncio": round(
                    statistics.median(r["ratio_raw_asyncio"] for r in results), 3
                ),
                "median_ratio_async": round(statistics.median(r["ratio_async"] for r in results), 3),
                "median_ratio_sync": round(statistics.median(r["ratio_sync"] for r in results), 3),
                "goal_ratio": 1.5,
            },
            indent=2,
        )
    )


async def _async_socket(actx: zmq.asyncio.Context, endpoint: str) -> zmq.asyncio.Socket:
    s = actx.socket(zmq.DEALER)  # created on the loop thread that will use it
    s.linger = 0
    s.connect(endpoint)
    return s


async def _close_async(s: zmq.asyncio.Socket) -> None:
    s.close(0)


if __name__ == "__main__":
    main()
