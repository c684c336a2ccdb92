"""The runner protocol: what the frontend needs from a batching loop, and the two records it passes.

A runner owns the model's forwards on its own thread. The frontend hands it `RunnerRequest`s (prompt ids, limits
and a `SequenceSampler` that picks the tokens) and reads `RunnerOutput`s back from any thread; the runner picks
each token with `sampling.sample`, so every runner samples the same way. Runners today: `SlotRunner` (a
preallocated per-slot cache, every family; the default) and `HFBatchingRunner` (transformers' continuous batching,
paged cache; not for latent attention).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from prism_moe.runtime.engine.sampling import SequenceSampler, TokenLogprobs, token_logprobs

log = logging.getLogger(__name__)


@dataclass
class RunnerRequest:
    id: str
    prompt: list[int]
    max_new_tokens: int
    eos: frozenset[int]  # stop token ids (empty: generate to max_new_tokens)
    sampler: SequenceSampler


@dataclass
class RunnerOutput:
    """A request's generated tokens so far (all of them, not just the new ones); `error` ends it."""

    request_id: str
    generated_tokens: list[int] = field(default_factory=list)
    finished: bool = False
    error: str | None = None

    def is_finished(self) -> bool:
        return self.finished or self.error is not None


class Runner(Protocol):
    """One batching loop. `start` may be called again after its thread died (a forward raised): the frontend
    restarts it. `add_request` returns False when the runner is not accepting requests (stopping)."""

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def is_running(self) -> bool: ...

    def add_request(self, request: RunnerRequest) -> bool: ...

    def cancel_request(self, request_id: str) -> None: ...

    def get_results(self, timeout: float | None = None) -> list[RunnerOutput]:
        """Every output there is (a step's outputs come together), waiting up to `timeout` s for the first; [] if
        none came."""
        ...

    def pause(self) -> AbstractContextManager[None]:
        """Hold the loop between two steps while the caller uses the model; requests keep their state."""
        ...

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Logits [n, V] of one plain forward over `prompt` (no cache kept); call it while paused."""
        ...

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[TokenLogprobs | None]:
        """`score_prompt` (a runner in another process computes it there)."""
        ...


def score_prompt(runner: Runner, prompt: list[int], top: int) -> list[TokenLogprobs | None]:
    """Logprobs of each prompt token given the ones before it (None for the first) with the `top` most likely tokens
    at each position (vLLM's `prompt_logprobs`): one plain forward while the runner holds between two steps."""
    with runner.pause():
        logits = runner.prompt_logits(prompt)  # [n, V]
    if len(prompt) < 2:
        return [None]
    return [None, *token_logprobs(logits[:-1].float().log_softmax(dim=-1),
                                  torch.tensor(prompt[1:], device=logits.device), top)]


def pump_outputs(runner: Runner, stopping: threading.Event, deliver: Callable[[list[RunnerOutput]], None],
                 restarted: Callable[[], None]) -> None:
    """Read `runner`'s outputs until `stopping`: each step's batch goes to `deliver`. A runner whose thread died (a
    forward raised) is started again, with backoff, and `restarted()` is called: errors for the requests of that
    moment (queued before its thread ended, so delivered first), not a dead server."""
    backoff = 0.05
    while not stopping.is_set():
        outs = runner.get_results(timeout=0.1)
        if outs:
            deliver(outs)
            continue
        if not runner.is_running() and not stopping.is_set():
            log.error("generation loop stopped unexpectedly; restarting it")
            time.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            if not stopping.is_set():
                runner.start()
                restarted()
        else:
            backoff = 0.05


def drain(q: queue.Queue, first: Any = None) -> list:
    """`first` (if not None) and every item `q` holds now."""
    items = [] if first is None else [first]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def caches_latents(config: Any) -> bool:
    """True for multi-head latent attention (DeepSeek-V2/V3): it caches two latents of different widths per layer,
    which transformers' PagedAttentionCache cannot store (it fails with an index_copy_ shape mismatch); the
    `SlotRunner`'s cache holds them."""
    return getattr(config, "kv_lora_rank", None) is not None
