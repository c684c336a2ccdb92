"""RemoteRunner + RunnerHost: an Engine whose batching loop runs behind ZeroMQ gives what a local one gives."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import zmq

from prism_moe.runtime.engine import Engine, RequestStats, SamplingParams
from prism_moe.runtime.engine.remote import RemoteRunner, RunnerHost, WireError, parse_add

TEXTS = ["Hello, how are", "The quick brown fox jumps over the lazy dog. Pack my box", "Edge"]


@pytest.fixture()
def split(engine: Engine, tmp_path):
    """(API-side Engine over a RemoteRunner, the RunnerHost running `engine`'s kind of runner on its model)."""
    to_host, from_host = f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out"
    host = RunnerHost(engine.make_runner, to_host, from_host)
    host.start()
    front = Engine(engine.model, engine.tokenizer, device=None, slot_runner=lambda *a: RemoteRunner(to_host, from_host))
    front.start()
    try:
        yield front, host
    finally:
        front.stop()
        host.stop()


def test_remote_equals_local_tokens_logprobs_and_scores(engine: Engine, split) -> None:
    front, host = split
    prompts = [engine.encode(t) for t in TEXTS]
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=3, logprobs=2),
              SamplingParams(temperature=0.6, seed=3, presence_penalty=0.5, repetition_penalty=1.3,
                             logit_bias={7: 2.0}, logprobs=0)]

    async def run(eng: Engine):
        outs = await asyncio.gather(*[eng.generate(p, 9, s) for p, s in zip(prompts, params, strict=True)])
        return outs, await eng.prompt_logprobs(prompts[1], 3)

    theirs, their_scores = asyncio.run(run(engine))
    ours, our_scores = asyncio.run(run(front))
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    assert [r.text for r in ours] == [r.text for r in theirs]
    for a, b in zip(ours[1].logprobs + ours[2].logprobs, theirs[1].logprobs + theirs[2].logprobs, strict=True):
        # the same loop; only how requests happened to share forwards differs (float rounding)
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert len(ours[1].logprobs) == 9 and len(ours[1].logprobs[0].top) == 2 and ours[2].logprobs[0].top == ()
    assert our_scores[0] is None and len(our_scores) == len(their_scores)
    for a, b in zip(our_scores[1:], their_scores[1:], strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and [t for t, _ in a.top] == [t for t, _ in b.top]
    assert front.num_running == front.num_waiting == 0
    deadline = time.monotonic() + 5
    while (host.num_running or host.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.num_running == host.num_waiting == 0


def test_cancel_and_stats_reach_the_host(engine: Engine, split) -> None:
    front, host = split
    seen: list[RequestStats] = []
    host.add_listener(seen.append)
    front.add_listener(front.runner.send_stats)

    async def run():
        stream = await front.submit(engine.encode(TEXTS[0]), 200, stop_token_ids=[])
        first = await stream.__anext__()
        await stream.aclose()  # cancels it in the host's runner
        done = await front.generate(engine.encode(TEXTS[2]), 4)
        return first, done

    first, done = asyncio.run(run())
    assert first.token_id is not None and len(done.token_ids) == 4
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(s.finish_reason for s in seen) == ["abort", "length"]
    while (host.num_running or host.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.num_running == host.num_waiting == 0  # the cancelled request left the host too


def test_host_survives_garbage(engine: Engine, split) -> None:
    front, host = split
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(host.to_host)
    for raw in (b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"op": "launch"}),
                msgpack.packb({"op": "cancel"}), msgpack.packb({"op": "score", "call": "x"})):
        push.send(raw)
    push.close()
    assert asyncio.run(front.generate(engine.encode(TEXTS[2]), 3)).token_ids  # the host still serves


@pytest.mark.parametrize(("msg", "error"), [
    ({"id": "", "prompt": [1], "max_new_tokens": 1, "eos": [], "params": {}}, "non-empty string"),
    ({"id": "a", "prompt": [1, "x"], "max_new_tokens": 1, "eos": [], "params": {}}, "prompt must be"),
    ({"id": "a", "prompt": [1], "max_new_tokens": 0, "eos": [], "params": {}}, "max_new_tokens"),
    ({"id": "a", "prompt": [1], "max_new_tokens": 1, "eos": [], "params": {"temp": 1}}, "SamplingParams fields"),
    ({"id": "a", "prompt": [1], "max_new_tokens": 1, "eos": None, "params": {}}, "eos must be"),
])
def test_parse_add_says_what_is_wrong(msg, error) -> None:
    with pytest.raises(WireError, match=error):
        parse_add(msg)
    ok = parse_add({"id": "a", "prompt": [1, 2], "max_new_tokens": 3, "eos": [2],
                    "params": {"temperature": 0.5, "logit_bias": {7: 1.0}}})
    assert ok.sampler.params.logit_bias == {7: 1.0} and ok.eos == frozenset({2})
