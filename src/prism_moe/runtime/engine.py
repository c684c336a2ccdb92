"""The generation engine of one edge server: a transformers causal LM serving many requests at once.

Batching is transformers' own continuous batching (`model.init_continuous_batching()` ->
`ContinuousBatchingManager`): a paged KV cache, chunked prefill, and one background thread that runs each step's
forward over every active request. Checked on CPU with transformers 5.24 and the tiny MoE models: greedy tokens
equal `model.generate(do_sample=False)` per request, also when requests of different lengths share steps, for
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE. Not for DeepSeek-V2/V3: their multi-head latent attention caches two
latents of different widths, which the paged cache cannot hold (index_copy_ shape error in the first forward).
Those models get `PaddedBatchLoop`, a small loop of our own with per-request caches padded into one batched
decode forward per step (`Engine(batching="auto")` picks it).

What this module adds around the manager, and why:

* Per-request sampling. The manager decides greedy vs sampling once for all requests (`do_sample` of its
  `GenerationConfig`) and has no per-request seed. We run it greedy (argmax) and install three per-request logits
  processors (`_Temperature`, `_TopP`, `_Draw`): `_Draw` draws each sampled token by inverse CDF from a uniform
  number taken from the request's own `random.Random(seed)` and turns the row into a one-hot, so the argmax picks
  it. Temperature 0 leaves the row alone: exact greedy. Installing them replaces `manager.logit_processor` before
  the loop starts (an attribute, not a documented hook; `_install_sampling` checks it exists).
* Routing to asyncio. One pump thread reads the manager's output queue (`get_result`) and hands each output to the
  event loop of the request it belongs to (`call_soon_threadsafe`). `register_result_handler` is not used: it
  schedules a whole batch of outputs on the loop of the last handler, which breaks with several loops.
* Survival. An exception in a forward (a peer that died under the distributed experts hook) ends the manager's
  generation thread and fails every in-flight request. The pump sees the thread gone and starts it again, so
  one bad step gives errors to the requests of that moment, not a dead server.
* Admission. The manager's own queue bound blocks the caller for up to 10 s; we count waiting requests (no token
  yet) ourselves and refuse at once with `EngineOverloaded` (HTTP 503).
* Text. Incremental detokenization and stop strings (held back until they cannot be a stop string any more; the
  request is cancelled in the manager when one matches).

Threads: the caller's event loop(s) run `submit` and the stream; the manager's thread runs every model forward
(and so the experts hook); the pump thread only moves outputs. CUDA graphs, compile and async double-buffering
are off by default: a forward that waits on remote experts cannot be captured in a graph.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class EngineError(RuntimeError):
    """Generation failed (the model forward raised, or the engine is not running)."""


class EngineOverloaded(EngineError):
    """Too many requests are waiting for their first token; try again later (HTTP 503)."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the text it adds (may be "" while a stop string or a multi-byte
    character is pending); the last event of a request has `finished=True` and a `finish_reason`."""

    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None


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


# --- per-request sampling -----------------------------------------------------------------------------------------
# Three steps on float32 logits [B, V], each with one value per row; shared by both batching loops.
def apply_temperature(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """scores [B, V] / t [B, 1]; rows with t = 0 (greedy) are left alone."""
    return scores / torch.where(t > 0, t, torch.ones_like(t))


def apply_top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter (as transformers' TopPLogitsWarper) with p [B, 1]; rows with p >= 1 are left alone."""
    # On CPU a data-dependent shortcut is free; on GPU stay branch-free (no host sync).
    if scores.device.type == "cpu" and bool((p >= 1).all()):
        return scores
    sorted_scores, order = scores.sort(dim=-1)  # ascending, [B, V]
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum <= 1 - p) & (p < 1)
    remove[:, -1] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-hot rows [B, V] (0 at the pick, -inf elsewhere): argmax where u [B, 1] < 0 (greedy), else the inverse
    CDF of softmax(scores) at u. One uniform per sampled token, from the request's own RNG, makes a seeded
    request give the same tokens whatever shares its batches."""
    if scores.device.type == "cpu" and bool((u < 0).all()):
        return scores  # all greedy: the argmax that follows is ours
    greedy = scores.argmax(dim=-1, keepdim=True)  # [B, 1]
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]
    # Strictly below the total, so the pick is a token with non-zero probability.
    target = torch.minimum(u.clamp(min=0) * total, torch.nextafter(total, torch.zeros_like(total)))
    sampled = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.size(-1) - 1)
    pick = torch.where(u < 0, greedy, sampled)
    return torch.full_like(scores, -math.inf).scatter_(-1, pick, 0.0)


def _uniform(kwargs: dict[str, Any]) -> float:
    """The next uniform of a sampled request, -1 for a greedy one."""
    rng = kwargs.get("rng")
    return rng.random() if rng is not None and kwargs.get("temperature", 0.0) > 0 else -1.0


def _floats_as_int32(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(torch.int32)


def _fill_float(int32_tensor: torch.Tensor, value: float) -> None:
    int32_tensor.copy_(torch.full_like(int32_tensor, value, dtype=torch.float32).view(torch.int32))


def _arg(tensor_arg: torch.Tensor, rows: int) -> torch.Tensor:
    """[max_tokens] int32 argument row -> [rows, 1] float32."""
    return tensor_arg[:rows].view(torch.float32).unsqueeze(-1)


def _make_sampling_processors() -> Any:
    """The three sampling steps as per-request continuous-batching logits processors. Each gets one int32
    argument row per step (one value per request with a new token); floats travel as their bits."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    class _Temperature(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"temperature": float}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            _fill_float(int32_tensor, 0.0)

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            return _floats_as_int32([r.state.logit_processor_kwargs.get("temperature", 0.0)
                                     for r in requests_with_new_token])

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            return apply_temperature(scores, _arg(tensor_arg, scores.size(0)))

    class _TopP(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"top_p": float}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            _fill_float(int32_tensor, 1.0)

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            return _floats_as_int32([r.state.logit_processor_kwargs.get("top_p", 1.0)
                                     for r in requests_with_new_token])

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            return apply_top_p(scores, _arg(tensor_arg, scores.size(0)))

    class _Draw(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"rng": random.Random}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            _fill_float(int32_tensor, -1.0)

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            return _floats_as_int32([_uniform(r.state.logit_processor_kwargs) for r in requests_with_new_token])

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            return draw(scores, _arg(tensor_arg, scores.size(0)))

    procs = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([_Temperature(), _TopP(), _Draw()]))
    # The list counts argument rows only for processors it converts itself; ours are already per-request.
    procs.tensors_required = 3
    return procs


# --- the fallback loop for caches the paged cache cannot hold ------------------------------------------------------
def caches_latents(config: Any) -> bool:
    """True for multi-head latent attention (DeepSeek-V2/V3): it caches two latents of different widths per layer,
    which transformers 5.24's PagedAttentionCache cannot store (it fails with an index_copy_ shape mismatch)."""
    return getattr(config, "kv_lora_rank", None) is not None


@dataclass
class _Output:
    """The fields of transformers' `GenerationOutput` that the Engine reads."""

    request_id: str
    generated_tokens: list[int]
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished or self.error is not None


@dataclass
class _Seq:
    id: str
    prompt: list[int]
    max_new: int
    eos: frozenset[int]
    kwargs: dict[str, Any]  # temperature, top_p, rng
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer, [1, heads, length, dim]
    out: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:  # tokens in the cache
        return self.kv[0][0].shape[-2] if self.kv else 0


class PaddedBatchLoop:
    """A small continuous-batching loop with per-request caches, for models the paged cache cannot hold (MLA).

    Same surface as the part of `ContinuousBatchingManager` the Engine uses (add_request / cancel_request /
    get_result / start / stop / pause / is_running). One thread; each step it
      1. prefills the newly admitted requests, one at a time (batch 1, a fresh `DynamicCache` each), and
      2. decodes one token for every other active request in ONE forward: their cached tensors left-padded to a
         common length, an attention mask hiding the padding, per-row position ids.
    Step 2 rebuilds the padded batch every step, a copy about the size of what `DynamicCache`'s own concatenation
    moves in `generate`. Greedy tokens equal `model.generate` (checked for DeepSeek-V2, Mixtral, Qwen2-MoE). A
    forward that raises fails the requests of that step only; the loop goes on.
    """

    def __init__(self, model: Any, max_running: int) -> None:
        self.model = model
        self.max_running = max_running
        self._inbox: queue.Queue[_Seq] = queue.Queue()
        self._out: queue.Queue[_Output] = queue.Queue()
        self._cancelled: set[str] = set()
        self._active: list[_Seq] = []  # have their first token
        self._waiting: list[_Seq] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()  # pause handshake
        self._pauses = 0
        self._paused = False
        self._thread: threading.Thread | None = None

    # --- the manager's surface --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.is_running():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prism-padded-batch", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, block: bool = True, timeout: float | None = None, hard_stop: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if block and self._thread is not None:
            self._thread.join(timeout)

    def destroy(self) -> None:
        self.stop()

    def add_request(self, input_ids: list[int], request_id: str, max_new_tokens: int, streaming: bool = True,
                    eos_token_id: list[int] | None = None, **kwargs: Any) -> str | None:
        if not self.is_running() or self._stop.is_set():
            return None
        self._inbox.put(_Seq(request_id, list(input_ids), max_new_tokens,
                             frozenset(t for t in (eos_token_id or []) if t >= 0), kwargs))
        self._wake.set()
        return request_id

    def cancel_request(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
        self._wake.set()

    def get_result(self, timeout: float | None = None) -> _Output | None:
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            return None

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Hold the loop between two steps while the caller works (e.g. swaps expert weights)."""
        with self._cond:
            self._pauses += 1
            self._wake.set()
            while not self._paused and self.is_running():
                self._cond.wait(0.05)
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    # --- the loop -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.no_grad():
                while not self._stop.is_set():
                    self._hold_if_paused()
                    self._admit()
                    if not self._active and not self._waiting:
                        self._wake.wait(0.1)
                        self._wake.clear()
                        continue
                    self._step()
        except Exception as e:  # a bug in the loop itself: fail everything; the Engine starts the loop again
            log.exception("padded batch loop failed")
            self._fail(self._active + self._waiting, e)
            self._active, self._waiting = [], []
        finally:
            self._fail(self._active + self._waiting + _drain(self._inbox), EngineError("engine stopped"))
            self._active, self._waiting = [], []

    def _hold_if_paused(self) -> None:
        with self._cond:
            if not self._pauses:
                return
            self._paused = True
            self._cond.notify_all()
            while self._pauses and not self._stop.is_set():
                self._cond.wait(0.05)
            self._paused = False

    def _admit(self) -> None:
        self._waiting += _drain(self._inbox)
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._active = [s for s in self._active if s.id not in cancelled]
            self._waiting = [s for s in self._waiting if s.id not in cancelled]

    def _step(self) -> None:
        decoding = self._active
        room = max(0, self.max_running - len(decoding))
        new, self._waiting = self._waiting[:room], self._waiting[room:]
        for seq in new:
            try:
                self._prefill(seq)
            except Exception as e:
                self._fail([seq], e)
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:
                self._fail(decoding, e)
                decoding = []
        self._active = [s for s in decoding + new if s.out and not self._done(s)]

    def _prefill(self, seq: _Seq) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([seq.prompt], device=self.model.device)
        out = self.model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        seq.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._emit([seq], out.logits[:, -1])

    def _decode(self, seqs: list[_Seq]) -> None:
        from transformers import DynamicCache

        dev = self.model.device
        longest = max(s.length for s in seqs)
        cache = DynamicCache()
        for layer in range(len(seqs[0].kv)):  # left-pad each request's [1, h, len, d] to [B, h, longest, d]
            keys = torch.cat([_left_pad(s.kv[layer][0], longest) for s in seqs])
            values = torch.cat([_left_pad(s.kv[layer][1], longest) for s in seqs])
            cache.update(keys, values, layer)
        mask = torch.zeros(len(seqs), longest + 1, dtype=torch.long, device=dev)  # [B, longest + 1]
        for i, s in enumerate(seqs):
            mask[i, longest - s.length:] = 1
        positions = torch.tensor([[s.length] for s in seqs], device=dev)  # [B, 1]
        ids = torch.tensor([[s.out[-1]] for s in seqs], device=dev)  # [B, 1]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        for i, s in enumerate(seqs):  # strip the padding again (views; the next step copies)
            start = longest - s.length
            s.kv = [(layer.keys[i:i + 1, :, start:], layer.values[i:i + 1, :, start:]) for layer in out.cache.layers]
        self._emit(seqs, out.logits[:, -1])

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's token from logits [B, V] and report it."""
        rows = lambda xs: torch.tensor(xs, dtype=torch.float32, device=logits.device).unsqueeze(-1)  # noqa: E731
        scores = apply_temperature(logits.float(), rows([s.kwargs.get("temperature", 0.0) for s in seqs]))
        scores = apply_top_p(scores, rows([s.kwargs.get("top_p", 1.0) for s in seqs]))
        picks = draw(scores, rows([_uniform(s.kwargs) for s in seqs])).argmax(dim=-1).tolist()
        for s, tok in zip(seqs, picks, strict=True):
            s.out.append(int(tok))
            self._out.put(_Output(s.id, list(s.out), finished=self._done(s)))

    @staticmethod
    def _done(s: _Seq) -> bool:
        return bool(s.out) and (s.out[-1] in s.eos or len(s.out) >= s.max_new)

    def _fail(self, seqs: list[_Seq], error: BaseException) -> None:
        for s in seqs:
            self._out.put(_Output(s.id, list(s.out), error=str(error)))


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """[1, h, n, d] -> [1, h, length, d] with zeros in front."""
    return torch.nn.functional.pad(x, (0, 0, length - x.shape[-2], 0))


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


# --- requests ---------------------------------------------------------------------------------------------------
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
    t_submit: float
    ids: list[int] = field(default_factory=list)  # detokenizer window: prompt context + generated
    n_out: int = 0  # generated tokens seen
    prefix_offset: int = 0
    read_offset: int = 0
    pending: str = ""  # decoded text not yet emitted (possible start of a stop string)
    t_first: float | None = None
    t_last: float | None = None
    done: bool = False


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

    `batching`: "paged" is transformers' ContinuousBatchingManager; "padded" is `PaddedBatchLoop`; "auto" takes
    "padded" for models with latent attention caches (DeepSeek-V2/V3, see `caches_latents`), else "paged".
    """

    def __init__(self, model: Any, tokenizer: Any, device: str | torch.device | None = "auto", *,
                 max_running: int = 32, max_waiting: int = 64, max_batch_tokens: int = 512,
                 kv_cache_tokens: int = 16384, page_size: int = 32, max_model_len: int | None = None,
                 use_cuda_graph: bool = False, batching: Literal["auto", "paged", "padded"] = "auto") -> None:
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
        if batching not in ("auto", "paged", "padded"):
            raise ValueError(f"batching must be 'auto', 'paged' or 'padded', got {batching!r}")
        self.batching = batching if batching != "auto" else "padded" if caches_latents(text_config) else "paged"
        self.max_running = max_running
        self._cb_kwargs = dict(
            page_size=page_size, num_blocks=max(1, math.ceil(kv_cache_tokens / page_size)),
            max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_running,
            use_cuda_graph=use_cuda_graph, use_async_batching=False, max_queue_size=0)
        self._manager: Any = None
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

    def apply_chat_template(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt ids of a chat (`[{"role": ..., "content": str}, ...]`), ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # The template writes the special tokens (bos) itself.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._pump is not None and self._pump.is_alive()

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    @property
    def num_running(self) -> int:
        return len(self._requests) - self._n_waiting

    def start(self) -> None:
        """Create the batching loop and start its generation thread and the pump thread."""
        if self.is_running:
            return
        if self.batching == "padded":
            self._manager = PaddedBatchLoop(self.model, self.max_running)
        else:
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            gen_config = GenerationConfig(do_sample=False, eos_token_id=list(self.eos_token_ids) or -1,
                                          pad_token_id=_pad_id(self.model, self.tokenizer))
            self._manager = self.model.init_continuous_batching(
                generation_config=gen_config,
                continuous_batching_config=ContinuousBatchingConfig(**self._cb_kwargs))
            _install_sampling(self._manager)
        self._manager.start()
        self._stopping.clear()
        self._pump = threading.Thread(target=self._pump_loop, name="prism-engine-pump", daemon=True)
        self._pump.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop at once: in-flight requests end with `EngineError`."""
        if self._manager is None:
            return
        self._stopping.set()
        try:
            self._manager.stop(block=True, timeout=timeout, hard_stop=True)
        finally:
            if self._pump is not None:
                self._pump.join(timeout)
            self._fail_all("engine stopped")
            self._manager.destroy()
            self._manager = None
            self._pump = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the generation loop between two steps (e.g. to swap expert weights); requests keep their state."""
        if self._manager is None:
            raise EngineError("engine is not running")
        with self._manager.pause():
            yield

    def add_listener(self, fn: Callable[[RequestStats], None]) -> None:
        """Call `fn(stats)` on the event loop when a request ends (metrics); it must be quick and not raise."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[RequestStats], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # --- requests ------------------------------------------------------------------------------------------------
    async def submit(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None, seed: int | None = None,
                     stop: Sequence[str] = ()) -> AsyncIterator[TokenEvent]:
        """Admit one request and return its token stream.

        `stop_token_ids` default to the model's EOS ids (pass `[]` to ignore EOS); the stop token is part of the
        output ids. `stop` strings end the text before them. Raises `ValueError` for an invalid request,
        `EngineOverloaded` when `max_waiting` requests have no token yet, `EngineError` when not running. The
        iterator raises `EngineError` if generation fails; closing it early cancels the request.
        """
        prompt = [int(t) for t in prompt_ids]
        self.check_request(prompt, max_tokens, temperature, top_p)
        if not self.is_running or self._manager is None:
            raise EngineError("engine is not running")
        stop_ids = self.eos_token_ids if stop_token_ids is None else tuple(int(t) for t in stop_token_ids)
        loop = asyncio.get_running_loop()
        req = _Request(id=f"r{next(self._ids)}", loop=loop, queue=asyncio.Queue(), prompt_len=len(prompt),
                       max_tokens=max_tokens, stop_ids=frozenset(stop_ids), stops=tuple(s for s in stop if s),
                       t_submit=time.perf_counter())
        # The detokenizer window starts with a little prompt context; deltas are what new tokens add to it.
        req.ids = prompt[-_DETOK_CONTEXT:]
        req.read_offset = len(req.ids)
        with self._lock:
            if self._n_waiting >= self.max_waiting:
                raise EngineOverloaded(f"{self._n_waiting} requests are waiting for their first token "
                                       f"(limit {self.max_waiting}); retry later")
            self._requests[req.id] = req
            self._n_waiting += 1
        kwargs: dict[str, Any] = {"temperature": float(temperature), "top_p": float(top_p)}
        if temperature > 0:
            kwargs["rng"] = random.Random(seed)  # seed None: seeded from OS entropy
        try:
            rid = self._manager.add_request(prompt, request_id=req.id, max_new_tokens=max_tokens, streaming=True,
                                            eos_token_id=list(stop_ids) or [-1], **kwargs)
        except Exception as e:  # the manager refuses while stopping
            self._forget(req)
            raise EngineError(f"engine refused the request: {e}") from e
        if rid is None:
            self._forget(req)
            raise EngineError("engine is not accepting requests (restarting or stopping); retry")
        return self._stream(req)

    def check_request(self, prompt_ids: Sequence[int], max_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0) -> None:
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
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    async def generate(self, prompt_ids: Sequence[int], max_tokens: int, **kwargs: Any) -> GenerationResult:
        """`submit` and collect: all token ids, the text and the finish reason."""
        ids, text, reason = [], [], None
        async for ev in await self.submit(prompt_ids, max_tokens, **kwargs):
            if ev.token_id is not None:
                ids.append(ev.token_id)
            text.append(ev.text)
            reason = ev.finish_reason
        return GenerationResult(ids, "".join(text), reason or "length")

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
            if not req.done and self._manager is not None:
                self._manager.cancel_request(req.id)  # client went away or an error: free the KV cache
            self._forget(req)
            self._notify(req, reason)

    def _advance(self, req: _Request, out: Any) -> list[TokenEvent]:
        """TokenEvents for the tokens of `out` (a GenerationOutput with all tokens so far) not seen yet."""
        now = time.perf_counter()
        new = out.generated_tokens[req.n_out:]
        if new and req.t_first is None:
            req.t_first = now
            with self._lock:
                self._n_waiting -= 1
        events = []
        finished = out.is_finished()
        for i, tok in enumerate(new):
            req.n_out += 1
            req.t_last = now
            req.ids.append(tok)
            req.pending += self._detok_step(req)
            last = finished and i == len(new) - 1
            text, hit = self._take_text(req, flush=last)
            if hit:  # a stop string: end here, and stop the manager generating for it
                req.done = True
                if self._manager is not None:
                    self._manager.cancel_request(req.id)
                events.append(TokenEvent(tok, text, True, "stop"))
                return events
            if last:
                req.done = True
                reason: FinishReason = "stop" if tok in req.stop_ids else "length"
                events.append(TokenEvent(tok, text, True, reason))
            else:
                events.append(TokenEvent(tok, text))
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
        """Route outputs to their event loops; restart the generation thread if a forward killed it."""
        manager = self._manager
        backoff = 0.05
        while not self._stopping.is_set():
            out = manager.get_result(timeout=0.1)
            if out is not None:
                self._deliver(out.request_id, out)
                continue
            if not manager.is_running() and not self._stopping.is_set():
                # Outputs failed by the crash are queued before the thread exits, so they were routed above.
                log.error("generation loop stopped unexpectedly; restarting it (restart %d)", self.restarts + 1)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if not self._stopping.is_set():
                    manager.start()
                    self.restarts += 1
            elif manager.is_running():
                backoff = 0.05

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            req = self._requests.get(request_id)
        if req is None:
            return  # cancelled or already finished
        try:
            req.loop.call_soon_threadsafe(req.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening
            self._forget(req)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            ids = list(self._requests)
        for rid in ids:
            self._deliver(rid, EngineError(message))


def _install_sampling(manager: Any) -> None:
    """Replace the manager's logits processors by the per-request sampling ones (before its loop starts)."""
    if not hasattr(manager, "logit_processor") or manager.is_running():
        raise RuntimeError("transformers' ContinuousBatchingManager changed: no `logit_processor` to replace "
                           "before start(); check prism_moe.runtime.engine against this transformers version")
    manager.logit_processor = _make_sampling_processors()


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
