"""`PaddedRunner`: a small continuous-batching loop with per-request caches, for models the paged cache cannot
hold (latent attention).

One thread; each step it
  1. prefills the newly admitted requests, one at a time (batch 1, a fresh `DynamicCache` each), and
  2. decodes one token for every other active request in ONE forward: their cached tensors left-padded to a
     common length, an attention mask hiding the padding, per-row position ids.
Step 2 rebuilds the padded batch every step, a copy about the size of what `DynamicCache`'s own concatenation
moves in `generate`. Greedy tokens equal `model.generate` (checked for DeepSeek-V2, Mixtral, Qwen2-MoE). A
forward that raises fails the requests of that step only; the loop goes on.
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

from prism_moe.runtime.engine.runners import RunnerOutput, RunnerRequest
from prism_moe.runtime.engine.sampling import sample

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    req: RunnerRequest
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer, [1, heads, length, dim]
    out: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:  # tokens in the cache
        return self.kv[0][0].shape[-2] if self.kv else 0

    @property
    def done(self) -> bool:
        return bool(self.out) and (self.out[-1] in self.req.eos or len(self.out) >= self.req.max_new_tokens)


class PaddedRunner:
    """The `Runner` for latent-attention models: at most `max_running` requests decode together."""

    def __init__(self, model: Any, max_running: int) -> None:
        self.model = model
        self.max_running = max_running
        self._inbox: queue.Queue[_Seq] = queue.Queue()
        self._out: queue.Queue[RunnerOutput] = queue.Queue()
        self._cancelled: set[str] = set()
        self._active: list[_Seq] = []  # have their first token
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
        self._thread = threading.Thread(target=self._run, name="prism-padded-batch", daemon=True)
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

    def get_result(self, timeout: float | None = None) -> RunnerOutput | None:
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            return None

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

    # --- the loop ------------------------------------------------------------------------------------------
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
        except Exception as e:  # a bug in the loop itself: fail everything; the frontend starts the loop again
            log.exception("padded batch loop failed")
            self._fail(self._active + self._waiting, e)
            self._active, self._waiting = [], []
        finally:
            self._fail(self._active + self._waiting + _drain(self._inbox), RuntimeError("engine stopped"))
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
            self._active = [s for s in self._active if s.req.id not in cancelled]
            self._waiting = [s for s in self._waiting if s.req.id not in cancelled]

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
        self._active = [s for s in decoding + new if s.out and not s.done]

    def _prefill(self, seq: _Seq) -> None:
        from transformers import DynamicCache

        ids = torch.tensor([seq.req.prompt], device=self.model.device)
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
        picks = sample(logits, [s.req.sampler for s in seqs]).tolist()
        for s, tok in zip(seqs, picks, strict=True):
            s.out.append(int(tok))
            self._out.put(RunnerOutput(s.req.id, list(s.out), finished=s.done))

    def _fail(self, seqs: list[_Seq], error: BaseException) -> None:
        for s in seqs:
            self._out.put(RunnerOutput(s.req.id, list(s.out), error=str(error)))


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
