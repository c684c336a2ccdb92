"""Engine: continuous batching gives model.generate's greedy tokens; sampling, stops, limits, failures."""

from __future__ import annotations

import asyncio

import pytest

from prism_moe.runtime.engine import Engine, EngineError, EngineOverloaded, RequestStats, SamplingParams

TEXTS = ["Hello, how are", "The quick brown fox jumps over the lazy dog. Pack my box", "Edge",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation", "Which experts are popular"]
MAX_TOKENS = [7, 19, 12, 3, 24]


def test_concurrent_greedy_equals_generate(engine: Engine, greedy_ref) -> None:
    prompts = [engine.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths share the batches

    async def run():
        return await asyncio.gather(*[engine.generate(p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True)])

    results = asyncio.run(run())
    for p, n, r in zip(prompts, MAX_TOKENS, results, strict=True):
        ref = greedy_ref(p, n)
        assert r.token_ids == ref
        assert r.text == engine.decode(ref)
        assert r.finish_reason == ("stop" if ref[-1] in engine.eos_token_ids else "length")
    assert engine.num_running == engine.num_waiting == 0


def test_events_stream_one_token_each(engine: Engine, greedy_ref) -> None:
    prompt = engine.encode(TEXTS[1])

    async def run():
        return [ev async for ev in await engine.submit(prompt, 6)]

    events = asyncio.run(run())
    assert [e.token_id for e in events] == greedy_ref(prompt, 6)
    assert [e.finished for e in events] == [False] * 5 + [True]
    assert events[-1].finish_reason == "length"


def test_seeded_sampling_is_reproducible_in_any_company(engine: Engine) -> None:
    a, b = engine.encode(TEXTS[0]), engine.encode(TEXTS[1])

    async def run():
        alone = await engine.generate(a, 16, temperature=1.0, seed=7)
        together = await asyncio.gather(engine.generate(a, 16, temperature=1.0, seed=7),
                                        engine.generate(b, 9, temperature=0.7, top_p=0.9, seed=1),
                                        engine.generate(b, 12))
        other = await engine.generate(a, 16, temperature=1.0, seed=8)
        narrow = await engine.generate(a, 16, temperature=1.0, top_p=1e-6, seed=8)  # nucleus of one = greedy
        greedy = await engine.generate(a, 16)
        return alone, together[0], other, narrow, greedy

    alone, together, other, narrow, greedy = asyncio.run(run())
    assert alone.token_ids == together.token_ids
    assert other.token_ids != alone.token_ids
    assert narrow.token_ids == greedy.token_ids
    assert alone.token_ids != greedy.token_ids


def test_stop_strings_and_stop_ids(engine: Engine) -> None:
    prompt = engine.encode(TEXTS[1])

    async def run():
        full = await engine.generate(prompt, 19, stop_token_ids=[])
        stop = full.text[4:7]
        cut = await engine.generate(prompt, 19, stop=[stop, "never there"], stop_token_ids=[])
        stop_id = full.token_ids[5]
        by_id = await engine.generate(prompt, 19, stop_token_ids=[stop_id])
        return full, stop, cut, stop_id, by_id

    full, stop, cut, stop_id, by_id = asyncio.run(run())
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    first = full.token_ids.index(stop_id)
    assert by_id.token_ids == full.token_ids[:first + 1] and by_id.finish_reason == "stop"


def test_stats_listener_and_limits(engine: Engine) -> None:
    seen: list[RequestStats] = []
    engine.add_listener(seen.append)
    prompt = engine.encode(TEXTS[2])
    try:
        asyncio.run(engine.generate(prompt, 5, stop_token_ids=[]))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            asyncio.run(engine.submit([1, engine.vocab_size], 4))
        with pytest.raises(ValueError, match="maximum context length"):
            asyncio.run(engine.submit(prompt, engine.max_model_len))
        engine.max_waiting = 0
        with pytest.raises(EngineOverloaded):
            asyncio.run(engine.submit(prompt, 4))
    finally:
        engine.max_waiting = 64
        engine.remove_listener(seen.append)
    (s,) = seen
    assert s.prompt_tokens == len(prompt) and s.completion_tokens == 5 and s.finish_reason == "length"
    assert 0 < s.ttft_s <= s.latency_s and s.tpot_s is not None and s.tpot_s > 0


def test_closing_a_stream_cancels_the_request(engine: Engine) -> None:
    async def run():
        stream = await engine.submit(engine.encode(TEXTS[0]), 200, stop_token_ids=[])
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    assert len(asyncio.run(run())) == 2
    assert engine.num_running == engine.num_waiting == 0
    assert asyncio.run(engine.generate(engine.encode(TEXTS[0]), 3)).token_ids


def test_failed_forward_fails_requests_and_engine_recovers(engine: Engine, greedy_ref) -> None:
    experts = engine.model.model.layers[0].mlp.experts
    calls = {"left": 1}

    def broken(*args, **kwargs):
        if calls["left"]:
            calls["left"] -= 1
            raise RuntimeError("peer edge-b unreachable")
        return type(experts).forward(experts, *args, **kwargs)

    restarts = engine.restarts
    experts.forward = broken
    try:
        with pytest.raises(EngineError, match="peer edge-b unreachable"):
            asyncio.run(engine.generate(engine.encode(TEXTS[0]), 4))
    finally:
        del experts.forward
    prompt = engine.encode(TEXTS[3])

    async def after():  # the restart happens on the pump thread: allow it a moment
        for _ in range(100):
            try:
                return await engine.generate(prompt, 4)
            except EngineError:
                await asyncio.sleep(0.05)
        raise AssertionError("engine did not recover")

    assert asyncio.run(after()).token_ids == greedy_ref(prompt, 4)
    # transformers' manager loses its thread to the exception (the pump restarts it); the slot runner's loop
    # fails that forward's requests and goes on
    assert engine.restarts == restarts + (engine.batching == "paged")


# --- DeepSeek-V2 (latent attention) on the slot runner, and the same answers from both runners ------------------
@pytest.fixture(scope="module")
def deepseek(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from prism_moe.model.tiny import make_tiny_model

    path = make_tiny_model("deepseek_v2", tmp_path_factory.mktemp("tiny_deepseek_v2"))
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with Engine.from_pretrained(path, device="cpu", dtype="float32") as eng:
        yield eng, ref


def test_latent_attention_model_is_served_by_the_slot_runner(deepseek) -> None:
    import torch

    engine, ref = deepseek
    assert engine.batching == "slots"
    prompts, lengths = [engine.encode(t) for t in TEXTS[:4]], MAX_TOKENS[:4]

    async def run():
        greedy = await asyncio.gather(*[engine.generate(p, n) for p, n in zip(prompts, lengths, strict=True)])
        alone = await engine.generate(prompts[0], 10, temperature=1.0, seed=5)
        together = await asyncio.gather(engine.generate(prompts[0], 10, temperature=1.0, seed=5),
                                        engine.generate(prompts[1], 6, temperature=0.5, seed=2))
        return greedy, alone, together[0]

    greedy, alone, together = asyncio.run(run())
    for p, n, r in zip(prompts, lengths, greedy, strict=True):
        assert r.token_ids == ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
    assert alone.token_ids == together.token_ids
    with engine.paused():  # the loop holds between steps
        assert engine.is_running

    experts = engine.model.model.layers[1].mlp.experts  # layer 0 is dense in DeepSeek-V2
    experts.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("peer lost"))
    try:
        with pytest.raises(EngineError, match="peer lost"):
            asyncio.run(engine.generate(prompts[2], 3))
    finally:
        del experts.forward
    assert asyncio.run(engine.generate(prompts[2], 3)).token_ids == greedy[2].token_ids[:3]
    assert engine.num_running == engine.num_waiting == 0


def test_slot_and_paged_runners_agree(engine: Engine, tiny_dir) -> None:
    prompts = [engine.encode(t) for t in TEXTS[:3]]
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=3, logprobs=2),
              SamplingParams(temperature=0.6, seed=3, presence_penalty=0.5, repetition_penalty=1.3,
                             logit_bias={7: 2.0}, logprobs=0)]

    async def run(eng: Engine):
        return await asyncio.gather(*[eng.generate(p, 8, s) for p, s in zip(prompts, params, strict=True)])

    async def scores(eng: Engine):
        return await eng.prompt_logprobs(prompts[1], 3)

    assert engine.batching == "slots"
    with Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", batching="paged") as paged:
        theirs, their_scores = asyncio.run(run(paged)), asyncio.run(scores(paged))
    with engine.paused():
        pass
    ours, our_scores = asyncio.run(run(engine)), asyncio.run(scores(engine))
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    for a, b in zip(ours[1].logprobs + ours[2].logprobs, theirs[1].logprobs + theirs[2].logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert len(ours[1].logprobs) == 8 and len(ours[1].logprobs[0].top) == 2 and ours[2].logprobs[0].top == ()
    assert our_scores[0] is None and their_scores[0] is None
    for a, b in zip(our_scores[1:], their_scores[1:], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and [t for t, _ in a.top] == [t for t, _ in b.top]


def test_prompt_logprobs_equal_a_plain_forward(engine: Engine, tiny_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prompt = engine.encode(TEXTS[1])
    got = asyncio.run(engine.prompt_logprobs(prompt, 2))
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        lp = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    assert got[0] is None and len(got) == len(prompt)
    for i in range(1, len(prompt)):
        assert got[i].token_id == prompt[i] and got[i].logprob == pytest.approx(lp[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t for t, _ in got[i].top] == lp[i - 1].topk(2).indices.tolist()


def test_closing_an_unread_stream_frees_its_place(engine: Engine) -> None:
    async def run():
        streams = [await engine.submit(engine.encode(TEXTS[0]), 50, stop_token_ids=[]) for _ in range(3)]
        for s in streams:
            await s.aclose()

    asyncio.run(run())
    assert engine.num_running == engine.num_waiting == 0


def test_transformers_version_check() -> None:
    from prism_moe.runtime.engine.hf_batching import check_transformers

    check_transformers()  # the installed version is a checked one
    for version in ("5.10.0", "6.0.0"):
        with pytest.raises(RuntimeError, match=r"checked with transformers >=5.24,<6"):
            check_transformers(version)
