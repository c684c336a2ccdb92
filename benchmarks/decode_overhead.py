"""Cost of a decode step through prism's experts hook, relative to plain transformers, in one run.

Issue 3's goal: with every expert local, a decode step costs at most 1.1x the same step in plain
transformers. A step's time is isolated as (time for N new tokens - time for 1 new token) / (N - 1),
which removes prefill and per-request setup. Paths, on identical weights (separate model copies):
  generate   plain transformers: `model.generate(do_sample=False)` with its default experts kernel
             (`grouped_mm` in transformers 5), a batch of B equal-length prompts;
  eager      the same with transformers' per-expert loop (`experts_implementation="eager"`), for scale;
  prism      the same `generate` after `attach(...)`: every MoE layer goes through the hook and the
             `ClusterDispatcher` of `prism serve` (slot lookup and activation counting on the device, the
             experts computed from the slot slabs by `--prism-path`: auto = the loop on CPU, grouped on a
             GPU), with a one-server placement holding every expert (no peers);
  manager    transformers' ContinuousBatchingManager alone (add_request / get_result), B requests
             (skipped for latent-attention models such as deepseek_v2, which it cannot serve);
  engine     `Engine.submit` from asyncio on the prism-attached model: the serving loop of `prism serve`
             (its batching loop + sampling + pump thread; detokenizer off).
The goal is read on `ratio_prism_vs_generate` (ratio of the medians) and `ratio_prism_vs_generate_paired`
(median and range of each repetition's prism / generate, timed back to back: less exposed to the machine's
drift); `ratio_engine_vs_manager` is the serving loop's own cost. Repetitions are interleaved and medians
reported; only the ratios mean something across machines.

    python benchmarks/decode_overhead.py [--device cpu] [--arch mixtral] [--batch 1 8] [--tokens 48] [--reps 5]
                                         [--prism-path auto|grouped|loop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from prism_moe.model.experts import attach
from prism_moe.model.tiny import make_tiny_model
from prism_moe.runtime.dispatch import ClusterDispatcher
from prism_moe.runtime.engine import Engine, caches_latents, resolve_device


def attach_all_local(model: Any, path: str = "auto") -> ClusterDispatcher:
    """Attach the hook with the dispatcher `prism serve` uses, for a one-server cluster holding every expert."""
    from prism_moe.model.spec import ModelSpec

    spec = ModelSpec.from_hf_config(model.config.to_dict())
    dispatcher = ClusterDispatcher.all_local(spec.num_moe_layers, spec.num_experts)
    dispatcher.path = path
    attach(model, dispatcher, spec)
    return dispatcher


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_generate(model: Any, prompts: list[list[int]], n: int) -> float:
    batch = torch.tensor(prompts, device=model.device)
    _sync(model.device)
    t = time.perf_counter()
    model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False)
    _sync(model.device)
    return time.perf_counter() - t


def time_manager(manager: Any, prompts: list[list[int]], n: int) -> float:
    t = time.perf_counter()
    ids = {manager.add_request(p, max_new_tokens=n, eos_token_id=[-1]) for p in prompts}
    while ids:
        out = manager.get_result(timeout=60)
        if out is None:
            raise RuntimeError("continuous batching manager produced nothing for 60 s")
        if out.is_finished():
            ids.discard(out.request_id)
    return time.perf_counter() - t


def time_engine(engine: Engine, prompts: list[list[int]], n: int) -> float:
    async def run() -> None:
        await asyncio.gather(*[engine.generate(p, n, stop_token_ids=[]) for p in prompts])

    t = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t


def per_step(fn: Any, prompts: list[list[int]], n: int) -> float:
    """Seconds per decode step: the difference between n tokens and 1 token, over n - 1 steps."""
    return (fn(prompts, n) - fn(prompts, 1)) / (n - 1)


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Median and range of the per-repetition ratios a[i] / b[i] (measured back to back)."""
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    return {"median": round(statistics.median(r), 3), "min": round(r[0], 3), "max": round(r[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="mixtral")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="concurrent requests")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--prism-path", default="auto", choices=["auto", "grouped", "loop"],
                    help="experts path of the prism and engine models")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(args.arch, tmp, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               intermediate_size=2 * args.hidden, num_attention_heads=8,
                               num_key_value_heads=8 if args.arch.startswith("deepseek") else 4,  # MLA: kv = q heads
                               max_position_embeddings=1024)
        def load(**kw: Any) -> Any:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).to(device).eval()

        gen_model, eager_model, prism_model, cb_model = load(), load(experts_implementation="eager"), load(), load()
        eng_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        prism_dispatcher = attach_all_local(prism_model, args.prism_path)
        eng_dispatcher = attach_all_local(eng_model.to(device), args.prism_path)
    vocab = gen_model.config.vocab_size
    max_b = max(args.batch)
    g = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(3, vocab, (max_b, args.prompt_len), generator=g).tolist()

    cb_kwargs = dict(page_size=32, num_blocks=max_b * 4 * (args.prompt_len + args.tokens) // 32 + 8,
                     max_batch_tokens=512, max_requests_per_batch=max_b, use_cuda_graph=False,
                     use_async_batching=False)
    manager = None
    if not caches_latents(cb_model.config):
        manager = cb_model.init_continuous_batching(
            generation_config=GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0),
            continuous_batching_config=ContinuousBatchingConfig(**cb_kwargs))
        manager.start()
    engine = Engine(eng_model, None, device, max_running=max_b, kv_cache_tokens=cb_kwargs["num_blocks"] * 32)
    engine.decode = lambda ids: ""  # no tokenizer needed: measure the serving path, not detokenization
    engine.start()
    # prism right after generate: each repetition's pair then sees the same machine state (paired ratio)
    paths = {"generate": lambda p, n: time_generate(gen_model, p, n),
             "prism": lambda p, n: time_generate(prism_model, p, n),
             "eager": lambda p, n: time_generate(eager_model, p, n),
             "manager": lambda p, n: time_manager(manager, p, n),
             "engine": lambda p, n: time_engine(engine, p, n)}
    if manager is None:
        del paths["manager"]
    result: dict[str, Any] = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "engine_batching": engine.batching,
        "default_experts_implementation": gen_model.config._experts_implementation,
        "prism_experts_path": "grouped" if prism_dispatcher.grouped_on(device) else "loop",
        "model": {"arch": args.arch, "hidden": args.hidden, "layers": args.layers,
                  "params_m": round(sum(p.numel() for p in gen_model.parameters()) / 1e6, 2)},
        "prompt_len": args.prompt_len, "new_tokens": args.tokens, "reps": args.reps}
    try:
        for b in args.batch:
            prompts = all_prompts[:b]
            for fn in paths.values():  # warm-up
                fn(prompts, 2)
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.reps):
                for name, fn in paths.items():
                    times[name].append(per_step(fn, prompts, args.tokens))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row: dict[str, Any] = {"ms_per_step": {k: round(v, 3) for k, v in ms.items()},
                                   "ratio_prism_vs_generate": round(ms["prism"] / ms["generate"], 3),
                                   "ratio_prism_vs_generate_paired": paired(times["prism"], times["generate"]),
                                   "ratio_eager_vs_generate": round(ms["eager"] / ms["generate"], 3),
                                   "ratio_engine_vs_generate": round(ms["engine"] / ms["generate"], 3)}
            if "manager" in ms:
                row["ratio_manager_vs_generate"] = round(ms["manager"] / ms["generate"], 3)
                row["ratio_engine_vs_manager"] = round(ms["engine"] / ms["manager"], 3)
            result[f"batch_{b}"] = row
        result["engine_remote_invocations"] = eng_dispatcher.remote_invocations  # 0: every expert local
    finally:
        engine.stop()
        if manager is not None:
            manager.stop(block=True, timeout=10)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
