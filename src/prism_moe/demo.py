"""`prism demo`: a local 3-server cluster serves one MoE model under several placements and plans, measured.

Steps: build (or reuse) a tiny random-weight checkpoint with DeepSeek-V2-Lite's routing shape (26 MoE
layers x 64 experts, top-6); write a cluster file of three heterogeneous servers (different memory
budgets, emulated links of different speeds); for each placement algorithm, and each execution plan
(`pipeline`, `hybrid`: layer blocks handed between servers, docs/plans.md), start the cluster, drive every
server with its own domain's prompts through the OpenAI API, read the servers' metrics, stop the cluster;
then print a table and write a report folder (Markdown, CSV, JSON, PNG plots).

Each server's routers replay its domain's real ESFT routing trace (benchmark mode), so a random model shows
real expert locality: the full ESFT set when a data folder holds it (`../shared/data`, PRISM_DATA_DIR,
--data-dir or what `prism data fetch esft` downloaded), else the compact sample shipped in the package
(`embedded:esft:<domain>`). The demo says which.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import GIB, ModelSpec

DOMAINS = {"edge-a": "intent", "edge-b": "law", "edge-c": "translation"}  # each server's ESFT domain
# Share of all routed experts each server has room for (beyond the dense part), as in the paper's setting.
MEMORY_SHARE = {"edge-a": 0.35, "edge-b": 0.35, "edge-c": 0.75}
DEFAULT_ALGORITHMS = ("uniform", "eplb", "prism", "latency", "pipeline", "hybrid")
# DeepSeek-V2-Lite's routing shape, so its real ESFT traces replay one to one.
TINY_SHAPE = dict(num_hidden_layers=27, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2)


@dataclass
class RequestResult:
    server: str
    latency_s: float
    ttft_s: float
    tokens: int
    ok: bool
    error: str = ""


@dataclass
class RunResult:
    algorithm: str
    requests: list[RequestResult] = field(default_factory=list)
    server_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    cross_server_bytes: float = 0.0
    predicted_remote_fraction: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.requests if r.ok]
        lat = sorted(r.latency_s for r in ok)
        local = sum(s["local_invocations"] for s in self.server_stats.values())
        total = sum(s["invocations"] for s in self.server_stats.values())
        return {
            "algorithm": self.algorithm,
            "requests": len(self.requests),
            "failed": len(self.requests) - len(ok),
            "mean_latency_s": statistics.fmean(lat) if lat else float("nan"),
            "p95_latency_s": float(np.percentile(lat, 95)) if lat else float("nan"),
            "mean_ttft_s": statistics.fmean(r.ttft_s for r in ok) if ok else float("nan"),
            "remote_fraction": (total - local) / total if total else 0.0,
            "predicted_remote_fraction": self.predicted_remote_fraction,
            "cross_server_mb": self.cross_server_bytes / 1e6,
            "wall_s": self.wall_s,
        }


def tiny_checkpoint(cache_dir: Path, console: Console) -> Path:
    """The demo's checkpoint, built once and cached."""
    from prism_moe.model.tiny import make_tiny_model

    path = cache_dir / "tiny-deepseek-v2-26x64"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    console.print(f"building a tiny random-weight DeepSeek-V2-shaped checkpoint in {path} ...")
    return make_tiny_model("deepseek_v2", path, seed=0, **TINY_SHAPE)


def demo_workloads(data_dir: str | None) -> tuple[dict[str, str], str | None, str]:
    """Each server's workload source, the data folder to pass on (None: the embedded sample) and, in
    words, which data that is."""
    from prism_moe.stats.workload import esft_domains, find_data_dir

    root = find_data_dir(data_dir)
    if root is not None and set(DOMAINS.values()) <= set(esft_domains(root)):
        return ({n: f"esft:{d}" for n, d in DOMAINS.items()}, str(root),
                f"the full ESFT routing traces in {root}")
    where = f"{root} has no ESFT set" if root is not None else "no routing data folder found"
    return ({n: f"embedded:esft:{d}" for n, d in DOMAINS.items()}, None,
            f"the ESFT sample embedded in the package (~2,000 real tokens per domain; {where}; "
            f"`prism data fetch esft` gets the full set)")


def demo_cluster(ckpt: Path, workloads: dict[str, str]) -> dict[str, Any]:
    """Three heterogeneous servers: memory budgets and emulated links differ."""
    spec = ModelSpec.from_pretrained(ckpt)
    all_experts = spec.total_experts * spec.expert_bytes
    servers = []
    for name, gpu in zip(DOMAINS, ("rtx-3090", "rtx-4090", "a100-40gb"), strict=True):
        s: dict[str, Any] = {"name": name, "gpu": gpu,
                             "memory_gib": round((spec.dense_bytes + MEMORY_SHARE[name] * all_experts) / GIB, 6)}
        s["workload"] = workloads[name]
        servers.append(s)
    return {
        "model": str(ckpt),
        "device": "cpu",
        "servers": servers,
        "network": {"bandwidth_mbps": 500, "latency_ms": 2, "emulate": True, "links": [
            {"between": ["edge-a", "edge-c"], "bandwidth_mbps": 1000, "latency_ms": 1},
            {"between": ["edge-b", "edge-c"], "bandwidth_mbps": 200, "latency_ms": 4}]},
    }


def _prompts(ckpt: Path, data_dir: str | None, workloads: dict[str, str], n: int,
             prompt_tokens: int) -> dict[str, list[list[int]]]:
    """Per server, n prompts as token ids: the real prompts of its domain (repeated when fewer than n)."""
    from transformers import AutoTokenizer

    from prism_moe.stats.workload import load_prompts

    tok = AutoTokenizer.from_pretrained(ckpt)
    out = {}
    for name, source in workloads.items():
        texts = load_prompts(source, data_dir) or [
            f"Request {i} from the users of {name}: explain how experts are placed." for i in range(n)]
        ids = [tok(texts[i % len(texts)]).input_ids[:prompt_tokens] for i in range(n)]
        out[name] = [x for x in ids if x] or [[1]]
    return out


async def _one_request(client: httpx.AsyncClient, url: str, server: str, prompt: list[int],
                       max_tokens: int, model: str) -> RequestResult:
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            if r.status_code != 200:
                return RequestResult(server, time.perf_counter() - t0, 0.0, 0, False, (await r.aread()).decode()[:200])
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return RequestResult(server, time.perf_counter() - t0, 0.0, tokens, False, str(e))
    return RequestResult(server, time.perf_counter() - t0, ttft or 0.0, tokens, True)


async def drive(endpoints: dict[str, str], prompts: dict[str, list[list[int]]], max_tokens: int,
                concurrency: int, model: str, on_done=None) -> list[RequestResult]:
    """Every server's own prompts, `concurrency` at a time per server, all servers at once."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def per_server(name: str) -> list[RequestResult]:
            sem = asyncio.Semaphore(concurrency)

            async def go(p: list[int]) -> RequestResult:
                async with sem:
                    res = await _one_request(client, endpoints[name], name, p, max_tokens, model)
                    if on_done:
                        on_done(res)
                    return res
            return list(await asyncio.gather(*(go(p) for p in prompts[name])))
        parts = await asyncio.gather(*(per_server(n) for n in endpoints))
    return [r for part in parts for r in part]


def _peer_bytes(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("prism_peer_bytes_sent_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_one(algorithm: str, cluster_dict: dict[str, Any], prompts, args, run_dir: Path, console: Console,
            replay: bool) -> tuple[RunResult, Any]:
    from rich.progress import Progress

    from prism_moe.placement.problem import Problem
    from prism_moe.placement.registry import is_plan_algorithm
    from prism_moe.planning import cluster_stats, execution_plan, plan
    from prism_moe.runtime.launcher import start_local_cluster

    cluster = cluster_from_dict(cluster_dict)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_plan_algorithm(algorithm):  # layer blocks on peers: the servers start on the plan file
        p = execution_plan(cluster, algorithm, args.data_dir)
        model = cluster.model_spec()
        demand = Problem.build(cluster_stats(cluster, model, args.data_dir)[0], cluster, model).demand
        path = run_dir / f"plan-{algorithm}.json"
        p.save(path)
        result = RunResult(algorithm, predicted_remote_fraction=p.remote_fraction(demand))
        placement = p.placement
    else:
        planned = plan(cluster, algorithm, args.data_dir)
        path = run_dir / f"placement-{algorithm}.json"
        planned.placement.save(path)
        result = RunResult(algorithm, predicted_remote_fraction=planned.remote_fraction)
        placement = planned.placement
    extra = ["--placement", str(path.resolve()), "--threads", str(max(1, (os.cpu_count() or 1) // 3))]
    extra += ["--replay"] if replay else []
    if args.data_dir:
        extra += ["--data-dir", args.data_dir]
    t0 = time.perf_counter()
    with console.status(f"\\[{algorithm}] starting 3 servers ..."):
        lc = start_local_cluster(cluster, run_dir / algorithm, extra, health_timeout=300, log=lambda *_: None)
    with lc:
        n = sum(len(v) for v in prompts.values())
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task(f"\\[{algorithm}] requests", total=n)
            result.requests = asyncio.run(drive(lc.endpoints(), prompts, args.max_tokens, args.concurrency,
                                                Path(cluster.model).name,
                                                on_done=lambda _: prog.advance(task)))
        for name, url in lc.endpoints().items():
            result.server_stats[name] = httpx.get(f"{url}/prism/stats", timeout=30).json()
            result.cross_server_bytes += _peer_bytes(httpx.get(f"{url}/metrics", timeout=30).text)
    result.wall_s = time.perf_counter() - t0
    return result, placement


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="prism demo: same workload, different placements and plans",
              caption="plan: a placement (every layer at home) or an execution plan (pipeline, hybrid: layer blocks "
                      "on peers); latency per request; remote %: expert invocations computed on another server than "
                      "the layer's (measured by the servers; planned: predicted from the traces); MB sent between "
                      "servers: expert calls and layer-block hand-offs")
    for col in ("plan", "mean s", "p95 s", "TTFT s", "remote %", "planned %", "MB sent", "failed"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["algorithm"], f"{r['mean_latency_s']:.2f}", f"{r['p95_latency_s']:.2f}",
                  f"{r['mean_ttft_s']:.2f}", f"{100 * r['remote_fraction']:.1f}",
                  f"{100 * r['predicted_remote_fraction']:.1f}", f"{r['cross_server_mb']:.1f}", str(r["failed"]))
    console.print(t)


def write_report(out: Path, rows: list[dict[str, Any]], runs: list[RunResult], placements: dict[str, Any],
                 header: str) -> None:
    from prism_moe.demo_plots import plot_invocations, plot_latency, plot_placements

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(json.dumps({"summary": rows, "requests": {
        r.algorithm: [asdict(x) for x in r.requests] for r in runs}}, indent=1))
    cols = list(rows[0])
    md = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    md += ["", "![latency](latency.png)", "![invocations](invocations.png)", "![placements](placements.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    plot_latency(rows, out / "latency.png")
    plot_invocations(runs, out / "invocations.png")
    plot_placements(placements, out / "placements.png")


def _stop_on_sigterm() -> None:
    """SIGTERM ends the demo like Ctrl-C does: the running cluster's processes are stopped on the way out."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(args: Any) -> int:
    _stop_on_sigterm()
    console = Console()
    out = Path(args.out)
    cache = Path(args.cache_dir)
    workloads, args.data_dir, data_words = demo_workloads(args.data_dir)
    console.print(f"routing data: {data_words}; each server replays its domain's real routing trace "
                  f"({', '.join(workloads.values())}) on the tiny model")
    ckpt = tiny_checkpoint(cache, console)
    cluster_dict = demo_cluster(ckpt, workloads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(yaml.safe_dump(cluster_dict, sort_keys=False))
    console.print(f"cluster: 3 servers (memory for {', '.join(f'{int(100 * v)}%' for v in MEMORY_SHARE.values())}"
                  f" of the experts), emulated links 200-1000 Mbps, 1-4 ms; file {out / 'cluster.yaml'}")
    prompts = _prompts(ckpt, args.data_dir, workloads, args.requests, args.prompt_tokens)
    runs, placements = [], {}
    t0 = time.perf_counter()
    for algorithm in args.algorithms:
        res, placement = run_one(algorithm, cluster_dict, prompts, args, out / "runs", console, True)
        runs.append(res)
        placements[algorithm] = placement
        s = res.summary()
        console.print(f"\\[{algorithm}] {s['requests']} requests, mean latency {s['mean_latency_s']:.2f} s, "
                      f"remote {100 * s['remote_fraction']:.1f}%, {s['cross_server_mb']:.1f} MB across servers "
                      f"({res.wall_s:.0f} s)")
    rows = [r.summary() for r in runs]
    print_table(rows, console)
    header = (f"# prism demo report\n\nTiny DeepSeek-V2-shaped model (26x64 experts, top-6, random weights) on 3 "
              f"local servers with emulated links; {args.requests} requests per server, {args.max_tokens} tokens "
              f"each; routing: replay of {data_words} ({', '.join(workloads.values())}). "
              f"Total {time.perf_counter() - t0:.0f} s.")
    write_report(out, rows, runs, placements, header)
    console.print(f"report: {out / 'report.md'} (CSV, JSON and PNG plots beside it)")
    return 1 if any(r["failed"] for r in rows) else 0
