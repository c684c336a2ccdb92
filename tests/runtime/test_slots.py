"""The slot runner: continuous batching for every family (DeepSeek's latent attention included) gives each request
`model.generate`'s greedy tokens, with requests admitted while others decode and caches kept in place."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prism_moe.model.tiny import ARCHS, make_tiny_model
from prism_moe.runtime.engine import Engine
from prism_moe.runtime.engine.slots import SlotCache, _attention_kinds

TEXTS = ["Hello, how are", "The quick brown fox jumps over the lazy dog. Pack my box", "Edge",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation", "Which experts are popular"]
MAX_TOKENS = [5, 12, 8, 3, 10]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {a: make_tiny_model(a, tmp_path_factory.mktemp(f"slots_{a}")) for a in ARCHS}


def _reference(path: Path, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    return [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(prompts, lengths, strict=True)]


async def _staggered(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Two requests first; the others join once the first has tokens (admitted while those decode)."""
    first = [asyncio.ensure_future(engine.generate(p, n)) for p, n in zip(prompts[:2], lengths[:2], strict=True)]
    stream = await engine.submit(prompts[2], lengths[2])
    ids = [(await stream.__anext__()).token_id]
    rest = [asyncio.ensure_future(engine.generate(p, n)) for p, n in zip(prompts[3:], lengths[3:], strict=True)]
    ids += [ev.token_id async for ev in stream]
    return [r.token_ids for r in await asyncio.gather(*first)] + [ids] + [r.token_ids for r in
                                                                          await asyncio.gather(*rest)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_batches_continuously(arch: str, checkpoints: dict[str, Path]) -> None:
    path = checkpoints[arch]
    # Three slots for five requests: some wait for a slot, finished ones free theirs (compaction), prompts are
    # prefilled in several forwards (40 padded tokens at most).
    with Engine.from_pretrained(path, device="cpu", dtype="float32", max_running=3, max_batch_tokens=40) as engine:
        assert engine.batching == "slots"
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_staggered(engine, prompts, MAX_TOKENS))
        assert engine.num_running == engine.num_waiting == 0
    assert got == _reference(path, prompts, MAX_TOKENS)


def test_latent_attention_through_the_servers_experts_hook(checkpoints: dict[str, Path]) -> None:
    """DeepSeek-V2 with every MoE layer going through the dispatcher `prism serve` attaches."""
    from prism_moe.model.experts import attach
    from prism_moe.model.spec import ModelSpec
    from prism_moe.runtime.dispatch import ClusterDispatcher

    path = checkpoints["deepseek_v2"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    dispatcher = ClusterDispatcher.all_local(spec.num_moe_layers, spec.num_experts)
    attach(model, dispatcher, spec)
    with Engine(model, AutoTokenizer.from_pretrained(path), device="cpu", max_running=4) as engine:
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_staggered(engine, prompts, MAX_TOKENS))
    assert got == _reference(path, prompts, MAX_TOKENS)
    assert dispatcher.local_invocations > 0


def test_cancelled_request_frees_its_slot_and_the_others_go_on(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["mixtral"]
    with Engine.from_pretrained(path, device="cpu", dtype="float32", max_running=3) as engine:
        prompts = [engine.encode(t) for t in TEXTS[:4]]
        lengths = [20, 20, 20, 20]

        async def run():
            keep = [asyncio.ensure_future(engine.generate(prompts[i], lengths[i])) for i in (0, 2)]
            stream = await engine.submit(prompts[1], 200, stop_token_ids=[])  # the middle slot
            await stream.__anext__()
            await stream.aclose()  # its slot is taken by the next request; the last one moves into the hole
            late = await engine.generate(prompts[3], lengths[3])
            return [r.token_ids for r in await asyncio.gather(*keep)] + [late.token_ids]

        got = asyncio.run(run())
        assert engine.num_running == engine.num_waiting == 0
    assert got == _reference(path, [prompts[i] for i in (0, 2, 3)], [lengths[i] for i in (0, 2, 3)])


def test_slot_cache_writes_in_place_and_reads_views() -> None:
    cache = SlotCache(num_layers=1, slots=3, max_len=300)
    cache.reserve(4)
    assert cache.capacity == 128  # the first reservation
    cache.for_prefill(0, 2)
    k = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).view(2, 1, 4, 2)
    keys, _ = cache.update(k, k[..., :1], 0)  # values may be narrower (latent attention)
    assert torch.equal(keys, k)
    stored = cache.keys[0]
    cache.for_decode(torch.tensor([4, 2]), read=5)
    new = torch.full((2, 1, 1, 2), -1.0)
    keys, values = cache.update(new, new[..., :1], 0)
    assert cache.keys[0] is stored and keys.data_ptr() == stored.data_ptr()  # a view: nothing copied per step
    assert keys.shape == (2, 1, 5, 2) and values.shape == (2, 1, 5, 1)
    assert torch.equal(keys[0, 0, :4], k[0, 0]) and torch.equal(keys[0, 0, 4], new[0, 0, 0])
    assert torch.equal(keys[1, 0, 2], new[1, 0, 0])  # row 1 wrote at its own length
    cache.move(1, 0, 3)
    assert torch.equal(cache.keys[0][0, 0, :3], cache.keys[0][1, 0, :3])
    cache.reserve(200)  # grows to the need (up to max_len), keeping what is cached
    assert cache.capacity == 256 and torch.equal(cache.keys[0][1, 0, :3], keys[1, 0, :3])
    with pytest.raises(ValueError, match="exceed"):
        cache.reserve(301)


def test_attention_kinds_and_refusals() -> None:
    from types import SimpleNamespace as Config

    assert _attention_kinds(Config(sliding_window=None)) == (None, None)
    assert _attention_kinds(Config(sliding_window=4096)) == (4096, None)  # one sliding mask (Mixtral-style)
    assert _attention_kinds(Config(sliding_window=0, use_sliding_window=False,
                                   layer_types=["full_attention"] * 2)) == (None, ("full_attention",))
    assert _attention_kinds(Config(sliding_window=16, layer_types=["sliding_attention", "full_attention"])) == (
        16, ("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match=r"'linear_attention'\].*batching='paged'"):  # MiniMax
        _attention_kinds(Config(sliding_window=None, layer_types=["full_attention", "linear_attention"]))
    with pytest.raises(ValueError, match="no runner of prism-moe serves it yet"):  # DeepSeek-V3.2's sparse indexer
        _attention_kinds(Config(sliding_window=None, layer_types=["indexed_attention"], kv_lora_rank=32))
