"""Every OpenAI field the API takes, over HTTP, against single-process transformers (logprobs, penalties, bias)
or against another request (seeds, n choices, streams vs. whole answers)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from prism_moe.runtime.engine import Engine
from prism_moe.runtime.http_api import create_app
from prism_moe.runtime.metrics import ServerMetrics

MODEL = "tiny-mixtral"
PROMPT = "The quick brown fox jumps over the lazy dog. Pack my box"
CHAT = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ServerMetrics(), MODEL)) as c:
        yield c


@pytest.fixture(scope="module")
def ref_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward: [len(ids), V]; row i predicts token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def post(client: TestClient, path: str, body: dict) -> dict:
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(client: TestClient, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={"model": MODEL, **body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_completion_logprobs_match_transformers(client: TestClient, engine: Engine, ref_model) -> None:
    ids = engine.encode(PROMPT)
    out = post(client, "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0, "logprobs": 3,
                                           "return_token_ids": True, "ignore_eos": True})
    choice = out["choices"][0]
    gen, lp = choice["token_ids"], choice["logprobs"]
    ref = ref_logprobs(ref_model, ids + gen)[len(ids) - 1:-1]  # [8, V]
    assert lp["tokens"] == [engine.token_text(t) for t in gen]
    assert lp["token_logprobs"] == pytest.approx([ref[i, t].item() for i, t in enumerate(gen)], abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"]):
        want: dict[str, float] = {}
        for v, t in zip(*ref[i].topk(3), strict=True):  # tokens with the same text: the most likely one's value
            want.setdefault(engine.token_text(int(t)), v.item())
        want.setdefault(lp["tokens"][i], lp["token_logprobs"][i])  # the chosen token is always listed
        assert list(top) == list(want) and list(top.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == choice["text"]


def test_echo_returns_prompt_logprobs(client: TestClient, engine: Engine, ref_model) -> None:
    ids = engine.encode(PROMPT)
    out = post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 1,
                                           "echo": True, "return_token_ids": True, "ignore_eos": True})
    choice = out["choices"][0]
    lp = choice["logprobs"]
    gen = choice["token_ids"]
    ref = ref_logprobs(ref_model, ids + gen)
    assert choice["text"].startswith(engine.decode(ids)) and len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    full = ids + gen
    assert lp["token_logprobs"][1:] == pytest.approx([ref[i - 1, full[i]].item() for i in range(1, len(full))],
                                                     abs=1e-4)
    assert out["usage"]["completion_tokens"] == 3
    # Echo without logprobs: just the text.
    plain = post(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "echo": True,
                                             "ignore_eos": True})["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None


def test_streamed_logprobs_equal_whole_answer(client: TestClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    full = post(client, "/v1/completions", body)["choices"][0]["logprobs"]
    chunks = sse(client, "/v1/completions", body)
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["token_logprobs"]] == full["token_logprobs"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["top_logprobs"]] == full["top_logprobs"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]] == full["text_offset"]


def test_chat_logprobs_and_top_logprobs(client: TestClient, engine: Engine, ref_model) -> None:
    body = {"messages": CHAT, "max_completion_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "return_token_ids": True, "ignore_eos": True}
    out = post(client, "/v1/chat/completions", body)
    choice = out["choices"][0]
    assert len(choice["token_ids"]) == 5  # max_completion_tokens
    content = choice["logprobs"]["content"]
    prompt = out["prompt_token_ids"]
    ref = ref_logprobs(ref_model, prompt + choice["token_ids"])[len(prompt) - 1:-1]
    for i, (entry, tok) in enumerate(zip(content, choice["token_ids"], strict=True)):
        assert entry["token"] == engine.token_text(tok) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(ref[i, tok].item(), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(ref[i].topk(2).values.tolist(),
                                                                              abs=1e-4)
    chunks = sse(client, "/v1/chat/completions", body)
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    no_lp = post(client, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert no_lp["choices"][0]["logprobs"] is None


def test_n_choices_with_seeds(client: TestClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 5, "return_token_ids": True,
            "ignore_eos": True}
    three = post(client, "/v1/completions", {**body, "n": 3})
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three["usage"]["completion_tokens"] == 30
    for i, choice in enumerate(three["choices"]):  # choice i is what seed 5 + i gives alone
        alone = post(client, "/v1/completions", {**body, "seed": 5 + i})["choices"][0]
        assert choice["token_ids"] == alone["token_ids"]
    assert len({tuple(c["token_ids"]) for c in three["choices"]}) == 3
    again = post(client, "/v1/completions", {**body, "n": 3})
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in three["choices"]]
    other = post(client, "/v1/completions", {**body, "seed": 6000})["choices"][0]
    assert other["token_ids"] != three["choices"][0]["token_ids"]


def test_n_choices_stream_with_usage(client: TestClient) -> None:
    body = {"messages": CHAT, "max_tokens": 6, "temperature": 0.8, "seed": 1, "n": 2, "ignore_eos": True,
            "return_token_ids": True}
    full = post(client, "/v1/chat/completions", body)
    chunks = sse(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *tokens, usage = chunks
    for i in range(2):
        mine = [c["choices"][0] for c in tokens if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"]["content"] for c in mine) == full["choices"][i]["message"]["content"]
        assert [t for c in mine for t in c["token_ids"]] == full["choices"][i]["token_ids"]
        assert mine[-1]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


def test_repetition_penalty_equals_transformers_generate(client: TestClient, engine: Engine, ref_model) -> None:
    ids = engine.encode(PROMPT)
    out = post(client, "/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                           "repetition_penalty": 1.5, "return_token_ids": True,
                                           "ignore_eos": True})
    ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                             eos_token_id=None)
    assert out["choices"][0]["token_ids"] == ref[0, len(ids):].tolist()


class _OpenAIPenalties:
    """OpenAI's presence/frequency penalties written out per token (generated tokens only), as a transformers
    logits processor: the independent reference."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        counts: dict[int, int] = {}
        for t in input_ids[0, self.prompt_len:].tolist():
            counts[t] = counts.get(t, 0) + 1
        for t, c in counts.items():
            scores[0, t] -= self.frequency * c + self.presence
        return scores


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0), (0.5, 0.7)])
def test_presence_frequency_penalties_equal_reference(client: TestClient, engine: Engine, ref_model,
                                                      presence: float, frequency: float) -> None:
    from transformers import LogitsProcessorList

    ids = engine.encode("Numbers: 0 1 2 3")
    out = post(client, "/v1/completions", {"prompt": ids, "max_tokens": 16, "temperature": 0,
                                           "presence_penalty": presence, "frequency_penalty": frequency,
                                           "return_token_ids": True, "ignore_eos": True})
    procs = LogitsProcessorList([_OpenAIPenalties(len(ids), presence, frequency)])
    ref = ref_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, logits_processor=procs,
                             eos_token_id=None)
    assert out["choices"][0]["token_ids"] == ref[0, len(ids):].tolist()
    plain = post(client, "/v1/completions", {"prompt": ids, "max_tokens": 16, "temperature": 0,
                                             "return_token_ids": True, "ignore_eos": True})
    assert plain["choices"][0]["token_ids"] != out["choices"][0]["token_ids"]  # the penalty did something


def test_logit_bias_equals_transformers_sequence_bias(client: TestClient, engine: Engine, ref_model) -> None:
    ids = engine.encode(PROMPT)
    bias = {"17": 4.0, "40": -100.0, "101": 2.5}
    out = post(client, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                "logit_bias": bias, "return_token_ids": True, "ignore_eos": True})
    prompt = out["prompt_token_ids"]
    ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                             sequence_bias={(int(k),): v for k, v in bias.items()})
    assert out["choices"][0]["token_ids"] == ref[0, len(prompt):].tolist()
    forced = post(client, "/v1/completions", {"prompt": ids, "max_tokens": 4, "temperature": 0.9, "seed": 3,
                                              "logit_bias": {"42": 100}, "return_token_ids": True,
                                              "ignore_eos": True})
    assert forced["choices"][0]["token_ids"] == [42] * 4


def test_stop_strings_over_http(client: TestClient) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(client, "/v1/completions", body)["choices"][0]["text"]
    stop = full[3:6]
    cut = post(client, "/v1/completions", {**body, "stop": [stop]})["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    chunks = sse(client, "/v1/completions", {**body, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_full_queue_is_503_with_retry_after(client: TestClient, engine: Engine) -> None:
    engine.max_waiting = 2
    try:
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "n": 3})
    finally:
        engine.max_waiting = 64
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "needs 3 places (limit 2)" in r.json()["error"]["message"]
    assert engine.num_waiting == engine.num_running == 0


def test_top_k_one_is_greedy_and_top_k_limits_sampling(client: TestClient, engine: Engine, ref_model) -> None:
    ids = engine.encode(PROMPT)
    body = {"prompt": ids, "max_tokens": 10, "temperature": 1.5, "seed": 11, "return_token_ids": True,
            "ignore_eos": True, "logprobs": 3}
    greedy = post(client, "/v1/completions", {**body, "temperature": 0})["choices"][0]["token_ids"]
    assert post(client, "/v1/completions", {**body, "top_k": 1})["choices"][0]["token_ids"] == greedy
    sampled = post(client, "/v1/completions", {**body, "top_k": 3, "n": 4})["choices"]
    for choice in sampled:  # every pick is among the 3 most likely tokens of the raw distribution
        ref = ref_logprobs(ref_model, ids + choice["token_ids"])[len(ids) - 1:-1]
        for i, tok in enumerate(choice["token_ids"]):
            assert tok in ref[i].topk(3).indices.tolist()
