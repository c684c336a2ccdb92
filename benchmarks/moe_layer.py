"""One MoE layer through prism's experts dispatcher vs transformers' own experts kernel, per path.

For each (path grouped|loop, batch, local share) it prints one JSON line (`--json`) with:
  device, path, batch, local_share, experts_active (distinct experts the batch routes to),
  prism_us       median (and prism_min_us: minimum) wall time of `moe_forward` of `prism serve`'s `ClusterDispatcher` on this server:
                 routing, activation counting, the local experts, gathering the remote rows, combining the
                 replies (the peer answers at once from an in-process stub: no network and no peer compute,
                 so this is the requester's own cost);
  reference_us   transformers' `grouped_mm_experts_forward` on the full layer (every expert local), the kernel
                 `AutoModelForCausalLM` uses by default in transformers 5 (timed interleaved with prism_us);
  kernel_launches, host_syncs   per MoE layer (one forward), counted with torch.profiler:
                 CUDA: kernel launch calls (cudaLaunchKernel*) and synchronising runtime calls
                 (cuda*Synchronize), plus the warnings of CUDA's sync debug mode as `sync_debug_warnings`;
                 CPU: the aten ops the host dispatches that do work (views, allocations and no-op casts left
                 out; ops inside ops, such as the CPU grouped_mm's own loop over groups, not counted) and the
                 host reads of tensor values (tolist/item/numpy/nonzero/...: each one a device sync on a GPU),
                 so the structure is checked without a GPU;
  reference_kernel_launches, reference_host_syncs   the same counts for transformers' kernel.
A last line (`"summary": true`) checks issue 12's goals on the grouped path: kernel launches per layer do not
grow with the active experts (max/min over the grid), host syncs 0 when all local and at most 1 otherwise.

    python benchmarks/moe_layer.py --json [--device cpu|cuda] [--hidden 512 --intermediate 256 --experts 32
           --top-k 4] [--batch 1 8 64] [--local-share 0.25 0.5 1.0] [--paths grouped loop] [--reps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from prism_moe.model.slots import ExpertSlots, Gate, SlotPool
from prism_moe.placement.placement import Placement
from prism_moe.runtime.dispatch import ClusterDispatcher

# ops that launch no kernel on a GPU: views, metadata, allocations, casts that copy nothing
NO_KERNEL = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::detach", "aten::alias",
             "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::promote_types", "aten::result_type",
             "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze", "aten::chunk", "aten::split",
             "aten::slice", "aten::select", "aten::as_strided", "aten::expand", "aten::empty", "aten::empty_like",
             "aten::empty_strided", "aten::to", "aten::narrow", "aten::permute"}
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
HOST_READS = {"tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
              "unique_consecutive", "cpu"}


class _HostReads(TorchFunctionMode):
    """Counts calls that read tensor values on the host (CPU stand-in for device syncs)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fns: list[Callable[[], Any]], device: torch.device, reps: int) -> list[tuple[float, float]]:
    """(median, min) microseconds of each function, calls interleaved (a drifting machine affects all alike;
    on a shared machine the minimum is the least disturbed run)."""
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t)
    return [(statistics.median(ts) * 1e6, min(ts) * 1e6) for ts in times]


def count(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Kernel launches and host syncs of one call (see the module docstring for what each device counts)."""
    fn()  # warm (caching allocators, pinned buffers)
    _sync(device)
    if device.type == "cuda":
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.profiler.profile(activities=acts) as prof:
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        names = [e.name for e in prof.events()]
        return {"kernel_launches": sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel")) for n in names),
                "host_syncs": sum(n in SYNC_CALLS for n in names),
                "sync_debug_warnings": sum("synchroniz" in str(w.message).lower() for w in caught)}
    reads = _HostReads()
    with reads, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return {"kernel_launches": sum(_does_work(e) for e in top), "host_syncs": reads.count}


def _does_work(event: Any) -> bool:
    return event.name not in NO_KERNEL or any(_does_work(c) for c in event.cpu_children)


def make_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, ExpertSlots]:
    """A transformers experts module (Qwen3-MoE's) with random weights, and prism slots over a copy of them."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = AutoConfig.for_model("qwen3_moe", hidden_size=args.hidden, moe_intermediate_size=args.intermediate,
                                  num_experts=args.experts, num_experts_per_tok=args.top_k, hidden_act="silu")
    module = Qwen3MoeExperts(config).to(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in (module.gate_up_proj, module.down_proj):
            p.copy_(torch.randn(p.shape, generator=g) * args.hidden ** -0.5)
    pool = SlotPool(args.experts, args.hidden, args.intermediate, dtype=dtype, device=device)
    slots = ExpertSlots(0, args.experts, pool, Gate.activation("silu"))
    return module, slots


def dispatcher(num_experts: int, local: int, path: str) -> ClusterDispatcher:
    """`prism serve`'s dispatcher for a two-server placement ("me" holds the first `local` experts, "peer"
    all), whose remote calls a stub answers at once with zeros (buffers made once per shape)."""
    hosts = np.zeros((2, 1, num_experts), dtype=bool)
    hosts[0, 0, :local] = True
    hosts[1] = True
    d = ClusterDispatcher("me", Placement.from_hosts(["me", "peer"], hosts, np.array([[0.0, 1.0], [1.0, 0.0]])),
                          None, path=path)
    replies: dict[tuple[int, ...], torch.Tensor] = {}

    def stub(layer: int, batches: dict[Any, tuple[torch.Tensor, torch.Tensor]]) -> dict[Any, torch.Tensor]:
        return {s: replies.setdefault(tuple(x.shape), torch.zeros_like(x)) for s, (_, x) in batches.items()}

    d.remote = stub  # type: ignore[method-assign]
    return d


def routing(batch: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], top-k ids [T, k] (distinct per token), weights [T, k]: a random router's choice."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, args.hidden, generator=g)
    logits = torch.randn(batch, args.experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    return hidden.to(device, dtype), ids.to(device), weights.to(device, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per line (the default prints a table)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--local-share", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--paths", nargs="+", default=["grouped", "loop"], choices=["grouped", "loop"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from transformers.integrations.moe import grouped_mm_experts_forward

    module, slots = make_layer(args, device, dtype)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for share in args.local_share:
            local = max(1, round(share * args.experts))
            for e in slots.held + slots.staged:
                slots.drop(e)
            for e in range(local):  # the first experts here; a random router makes which ones immaterial
                slots.add(e, module.gate_up_proj[e], module.down_proj[e])
            for batch in args.batch:
                hidden, ids, weights = routing(batch, args, device, dtype, seed=batch)
                ref = lambda h=hidden, i=ids, w=weights: grouped_mm_experts_forward(module, h, i, w)  # noqa: E731
                ref_counts = count(ref, device)
                for path in args.paths:
                    d = dispatcher(args.experts, local, path)
                    fn = lambda h=hidden, i=ids, w=weights, d=d: d.moe_forward(0, h, i, w, slots)  # noqa: E731
                    counts = count(fn, device)
                    (prism_us, prism_min), (ref_us, ref_min) = time_us([fn, ref], device, args.reps)
                    row = {"device": str(device), "path": path, "batch": batch, "local_share": share,
                           "experts_local": local, "experts_active": int(torch.unique(ids).numel()),
                           "prism_us": round(prism_us, 1), "reference_us": round(ref_us, 1),
                           "prism_min_us": round(prism_min, 1), "reference_min_us": round(ref_min, 1),
                           **counts, "reference_kernel_launches": ref_counts["kernel_launches"],
                           "reference_host_syncs": ref_counts["host_syncs"]}
                    row["ratio"] = round(row["prism_us"] / row["reference_us"], 3)
                    row["ratio_min"] = round(prism_min / ref_min, 3)
                    rows.append(row)
                    print(json.dumps(row) if args.json else
                          f"{path:8s} batch {batch:3d} local {share:4.2f} active {row['experts_active']:3d}  "
                          f"prism {row['prism_us']:9.1f} us  ref {row['reference_us']:9.1f} us  "
                          f"launches {row['kernel_launches']:4d}  syncs {row['host_syncs']:3d}", flush=True)
    grouped = [r for r in rows if r["path"] == "grouped"]
    summary: dict[str, Any] = {"summary": True, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                               "layer": {"hidden": args.hidden, "intermediate": args.intermediate,
                                         "experts": args.experts, "top_k": args.top_k},
                               "torch_threads": torch.get_num_threads()}
    if grouped:
        launches = [r["kernel_launches"] for r in grouped]
        summary["grouped_launches_max_over_min"] = round(max(launches) / max(min(launches), 1), 3)
        summary["grouped_max_syncs_all_local"] = max((r["host_syncs"] for r in grouped if r["local_share"] >= 1),
                                                     default=None)
        summary["grouped_max_syncs_some_remote"] = max((r["host_syncs"] for r in grouped if r["local_share"] < 1),
                                                       default=None)
    for path in args.paths:
        for key in ("ratio", "ratio_min"):
            ratios = [r[key] for r in rows if r["path"] == path and r["local_share"] >= 1]
            if ratios:
                summary[f"{path}_all_local_{key}_median"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
