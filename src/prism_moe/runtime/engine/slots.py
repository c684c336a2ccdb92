"""`SlotRunner`: continuous batching over a preallocated per-slot KV cache, for every family (latent attention too).

The cache (`SlotCache`) has, per layer, one key and one value buffer `[slots, heads, capacity, dim]`, allocated at
the first forward with the shapes the model writes. Whatever a family caches fits: Mixtral's keys and values, or
DeepSeek's two latents of different widths (`[slots, 1, capacity, kv_lora_rank]` and `[..., qk_rope_head_dim]`),
which transformers' paged cache cannot hold. Running requests occupy slots 0..B-1, kept compact (when one ends,
the last one moves into its slot: one copy per finished request), so a decode step reads the view
`buffer[:B, :, :longest + 1]`; nothing is re-padded or concatenated per step. `capacity` grows by doubling up to
`max_len` (a copy per doubling), so memory is `max_running` x the longest request so far, not the worst case.

Each step of the loop thread:
  1. admits waiting requests into free slots and prefills them together (right-padded to the longest prompt, at
     most `max_batch_tokens` tokens per forward), each row writing its keys at positions 0..n-1 of its slot; the
     prism experts hook routes the padding to no expert (`experts.skip_padding`);
  2. decodes one token for every running request in one forward: each row writes its new key at its own length
     and attends its first length + 1 positions (an additive mask [B, 1, 1, longest + 1]).
Positions past a request's length hold stale keys (prefill padding, an earlier occupant); the mask hides them and
the request's own writes replace them before it reads there.

The model is called through its decoder (`model.model`) and `lm_head`, so prefill computes logits only at each
prompt's last token. Tokens are picked by `sampling.sample`. Greedy tokens equal `model.generate` for the five
tiny families (tests/runtime/test_slots.py). A forward that raises fails the requests of that forward only; the
loop goes on. A request put back in the waiting list with tokens already generated (`plans.PlanRunner` does it when
a plan changes or a peer holding part of its cache fails) is *resumed*: its prefill feeds the prompt and all but its
last token, rebuilds its cache and emits nothing; decoding goes on from the last token.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from prism_moe.model.experts import skip_padding
from prism_moe.runtime.engine.runners import RunnerOutput, RunnerRequest, drain, score_prompt
from prism_moe.runtime.engine.sampling import TokenLogprobs, sample

log = logging.getLogger(__name__)

_MIN_CAPACITY = 128  # first cache length per slot (tokens); doubled as requests need more


class SlotCache:
    """Per-layer key/value buffers [slots, heads, capacity, dim]; the object a transformers model calls `update` on.

    Before each forward the runner says what it is: `for_prefill(start, rows)` (rows `start..start+rows-1` write
    positions 0..q-1) or `for_decode(lengths)` (row i writes position lengths[i] and reads `:max(lengths) + 1`).
    """

    def __init__(self, num_layers: int, slots: int, max_len: int) -> None:
        self.slots, self.max_len = slots, max_len
        self.capacity = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._rows = slice(0, 0)
        self._row_idx: torch.Tensor | None = None  # decode: [B] rows
        self._pos: torch.Tensor | None = None  # decode: [B] write positions
        self._read = 0  # decode: positions each row reads

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per slot (doubling; copies what is cached)."""
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the cache's {self.max_len} per request")
        if length <= self.capacity:
            return
        new = min(self.max_len, max(_MIN_CAPACITY, self.capacity * 2, length))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                if old is not None:
                    grown = old.new_zeros(*old.shape[:2], new, old.shape[3])
                    grown[:, :, :self.capacity] = old
                    store[i] = grown
        self.capacity = new

    def for_prefill(self, start: int, rows: int) -> None:
        self._rows, self._pos = slice(start, start + rows), None

    def for_decode(self, lengths: torch.Tensor, read: int) -> None:
        """lengths [B] (on the cache's device): row i writes position lengths[i]; every row reads `:read`."""
        self._rows = slice(0, lengths.numel())
        self._row_idx = torch.arange(lengths.numel(), device=lengths.device)
        self._pos, self._read = lengths, read

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction)."""
        for store in (self.keys, self.values):
            for buf in store:
                if buf is not None:
                    buf[dst, :, :length] = buf[src, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states [rows, hk, q, dk], value_states [rows, hv, q, dv] -> everything the rows attend to."""
        keys, values = self._buffers(key_states, value_states, layer_idx)
        rows = self._rows
        if self._pos is None:  # prefill: positions 0..q-1
            q = key_states.shape[2]
            keys[rows, :, :q] = key_states
            values[rows, :, :q] = value_states
            return keys[rows, :, :q], values[rows, :, :q]
        keys[self._row_idx, :, self._pos] = key_states[:, :, 0]  # [B, hk, dk] at (row, :, position)
        values[self._row_idx, :, self._pos] = value_states[:, :, 0]
        return keys[rows, :, :self._read], values[rows, :, :self._read]

    def _buffers(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s buffers, made at its first write in the shapes and dtype the model writes."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = key_states.new_zeros(self.slots, key_states.shape[1], self.capacity,
                                                        key_states.shape[3])
            self.values[layer_idx] = value_states.new_zeros(self.slots, value_states.shape[1], self.capacity,
                                                            value_states.shape[3])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        assert keys is not None and values is not None
        return keys, values

    # What transformers' mask and position helpers may ask a cache; the runner passes both, so these are not used
    # for the forward itself.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0


@dataclass
class _Seq:
    req: RunnerRequest
    slot: int = -1
    length: int = 0  # positions cached
    out: list[int] = field(default_factory=list)
    route: Any = None  # the plan route its cache was built under (plans.PlanRunner)
    resumes: int = 0  # times its cache was lost and rebuilt (plans.PlanRunner)

    @property
    def done(self) -> bool:
        return bool(self.out) and (self.out[-1] in self.req.eos or len(self.out) >= self.req.max_new_tokens)

    def tokens(self) -> list[int]:
        """What its prefill feeds: the prompt, plus every generated token but the last when resuming (the next
        decode step feeds that one)."""
        return self.req.prompt + self.out[:-1] if self.out else self.req.prompt


class SlotRunner:
    """The `Runner` over a `SlotCache`: at most `max_running` requests decode together, requests of at most
    `max_len` tokens (prompt + output), at most `max_batch_tokens` prompt tokens (padded) per prefill forward."""

    def __init__(self, model: Any, max_running: int, max_len: int, max_batch_tokens: int = 512) -> None:
        self.model = model
        self.max_running = max_running
        self.max_len = max_len
        self.max_batch_tokens = max_batch_tokens
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._dtype = next(model.parameters()).dtype
        config = model.config.get_text_config()
        self._num_layers = int(config.num_hidden_layers)
        self._window, self._layer_types = _attention_kinds(config)
        self._cache: SlotCache | None = None
        self._inbox: queue.Queue[_Seq] = queue.Queue()
        self._out: queue.Queue[list[RunnerOutput]] = queue.Queue()  # one list per forward: one wake-up per step
        self._cancelled: set[str] = set()
        self._active: list[_Seq] = []  # in slots 0..len-1, in slot order
        # the rows of the forward under way: each row's first position and how many tokens it feeds
        self._batch: list[_Seq] = []
        self._starts: list[int] = []
        self._counts: list[int] = []
        self._waiting: list[_Seq] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cond = threading.Condition()  # pause handshake
        self._pauses = 0
        self._paused = False
        self._thread: threading.Thread | None = None

    # --- the Runner protocol -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.is_running():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prism-slot-batch", daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def add_request(self, request: RunnerRequest) -> bool:
        if not self.is_running() or self._stop.is_set():
            return False
        self._inbox.put(_Seq(request))
        self._wake.set()
        return True

    def cancel_request(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
        self._wake.set()

    def get_results(self, timeout: float | None = None) -> list[RunnerOutput]:
        try:
            first = self._out.get(timeout=timeout)
        except queue.Empty:
            return []
        return [out for batch in drain(self._out, first) for out in batch]

    @contextmanager
    def pause(self) -> Iterator[None]:
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

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([prompt], device=self.model.device), use_cache=False).logits[0]

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[TokenLogprobs | None]:
        return score_prompt(self, prompt, top)

    # --- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                if self._cache is None:  # inference tensors: made and written on this thread only
                    self._cache = SlotCache(self._num_layers, self.max_running, self.max_len)
                while not self._stop.is_set():
                    self._hold_if_paused()
                    self._admit()
                    if not self._active and not self._waiting:
                        self._wake.wait(0.1)
                        self._wake.clear()
                        continue
                    self._step()
        except Exception as e:  # a bug in the loop itself: fail everything; the frontend starts the loop again
            log.exception("slot batch loop failed")
            self._fail(self._active + self._waiting, e)
            self._active, self._waiting = [], []
        finally:
            self._fail(self._active + self._waiting + drain(self._inbox), RuntimeError("engine stopped"))
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
        for seq in drain(self._inbox):
            need = len(seq.req.prompt) + seq.req.max_new_tokens
            if need > self.max_len:
                self._fail([seq], ValueError(f"{need} tokens (prompt + max_new_tokens) exceed the runner's "
                                             f"{self.max_len} per request"))
            else:
                self._waiting.append(seq)
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._ended([s for s in self._waiting + self._active if s.req.id in cancelled])
            self._waiting = [s for s in self._waiting if s.req.id not in cancelled]
            kept = [s for s in self._active if s.req.id not in cancelled]
            if len(kept) != len(self._active):
                self._compact(kept)

    def _step(self) -> None:
        assert self._cache is not None
        decoding = self._active
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:
                self._on_forward_error(decoding, e)
                decoding = []
        running = [s for s in decoding if not s.done]
        self._compact(running)
        room = self.max_running - len(running)
        while room > 0 and self._waiting:
            batch = self._prefill_batch(room)
            for i, s in enumerate(batch):
                s.slot = len(self._active) + i
            try:
                self._prefill(batch)
            except Exception as e:
                self._on_forward_error(batch, e)
                continue
            self._compact(self._active + [s for s in batch if not s.done])  # one that ended at once leaves a hole
            room = self.max_running - len(self._active)

    def _prefill_batch(self, room: int) -> list[_Seq]:
        """The next waiting requests whose padded prompts fit in `max_batch_tokens` (at least one)."""
        batch: list[_Seq] = []
        longest = 0
        for s in self._waiting[:room]:
            n = max(longest, len(s.tokens()))
            if batch and n * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(s)
            longest = n
        self._waiting = self._waiting[len(batch):]
        return batch

    def _compact(self, kept: list[_Seq]) -> None:
        """Make `kept` the running requests, in slots 0..len-1 (moving those beyond into the holes)."""
        assert self._cache is not None
        n = len(kept)
        holes = sorted(set(range(n)) - {s.slot for s in kept})
        movers = [s for s in kept if s.slot >= n]
        for s, hole in zip(movers, holes, strict=True):
            self._cache.move(s.slot, hole, s.length)
            s.slot = hole
        self._active = sorted(kept, key=lambda s: s.slot)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, q, H] of the decoder over ids [B, q] at positions [B, q]; keys [B, k] is each row's
        position of every cache entry it reads, -1 for entries it must not see (padding, stale)."""
        out = self._decoder(input_ids=ids, position_ids=positions, attention_mask=self._masks(positions, keys),
                            cache=self._cache, use_cache=True)
        return out.last_hidden_state

    def _masks(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        return attention_masks(positions, keys, self._dtype, self._window, self._layer_types)

    def _prefill(self, seqs: list[_Seq]) -> None:
        cache, dev = self._cache, self.model.device
        assert cache is not None
        feeds = [s.tokens() for s in seqs]
        lengths = [len(t) for t in feeds]
        longest = max(lengths)
        cache.reserve(longest)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        for i, t in enumerate(feeds):
            ids[i, :lengths[i]] = torch.tensor(t)
        self._batch, self._starts, self._counts = seqs, [0] * len(seqs), lengths
        n = torch.tensor(lengths, device=dev)
        pos = torch.arange(longest, device=dev).expand(len(seqs), -1)  # [B, q]
        cache.for_prefill(seqs[0].slot, len(seqs))
        valid = pos < n[:, None]
        with skip_padding(~valid.reshape(-1)):  # the prism experts hook computes no expert for the padding
            hidden = self._forward(ids.to(dev), pos, torch.where(valid, pos, -1))
        fresh = [i for i, s in enumerate(seqs) if not s.out]  # resumed rows emit nothing: their next token is known
        for s, length in zip(seqs, lengths, strict=True):
            s.length = length
        if fresh:
            rows = torch.tensor(fresh, device=dev)
            self._emit([seqs[i] for i in fresh], self._head(hidden[rows, n[rows] - 1]))  # [B', H] at last tokens

    def _decode(self, seqs: list[_Seq]) -> None:
        cache, dev = self._cache, self.model.device
        assert cache is not None
        lengths = [s.length for s in seqs]
        read = max(lengths) + 1
        cache.reserve(read)
        n = torch.tensor(lengths, device=dev)
        cache.for_decode(n, read)
        ids = torch.tensor([[s.out[-1]] for s in seqs], device=dev)
        self._batch, self._starts, self._counts = seqs, lengths, [1] * len(seqs)
        entries = torch.arange(read, device=dev).expand(len(seqs), -1)  # [B, read]: entry j holds position j
        hidden = self._forward(ids, n.unsqueeze(-1), torch.where(entries <= n[:, None], entries, -1))
        for s in seqs:
            s.length += 1
        self._emit(seqs, self._head(hidden[:, -1]))

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Pick each row's token from logits [B, V] and report it."""
        picks = sample(logits, [s.req.sampler for s in seqs]).tolist()
        outs = []
        for s, tok in zip(seqs, picks, strict=True):
            s.out.append(int(tok))
            outs.append(RunnerOutput(s.req.id, list(s.out), finished=s.done))
        self._out.put(outs)
        self._ended([s for s in seqs if s.done])

    def _fail(self, seqs: list[_Seq], error: BaseException) -> None:
        if seqs:
            self._out.put([RunnerOutput(s.req.id, list(s.out), error=str(error)) for s in seqs])
        self._ended(seqs)

    # --- hooks for subclasses (plans.PlanRunner) -----------------------------------------------------------
    def _on_forward_error(self, seqs: list[_Seq], error: Exception) -> None:
        """A forward over `seqs` raised: they fail (the loop goes on)."""
        self._fail(seqs, error)

    def _ended(self, seqs: list[_Seq]) -> None:
        """`seqs` finished, failed or were cancelled: nothing of theirs is needed any more."""


def attention_masks(positions: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype, window: int | None,
                    layer_types: tuple[str, ...] | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive masks [B, 1, q, k] in `dtype` (eager and sdpa attention both add them) for queries at positions [B, q]
    over cache entries at positions keys [B, k] (-1: must not be seen): causal over the visible entries, within
    `window` for sliding layers; one per layer type when the config has them (`_attention_kinds`)."""
    q, k = positions.unsqueeze(-1), keys.unsqueeze(1)  # [B, q, 1], [B, 1, k]
    causal = (k >= 0) & (k <= q)
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    lowest = torch.finfo(dtype).min

    def additive(visible: torch.Tensor) -> torch.Tensor:
        return torch.where(visible, zero, lowest).unsqueeze(1)

    def windowed() -> torch.Tensor:
        return additive(causal & (k > q - window))

    if layer_types is None:
        return windowed() if window else additive(causal)
    return {kind: windowed() if kind == "sliding_attention" else additive(causal) for kind in layer_types}


def _attention_kinds(config: Any) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window or None, the config's layer types or None). A model with `layer_types` takes one mask per
    type (transformers' `causal_mask_mapping`); without them its one mask slides when `sliding_window` is set."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:
        return window, None
    kinds = tuple(sorted(set(types)))
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown or ("sliding_attention" in kinds and not window):
        other = ("transformers' continuous batching (batching='paged') is the other runner, for models without "
                 "latent attention" if getattr(config, "kv_lora_rank", None) is None else
                 "no runner of prism-moe serves it yet")
        raise ValueError(f"the slot runner holds full and sliding-window attention caches; this model has layer "
                         f"types {sorted(set(types))} (sliding_window={window}): {other}")
    return window, kinds
