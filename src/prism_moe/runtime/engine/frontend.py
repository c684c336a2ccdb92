"""The engine's frontend: admission, one token stream per request, detokenisation and stop strings.

`Engine` wraps one `Runner` (the batching loop that owns the model's forwards) and talks asyncio to its callers:

* Admission. Requests wait in the runner until they get their first token; we count them and refuse at once with
  `EngineOverloaded` (HTTP 503) beyond `max_waiting`, so the queue is bounded and a client is never left hanging.
* Routing to asyncio. One pump thread reads the runner's outputs and hands each to the event loop of the request
  it belongs to (`call_soon_threadsafe`), so several event loops may share one engine.
* Survival. An exception in a forward (a peer that died under the distributed experts hook) ends the runner's
  thread and fails the requests of that moment. The pump sees the thread gone and starts it again: errors for
  those requests, not a dead server.
* Text. Incremental detokenisation and stop strings (held back until they cannot be a stop string any more; the
  request is cancelled in the runner when one matches).

Threads: the caller's event loop(s) run `submit` and the streams; the runner's thread runs every model forward
(and so the experts hook) and the sampling; the pump thread only moves outputs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from prism_moe.runtime.engine.runners import Runner, RunnerOutput, RunnerRequest, caches_latents, pump_outputs
from prism_moe.runtime.engine.sampling import SamplingParams, SequenceSampler, TokenLogprobs

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """Generation failed (the model forward raised, or the engine is not running)."""


class EngineOverloaded(EngineError):
    """Too many requests are waiting for their first token; try again later (HTTP 503)."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the text it adds (may be "" while a stop string or a multi-byte
    character is pending); the last event of a request has `finished=True` and a `finish_reason`. `logprobs` is
    set when the request asked for them."""

    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class RequestStats:
    """Timings of one generation, measured on the event loop (what a client sees, less the network).

    `ttft_s`: submission -> first token; `tpot_s`: mean gap between later tokens (None with < 2 tokens);
    `latency_s`: submission -> last token. `finish_reason` is "stop", "length", "abort" or "error".
    """

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    latency_s: float
    finish_reason: str


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprobs] = field(default_factory=list)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _same_device(have: torch.device, want: torch.device) -> bool:
    """`cuda` matches `cuda:0` (the current device); otherwise type and index must agree."""
    if have.type != want.type:
        return False
    if want.type == "cuda" and want.index is None:
        return have.index in (None, torch.cuda.current_device())
    return have.index == want.index


# Tokens of prompt context given to the detokenizer, so the first generated token decodes with the right spacing.
_DETOK_CONTEXT = 5


@dataclass
class _Request:
    id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_len: int
    max_tokens: int
    stop_ids: frozenset[int]
    stops: tuple[str, ...]
    sampler: SequenceSampler
    t_submit: float
    ids: list[int] = field(default_factory=list)  # detokenizer window: prompt context + generated
    n_out: int = 0  # generated tokens seen
    prefix_offset: int = 0
    read_offset: int = 0
    pending: str = ""  # decoded text not yet emitted (possible start of a stop string)
    t_first: float | None = None
    t_last: float | None = None
    done: bool = False
    closed: bool = False


class TokenStream:
    """The `TokenEvent`s of one request (an async iterator). `aclose()` cancels the request, also before its first
    event was read (a bare async generator would skip its cleanup then and keep the request's place)."""

    def __init__(self, engine: Engine, req: _Request) -> None:
        self._engine, self._req = engine, req
        self._events = engine._stream(req)

    @property
    def request_id(self) -> str:
        return self._req.id

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()
        self._engine._close(self._req, "abort")


class Engine:
    """Continuous-batching generation over one model on one device.

    `await engine.submit(prompt_ids, max_tokens, ...)` admits a request (or raises) and returns an async iterator
    of `TokenEvent`s; greedy (temperature 0) tokens equal `model.generate(do_sample=False)`. Call `start()`
    before submitting and `stop()` at the end (or use `with engine:`).

    Sizes: `kv_cache_tokens` tokens of KV cache shared by all requests (pages of `page_size`), at most
    `max_running` requests and `max_batch_tokens` tokens per forward, at most `max_waiting` requests without a
    first token before `submit` refuses. `max_model_len` (prompt + completion) defaults to the model's
    `max_position_embeddings`, capped by the cache. `device` 'auto' picks cuda when available; `None` keeps the
    model where it is (the model is moved only when it is elsewhere).

    `batching` picks the runner: "slots" (the default, "auto") is `SlotRunner`, a preallocated per-slot cache that
    holds every family's cache, latent attention included, and measured faster on CPU (docs/results.md); its memory
    is `max_running` x the longest request so far (it ignores `kv_cache_tokens` and `page_size`). "paged" is
    transformers' continuous batching (`HFBatchingRunner`: a paged cache of `kv_cache_tokens`; not for latent
    attention, see `caches_latents`).
    """

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device | None = "auto", *,
                 max_running: int = 32, max_waiting: int = 64, max_batch_tokens: int = 512,
                 kv_cache_tokens: int = 16384, page_size: int = 32, max_model_len: int | None = None,
                 use_cuda_graph: bool = False, batching: Literal["auto", "paged", "slots"] = "auto",
                 slot_runner: Callable[..., Runner] | None = None) -> None:
        self.device = model.device if device is None else resolve_device(device)
        if not _same_device(model.device, self.device):  # a model placed already (maybe partly meta) stays put
            model = model.to(self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        text_config = model.config.get_text_config()
        self.vocab_size: int = int(model.get_input_embeddings().num_embeddings)
        limit = min(int(getattr(text_config, "max_position_embeddings", None) or kv_cache_tokens), kv_cache_tokens)
        self.max_model_len: int = min(max_model_len, limit) if max_model_len else limit
        self.eos_token_ids: tuple[int, ...] = _eos_ids(model, tokenizer)
        self.max_waiting = max_waiting
        if batching not in ("auto", "paged", "slots"):
            raise ValueError(f"batching must be 'auto', 'slots' or 'paged', got {batching!r}")
        if batching == "paged" and caches_latents(text_config):
            raise ValueError("batching='paged' cannot hold this model's latent attention cache (DeepSeek-V2/V3); "
                             "use batching='slots' (the default)")
        self.batching = "slots" if batching == "auto" else batching
        self.max_running = max_running
        self._runner_kwargs = dict(max_running=max_running, max_batch_tokens=max_batch_tokens,
                                   kv_cache_tokens=kv_cache_tokens, page_size=page_size,
                                   use_cuda_graph=use_cuda_graph)
        # makes the "slots" runner: `SlotRunner` or a subclass taking the same first four arguments (a server that
        # executes plans passes `plans.PlanRunner` with its gate, client and route bound)
        self._slot_runner = slot_runner
        self._runner: Runner | None = None
        self._pump: threading.Thread | None = None
        self._stopping = threading.Event()
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # guards _requests and the counters (event loops + pump thread)
        self._n_waiting = 0
        self._ids = itertools.count()
        self._listeners: list[Callable[[RequestStats], None]] = []
        self.restarts = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = "auto", dtype: str = "auto",
                        **kwargs: Any) -> Engine:
        """Load a checkpoint folder (model + tokenizer) and wrap it."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), device, **kwargs)

    # --- tokenizer helpers ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens included), as OpenAI's logprobs name tokens."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt ids of a chat (`[{"role": ..., "content": str}, ...]`), ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (e.g. roles must alternate) raise jinja errors
            raise ValueError(f"this model's chat template refused the messages: {e}") from e
        # The template writes the special tokens (bos) itself.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._pump is not None and self._pump.is_alive()

    @property
    def runner(self) -> Runner | None:
        """The batching loop while the engine runs (e.g. to give a `PlanRunner` a new route)."""
        return self._runner

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def num_running(self) -> int:
        return len(self._requests) - self._n_waiting

    def start(self) -> None:
        """Create the runner and start its generation thread and the pump thread."""
        if self.is_running:
            return
        self._runner = self.make_runner()
        self._runner.start()
        self._stopping.clear()
        self._pump = threading.Thread(target=self._pump_loop, name="prism-engine-pump", daemon=True)
        self._pump.start()

    def make_runner(self) -> Runner:
        """A new (not started) batching loop over the model with this engine's limits."""
        if self.batching == "slots":
            from prism_moe.runtime.engine.slots import SlotRunner

            make = self._slot_runner or SlotRunner
            return make(self.model, self.max_running, self.max_model_len, self._runner_kwargs["max_batch_tokens"])
        from prism_moe.runtime.engine.hf_batching import HFBatchingRunner

        return HFBatchingRunner(self.model, self.eos_token_ids, _pad_id(self.model, self.tokenizer),
                                **self._runner_kwargs)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once: in-flight requests end with `EngineError`."""
        if self._runner is None:
            return
        self._stopping.set()
        try:
            self._runner.stop(timeout=timeout)
        finally:
            if self._pump is not None:
                self._pump.join(timeout)
            self._fail_all("engine stopped")
            self._runner = None
            self._pump = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the generation loop between two steps (e.g. to swap expert weights); requests keep their state."""
        if self._runner is None:
            raise EngineError("engine is not running")
        with self._runner.pause():
            yield

    def add_listener(self, fn: Callable[[RequestStats], None]) -> None:
        """Call `fn(stats)` on the event loop when a request ends (metrics); it must be quick and not raise."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[RequestStats], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # --- requests ------------------------------------------------------------------------------------------------
    async def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams | None = None, *,
                     stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] = (),
                     **sampling_fields: Any) -> TokenStream:
        """Admit one request and return its token stream.

        `sampling` (or its fields as keywords: `temperature=0.7, seed=1, ...`) says how tokens are picked; the
        default is greedy. `stop_token_ids` default to the model's EOS ids (pass `[]` to ignore EOS); the stop token
        is part of the output ids. `stop` strings end the text before them. Raises `ValueError` for an invalid
        request, `EngineOverloaded` when `max_waiting` requests have no token yet, `EngineError` when not running.
        The stream raises `EngineError` if generation fails; `aclose()` (also before the first token) cancels the
        request and frees its place.
        """
        prompt = [int(t) for t in prompt_ids]
        params = sampling if sampling is not None else SamplingParams(**sampling_fields)
        self.check_request(prompt, max_tokens, params)
        if not self.is_running or self._runner is None:
            raise EngineError("engine is not running")
        stop_ids = self.eos_token_ids if stop_token_ids is None else tuple(int(t) for t in stop_token_ids)
        sampler = SequenceSampler(params, prompt)
        req = _Request(id=f"r{next(self._ids)}", loop=asyncio.get_running_loop(), queue=asyncio.Queue(),
                       prompt_len=len(prompt), max_tokens=max_tokens, stop_ids=frozenset(stop_ids),
                       stops=tuple(s for s in stop if s), sampler=sampler, t_submit=time.perf_counter())
        # The detokenizer window starts with a little prompt context; deltas are what new tokens add to it.
        req.ids = prompt[-_DETOK_CONTEXT:]
        req.read_offset = len(req.ids)
        with self._lock:
            if self._n_waiting >= self.max_waiting:
                raise EngineOverloaded(f"{self._n_waiting} requests are waiting for their first token "
                                       f"(limit {self.max_waiting}); retry later")
            self._requests[req.id] = req
            self._n_waiting += 1
        try:
            accepted = self._runner.add_request(RunnerRequest(req.id, prompt, max_tokens, req.stop_ids, sampler))
        except Exception as e:  # the runner refuses while stopping
            self._forget(req)
            raise EngineError(f"engine refused the request: {e}") from e
        if not accepted:
            self._forget(req)
            raise EngineError("engine is not accepting requests (restarting or stopping); retry")
        return TokenStream(self, req)

    def check_request(self, prompt_ids: Sequence[int], max_tokens: int,
                      sampling: SamplingParams | None = None) -> None:
        """Raise `ValueError` saying what is wrong with a request (the HTTP layer calls it before submitting)."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = next(((i, t) for i, t in enumerate(prompt_ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad[1]} at position {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens, but "
                             f"{len(prompt_ids) + max_tokens} were requested ({len(prompt_ids)} in the prompt, "
                             f"{max_tokens} in the completion); shorten the prompt or lower max_tokens")
        (sampling or SamplingParams()).check(self.vocab_size)

    async def generate(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams | None = None,
                       **kwargs: Any) -> GenerationResult:
        """`submit` and collect: all token ids, the text, the finish reason (and logprobs when asked for)."""
        ids, text, lps, reason = [], [], [], None
        async for ev in await self.submit(prompt_ids, max_tokens, sampling, **kwargs):
            if ev.token_id is not None:
                ids.append(ev.token_id)
            if ev.logprobs is not None:
                lps.append(ev.logprobs)
            text.append(ev.text)
            reason = ev.finish_reason
        return GenerationResult(ids, "".join(text), reason or "length", lps)

    async def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0) -> list[TokenLogprobs | None]:
        """Logprobs of each prompt token given the ones before it (None for the first), with the `top` most likely
        tokens at each position; raw distribution, as vLLM's `prompt_logprobs`. One forward over the prompt while
        the runner holds between two steps."""
        prompt = [int(t) for t in prompt_ids]
        self.check_request(prompt, 1, SamplingParams(logprobs=top))
        if self._runner is None:
            raise EngineError("engine is not running")
        runner = self._runner

        try:
            return await asyncio.to_thread(runner.prompt_logprobs, prompt, top)
        except Exception as e:
            raise EngineError(f"scoring the prompt failed: {e}") from e

    # --- event-loop side -----------------------------------------------------------------------------------------
    async def _stream(self, req: _Request) -> AsyncIterator[TokenEvent]:
        reason = "abort"
        try:
            while not req.done:
                out = await req.queue.get()
                if isinstance(out, BaseException):
                    reason = "error"
                    raise EngineError(f"generation failed: {out}")
                if out.error is not None:
                    reason = "error"
                    raise EngineError(f"generation failed: {out.error}")
                for ev in self._advance(req, out):
                    if ev.finished:
                        reason = ev.finish_reason or "length"
                    yield ev
        finally:
            self._close(req, reason)

    def _close(self, req: _Request, reason: str) -> None:
        """End a request once: cancel it in the runner if it is still generating, forget it, report its stats."""
        if req.closed:
            return
        req.closed = True
        if not req.done and self._runner is not None:
            self._runner.cancel_request(req.id)  # client went away or an error: free the KV cache
        self._forget(req)
        self._notify(req, reason)

    def _advance(self, req: _Request, out: RunnerOutput) -> list[TokenEvent]:
        """TokenEvents for the tokens of `out` (all tokens so far) not seen yet."""
        now = time.perf_counter()
        new = out.generated_tokens[req.n_out:]
        if new and req.t_first is None:
            req.t_first = now
            with self._lock:
                self._n_waiting -= 1
        events = []
        finished = out.is_finished()
        want_logprobs = req.sampler.params.logprobs is not None
        for i, tok in enumerate(new):
            lp = req.sampler.logprobs[req.n_out] if want_logprobs else None
            req.n_out += 1
            req.t_last = now
            req.ids.append(tok)
            req.pending += self._detok_step(req)
            last = finished and i == len(new) - 1
            text, hit = self._take_text(req, flush=last)
            if hit:  # a stop string: end here, and stop the runner generating for it
                req.done = True
                if self._runner is not None:
                    self._runner.cancel_request(req.id)
                events.append(TokenEvent(tok, text, True, "stop", lp))
                return events
            if last:
                req.done = True
                reason: FinishReason = "stop" if tok in req.stop_ids else "length"
                events.append(TokenEvent(tok, text, True, reason, lp))
            else:
                events.append(TokenEvent(tok, text, logprobs=lp))
        if finished and not req.done:  # defensive: finished with no new token
            req.done = True
            text, _ = self._take_text(req, flush=True)
            events.append(TokenEvent(None, text, True, "length"))
        return events

    def _detok_step(self, req: _Request) -> str:
        """Text added by the newest token; "" while it ends in an incomplete UTF-8 sequence."""
        prefix = self.decode(req.ids[req.prefix_offset:req.read_offset])
        full = self.decode(req.ids[req.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            req.prefix_offset, req.read_offset = req.read_offset, len(req.ids)
            return full[len(prefix):]
        return ""

    def _take_text(self, req: _Request, flush: bool) -> tuple[str, bool]:
        """(text to emit now, whether a stop string matched). Holds back a tail that may begin a stop string."""
        if flush and req.read_offset < len(req.ids):  # an incomplete character at the end shows as U+FFFD
            prefix = self.decode(req.ids[req.prefix_offset:req.read_offset])
            req.pending += self.decode(req.ids[req.prefix_offset:])[len(prefix):]
            req.prefix_offset = req.read_offset = len(req.ids)
        text = req.pending
        if req.stops:
            hits = [i for i in (text.find(s) for s in req.stops) if i >= 0]
            if hits:
                req.pending = ""
                return text[:min(hits)], True
            if not flush:
                keep = max((n for s in req.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                            if text.endswith(s[:n])), default=0)
                req.pending = text[len(text) - keep:] if keep else ""
                return text[:len(text) - keep], False
        req.pending = ""
        return text, False

    def _notify(self, req: _Request, reason: str) -> None:
        end = req.t_last if req.t_last is not None else time.perf_counter()
        tpot = (req.t_last - req.t_first) / (req.n_out - 1) if req.n_out > 1 else None
        stats = RequestStats(req.id, req.prompt_len, req.n_out,
                             None if req.t_first is None else req.t_first - req.t_submit, tpot,
                             end - req.t_submit, reason)
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # a metrics bug must not break a response
                log.exception("engine stats listener failed")

    def _forget(self, req: _Request) -> None:
        with self._lock:
            if self._requests.pop(req.id, None) is not None and req.t_first is None:
                self._n_waiting -= 1

    # --- pump thread ---------------------------------------------------------------------------------------------
    def _pump_loop(self) -> None:
        """Route outputs to their event loops; restart the runner's thread if a forward killed it."""
        assert self._runner is not None
        # A step's outputs arrive together: each event loop is woken once for them, not once per token (measured:
        # the loop thread's wake-ups were a cost at 16+ streams).
        pump_outputs(self._runner, self._stopping, lambda outs: self._deliver_all([(o.request_id, o) for o in outs]),
                     self._restarted)

    def _restarted(self) -> None:
        self.restarts += 1

    def _deliver_all(self, items: list[tuple[str, Any]]) -> None:
        """Hand each (request id, output or error) to its request's queue: one callback per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
        with self._lock:
            for request_id, item in items:
                req = self._requests.get(request_id)
                if req is not None:  # else cancelled or already finished
                    by_loop.setdefault(req.loop, []).append((req, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # its event loop is closed: nobody is listening
                for req, _ in batch:
                    self._forget(req)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._requests)
        self._deliver_all([(rid, EngineError(message)) for rid in ids])


def _put_all(batch: list[tuple[_Request, Any]]) -> None:
    for req, item in batch:
        req.queue.put_nowait(item)


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from the generation config, else the model config, else the tokenizer."""
    for src in (getattr(model, "generation_config", None), model.config.get_text_config(), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else list(eos)
            return tuple(int(i) for i in ids if i is not None and i >= 0)
    return ()


def _pad_id(model: torch.nn.Module, tokenizer: Any) -> int:
    for src in (getattr(model, "generation_config", None), tokenizer, model.config.get_text_config()):
        pad = getattr(src, "pad_token_id", None)
        if isinstance(pad, int) and pad >= 0:
            return pad
    return 0
