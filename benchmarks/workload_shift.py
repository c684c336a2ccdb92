"""Workload shift and server failure on a live 3-server cluster, with the coordinator re-placing experts.

A tiny random-weight model with DeepSeek-V2-Lite's routing shape (26 MoE layers x 64 routed experts,
top-6, 2 shared experts) serves on three local `prism serve` processes; the routers replay real ESFT
traces (`--replay`), so expert demand is that of the real model on each server's domain. Each server
holds about half of the experts (slots for 1.5 copies of the model's experts in all); the starting
placement is the default algorithm's on the starting domains. Streaming clients keep every server busy.

Scenario `shift`: every server switches to another domain mid-run. The coordinator (in this process,
the same code `prism coordinator` runs) detects each server's shift, decides, and migrates live. Printed:
remote fraction of routed (token, expert) pairs before the shift, after it until the first migration
starts, and after the last migration the shift caused, next to the exact optimum (flow) for the new
workloads' traces; migrations, bytes against the minimal move set, and the longest gap between two
tokens of a stream that overlaps a migration (max_stall_ms; by step: load, switch, drop), next to the
longest gap of the phase before the shift (same traffic, no migration) and a remote call's median round
trip.

Scenario `kill`: one server is killed mid-run (SIGKILL). Survivors route to remaining replicas at once;
the coordinator marks it down and re-hosts the experts it held alone. Printed as above, plus
recovered_seconds (kill -> repair placement serving) and the requests that failed on the survivors.

Ratios and times of one run on this machine; no pass/fail. Takes 3-5 minutes on 2 CPU cores.

    python benchmarks/workload_shift.py [--scenario both|shift|kill] [--phase 30] [--clients 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.planning import plan
from prism_moe.runtime.launcher import start_local_cluster
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

NAMES = ["edge-a", "edge-b", "edge-c"]
BEFORE = {"edge-a": "esft:intent", "edge-b": "esft:law", "edge-c": "esft:summary"}
AFTER = {"edge-a": "esft:translation", "edge-b": "esft:intent", "edge-c": "esft:law"}


class Traffic:
    """Streaming completions against every server; records outcomes, token gaps and routing counters."""

    def __init__(self, urls: dict[str, str], model: str, clients: int, max_tokens: int) -> None:
        self.urls, self.model, self.clients, self.max_tokens = urls, model, clients, max_tokens
        self.requests: list[dict[str, Any]] = []  # server, start, end, ok, error
        self.gaps: list[tuple[float, float]] = []  # (time of the later token, gap seconds)
        self.samples: list[tuple[float, dict[str, tuple[int, int]]]] = []  # (time, {server: (local, remote)})
        self.active = set(urls)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(self._client(http, n)) for n in self.urls for _ in range(self.clients)]
            tasks.append(asyncio.create_task(self._sampler(http)))
            await self._stop.wait()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, http: httpx.AsyncClient, name: str) -> None:
        while not self._stop.is_set() and name in self.active:
            t0, last, err = time.time(), None, None
            try:
                async with http.stream("POST", f"{self.urls[name]}/v1/completions", json={
                        "model": self.model, "prompt": "The edge server", "max_tokens": self.max_tokens,
                        "temperature": 0, "stream": True, "ignore_eos": True}) as r:
                    if r.status_code != 200:
                        err = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            err = str(chunk["error"])[:200]
                        now = time.time()
                        if last is not None:
                            self.gaps.append((now, now - last))
                        last = now
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                err = f"{type(e).__name__}: {e}"
            self.requests.append({"server": name, "start": t0, "end": time.time(), "ok": err is None,
                                  "error": err})
            if err is not None:
                await asyncio.sleep(0.2)

    async def _sampler(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            snap = {}
            for n in list(self.active):
                try:
                    s = (await http.get(f"{self.urls[n]}/prism/stats", timeout=2)).json()
                    snap[n] = (s["routed_local"], s["routed_remote"])
                except (httpx.HTTPError, ValueError):
                    pass
            self.samples.append((time.time(), snap))
            await asyncio.sleep(0.25)

    def remote_fraction(self, t0: float, t1: float, servers: list[str]) -> float | None:
        """Remote share of routed pairs between the samples nearest t0 and t1, over `servers`."""
        def at(t: float) -> dict[str, tuple[int, int]]:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        a, b = at(t0), at(t1)
        loc = sum(b[n][0] - a[n][0] for n in servers if n in a and n in b)
        rem = sum(b[n][1] - a[n][1] for n in servers if n in a and n in b)
        return round(rem / (loc + rem), 4) if loc + rem > 0 else None

    def wait_requests(self, after: float, n: int = 1) -> bool:
        return all(sum(1 for r in self.requests if r["server"] == s and r["start"] >= after and r["ok"]) >= n
                   for s in self.active)


async def _until(cond, timeout: float, step: float = 0.25) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return False


def _stall(traffic: Traffic, windows: list[tuple[float, float]]) -> float | None:
    """The longest gap between two tokens of a stream that overlaps any of `windows`, ms."""
    gaps = [g for t, g in traffic.gaps if any(t - g <= w1 and t >= w0 for w0, w1 in windows)]
    return round(max(gaps) * 1e3, 1) if gaps else None


def _stall_by_step(traffic: Traffic, reports: list[Any]) -> dict[str, float | None]:
    """The longest token gap overlapping each kind of migration step (load, switch, drop)."""
    out: dict[str, float | None] = {}
    for step in ("load", "switch", "drop"):
        out[step] = _stall(traffic, [(t0, t1) for m in reports for name, t0, t1 in m.phases if name == step])
    return out


async def _remote_call_p50_ms(urls: dict[str, str]) -> float | None:
    """Median over servers of their median remote expert call round trip (from /prism/stats), ms."""
    vals = []
    async with httpx.AsyncClient(timeout=10) as http:
        for url in urls.values():
            try:
                v = (await http.get(f"{url}/prism/stats")).json().get("remote_call_p50_s")
            except (httpx.HTTPError, ValueError):
                continue
            if v is not None:
                vals.append(v)
    return round(statistics.median(vals) * 1e3, 2) if vals else None


def _optimum_after_shift(cluster: Any, data_dir: str | None, end: Any) -> dict[str, Any]:
    """The exact optimum (flow) for the new workloads, and the placement the coordinator ended at, both
    scored on the new workloads' trace counts."""
    servers = [s.model_copy(update={"workload": AFTER[s.name]}) for s in cluster.servers]
    best = plan(cluster.model_copy(update={"servers": servers}), "flow", data_dir)
    demand = best.problem.demand
    return {"remote_fraction_optimal_for_new_workload": round(best.remote_fraction, 4),
            "remote_fraction_planned_after_migration": round(end.remote_fraction(demand), 4)}


def _migration_summary(reports: list[Any], expert_bytes: int, start: Any = None, end: Any = None,
                       live: list[bool] | None = None) -> dict[str, Any]:
    """`start`, `end`: the placements before the first and after the last migration. The minimal move set
    is what `end` holds on a live server that `start` lacks there (cost.migration_bytes start -> end)."""
    migrated = sum(m.experts_loaded for m in reports) * expert_bytes
    minimal = None
    if start is not None and end is not None:
        added = end.hosts & ~start.hosts
        minimal = int(added[live].sum() if live is not None else added.sum()) * expert_bytes
    return {"migrations": sum(1 for m in reports if m.ok),
            "bytes_migrated": migrated,
            "minimal_bytes": minimal,
            "bytes_migrated_over_minimal": round(migrated / minimal, 3) if minimal else None,
            "minimal_bytes_per_migration": [m.minimal_bytes for m in reports],
            "bytes_over_links": sum(m.bytes_moved for m in reports),
            "migration_seconds": [round(m.seconds, 3) for m in reports],
            "migration_steps_seconds": [[(name, round(t1 - t0, 3)) for name, t0, t1 in m.phases] for m in reports],
            "planned_seconds": [round(m.planned_seconds, 4) for m in reports]}


async def shift_scenario(lc: Any, coord: Coordinator, traffic: Traffic, phase: float, spec: ModelSpec,
                         data_dir: str | None = None) -> dict:
    urls = lc.endpoints()
    await _until(lambda: traffic.wait_requests(0.0), 120)
    t0 = time.time()
    await asyncio.sleep(phase)
    t_shift = time.time()
    n_before = len(coord.migrations)
    p_start = coord.placement
    async with httpx.AsyncClient(timeout=30) as http:
        for n in NAMES:
            r = await http.post(f"{urls[n]}/prism/replay", json={"workload": AFTER[n]})
            r.raise_for_status()
    def after_shift() -> list:
        return [m for m in list(coord.migrations)[n_before:] if m.started_at >= t_shift]

    def settled() -> bool:  # migrated since the shift, and no new migration for a detection window
        ms = [m for m in after_shift() if m.ok]
        return bool(ms) and not coord.migrating and time.time() - ms[-1].finished_at > coord.config.window

    await _until(settled, 4 * phase)
    await _until(lambda: not coord.migrating, 2 * phase)
    reports = after_shift()
    p_end = coord.placement
    migrated = any(m.ok for m in reports)
    ok = [m for m in reports if m.ok]
    t_mig0 = ok[0].started_at if ok else time.time()
    t_mig1 = ok[-1].finished_at if ok else time.time()
    await asyncio.sleep(phase)
    t_end = time.time()
    reqs = [r for r in traffic.requests if t0 <= r["start"] <= t_end]
    shifts = [e for e in coord.events if e["kind"] == "shift" and e["time"] >= t_shift]
    detected = {e["server"]: round(e["time"] - t_shift, 2) for e in reversed(shifts)}
    after = traffic.remote_fraction(t_mig1, t_end, NAMES) if migrated else None
    optimum = _optimum_after_shift(lc.cluster, data_dir, p_end)
    best = optimum["remote_fraction_optimal_for_new_workload"]
    return {
        "scenario": "shift", "requests": len(reqs), "failed_requests": sum(not r["ok"] for r in reqs),
        "remote_fraction_before_shift": traffic.remote_fraction(t0, t_shift, NAMES),
        "remote_fraction_after_shift_before_migration": traffic.remote_fraction(t_shift, t_mig0, NAMES),
        "remote_fraction_after_migration": after,
        **optimum,
        "after_migration_over_optimum": round(after / best, 3) if after is not None and best else None,
        "migrations_after_shift": len(ok),
        "migrations_after_settling": len([m for m in coord.migrations if m.ok and m.started_at > t_mig1]),
        **_migration_summary(reports, spec.expert_bytes, p_start, p_end),
        "max_stall_ms": _stall(traffic, [(m.started_at, m.finished_at) for m in reports]),
        "max_stall_ms_by_step": _stall_by_step(traffic, reports),
        "max_token_gap_before_shift_ms": _stall(traffic, [(t0, t_shift)]),  # same traffic, no migration
        "remote_call_p50_ms": await _remote_call_p50_ms(urls),
        "median_token_gap_ms": round(statistics.median(g for _, g in traffic.gaps) * 1e3, 1),
        "shift_detected_after_s": detected,
        "migration_started_after_shift_s": round(t_mig0 - t_shift, 2) if ok else None,
        "decision": coord.last_decision.to_dict() if coord.last_decision else None,
    }


async def kill_scenario(lc: Any, coord: Coordinator, traffic: Traffic, phase: float, spec: ModelSpec,
                        victim: str = "edge-c") -> dict:
    survivors = [n for n in NAMES if n != victim]
    t0 = time.time()
    await asyncio.sleep(phase)
    n_before = len(coord.migrations)
    p_start = coord.placement
    t_kill = time.time()
    os.killpg(lc.procs[victim].pid, signal.SIGKILL)
    traffic.active.discard(victim)  # its own users are gone with it
    repaired = await _until(lambda: any(m.ok for m in list(coord.migrations)[n_before:])
                            or (not coord.servers[victim].live and coord.error is None
                                and coord.placement.hosts[[NAMES.index(n) for n in survivors]].any(0).all()),
                            4 * phase)
    reports = list(coord.migrations)[n_before:]
    p_end = coord.placement
    ok = [m for m in reports if m.ok]
    t_rep0 = ok[0].started_at if ok else time.time()
    t_rep1 = ok[-1].finished_at if ok else time.time()
    await _until(lambda: traffic.wait_requests(t_rep1), 60)
    await asyncio.sleep(phase)
    t_end = time.time()
    reqs = [r for r in traffic.requests if t0 <= r["start"] <= t_end and r["server"] in survivors]
    lost = [r for r in traffic.requests if r["server"] == victim and r["end"] >= t_kill and not r["ok"]]
    failed = [r for r in reqs if not r["ok"]]
    down = [e for e in coord.events if e["kind"] == "down" and e["time"] >= t_kill]
    return {
        "scenario": "kill", "killed": victim, "requests": len(reqs), "failed_requests": len(failed),
        "requests_lost_on_killed_server": len(lost),
        "remote_fraction_before_kill": traffic.remote_fraction(t0, t_kill, survivors),
        "remote_fraction_after_kill_before_repair": traffic.remote_fraction(t_kill, t_rep0, survivors),
        "remote_fraction_after_repair": traffic.remote_fraction(t_rep1, t_end, survivors) if repaired else None,
        **_migration_summary(reports, spec.expert_bytes, p_start, p_end,
                             [n != victim for n in NAMES]),
        "max_stall_ms": _stall(traffic, [(t_kill, t_rep1)]),
        "marked_down_after_s": round(down[0]["time"] - t_kill, 2) if down else None,
        "recovered_seconds": round(t_rep1 - t_kill, 2) if repaired else None,
        "last_failure_after_kill_s": round(max(r["end"] for r in failed) - t_kill, 2) if failed else None,
        "cluster_error": coord.error,
    }


async def main_async(args: argparse.Namespace) -> list[dict]:
    # one compute thread per server process: three busy-waiting OpenMP pools on two cores stall for seconds
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="prism-shift-"))
    ckpt = make_tiny_model("deepseek_v2", tmp / "ckpt", num_hidden_layers=27, n_routed_experts=64,
                           num_experts_per_tok=6, n_shared_experts=2)
    spec = ModelSpec.from_pretrained(ckpt)
    slots = round(1.5 * spec.total_experts / 3)
    memory_gib = (spec.dense_bytes + (slots + 0.5) * spec.expert_bytes) / GIB
    cluster = cluster_from_dict({"model": str(ckpt), "device": "cpu", "servers": [
        {"name": n, "memory_gib": memory_gib, "workload": BEFORE[n]} for n in NAMES]})
    placement = plan(cluster, data_dir=args.data_dir).placement
    placement.save(tmp / "placement.json")
    extra = ["--placement", str(tmp / "placement.json"), "--replay", "--timeout", "2"]
    if args.data_dir:
        extra += ["--data-dir", args.data_dir]
    results = []
    lc = start_local_cluster(cluster, tmp / "run", extra, health_timeout=240, log=lambda *_: None)
    config = CoordinatorConfig(period=args.period, poll_interval=0.5, down_after=1.5, half_life=120.0,
                               window=args.window, shift_threshold=args.shift_threshold, min_shift_invocations=args.min_shift,
                               margin=0.1, transfer=args.transfer, settle=args.settle)
    coord = Coordinator(lc.cluster, config, placement=placement, model=spec)
    try:
        coord.start()
        traffic = Traffic(lc.endpoints(), ckpt.name, args.clients, args.max_tokens)
        runner = asyncio.create_task(traffic.run())
        if args.scenario in ("both", "shift"):
            results.append(await shift_scenario(lc, coord, traffic, args.phase, spec, args.data_dir))
            print(json.dumps(results[-1]), flush=True)
        if args.scenario in ("both", "kill"):
            results.append(await kill_scenario(lc, coord, traffic, args.phase, spec))
            print(json.dumps(results[-1]), flush=True)
        traffic.stop()
        await runner
        if args.events:
            for e in coord.events:
                print(json.dumps(e), file=sys.stderr)
    finally:
        coord.stop()
        lc.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=["both", "shift", "kill"], default="both")
    ap.add_argument("--phase", type=float, default=30.0, help="seconds of traffic per phase")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streams per server")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--window", type=float, default=20.0, help="coordinator's shift-detection window, s")
    ap.add_argument("--min-shift", type=float, default=1000.0, help="invocations per layer before a shift counts")
    ap.add_argument("--shift-threshold", type=float, default=0.27, help="mean TV distance that is a shift")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="after a shift, seconds without another before the one re-plan")
    ap.add_argument("--period", type=float, default=30.0, help="coordinator period (and cost horizon), s")
    ap.add_argument("--transfer", choices=["auto", "checkpoint", "peer"], default="peer")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--events", action="store_true", help="print the coordinator's events to stderr")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
