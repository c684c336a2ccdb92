"""Calibrate the simulator's cost model on this machine, for the tiny CPU model the demo serves.

A tiny model on a CPU is not a roofline: its kernels are microseconds of FLOPs under tens of
microseconds of PyTorch/Python overhead per op. So instead of a GPU profile we measure what the
simulator charges for, with torch threads=1 (as `prism demo` runs each server):

  dense_layer_s   one MoE layer's non-expert work (attention, norms, router, shared experts) plus its
                  share of the step's rest (embeddings, dense first layer, LM head), per step;
  dense_token_s   the same per extra token (the dense time is max(fixed, tokens x this));
  expert_call_s   fixed cost of one grouped expert call (dispatch, grouping, combine);
  expert_s        per distinct expert in the call (each expert's small matmuls);
  call_overhead_s one loopback round trip through the project's transport (msgpack, ZeroMQ, the hops
                  onto the transport loop and the service's compute thread), on top of the emulated link.

`calibrated_cost(cost, cal)` maps them onto the unchanged `CostModel`: every server gets a profile
whose bandwidth makes `expert_bytes / bandwidth = expert_s` and whose overhead is `expert_call_s`,
the dense part's bytes and FLOPs are set so its roofline gives the measured times, and the
transport round trip is added to the links' one-way latencies (half each way).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

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

    def as_dict(self) -> dict[str, float]:
        return {k: round(v * 1e6, 1) for k, v in self.__dict__.items()} | {"unit": "us"}


def measure_model(ckpt: str | Path, batch_tokens: tuple[int, ...] = (1, 4, 16, 64), repeats: int = 5,
                  threads: int = 1) -> tuple[float, float, float, float]:
    """(dense_layer_s, dense_token_s, expert_call_s, expert_s): forwards of the model on `batch_tokens`
    tokens with hooks timing every routed-experts call; dense = the rest of the forward / MoE layers."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    from prism_moe.model.experts import LocalDispatcher, attach

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    attach(model, LocalDispatcher())  # the runtime's experts path: per-expert compute, grouping, combine
    moe = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    calls: list[tuple[int, float]] = []  # (distinct experts, seconds) per experts call
    t_in: list[float] = []

    def pre(_m, args):
        t_in.append(time.perf_counter())

    def post(_m, args, _out):
        calls.append((int(torch.unique(args[1]).numel()), time.perf_counter() - t_in.pop()))

    hooks = [m.register_forward_pre_hook(pre) for m in moe] + [m.register_forward_hook(post) for m in moe]
    dense: dict[int, float] = {}
    every: list[tuple[int, float]] = []
    try:
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
                    per.append((total - sum(s for _, s in calls)) / len(moe))
                    every.extend(calls)
                dense[t] = statistics.median(per)
    finally:
        for h in hooks:
            h.remove()
    # expert call = a + b x distinct experts (least squares over all calls)
    d = np.array([c[0] for c in every], dtype=float)
    s = np.array([c[1] for c in every])
    b, a = np.polyfit(d, s, 1) if np.ptp(d) > 0 else (s.mean() / max(d.mean(), 1), 0.0)
    big = max(batch_tokens)
    return dense[min(batch_tokens)], dense[big] / big, float(max(a, 0.0)), float(max(b, 1e-7))


def measure_transport(hidden_size: int = 64, tokens: int = 4, samples: int = 300) -> float:
    """Median round trip of one expert call through the project's transport on loopback (no link emulation)."""
    import torch

    from prism_moe.runtime.transport import ExpertService, LoopThread, SyncPeerPool

    def identity(layer: int, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h

    server, client_loop = LoopThread("calib-service"), LoopThread("calib-client")
    svc = ExpertService("tcp://127.0.0.1:*", identity, num_layers=64, num_experts=64, hidden_size=hidden_size)
    pool = None
    try:
        endpoint = server.run(svc.start())
        pool = SyncPeerPool({"peer": endpoint}, loop_thread=client_loop, timeout=10.0, retries=0)
        h, ids = torch.randn(tokens, hidden_size), torch.zeros(tokens, dtype=torch.long)
        for _ in range(20):
            pool.call("peer", 0, ids, h)
        rt = []
        for _ in range(samples):
            t0 = time.perf_counter()
            pool.call("peer", 0, ids, h)
            rt.append(time.perf_counter() - t0)
        return statistics.median(rt)
    finally:
        if pool is not None:
            pool.close()
        server.run(svc.close())
        server.close()
        client_loop.close()


def calibrate(ckpt: str | Path, threads: int = 1) -> Calibration:
    dense, per_token, call, expert = measure_model(ckpt, threads=threads)
    return Calibration(dense, per_token, call, expert, measure_transport())


def calibrated_cost(cost: CostModel, cal: Calibration, slowdown: float = 1.0) -> CostModel:
    """`cost` with every server's compute and the transport overhead as measured in `cal`; compute
    `slowdown` x slower (e.g. servers / cores when the servers share a CPU: the simulator gives each its own)."""
    bw = cost.expert_bytes / cal.expert_s / slowdown  # bytes/s: one distinct expert costs expert_s
    prof = GpuProfile("cpu-calibrated", 1e3, bw / 1e9, FLOPS / 1e12, kernel_overhead_s=cal.expert_call_s * slowdown,
                      source="measured: prism_moe.sim.calibrate")
    lat = cost.latency_s + (1 - np.eye(cost.num_servers)) * cal.call_overhead_s / 2
    return replace(cost, profiles=(prof,) * cost.num_servers, latency_s=lat,
                   expert_flops_per_pair=0.0,
                   dense_layer_bytes=max(cal.dense_layer_s - cal.expert_call_s, 0.0) * slowdown * bw,
                   dense_layer_flops_per_token=cal.dense_token_s * slowdown * FLOPS)
