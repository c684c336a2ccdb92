"""The OpenAI-compatible HTTP API of one edge server (FastAPI).

`POST /v1/completions` and `POST /v1/chat/completions`, streamed (SSE `data: {chunk}` lines ending with
`data: [DONE]`) or not; `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Compatible with the `openai` client; differences, following vLLM where OpenAI has nothing:
* a prompt may be token ids (`[1, 2, 3]`, as OpenAI's legacy API allows); one prompt and `n=1` per request;
* `return_token_ids: true` adds the generated ids (`token_ids` in each choice; in a stream, each chunk's new ids)
  and the prompt ids (`prompt_token_ids`: in the choice for completions, at the top for chat);
* `ignore_eos: true` keeps generating past EOS (benchmarks); `seed` makes sampling reproducible.
Every body is checked by pydantic; bad requests get 400 with an OpenAI-style `{"error": {"message", ...}}` that
names the field, an unknown model 404, a missing/wrong API key 401, a full queue 503, a failed generation 500.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from prism_moe.runtime.engine import Engine, EngineError, EngineOverloaded, SamplingParams, TokenEvent
from prism_moe.runtime.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
MAX_STOP_STRINGS = 16
METRIC_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# --- request bodies ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    # Unknown fields are refused (as OpenAI does) so a misspelt parameter is not silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    return_token_ids: bool = False
    ignore_eos: bool = False
    user: str | None = None
    # Accepted only at their neutral values (clients send them by default).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported (one choice per request); send several requests instead")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("penalties are not supported; leave at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | int | None) -> bool | int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Body):
    # Token ids are strict ints so `["1"]` is a list of strings (text), never silently ids.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(v)}")
            v = v[0]
        if len(v) == 0:
            raise ValueError("prompt is empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(engine: Engine, metrics: ServerMetrics, model_name: str, api_key: str | None = None,
               extra_health: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """The server's FastAPI app. Its lifespan starts `engine` if it is not running (and then stops it at
    shutdown); `extra_health()` adds fields to `/health` (a raise there makes `/health` answer 503). The app
    registers `metrics.observe_generation` as an engine listener until its lifespan ends."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = not engine.is_running
        if started:
            engine.start()
        try:
            yield
        finally:
            engine.remove_listener(metrics.observe_generation)
            if started:
                engine.stop()

    app = FastAPI(title="prism-moe edge server", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.model_name = engine, metrics, model_name
    engine.add_listener(metrics.observe_generation)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    # --- errors ----------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def parse(request: Request, cls: type[_Body]) -> Any:
        """Parse the JSON body ourselves so bad JSON and bad fields both get our 400 (auth is checked first)."""
        check_auth(request)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        try:
            body = cls.model_validate(data)
        except Exception as e:
            if hasattr(e, "errors"):
                raise RequestValidationError(e.errors()) from e
            raise APIError(400, str(e)) from e
        check_model(body.model)
        return body

    # --- routes ----------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": "ok", "model": model_name, "engine_running": engine.is_running,
                                "running": engine.num_running, "waiting": engine.num_waiting,
                                "engine_restarts": engine.restarts}
        status = 200 if engine.is_running else 503
        if not engine.is_running:
            body["status"] = "engine not running"
        if extra_health is not None:
            try:
                body.update(extra_health())
            except Exception as e:
                body["status"], status = f"extra health check failed: {e}", 503
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.set_load(engine.num_running, engine.num_waiting)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _CREATED,
                                            "owned_by": "prism-moe", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await parse(request, CompletionRequest)
        prompt_ids = engine.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        return await _generate(engine, body, prompt_ids, max_tokens, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = await parse(request, ChatRequest)
        try:
            prompt_ids = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # chat has no default limit: whatever the context leaves
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        return await _generate(engine, body, prompt_ids, max_tokens, model_name, chat=True)

    return app


_CREATED = int(time.time())


async def _generate(engine: Engine, body: _Body, prompt_ids: list[int], max_tokens: int, model_name: str,
                    chat: bool) -> Response:
    """Submit to the engine and answer as one JSON body or as an SSE stream."""
    try:
        engine.check_request(prompt_ids, max_tokens, SamplingParams(temperature=body.temperature, top_p=body.top_p))
    except ValueError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from e
    try:
        stream = await engine.submit(prompt_ids, max_tokens, temperature=body.temperature, top_p=body.top_p,
                                     stop_token_ids=[] if body.ignore_eos else None, seed=body.seed,
                                     stop=body.stop_list())
    except EngineOverloaded as e:
        raise APIError(503, str(e), "server_overloaded", code="overloaded") from e
    except EngineError as e:
        raise APIError(503, str(e), "server_error", code="engine_unavailable") from e
    fmt = _Format(chat, model_name, body.return_token_ids, prompt_ids)
    if body.stream:
        return EventSourceResponse(_sse(stream, fmt, body.include_usage()),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    ids: list[int] = []
    text: list[str] = []
    reason: str | None = None
    try:
        async for ev in stream:
            if ev.token_id is not None:
                ids.append(ev.token_id)
            text.append(ev.text)
            reason = ev.finish_reason or reason
    except EngineError as e:
        raise APIError(500, str(e), "server_error", code="generation_failed") from e
    return JSONResponse(fmt.full("".join(text), ids, reason or "length"))


async def _sse(stream: AsyncIterator[TokenEvent], fmt: _Format, include_usage: bool) -> AsyncIterator[str]:
    """`data: {chunk}` per token, an error chunk if generation fails, then `data: [DONE]`."""
    n_out = 0
    try:
        if fmt.chat:  # OpenAI opens a chat stream with the role
            yield _data(fmt.chunk("", [], None, first=True, role=True))
        first = not fmt.chat
        async for ev in stream:
            ids = [ev.token_id] if ev.token_id is not None else []
            n_out += len(ids)
            yield _data(fmt.chunk(ev.text, ids, ev.finish_reason, first=first))
            first = False
        if include_usage:
            yield _data(fmt.usage_chunk(n_out))
    except EngineError as e:
        yield _data(APIError(500, str(e), "server_error", code="generation_failed").body())
    finally:
        await _aclose(stream)
    yield "data: [DONE]\n\n"


async def _aclose(stream: AsyncIterator[TokenEvent]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Format:
    """Builds OpenAI response and chunk objects for one request."""

    def __init__(self, chat: bool, model: str, token_ids: bool, prompt_ids: list[int]) -> None:
        self.chat, self.model, self.token_ids, self.prompt_ids = chat, model, token_ids, prompt_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, n_out: int) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(self.prompt_ids) + n_out}

    def full(self, text: str, ids: list[int], reason: str) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": reason}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        if self.token_ids:
            choice["token_ids"] = ids
            (out if self.chat else choice)["prompt_token_ids"] = self.prompt_ids
        out["choices"] = [choice]
        out["usage"] = self.usage(len(ids))
        return out

    def chunk(self, text: str, ids: list[int], reason: str | None, first: bool = False,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        if self.token_ids:
            choice["token_ids"] = ids
            if first:
                (out if self.chat else choice)["prompt_token_ids"] = self.prompt_ids
        out["choices"] = [choice]
        return out

    def usage_chunk(self, n_out: int) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = self.usage(n_out)
        return out


def _validation_response(errors: Any) -> JSONResponse:
    """400 with every problem spelled out: `field.path: message (got value)`."""
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # Drop pydantic's union-branch names (e.g. "str", "list[int]") from the field path.
        loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
        where = ".".join(loc) or "body"
        param = param or where
        msg = err.get("msg", "invalid")
        if "input" in err and err.get("type") != "missing":
            got = repr(err["input"])
            msg += f" (got {got[:60] + '...' if len(got) > 60 else got})"
        parts.append(f"{where}: {msg}")
    # Unions report one error per branch; keep each message once.
    message = "; ".join(dict.fromkeys(parts))
    return APIError(400, f"invalid request: {message}", param=param).response()


class _MetricsMiddleware:
    """Counts every HTTP request (endpoint, status) and its latency until the last byte (streams included)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in METRIC_ENDPOINTS else "other"
        t0 = time.perf_counter()
        status = 500
        recorded = False

        async def send_wrapper(message: dict) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                recorded = True
                self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not recorded:  # the client left mid-stream, or the app failed before answering
                self.metrics.observe_request(endpoint, status, time.perf_counter() - t0)
