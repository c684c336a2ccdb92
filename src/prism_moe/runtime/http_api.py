"""The OpenAI-compatible HTTP API of one edge server (FastAPI).

`POST /v1/completions` and `POST /v1/chat/completions`, streamed (SSE `data: {chunk}` lines ending with
`data: [DONE]`) or not; `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text). Every body is a
pydantic model declared to FastAPI, so `/openapi.json` (and `/docs`) list each field, its range and each error
status.

Compatible with the `openai` client, with vLLM's semantics where OpenAI leaves them open:
* sampling: `temperature`, `top_p`, `top_k` (vLLM's extension), `seed` (same seed, same tokens; choice i of
  `n` uses `seed + i`), `presence_penalty` and `frequency_penalty` (on generated tokens), `repetition_penalty`
  (vLLM's, on prompt and generated tokens), `logit_bias` (token id -> [-100, 100]), `stop`, `n` choices;
* `logprobs` of the raw distribution (before penalties, bias and temperature, as vLLM by default): completions
  take `logprobs: k` (the chosen token and the k most likely, in `top_logprobs`), and with `echo: true` the
  prompt comes back first with its own logprobs (the first token's are null); chat takes `logprobs: true` and
  `top_logprobs: k`;
* a prompt may be token ids (`[1, 2, 3]`, as OpenAI's legacy API allows); one prompt per request;
* `return_token_ids: true` adds the generated ids (`token_ids` in each choice; in a stream, each chunk's new ids)
  and the prompt ids (`prompt_token_ids`: in the choice for completions, at the top for chat);
* `ignore_eos: true` keeps generating past EOS (benchmarks); `stream_options.include_usage` ends a stream with a
  usage chunk.
Errors are OpenAI-style `{"error": {"message", "type", "param", "code"}}`: 400 for a bad body (the message names
the field), 401 for a missing/wrong API key, 404 for an unknown model, 503 (with `Retry-After`) when the engine's
waiting queue is full or the engine is not running, 500 when generation fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from prism_moe.runtime.engine import (
    Engine,
    EngineError,
    EngineOverloaded,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
    TokenStream,
)
from prism_moe.runtime.engine.sampling import MAX_LOGPROBS
from prism_moe.runtime.metrics import ServerMetrics

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n
MIN_LOGPROB = -9999.0  # as vLLM: a -inf logprob would not be valid JSON
METRIC_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# The API key as `Authorization: Bearer <key>` (documented in the schema; checked in `create_app`).
_bearer = HTTPBearer(auto_error=False, description="The server's API key (`prism serve --api-key`), if it has one.")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


# --- request bodies ---------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="End the stream with a chunk holding the usage (no choices).")


Bias = Annotated[float, Field(ge=-100, le=100)]


class _Body(BaseModel):
    # Unknown fields are refused (as OpenAI does) so a misspelt parameter is not silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = Field(None, description="The served model's name (GET /v1/models); optional.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (exact argmax).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to p.")
    top_k: int = Field(0, ge=-1, description="vLLM extension: keep the k most likely tokens; 0 or -1: all.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate for the prompt.")
    stream: bool = Field(False, description="Answer as server-sent events, one chunk per token.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} strings that end the text "
                                                           "(not included in it).")
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63,
                             description="Same seed, same tokens (choice i uses seed + i).")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted once from the logit of every token "
                                                                  "already generated.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted from a token's logit once per time "
                                                                   "it was generated.")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="vLLM extension: logits of tokens in the "
                                      "prompt or the output are divided (if > 0) or multiplied by it; 1: off.")
    logit_bias: dict[str, Bias] | None = Field(None, description="Token id (as a string) -> bias added to its "
                                                                 "logit, in [-100, 100].")
    return_token_ids: bool = Field(False, description="Add the generated and prompt token ids to the answer.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids written as strings (e.g. \"50256\"), got {key!r}")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Body:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, choice: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()}, logprobs=logprobs,
            seed=None if self.seed is None else self.seed + choice)


class CompletionRequest(_Body):
    # Token ids are strict ints so `["1"]` is a list of strings (text), never silently ids.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(
        description="Text, or token ids; a list of one prompt is accepted too.")
    echo: bool = Field(False, description="Answer with the prompt before the completion (with logprobs: the "
                                          "prompt's own logprobs too).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return each token's logprob and the "
                                 "k most likely tokens' (raw distribution).")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Only equal to n (or unset).")
    suffix: str | None = Field(None, description="Not supported: must be empty.")

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

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n ({self.n}) or be unset: choices are not ranked here")
        return self


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
    max_completion_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice "
                                                                      "(wins over max_tokens).")
    logprobs: bool = Field(False, description="Return each generated token's logprob (raw distribution).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="With logprobs: the k most likely "
                                                                              "tokens at each position.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


# --- response bodies (documentation: /openapi.json; the handlers build plain dicts) ---------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


def _responses(ok: type[BaseModel] | None, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """The documented answers of a /v1 route."""
    out: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
        404: {"model": ErrorResponse, "description": "Unknown model"}}
    if ok is not None:
        out[200] = {"model": ok}
        if stream:
            # SSE: the schema describes one event (as OpenAPI 3.2's itemSchema does, and schemathesis checks)
            event = {"type": "object", "required": ["data"],
                     "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
            out[200]["content"] = {"text/event-stream": {"schema": event, "description":
                                                         "with stream=true: `data: {chunk}` events, then `data: [DONE]`"}}
        out.update({
            400: {"model": ErrorResponse, "description": "Invalid request (the message names the field)"},
            500: {"model": ErrorResponse, "description": "Generation failed (e.g. a peer holding experts failed)"},
            503: {"model": ErrorResponse, "description": "Waiting queue full or engine not running; retry "
                                                         "after `Retry-After` seconds"}})
    return out


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(engine: Engine, metrics: ServerMetrics, model_name: str, api_key: str | None = None,
               extra_health: Callable[[], dict[str, Any]] | None = None, *, openai: bool = True,
               status: bool = True) -> FastAPI:
    """The server's FastAPI app. Its lifespan starts `engine` if it is not running (and then stops it at
    shutdown); `extra_health()` adds fields to `/health` (a raise there makes `/health` answer 503). The app
    registers `metrics.observe_generation` as an engine listener until its lifespan ends.

    `prism serve` splits it over two processes (runtime/api_process.py): the API process's app has the OpenAI
    routes (`status=False`; the rest goes to the model's process), the model process's app the rest (`openai=False`,
    `engine` a `RunnerHost`). Both True: one process (tests, the library, `prism serve --api-in-process`)."""

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
    # without the status routes, another process answers (and counts) the other paths
    app.add_middleware(_MetricsMiddleware, metrics=metrics, counted=None if status else "/v1/")
    _document_400_not_422(app)

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

    async def check_auth(credentials: BearerCredentials) -> None:
        """Runs before the body is validated, so a caller without the key learns nothing about bodies. Async: a
        sync dependency would cost every request a hop to a worker thread and back."""
        if api_key is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.strip().encode(),
                                                             api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    if status:
        _add_status_routes(app, engine, metrics, model_name, extra_health)
    if openai:
        _add_openai_routes(app, engine, model_name, check_auth)
    return app


def _add_status_routes(app: FastAPI, engine: Engine, metrics: ServerMetrics, model_name: str,
                       extra_health: Callable[[], dict[str, Any]] | None) -> None:
    @app.get("/health", responses={503: {"description": "Engine not running or a health check failed (same "
                                                        "body, with `status` saying why)"}})
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

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format"}})
    async def metrics_endpoint() -> Response:
        metrics.set_load(engine.num_running, engine.num_waiting)
        return Response(metrics.render(), media_type=metrics.content_type)


def _add_openai_routes(app: FastAPI, engine: Engine, model_name: str, check_auth: Callable[..., Any]) -> None:
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.get("/v1/models", responses=_responses(None), dependencies=[Depends(check_auth)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": _CREATED,
                                            "owned_by": "prism-moe", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", response_model=None, responses=_responses(CompletionResponse, stream=True),
              dependencies=[Depends(check_auth)])
    async def completions(body: CompletionRequest) -> Response:
        """OpenAI's (legacy) completions: one prompt, `n` choices."""
        check_model(body.model)
        prompt_ids = engine.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        return await _generate(engine, body, prompt_ids, max_tokens, model_name, chat=False)

    @app.post("/v1/chat/completions", response_model=None,
              responses=_responses(ChatCompletionResponse, stream=True), dependencies=[Depends(check_auth)])
    async def chat_completions(body: ChatRequest) -> Response:
        """OpenAI's chat completions: the model's chat template over `messages`, `n` choices."""
        check_model(body.model)
        try:
            prompt_ids = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # chat has no default limit: whatever the context leaves
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        return await _generate(engine, body, prompt_ids, max_tokens, model_name, chat=True)


_CREATED = int(time.time())


def _document_400_not_422(app: FastAPI) -> None:
    """Bad bodies answer 400 (OpenAI's status), so the schema must not promise FastAPI's default 422."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- generation ---------------------------------------------------------------------------------------------------
async def _generate(engine: Engine, body: CompletionRequest | ChatRequest, prompt_ids: list[int], max_tokens: int,
                    model_name: str, chat: bool) -> Response:
    """Submit `n` choices to the engine and answer as one JSON body or as an SSE stream."""
    if chat:
        want: int | None = (body.top_logprobs or 0) if body.logprobs else None
    else:
        want = body.logprobs
    samplings = [body.sampling(i, want) for i in range(body.n)]
    try:
        engine.check_request(prompt_ids, max_tokens)
    except ValueError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from e
    try:
        samplings[0].check(engine.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e)) from e
    echo = not chat and body.echo
    prompt_lps: list[TokenLogprobs | None] | None = None
    if echo and want is not None:
        try:
            prompt_lps = await engine.prompt_logprobs(prompt_ids, want)
        except EngineError as e:
            raise APIError(500, str(e), "server_error", code="generation_failed") from e
    streams = await _submit_all(engine, prompt_ids, max_tokens, samplings, body)
    fmt = _Format(engine, chat, model_name, body.return_token_ids, prompt_ids, want, echo, prompt_lps)
    if body.stream:
        return EventSourceResponse(_sse(streams, fmt, body.include_usage()),
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = await asyncio.gather(*[_collect(s) for s in streams])
    except EngineError as e:
        raise APIError(500, str(e), "server_error", code="generation_failed") from e
    finally:
        for s in streams:
            await s.aclose()
    return JSONResponse(fmt.full(results))


async def _submit_all(engine: Engine, prompt_ids: list[int], max_tokens: int, samplings: list[SamplingParams],
                      body: _Body) -> list[TokenStream]:
    """One engine request per choice, all admitted or none (503 when the waiting queue cannot take them)."""
    if engine.num_waiting + len(samplings) > engine.max_waiting:
        raise APIError(503, f"{engine.num_waiting} requests are waiting for their first token and this one needs "
                            f"{len(samplings)} places (limit {engine.max_waiting}); retry later",
                       "server_overloaded", code="overloaded", headers={"Retry-After": "1"})
    streams: list[TokenStream] = []
    try:
        for params in samplings:
            streams.append(await engine.submit(prompt_ids, max_tokens, params,
                                               stop_token_ids=[] if body.ignore_eos else None,
                                               stop=body.stop_list()))
    except (EngineError, ValueError) as e:
        for s in streams:
            await s.aclose()
        if isinstance(e, ValueError):
            raise APIError(400, str(e)) from e
        if isinstance(e, EngineOverloaded):
            raise APIError(503, str(e), "server_overloaded", code="overloaded",
                           headers={"Retry-After": "1"}) from e
        raise APIError(503, str(e), "server_error", code="engine_unavailable", headers={"Retry-After": "1"}) from e
    return streams


async def _collect(stream: TokenStream) -> list[TokenEvent]:
    return [ev async for ev in stream]


async def _merged(streams: Sequence[TokenStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from all streams as they come; raises the first stream's `EngineError`."""
    if len(streams) == 1:  # the common case, without tasks
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: TokenStream) -> None:
        try:
            async for ev in stream:
                await queue.put((i, ev))
        except EngineError as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, EngineError):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sse(streams: list[TokenStream], fmt: _Format, include_usage: bool) -> AsyncIterator[str]:
    """`data: {chunk}` per token, an error chunk if generation fails, then `data: [DONE]`."""
    n_out = 0
    try:
        for i in range(len(streams)):
            if fmt.chat:  # OpenAI opens a chat stream with the role
                yield _data(fmt.chunk(i, "", [], None, first=True, role=True))
            elif fmt.echo:  # the prompt first
                yield _data(fmt.chunk(i, fmt.prompt_text, [], None, lps=fmt.prompt_entries(), first=True))
        first = [not fmt.chat and not fmt.echo] * len(streams)
        async for i, ev in _merged(streams):
            ids = [ev.token_id] if ev.token_id is not None else []
            n_out += len(ids)
            entries = [(ev.token_id, ev.logprobs)] if ev.token_id is not None and ev.logprobs is not None else []
            yield _data(fmt.chunk(i, ev.text, ids, ev.finish_reason, lps=entries, first=first[i]))
            first[i] = False
        if include_usage:
            yield _data(fmt.usage_chunk(n_out))
    except EngineError as e:
        yield _data(APIError(500, str(e), "server_error", code="generation_failed").body())
    finally:
        for s in streams:
            await s.aclose()
    yield "data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Format:
    """Builds OpenAI response and chunk objects for one request."""

    def __init__(self, engine: Engine, chat: bool, model: str, token_ids: bool, prompt_ids: list[int],
                 logprobs: int | None, echo: bool, prompt_lps: list[TokenLogprobs | None] | None) -> None:
        self.engine, self.chat, self.model, self.token_ids, self.prompt_ids = engine, chat, model, token_ids, prompt_ids
        self.logprobs, self.echo, self.prompt_lps = logprobs, echo, prompt_lps
        self.prompt_text = engine.decode(prompt_ids) if echo else ""
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # streamed completions: text offset reached per choice

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, n_out: int) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(self.prompt_ids) + n_out}

    def prompt_entries(self) -> list[tuple[int, TokenLogprobs | None]]:
        if self.prompt_lps is None:
            return []
        return list(zip(self.prompt_ids, self.prompt_lps, strict=True))

    # --- logprobs objects --------------------------------------------------------------------------------------
    def _lp_json(self, entries: list[tuple[int, TokenLogprobs | None]], offset: int = 0) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        text = self.engine.token_text
        if self.chat:
            return {"content": [{**_top_entry(text(t), lp.logprob),
                                 "top_logprobs": [_top_entry(text(i), v) for i, v in lp.top]}
                                for t, lp in entries if lp is not None]}
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, lp in entries:
            s = text(tok)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if lp is None:  # the first prompt token has no logprob
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(max(lp.logprob, MIN_LOGPROB))
            top: dict[str, float] = {}
            for i, v in lp.top:  # two tokens may decode to one text: the more likely keeps the key
                top.setdefault(text(i), max(v, MIN_LOGPROB))
            top.setdefault(s, max(lp.logprob, MIN_LOGPROB))  # as vLLM: the chosen token is always listed
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # --- whole answers -----------------------------------------------------------------------------------------
    def full(self, results: list[list[TokenEvent]]) -> dict[str, Any]:
        choices, n_out = [], 0
        for i, events in enumerate(results):
            ids = [ev.token_id for ev in events if ev.token_id is not None]
            n_out += len(ids)
            text = "".join(ev.text for ev in events)
            reason = next((ev.finish_reason for ev in reversed(events) if ev.finish_reason), "length")
            entries = [(ev.token_id, ev.logprobs) for ev in events if ev.token_id is not None]
            if self.chat:
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                          "logprobs": self._lp_json(entries), "finish_reason": reason}
            else:
                choice = {"index": i, "text": self.prompt_text + text,
                          "logprobs": self._lp_json(self.prompt_entries() + entries), "finish_reason": reason}
            if self.token_ids:
                choice["token_ids"] = ids
                if not self.chat:
                    choice["prompt_token_ids"] = self.prompt_ids
            choices.append(choice)
        out = self._head("chat.completion" if self.chat else "text_completion")
        if self.token_ids and self.chat:
            out["prompt_token_ids"] = self.prompt_ids
        out["choices"] = choices
        out["usage"] = self.usage(n_out)
        return out

    def chunk(self, index: int, text: str, ids: list[int], reason: str | None,
              lps: list[tuple[int, TokenLogprobs | None]] | None = None, first: bool = False,
              role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
            choice: dict[str, Any] = {"index": index, "delta": delta,
                                      "logprobs": None if role else self._lp_json(lps or []),
                                      "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            lp_json = self._lp_json(lps or [], self._offsets.get(index, 0))
            if lp_json is not None and lp_json["tokens"]:  # text_offset counts on from the last chunk's tokens
                self._offsets[index] = lp_json["text_offset"][-1] + len(lp_json["tokens"][-1])
            choice = {"index": index, "text": text, "logprobs": lp_json, "finish_reason": reason}
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


def _top_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(token.encode("utf-8"))}


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

    def __init__(self, app: Any, metrics: ServerMetrics, counted: str | None = None) -> None:
        self.app, self.metrics, self.counted = app, metrics, counted  # counted: only paths with this prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or (self.counted and not scope.get("path", "").startswith(self.counted)):
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
