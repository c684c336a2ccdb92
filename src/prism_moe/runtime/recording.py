"""Live routing traces: what a server's routers decided, token by token, in the project's trace format.

`ForwardRecorder.observe(layer, top_k_index [T, k], top_k_weights [T, k])` is called by the dispatcher
for every MoE layer of every forward, on the model's generation thread, layer 0..L-1 in order with the
same T rows. Under continuous batching the rows of one forward are not tagged by request, so each
complete forward (all L layers seen) becomes one *sequence* of the trace: a prefill forward holds the
prompt tokens of the requests admitted in that step, a decode forward one token of each running request.
Per-token routing across layers is exact; the grouping of tokens into sequences is by forward, not by
request (see docs/trace-format.md, "Recorded by a server").

Memory is bounded by `max_tokens`: the first forward that would exceed it stops the recording (one log
line); what was recorded stays and is saved. `snapshot()`/`save()` may run on any thread.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from torch import Tensor

from prism_moe.stats.trace import RoutingTrace, TraceRecorder, save_trace

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1_000_000


class ForwardRecorder:
    """Records every forward's routing (top-k expert ids and gate weights per MoE layer) as one sequence."""

    def __init__(self, num_layers: int, top_k: int, num_experts: int, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 source: str = "", model: str = "", name: str = "") -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.num_layers, self.top_k, self.num_experts = num_layers, top_k, num_experts
        self.max_tokens = int(max_tokens)
        self.name = name or "server"
        self._rec = TraceRecorder(num_layers, top_k, num_experts, source=source, model=model)
        self._lock = threading.Lock()  # guards _rec, _tokens, _stopped (committing vs saving)
        self._tokens = 0
        self._stopped = False
        self._seq = 0
        self.dropped_forwards = 0  # forwards not recorded because their layers did not line up
        self._warned = False
        # the forward being seen (generation thread only)
        self._cur_e: list[np.ndarray] = []
        self._cur_w: list[np.ndarray] = []

    # --- generation thread ---------------------------------------------------------------------------------
    def observe(self, layer: int, top_k_index: Tensor, top_k_weights: Tensor | None) -> None:
        """One MoE layer of the current forward: top_k_index [T, k], top_k_weights [T, k] (any device/dtype)."""
        if self._stopped:
            return
        if layer == 0 and self._cur_e:  # the previous forward did not reach the last layer
            self._drop(f"a forward stopped after {len(self._cur_e)} of {self.num_layers} MoE layers")
        if layer != len(self._cur_e):
            if self._cur_e or layer != 0:
                self._drop(f"MoE layer {layer} came after layer {len(self._cur_e) - 1}")
            return
        e = top_k_index.detach().to("cpu").numpy()
        if e.ndim != 2 or e.shape[1] != self.top_k or (self._cur_e and e.shape[0] != self._cur_e[0].shape[0]):
            self._drop(f"MoE layer {layer} routed {tuple(e.shape)} rows, expected [T, {self.top_k}] with the T "
                       f"of layer 0")
            return
        self._cur_e.append(e)
        if top_k_weights is not None:
            self._cur_w.append(top_k_weights.detach().float().to("cpu").numpy())
        if len(self._cur_e) == self.num_layers:
            self._commit()

    def _drop(self, why: str) -> None:
        self._cur_e, self._cur_w = [], []
        self.dropped_forwards += 1
        if not self._warned:
            self._warned = True
            log.warning("%s: trace recording skipped a forward (%s); further skips are only counted", self.name, why)

    def _commit(self) -> None:
        es, ws = self._cur_e, self._cur_w
        self._cur_e, self._cur_w = [], []
        tokens = es[0].shape[0]
        if tokens == 0:
            return
        experts = np.stack(es, axis=1)  # [T, L, k]
        if experts.min() < 0 or experts.max() >= self.num_experts:  # padding (-1) or a foreign model
            self._drop(f"expert ids {int(experts.min())}..{int(experts.max())} outside 0..{self.num_experts - 1}")
            return
        weights = np.stack(ws, axis=1) if len(ws) == len(es) else None
        with self._lock:
            if self._stopped:
                return
            if self._tokens + tokens > self.max_tokens:
                self._stopped = True
                log.warning("%s: trace recording stopped at %d tokens (--record-max-tokens %d); the trace so far "
                            "is kept and saved", self.name, self._tokens, self.max_tokens)
                return
            try:
                self._rec.append(experts, weights, seq=self._seq)
            except ValueError as err:  # e.g. weights missing in one forward but not in others
                self._rec.discard_sequence(self._seq)
                self._drop(str(err))
                return
            self._rec.finish_sequence(self._seq)
            self._seq += 1
            self._tokens += tokens

    # --- any thread ----------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        with self._lock:
            return self._tokens

    @property
    def num_sequences(self) -> int:
        with self._lock:
            return self._rec.num_sequences

    @property
    def stopped(self) -> bool:
        """True once the token bound was reached (nothing more is recorded)."""
        return self._stopped

    def snapshot(self) -> RoutingTrace:
        """The forwards recorded so far, as a trace (a copy: recording goes on)."""
        with self._lock:
            return self._rec.to_trace()

    def save(self, path: str | Path) -> dict[str, object]:
        """Write the trace so far to `path` (atomically: a temporary file, then a rename)."""
        trace = self.snapshot()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_trace(trace, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": str(path), "tokens": trace.num_tokens, "sequences": trace.num_sequences,
                "stopped": self._stopped, "dropped_forwards": self.dropped_forwards}
