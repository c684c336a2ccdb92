"""Overhead of the expert transport against raw pyzmq, measured in one run on loopback.

For hidden states of [tokens, H] (float32 and bfloat16) it times one round trip of each method:

  raw      the baseline: a sync pyzmq DEALER in this process sends the very frames an expert call sends
           (its msgpack header, hidden, expert ids) to a ROUTER in a child process that answers with the
           frames of an expert result (a header of the same size, hidden echoed): same bytes, same frame
           count, same two sockets in two processes; no Python work beyond the socket calls.
  prism    `PeerPool.call` from this thread (the one remote-call path: what a layer of `prism serve`
           uses, on real and emulated links alike) against an `ExpertService` in a child process whose
           identity handler runs on its compute worker.
  before:M with `--baseline REV`: the transport of git revision REV (its runtime modules, extracted
           into a temporary package), the same way: for a revision before the one remote-call path, its
           `SyncPeerPool.call` against its own service in handler mode M (`inline`: on the service's I/O
           thread, what `prism serve` used; `threads`: in a worker thread); for a later one, `before:prism`.

The methods are interleaved sample by sample so load spikes on a shared machine hit them alike, in an
order shuffled every round (in a fixed order each method would always follow the same others, and a
process that sat idle through them answers its next call slower). Prints JSON: per-size medians (us),
ratios to raw, and the median ratio of each method over the sizes. It measures; it never passes or
fails on time (`goal_ratio` is only printed for reference).

    python benchmarks/transport_overhead.py [--hidden 2048] [--tokens 1 16 256] [--seconds 1]
        [--dtypes float32 bfloat16] [--baseline REV [--baseline-modes inline threads]]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from prism_moe.runtime.transport import ExpertService, PeerPool
from prism_moe.runtime.wire import encode

REPO = Path(__file__).resolve().parent.parent
BASELINE_PACKAGE = "prism_transport_before"
BASELINE_MODULES = ("transport", "service", "wire", "sockets", "emulation", "keys")


def serve_raw() -> None:
    """Answer each request with a pre-built expert_result header (matching its size) + the hidden frame."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:*")
    print(sock.get(zmq.LAST_ENDPOINT).decode(), flush=True)
    reply_header = b""
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if len(frames) == 2:
                if frames[1].bytes == b"stop":
                    return
                reply_header = frames[1].bytes  # set-up message: the header to answer with
                sock.send_multipart([frames[0], b"ok"])
                continue
            sock.send_multipart([frames[0], reply_header, frames[2]], copy=False)
    finally:
        sock.close(0)
        ctx.term()


def identity(layer: int, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h


def serve_prism(hidden: int) -> None:
    with ExpertService("tcp://127.0.0.1:*", identity, num_layers=64, num_experts=256, hidden_size=hidden) as svc:
        print(svc.endpoint, flush=True)
        sys.stdin.readline()  # parent closes stdin to stop us


def extract_baseline(rev: str, into: Path) -> None:
    """Write the runtime modules of git revision `rev` as package BASELINE_PACKAGE under `into`."""
    pkg = into / BASELINE_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for m in BASELINE_MODULES:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/prism_moe/runtime/{m}.py"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / f"{m}.py").write_text(src)


def serve_before(hidden: int, mode: str, path: str) -> None:
    sys.path.insert(0, path)
    old = importlib.import_module(f"{BASELINE_PACKAGE}.transport")
    if not hasattr(old, "LoopThread"):  # a revision with this one-path transport
        with old.ExpertService("tcp://127.0.0.1:*", identity, num_layers=64, num_experts=256,
                               hidden_size=hidden) as svc:
            print(svc.endpoint, flush=True)
            sys.stdin.readline()
        return
    kw: dict[str, Any] = {"compute_threads": 0} if mode == "inline" else {}
    with old.LoopThread() as lt:
        svc = old.ExpertService("tcp://127.0.0.1:*", identity, num_layers=64, num_experts=256, hidden_size=hidden,
                                **kw)
        print(lt.run(svc.start()), flush=True)
        sys.stdin.readline()
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
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per size (all methods)")
    ap.add_argument("--min-samples", type=int, default=100)
    ap.add_argument("--baseline", metavar="REV", help="also time the transport of this git revision")
    ap.add_argument("--baseline-modes", nargs="+", choices=["inline", "threads"], default=["inline", "threads"])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--baseline-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "raw":
        return serve_raw()
    if args.baseline_dir:  # first: a baseline's mode may be named "prism" too
        return serve_before(args.hidden, args.serve, args.baseline_dir)
    if args.serve == "prism":
        return serve_prism(args.hidden)

    torch.manual_seed(0)
    rng = random.Random(0)
    procs: list[subprocess.Popen[str]] = []
    tmp = tempfile.TemporaryDirectory()
    raw_proc, raw_ep = _spawn("--serve", "raw")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(raw_ep)
    proc, ep = _spawn("--serve", "prism", "--hidden", str(args.hidden))
    procs.append(proc)
    pool = PeerPool({"peer": ep}, timeout=10.0, retries=0)
    old_pools: dict[str, Any] = {}
    if args.baseline:
        extract_baseline(args.baseline, Path(tmp.name))
        sys.path.insert(0, tmp.name)
        old = importlib.import_module(f"{BASELINE_PACKAGE}.transport")
        one_path = not hasattr(old, "LoopThread")
        for mode in ["prism"] if one_path else args.baseline_modes:
            proc, ep = _spawn("--serve", mode, "--hidden", str(args.hidden), "--baseline-dir", tmp.name)
            procs.append(proc)
            pool_type = old.PeerPool if one_path else old.SyncPeerPool
            old_pools[mode] = pool_type({"peer": ep}, timeout=10.0, retries=0)
    results = []
    try:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for n in args.tokens:
                hidden = torch.randn(n, args.hidden).to(dtype)
                ids = torch.randint(0, 256, (n,))
                # the frames a call sends (its id has the same msgpack size as ours) and the header of the reply
                request = encode({"type": "expert_call", "id": 1000, "layer": 0}, {"hidden": hidden, "expert_ids": ids})
                reply_header = encode({"type": "expert_result", "id": 1000, "layer": 0}, {"out": hidden})[0]
                raw.send_multipart([reply_header])
                raw.recv_multipart()

                def raw_once(request: list[Any] = request) -> float:
                    t = time.perf_counter()
                    raw.send_multipart(request, copy=False)
                    raw.recv_multipart(copy=False)
                    return time.perf_counter() - t

                def call_once(p: Any = pool, hidden: Any = hidden, ids: Any = ids) -> float:
                    t = time.perf_counter()
                    p.call("peer", 0, ids, hidden)
                    return time.perf_counter() - t

                methods: dict[str, Any] = {"raw": raw_once, "prism": call_once}
                for mode, p in old_pools.items():
                    methods[f"before:{mode}"] = lambda p=p, f=call_once: f(p)
                samples: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(20):  # warm up
                    for f in methods.values():
                        f()
                # interleave one sample of each method at a time: load spikes hit all of them alike
                budget = time.perf_counter() + args.seconds
                order = list(methods.items())
                while time.perf_counter() < budget or len(samples["raw"]) < args.min_samples:
                    rng.shuffle(order)
                    for m, f in order:
                        samples[m].append(f())
                med = {m: statistics.median(v) * 1e6 for m, v in samples.items()}
                results.append({
                    "tokens": n,
                    "dtype": dtype_name,
                    "bytes": hidden.numel() * hidden.element_size(),
                    "samples": len(samples["raw"]),
                    "median_us": {m: round(v, 1) for m, v in med.items()},
                    "ratio": {m: round(v / med["raw"], 3) for m, v in med.items() if m != "raw"},
                })
    finally:
        pool.close()
        for p in old_pools.values():
            p.close()
        raw.send_multipart([b"stop"])
        raw.close(0)
        ctx.term()
        for proc in procs:
            proc.communicate(timeout=10)
        raw_proc.wait(timeout=10)
        tmp.cleanup()
    names = list(results[0]["ratio"]) if results else []
    print(json.dumps({
        "hidden": args.hidden,
        "baseline": args.baseline,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "sizes": results,
        "median_ratio": {m: round(statistics.median(r["ratio"][m] for r in results), 3) for m in names},
        "goal_ratio": 1.5,
    }, indent=2))


if __name__ == "__main__":
    main()
