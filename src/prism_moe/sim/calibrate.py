"""Calibrate the simulator's cost model on this machine, for the tiny CPU model the demo serves.

A tiny model on a CPU is not a roofline: its kernels are microseconds of FLOPs under tens of
microseconds of PyTorch/Python overhead per op. So instead of a GPU profile we measure what the
simulator charges for, on the path a server runs (`measure_server_path`: an `EdgeServer` in this
process calling a peer `prism serve` process, through its `Engine`, torch threads=1 as `prism demo`
runs each server):

  dense_layer_s   one MoE layer's non-expert work (attention, norms, router, shared experts) plus its
                  share of the step's rest (embeddings, dense first layer, LM head), per decode step;
  dense_token_s   the same per prefill token (the dense time is max(fixed, tokens x this));
  expert_call_s   fixed cost of one MoE layer's expert work in a decode step (grouping, combine);
  expert_s        per distinct local expert (each expert's small matmuls);
  call_overhead_s what one remote call costs beyond its emulated link and the peer's expert compute:
                  the caller's own work per call (batching, encoding, decoding the reply), the hops onto
                  the transport loop and back, msgpack, ZeroMQ, the peer's service thread;
  step_overhead_s the serving loop's own work between two decode forwards (`Engine`: batch building,
                  sampling, detokenizing, handing tokens to asyncio).

`calibrated_cost(cost, cal)` maps them onto the unchanged `CostModel`: every server gets a profile
whose bandwidth makes `expert_bytes / bandwidth = expert_s`, whose kernel overhead is `expert_call_s`
and whose step overhead is `step_overhead_s`, the dense part's bytes and FLOPs are set so its roofline
gives the measured times, and the call overhead is added to the links' one-way latencies (half
each way).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from prism_moe.hardware import GpuProfile
from prism_moe.sim.cost import CostModel

FLOPS = 1e15  # a nominal FLOP/s: FLOP counts below are seconds x FLOPS


@dataclass(frozen=True)
class Calibration:
    dense_layer_s: float
    dense_token_s: float
    expert_call_s: float
    expert_s: float
    call_overhead_s: float
    step_overhead_s: float = 0.0
    handoff_s: float = 0.0  # a block hand-off round trip beyond link and compute (`measure_handoff`; 0: not measured)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v * 1e6, 1) for k, v in self.__dict__.items()} | {"unit": "us"}


@dataclass
class PathRecords:
    """What `_PathTimer` saw in a serving run; times in seconds on the model's thread.

    forwards: (start, end, tokens) per model forward; layers: (forward index, seconds, seconds waited on
    remote replies, distinct local experts, remote calls) per MoE layer call; calls: (round trip, distinct
    experts) of remote calls whose reply the layer had to wait for (the others came back during the local
    compute: their round trip is only bounded)."""

    forwards: list[tuple[float, float, int]]
    layers: list[tuple[int, float, float, int, int]]
    calls: list[tuple[float, int]]

    def clear(self) -> None:
        for records in (self.forwards, self.layers, self.calls):
            records.clear()


class _PathTimer:
    """Times a running `EdgeServer`: its model's forwards, and in its `ClusterDispatcher` every MoE layer,
    the remote calls it sends and what it waits for them (instance attributes over the methods)."""

    def __init__(self, server: Any) -> None:
        self.rec = PathRecords([], [], [])
        disp = server.dispatcher
        # the runner calls the decoder and the head apart (engine/slots.py): a forward is the decoder's
        decoder = server.model.get_decoder()
        moe_forward, remote, forward = disp.moe_forward, disp.remote, decoder.forward
        layer_state = {"wait": 0.0, "calls": 0}
        rec = self.rec

        class Timed:  # wraps one pending reply
            def __init__(self, reply: Any, t_sent: float, distinct: int) -> None:
                self.reply, self.t_sent, self.distinct = reply, t_sent, distinct

            def result(self, timeout: float | None = None) -> Any:
                t0 = time.perf_counter()
                y = self.reply.result(timeout)
                t1 = time.perf_counter()
                layer_state["wait"] += t1 - t0
                if t1 - t0 > 50e-6:  # it had to wait: the reply came in just now
                    rec.calls.append((t1 - self.t_sent, self.distinct))
                return y

            def cancel(self) -> Any:
                return self.reply.cancel()

        def timed_remote(layer: int, batches: dict) -> dict:
            t0 = time.perf_counter()
            out = remote(layer, batches)
            layer_state["calls"] += len(out)
            return {k: Timed(r, t0, int(batches[k][0].unique().numel())) for k, r in out.items()}

        def timed_moe(layer: int, hidden: Any, top_k_index: Any, top_k_weights: Any, experts: Any) -> Any:
            layer_state["wait"], layer_state["calls"] = 0.0, 0
            t0 = time.perf_counter()
            y = moe_forward(layer, hidden, top_k_index, top_k_weights, experts)
            dt = time.perf_counter() - t0
            local = sum(1 for e in top_k_index.unique().tolist() if e in experts)
            rec.layers.append((len(rec.forwards), dt, layer_state["wait"], local, layer_state["calls"]))
            return y

        def timed_forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", args[0] if args else None)
            t0 = time.perf_counter()
            y = forward(*args, **kwargs)
            rec.forwards.append((t0, time.perf_counter(), int(ids.numel()) if ids is not None else 0))
            return y

        disp.remote, disp.moe_forward, decoder.forward = timed_remote, timed_moe, timed_forward


def fit_server_path(rec: PathRecords, num_layers: int, decode_tokens: int,
                    link_s: float) -> tuple[Calibration, float]:
    """The cost model's terms from a serving run's records (see `measure_server_path`); `link_s`: the
    emulated links' round-trip delay. Returns (calibration, caller's own seconds per remote call).

    decode forwards (at most `decode_tokens` tokens): dense per layer = (forward - its MoE layers) / layers;
    step overhead = the gap between one decode forward's end and the next one's start;
    MoE layers of decode forwards: time - waiting = expert_call + expert x local experts + per_call x calls
        (least squares), per_call being the caller's own work per remote call (grouping, encoding, decoding);
    prefill forwards (more tokens): dense per token = (forward - its MoE layers) / layers / tokens;
    calls: call_overhead = median(round trip - link_s - peer compute) + per_call, where the peer's compute
        is expert_call + expert x its distinct experts (what the simulator charges on the peer's device).
    """
    moe_by_forward: dict[int, float] = {}
    for f, dt, *_ in rec.layers:
        moe_by_forward[f] = moe_by_forward.get(f, 0.0) + dt
    decode = [i for i, (_, _, t) in enumerate(rec.forwards) if 0 < t <= decode_tokens]
    prefill = [i for i, (_, _, t) in enumerate(rec.forwards) if t > decode_tokens]
    if len(decode) < 3 or not prefill:
        raise RuntimeError(f"calibration: {len(decode)} decode and {len(prefill)} prefill forwards recorded; "
                           f"need at least 3 and 1")

    def dense(i: int) -> float:
        start, end, _ = rec.forwards[i]
        return (end - start - moe_by_forward.get(i, 0.0)) / num_layers

    dense_layer = statistics.median(dense(i) for i in decode)
    gaps = [rec.forwards[j][0] - rec.forwards[i][1] for i, j in zip(decode, decode[1:], strict=False) if j == i + 1]
    step = statistics.median(gaps) if gaps else 0.0
    is_decode = set(decode)
    rows = [(1.0, local, calls, dt - wait) for f, dt, wait, local, calls in rec.layers if f in is_decode]
    a = np.array(rows)
    coef, *_ = np.linalg.lstsq(a[:, :3], a[:, 3], rcond=None)
    call, expert, per_call = float(max(coef[0], 0.0)), float(max(coef[1], 1e-7)), float(max(coef[2], 0.0))
    per_token = statistics.median(max(dense(i) - call, 0.0) / rec.forwards[i][2] for i in prefill)
    beyond = [rtt - link_s - (call + expert * k) for rtt, k in rec.calls]
    overhead = max(statistics.median(beyond), 0.0) + per_call if beyond else per_call
    return Calibration(dense_layer, per_token, call, expert, overhead, max(step, 0.0)), per_call


def _calibration_cluster(ckpt: Path, delay_ms: float, emulated: bool) -> tuple[Any, Any]:
    """Two servers on loopback: `cal-a` holds every other expert of each layer, `cal-b` all of them."""
    from prism_moe.config import cluster_from_dict
    from prism_moe.model.spec import GIB, ModelSpec
    from prism_moe.placement.placement import Placement

    spec = ModelSpec.from_pretrained(ckpt)
    memory = round(1.1 * (spec.dense_bytes + spec.total_experts * spec.expert_bytes) / GIB, 6)
    cluster = cluster_from_dict({
        "model": str(ckpt), "device": "cpu",
        "servers": [{"name": "cal-a", "memory_gib": memory}, {"name": "cal-b", "memory_gib": memory}],
        "network": {"bandwidth_mbps": 100_000, "latency_ms": delay_ms, "emulate": emulated}})
    hosts = np.ones((2, spec.num_moe_layers, spec.num_experts), dtype=bool)
    hosts[0, :, 1::2] = False
    return cluster, Placement.from_hosts(cluster.server_names, hosts, np.array([[0.0, 1.0], [1.0, 0.0]]))


def measure_server_path(ckpt: str | Path, replay: str | None = None, data_dir: str | None = None,
                        emulated: bool = True, delay_ms: float = 2.0, batch: int = 4, prompt_tokens: int = 32,
                        new_tokens: int = 16, repeats: int = 3, threads: int = 1,
                        work_dir: str | Path | None = None) -> Calibration:
    """Calibrate on the path `prism serve` runs: a server (`EdgeServer`, in this process, its `Engine` and
    `ClusterDispatcher`, trace replay of `replay` when given) holding half of every layer's experts, whose
    peer (a `prism serve` process) holds them all, over an emulated link of `delay_ms` each way (or the
    direct path when not `emulated`). `repeats` rounds of `batch` requests of `prompt_tokens` random prompt
    tokens and `new_tokens` tokens each; the terms come from `fit_server_path`.

    The dense part, the expert calls and the serving loop are thus timed as they run in a server: with its
    transport thread, its peer's calls and the extra work of a layer that sends some tokens away (which a
    one-process `model.generate` does not show: measured 1.3-1.9 ms per layer in a server against 0.9 ms in
    `generate` on this machine).
    """
    import asyncio
    import tempfile

    import torch

    from prism_moe.runtime.launcher import start_local_cluster
    from prism_moe.runtime.server import EdgeServer, ServeOptions

    torch.set_num_threads(threads)
    ckpt = Path(ckpt)
    cluster, placement = _calibration_cluster(ckpt, delay_ms, emulated)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "placement.json"
        placement.save(path)
        with start_local_cluster(cluster, Path(tmp) / "run", ["--placement", str(path), "--threads", str(threads)],
                                 log=lambda *_: None, only=["cal-b"]) as lc:
            server = EdgeServer(lc.cluster, "cal-a", ServeOptions(
                placement=placement, device="cpu", replay=replay, data_dir=data_dir, max_running=batch))
            server.start()
            try:
                timer = _PathTimer(server)
                vocab = server.model.config.vocab_size
                g = torch.Generator().manual_seed(0)

                async def round_() -> None:
                    prompts = torch.randint(3, vocab, (batch, prompt_tokens), generator=g).tolist()
                    await asyncio.gather(*(server.engine.generate(p, new_tokens, stop_token_ids=[]) for p in prompts))

                server.engine.start()
                asyncio.run(round_())  # warm up
                timer.rec.clear()  # the warm-up's records out
                for _ in range(repeats):
                    asyncio.run(round_())
            finally:
                server.close()
    link_s = 2 * delay_ms / 1e3 if emulated else 0.0
    cal, _ = fit_server_path(timer.rec, placement.num_layers, batch, link_s)
    return cal


def measure_handoff(ckpt: str | Path, batch: int = 4, prompt_tokens: int = 32, new_tokens: int = 16,
                    repeats: int = 7, threads: int = 1, delay_ms: float = 2.0, emulated: bool = True,
                    work_dir: str | Path | None = None) -> float:
    """Seconds one block hand-off round trip costs beyond its emulated link delay and the block's compute, on
    the path `prism serve` runs plans (`PlanRunner` -> `BlockClient` -> the peer's `BlockExecutor` on its
    `blocks` worker): the caller's encoding and decoding, ZeroMQ, the peer's service thread and worker hop, its
    decoder call around the block (masks, positions, cache bookkeeping).

    A server (`EdgeServer` in this process, holding the whole model) runs rounds of `batch` requests alternately
    with every layer at home and with its second half of MoE layers handed to a peer `prism serve` process
    (the whole model too) over an emulated link of `delay_ms` each way: one round trip per forward. The median
    over `repeats` pairs of neighbouring rounds of the difference of their median decode forwards, less the
    link's round trip, is the hand-off's cost (the block runs on the peer instead of here: the same
    single-threaded compute either way). On a shared machine it varies with the load (0-6.6 ms measured here).
    """
    import asyncio
    import tempfile

    import torch

    from prism_moe.placement.plan import ExecutionPlan
    from prism_moe.runtime.engine.plans import Route
    from prism_moe.runtime.launcher import start_local_cluster
    from prism_moe.runtime.server import EdgeServer, ServeOptions

    torch.set_num_threads(threads)
    ckpt = Path(ckpt)
    cluster, placement = _calibration_cluster(ckpt, delay_ms, emulated)
    placement = type(placement).from_hosts(placement.server_names, np.ones_like(placement.hosts),
                                           np.array([[0.0, 1.0], [1.0, 0.0]]))  # both hold every expert
    layers = placement.num_layers
    executor = np.zeros((2, layers), dtype=np.int64)
    executor[1] = 1
    executor[0, layers // 2:] = 1  # cal-a's second half runs on cal-b
    plan = ExecutionPlan(placement, executor, np.ones((2, layers), dtype=bool), "calibration")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "plan.json"
        plan.save(path)
        with start_local_cluster(cluster, Path(tmp) / "run", ["--placement", str(path), "--threads", str(threads)],
                                 log=lambda *_: None, only=["cal-b"]) as lc:
            server = EdgeServer(lc.cluster, "cal-a", ServeOptions(placement=placement, plan=plan, device="cpu",
                                                                   max_running=batch))
            server.start()
            try:
                timer = _PathTimer(server)
                vocab = server.model.config.vocab_size
                g = torch.Generator().manual_seed(0)
                routes = {"handoff": server._route(plan), "home": Route.local(layers, plan.placement.version)}
                diffs: list[float] = []  # per pair of neighbouring rounds: the load drifts slower than a pair

                async def round_() -> None:
                    prompts = torch.randint(3, vocab, (batch, prompt_tokens), generator=g).tolist()
                    await asyncio.gather(*(server.engine.generate(p, new_tokens, stop_token_ids=[]) for p in prompts))

                def decode_median(key: str) -> float:
                    server.engine.runner.set_route(routes[key])
                    timer.rec.clear()
                    asyncio.run(round_())
                    return statistics.median(end - start for start, end, t in timer.rec.forwards if 0 < t <= batch)

                server.engine.start()
                decode_median("handoff"), decode_median("home")  # warm both routes up
                for _ in range(repeats):
                    diffs.append(decode_median("handoff") - decode_median("home"))
            finally:
                server.close()
    link_s = 2 * delay_ms / 1e3 if emulated else 0.0
    return max(statistics.median(diffs) - link_s, 0.0)


def calibrate(ckpt: str | Path, threads: int = 1, emulated: bool = True, batch: int = 4,
              replay: str | None = None, data_dir: str | None = None, prompt_tokens: int = 32,
              contention: int = 0, handoff: bool = False) -> Calibration:
    """`measure_server_path` for `ckpt` (`emulated`: the cluster emulates its links; `batch`: requests per
    step; `replay`: the workload whose trace the servers replay, if they do; `prompt_tokens`: the prompts'
    length).

    `contention`: measure while that many other processes run the model's forwards nonstop (`_busy`), as
    when the cluster's other servers share this machine's cores. The simulator gives every server its own
    device, so a local cluster on fewer cores than servers is modelled by calibrating under its load. This
    is an upper bound: real peers also idle while they wait on the network. `handoff`: also measure a block
    hand-off's cost (`measure_handoff`, under the same load).
    """
    import subprocess
    import sys

    code = f"from prism_moe.sim.calibrate import _busy; _busy({str(ckpt)!r}, {threads})"
    load = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(contention)]
    try:
        if load:
            time.sleep(5.0)  # let them load the model and start computing
        cal = measure_server_path(ckpt, replay, data_dir, emulated=emulated, batch=batch,
                                  prompt_tokens=prompt_tokens, threads=threads)
        if handoff:
            cal = replace(cal, handoff_s=measure_handoff(ckpt, batch=batch, prompt_tokens=prompt_tokens,
                                                         threads=threads, emulated=emulated))
        return cal
    finally:
        for proc in load:
            proc.kill()
            proc.wait()


def _busy(ckpt: str, threads: int) -> None:
    """Background load for `calibrate(contention=...)`: decode-sized forwards of the model until killed."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(3, model.config.vocab_size, (4, 1))
    with torch.inference_mode():
        while True:
            model(ids)


def calibrated_cost(cost: CostModel, cal: Calibration, slowdown: float | Sequence[float] = 1.0) -> CostModel:
    """`cost` with every server's compute and the call overhead as measured in `cal`, all of it `slowdown` x
    slower (one factor, or one per server): e.g. servers / cores when a local cluster's servers share one
    machine's cores (the simulator gives each server a device of its own; both terms are CPU work here; see
    `shared_cores_slowdown`). A call's overhead is slowed by the mean of its two ends' factors. A block hand-off
    pays `cal.handoff_s` (when measured) per round trip, half each way, instead of the expert call's overhead
    that the links' latencies carry."""
    f = np.broadcast_to(np.asarray(slowdown, dtype=np.float64), (cost.num_servers,))
    bw = cost.expert_bytes / cal.expert_s  # bytes/s: one distinct expert costs expert_s
    profiles = tuple(GpuProfile("cpu-calibrated", 1e3, bw / x / 1e9, FLOPS / 1e12 / x,
                                kernel_overhead_s=cal.expert_call_s * x, source="measured: prism_moe.sim.calibrate",
                                step_overhead_s=cal.step_overhead_s * x) for x in f.tolist())
    pair = (f[:, None] + f[None, :]) / 2
    lat = cost.latency_s + (1 - np.eye(cost.num_servers)) * cal.call_overhead_s * pair / 2
    handoff = (cal.handoff_s - cal.call_overhead_s) * float(f.mean()) / 2 if cal.handoff_s > 0 else 0.0
    return replace(cost, profiles=profiles, latency_s=lat, expert_flops_per_pair=0.0,
                   dense_layer_bytes=max(cal.dense_layer_s - cal.expert_call_s, 0.0) * bw,
                   dense_layer_flops_per_token=cal.dense_token_s * FLOPS, handoff_overhead_s=handoff)


def shared_cores_slowdown(busy_s: Sequence[float], makespan_s: float, cores: int,
                          host_s: float = 0.0) -> np.ndarray:
    """Per server, how much slower its CPU work runs when the servers share `cores` cores: a server busy
    `busy_s[s]` of `makespan_s` (a simulation where each has a device of its own) shares the machine, while it
    computes, with the others' expected load (their utilisations): max(1, (1 + sum of the others') / cores).
    `host_s`: CPU seconds the simulation counts as latency, not as busy (the calls' and hand-offs' own work:
    encoding, ZeroMQ, service threads), spread evenly over the servers."""
    busy = np.asarray(busy_s, dtype=np.float64) + host_s / len(busy_s)
    u = np.minimum(busy / max(makespan_s, 1e-12), 1.0)
    return np.maximum(1.0, (1.0 + u.sum() - u) / cores)
