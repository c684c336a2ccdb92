"""Calibrate the simulator's cost model on this machine, for the tiny CPU model the demo serves.

A tiny model on a CPU is not a roofline: its kernels are microseconds of FLOPs under tens of
microseconds of PyTorch/Python overhead per op. So instead of a GPU profile we measure what the
simulator charges for, with torch threads=1 (as `prism demo` runs each server):

  dense_layer_s   one MoE layer's non-expert work (attention, norms, router, shared experts) plus its
                  share of the step's rest (embeddings, dense first layer, LM head), per decode step;
  dense_token_s   the same per prefill token (the dense time is max(fixed, tokens x this));
  expert_call_s   fixed cost of one grouped expert call in a decode step (dispatch, grouping, combine);
  expert_s        per distinct expert in the call (each expert's small matmuls);
  call_overhead_s one loopback round trip through the project's transport, on top of the emulated link:
                  the path a cluster with emulated links takes (the hop onto the transport loop, msgpack,
                  ZeroMQ, the service's compute thread), or the direct path of real links;
  step_overhead_s the serving loop's own work per decode step (`Engine`: batch building, sampling,
                  detokenizing, handing tokens to asyncio): the Engine's step minus `model.generate`'s
                  on the same batch, by the difference method.

`calibrated_cost(cost, cal)` maps them onto the unchanged `CostModel`: every server gets a profile
whose bandwidth makes `expert_bytes / bandwidth = expert_s`, whose kernel overhead is `expert_call_s`
and whose step overhead is `step_overhead_s`, the dense part's bytes and FLOPs are set so its roofline
gives the measured times, and the transport round trip is added to the links' one-way latencies (half
each way).
"""

from __future__ import annotations

import statistics
import time
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

    def as_dict(self) -> dict[str, float]:
        return {k: round(v * 1e6, 1) for k, v in self.__dict__.items()} | {"unit": "us"}


class _Timed:
    """A dispatcher wrapper that records (distinct experts, seconds) of every routed-experts call."""

    def __init__(self, inner: Any, calls: list[tuple[int, float]]) -> None:
        self.inner, self.calls = inner, calls

    def moe_forward(self, layer: int, hidden: Any, top_k_index: Any, top_k_weights: Any, experts: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner.moe_forward(layer, hidden, top_k_index, top_k_weights, experts)
        self.calls.append((int(top_k_index.unique().numel()), time.perf_counter() - t0))
        return out


def measure_model(ckpt: str | Path, batch_tokens: tuple[int, ...] = (1, 4, 16, 64), repeats: int = 5,
                  threads: int = 1, replay: Any = None, decode_batches: tuple[int, ...] = (1, 4),
                  decode_tokens: int = 16) -> tuple[float, float, float, float]:
    """(dense_layer_s, dense_token_s, expert_call_s, expert_s), timing every routed-experts call; dense =
    the rest of the forward / MoE layers. `dense_token_s` comes from prefill forwards of `batch_tokens`
    tokens; the fixed dense cost per layer and the expert calls from decode steps (`model.generate` with
    its KV cache) of `decode_batches` sequences, where attention and cache work cost more per layer than a
    prefill's share suggests.

    The experts go through the dispatcher stack `prism serve` runs: the `ClusterDispatcher` (activation
    counting, routing table, frozen store) of a one-server placement holding every expert, under trace
    replay when `replay` (a `RoutingTrace`) is given, as with `prism serve --replay`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    from prism_moe.model.experts import attach
    from prism_moe.model.replay import ReplayDispatcher, ReplayRouting
    from prism_moe.model.spec import ModelSpec
    from prism_moe.runtime.dispatch import ClusterDispatcher

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    calls: list[tuple[int, float]] = []  # (distinct experts, seconds) per experts call
    dispatcher: Any = _Timed(ClusterDispatcher.all_local(spec.num_moe_layers, spec.num_experts), calls)
    if replay is not None:
        dispatcher = ReplayDispatcher(dispatcher, ReplayRouting(replay.experts, replay.weights, wrap=True))
    attach(model, dispatcher, spec)
    n_moe = spec.num_moe_layers
    # prefill: one sequence of t tokens per forward, for the dense part's cost per extra token
    dense: dict[int, float] = {}
    with torch.inference_mode():
        for t in batch_tokens:
            ids = torch.randint(3, model.config.vocab_size, (1, t))
            model(ids)  # warm up
            per = []
            for _ in range(repeats):
                calls.clear()
                t0 = time.perf_counter()
                model(ids)
                total = time.perf_counter() - t0
                per.append((total - sum(s for _, s in calls)) / n_moe)
            dense[t] = statistics.median(per)
    # decode: steps with a KV cache (what most of a request's time is), for the dense part's fixed cost per
    # layer and the expert calls' cost; per step by the difference method: (N new tokens - 1) / (N - 1)
    decode_dense: list[float] = []
    every: list[tuple[int, float]] = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in decode_batches:
            prompts = torch.randint(3, model.config.vocab_size, (b, 32), generator=g)

            def generate(n: int, prompts: Any = prompts) -> tuple[float, float, list[tuple[int, float]]]:
                calls.clear()
                t0 = time.perf_counter()
                model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)
                return time.perf_counter() - t0, sum(s for _, s in calls), list(calls)

            generate(2)  # warm up
            for _ in range(max(1, repeats // 2)):
                (t_n, e_n, c_n), (t_1, e_1, c_1) = generate(decode_tokens), generate(1)
                decode_dense.append(((t_n - t_1) - (e_n - e_1)) / (decode_tokens - 1) / n_moe)
                every.extend(c_n[len(c_1):])  # the decode steps' expert calls
    # expert call = a + b x distinct experts (least squares over the decode calls)
    d = np.array([c[0] for c in every], dtype=float)
    s = np.array([c[1] for c in every])
    b, a = np.polyfit(d, s, 1) if np.ptp(d) > 0 else (s.mean() / max(d.mean(), 1), 0.0)
    big = max(batch_tokens)
    return statistics.median(decode_dense), dense[big] / big, float(max(a, 0.0)), float(max(b, 1e-7))


def measure_transport(hidden_size: int = 64, tokens: int = 4, samples: int = 300, emulated: bool = True,
                      delay_ms: float = 2.0) -> float:
    """Seconds one expert call costs on loopback beyond what the links account for, by the path
    `prism serve` takes, against an expert service in another process (as in a cluster): with `emulated`
    links, through the transport loop and an emulated link of `delay_ms` each way (its timers wake on the
    loop's millisecond clock) to a service computing in a worker thread; else direct
    (`SyncPeerPool.start_call`) to an inline service. Returns the median round trip minus 2 x delay."""
    import subprocess
    import sys

    import torch

    from prism_moe.runtime.emulation import LinkProfile
    from prism_moe.runtime.transport import SyncPeerPool

    code = ("import sys; from prism_moe.sim.calibrate import _serve_identity; "
            f"_serve_identity({hidden_size}, {1 if emulated else 0})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pool = None
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        if not endpoint:
            raise RuntimeError("calibration: the expert service process did not start")
        links = {"peer": LinkProfile(delay_ms=delay_ms)} if emulated else {}
        pool = SyncPeerPool({"peer": endpoint}, links=links, timeout=10.0, retries=0)
        h, ids = torch.randn(tokens, hidden_size), torch.zeros(tokens, dtype=torch.long)

        def once() -> float:
            t0 = time.perf_counter()
            pool.start_call("peer", 0, ids, h).result()
            return time.perf_counter() - t0

        for _ in range(20):
            once()
        rtt = statistics.median(once() for _ in range(samples))
        return max(rtt - (2 * delay_ms / 1e3 if emulated else 0.0), 0.0)
    finally:
        if pool is not None:
            pool.close()
        proc.kill()
        proc.wait()


def _serve_identity(hidden_size: int, compute_threads: int) -> None:
    """The service side of `measure_transport` (run in a child process until killed)."""
    from prism_moe.runtime.transport import ExpertService, LoopThread

    def identity(layer: int, ids: Any, h: Any) -> Any:
        return h

    with LoopThread("calib-service") as lt:
        svc = ExpertService("tcp://127.0.0.1:*", identity, num_layers=64, num_experts=64, hidden_size=hidden_size,
                            compute_threads=compute_threads)
        print(lt.run(svc.start()), flush=True)
        while True:
            time.sleep(3600)


def measure_step_overhead(ckpt: str | Path, batch: int = 4, prompt_tokens: int = 32, new_tokens: int = 24,
                          repeats: int = 5, threads: int = 1) -> float:
    """Seconds the serving loop adds to one decode step of `batch` requests: `Engine` (what `prism serve`
    runs, detokenizing included) minus `model.generate`, both on the prism experts hook, per step as
    (time for N tokens - time for 1) / (N - 1). Clipped at 0."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prism_moe.model.experts import LocalDispatcher, attach
    from prism_moe.runtime.engine import Engine

    torch.set_num_threads(threads)

    def load() -> Any:
        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        attach(model, LocalDispatcher())
        return model

    gen_model, eng_model = load(), load()
    engine = Engine(eng_model, AutoTokenizer.from_pretrained(ckpt), "cpu", max_running=batch,
                    kv_cache_tokens=batch * (prompt_tokens + new_tokens) + 64)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, gen_model.config.vocab_size, (batch, prompt_tokens), generator=g)

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen_model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    def serve(n: int) -> float:
        async def run() -> None:
            await asyncio.gather(*(engine.generate(p, n, stop_token_ids=[]) for p in prompts.tolist()))

        t0 = time.perf_counter()
        asyncio.run(run())
        return time.perf_counter() - t0

    engine.start()
    try:
        serve(2), generate(2)  # warm up
        diffs = []
        for _ in range(repeats):  # interleaved, so load changes hit both alike
            eng = (serve(new_tokens) - serve(1)) / (new_tokens - 1)
            gen = (generate(new_tokens) - generate(1)) / (new_tokens - 1)
            diffs.append(eng - gen)
    finally:
        engine.stop()
    return max(statistics.median(diffs), 0.0)


def calibrate(ckpt: str | Path, threads: int = 1, emulated: bool = True, batch: int = 4,
              replay: Any = None, contention: int = 0) -> Calibration:
    """Everything above for `ckpt` (`emulated`: the cluster emulates its links; `batch`: requests per step;
    `replay`: the `RoutingTrace` the servers replay, if they do).

    `contention`: measure while that many other processes run the model's forwards nonstop (`_busy`), as
    when the cluster's other servers share this machine's cores. The simulator gives every server its own
    device, so a local cluster on fewer cores than servers is modelled by calibrating under its load. This
    is an upper bound: real peers also idle while they wait on the network.
    """
    import subprocess
    import sys

    code = f"from prism_moe.sim.calibrate import _busy; _busy({str(ckpt)!r}, {threads})"
    load = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(contention)]
    try:
        if load:
            time.sleep(5.0)  # let them load the model and start computing
        dense, per_token, call, expert = measure_model(ckpt, threads=threads, replay=replay)
        return Calibration(dense, per_token, call, expert, measure_transport(emulated=emulated),
                           measure_step_overhead(ckpt, batch=batch, threads=threads))
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


def calibrated_cost(cost: CostModel, cal: Calibration, slowdown: float = 1.0) -> CostModel:
    """`cost` with every server's compute and the transport overhead as measured in `cal`; compute
    `slowdown` x slower (e.g. servers / cores when the servers share a CPU: the simulator gives each its own)."""
    bw = cost.expert_bytes / cal.expert_s / slowdown  # bytes/s: one distinct expert costs expert_s
    prof = GpuProfile("cpu-calibrated", 1e3, bw / 1e9, FLOPS / 1e12, kernel_overhead_s=cal.expert_call_s * slowdown,
                      source="measured: prism_moe.sim.calibrate", step_overhead_s=cal.step_overhead_s * slowdown)
    lat = cost.latency_s + (1 - np.eye(cost.num_servers)) * cal.call_overhead_s / 2
    return replace(cost, profiles=(prof,) * cost.num_servers, latency_s=lat,
                   expert_flops_per_pair=0.0,
                   dense_layer_bytes=max(cal.dense_layer_s - cal.expert_call_s, 0.0) * slowdown * bw,
                   dense_layer_flops_per_token=cal.dense_token_s * slowdown * FLOPS)
