"""OpenAI-compatible HTTP API over the session Engine: schema, streaming, token ids, auth, errors, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from prism_moe.runtime.engine import Engine
from prism_moe.runtime.http_api import create_app
from prism_moe.runtime.metrics import ServerMetrics

MODEL = "tiny-mixtral"
PROMPT = "The quick brown fox jumps over the lazy dog. Pack my box"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(engine, ServerMetrics("edge-a"), MODEL, extra_health=lambda: {"server": "edge-a"})
    with TestClient(app) as c:
        yield c


def sse(client: TestClient, path: str, body: dict) -> list[dict]:
    """POST with stream=true; the decoded `data:` chunks (the final `[DONE]` checked and dropped)."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def test_completion_text_and_token_prompts(client: TestClient, engine: Engine, greedy_ref) -> None:
    ids = engine.encode(PROMPT)
    body = {"model": MODEL, "max_tokens": 9, "temperature": 0, "return_token_ids": True}
    by_text = client.post("/v1/completions", json={**body, "prompt": PROMPT}).json()
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids}).json()
    ref = greedy_ref(ids, 9)
    (choice,) = by_text["choices"]
    assert by_text["object"] == "text_completion" and by_text["model"] == MODEL
    assert choice["token_ids"] == ref and choice["prompt_token_ids"] == ids
    assert choice["text"] == engine.decode(ref) and choice["finish_reason"] == "length"
    assert by_text["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 9, "total_tokens": len(ids) + 9}
    assert by_ids["choices"][0]["text"] == choice["text"]
    # Defaults: 16 tokens (OpenAI's legacy default), no token ids unless asked.
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "temperature": 0}).json()
    assert plain["usage"]["completion_tokens"] <= 16 and "token_ids" not in plain["choices"][0]


def test_completion_stream_concatenates_to_full(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    full = client.post("/v1/completions", json={k: v for k, v in body.items() if k != "stream_options"})
    full = full.json()["choices"][0]
    chunks = sse(client, "/v1/completions", body)
    *tokens, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in tokens) == full["text"]
    assert [t for c in tokens for t in c["choices"][0]["token_ids"]] == full["token_ids"]
    assert tokens[0]["choices"][0]["prompt_token_ids"] == full["prompt_token_ids"]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12


def test_chat_full_and_stream(client: TestClient, engine: Engine, greedy_ref) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    full = client.post("/v1/chat/completions", json=body).json()
    prompt_ids = engine.apply_chat_template(CHAT)
    assert full["object"] == "chat.completion" and full["prompt_token_ids"] == prompt_ids
    (choice,) = full["choices"]
    assert choice["message"]["role"] == "assistant" and choice["token_ids"] == greedy_ref(prompt_ids, 10)
    chunks = sse(client, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": [1, 99999]}, 400, "vocabulary"),
    ({"prompt": [5] * 500, "max_tokens": 100}, 400, "maximum context length"),
    ({"prompt": "hi", "model": "gpt-9"}, 404, "does not exist"),
    ({"prompt": "hi", "n": 17}, 400, "n"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of must equal n"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, 400, "token ids"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "outside the vocabulary"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"max_tokens": 4}, 400, "prompt"),
])
def test_bad_requests_say_what_is_wrong(client: TestClient, body: dict, status: int, words: str) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_bad_json_and_bad_chat(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_overload_is_503_and_engine_error_is_500(client: TestClient, engine: Engine) -> None:
    engine.max_waiting = 0
    try:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    finally:
        engine.max_waiting = 64
    assert r.status_code == 503 and "retry" in r.json()["error"]["message"]

    experts = engine.model.model.layers[1].mlp.experts
    experts.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("expert service down"))
    try:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        for _ in range(100):  # wait out the restart after that failure, then fail a stream the same way
            try:
                chunks = sse(client, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2})
                break
            except AssertionError:
                time.sleep(0.05)
    finally:
        del experts.forward
    assert r.status_code == 500 and "expert service down" in r.json()["error"]["message"]
    assert "expert service down" in chunks[-1]["error"]["message"]  # then `data: [DONE]`, checked by sse()
    for _ in range(100):  # the server lives on: the engine restarts its loop
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        if r.status_code == 200:
            break
        time.sleep(0.05)
    assert r.status_code == 200


def test_health_models_metrics(client: TestClient) -> None:
    client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["server"] == "edge-a"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    text = client.get("/metrics").text
    for name in ["prism_requests_total", "prism_request_latency_seconds_bucket",
                 "prism_time_to_first_token_seconds_bucket", "prism_time_per_output_token_seconds_bucket",
                 "prism_resident_weight_bytes", "prism_placement_version", "prism_trace_replay",
                 "prism_requests_running"]:
        assert name in text, name
    assert 'prism_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_api_key(engine: Engine) -> None:
    app = create_app(engine, ServerMetrics(), MODEL, api_key="s3cret")
    with TestClient(app) as c:
        body = {"model": MODEL, "prompt": "Edge", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200


def test_openai_client_against_uvicorn(engine: Engine, greedy_ref) -> None:
    import openai
    import uvicorn

    app = create_app(engine, ServerMetrics(), MODEL, api_key="k")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the OS picks the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"return_token_ids": True})
        ids = engine.encode(PROMPT)
        assert out.choices[0].model_extra["token_ids"] == greedy_ref(ids, 6)
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 6
        stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                stream=True)
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0)
        assert text == full.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=99)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive() and engine.is_running  # the app did not own the engine: still running
