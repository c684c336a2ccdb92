"""Trace replay: route tokens by a recorded trace instead of the model's (random-weight) router.

Benchmarks on tiny random models need realistic expert activations. `ReplayRouting` holds a trace
`experts [tokens, moe_layers, k]` (+ optional gate `weights` of the same shape, else uniform 1/k) and hands out
the next rows per sequence and MoE layer; `ReplayDispatcher` wraps any dispatcher and substitutes those choices
for the router's before the experts run. Off by default: nothing replays unless you attach a `ReplayDispatcher`.

Cursors are per (sequence, MoE layer): every MoE layer of one forward reads the same trace rows, and the next
forward continues where the previous stopped. Rows of a forward are assigned to sequences by `set_batch`
(explicit `(sequence, n_tokens)` layout, in row order) or, by default, split equally among the open sequences in
the order they were opened (what `model.generate` does with a batch of equal-length prompts).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .experts import ExpertDispatcher
from .slots import ExpertSlots


def _copy_tensor(x: Any, dtype: torch.dtype) -> Tensor:
    """A writable tensor copy of an array or tensor (trace arrays are read-only numpy views)."""
    if isinstance(x, Tensor):
        return x.to(dtype).clone()
    return torch.from_numpy(np.array(x)).to(dtype)


class ReplayRouting:
    """Per-token routing from a trace: experts [tokens, layers, k] int, weights [tokens, layers, k] or None."""

    def __init__(self, experts: Any, weights: Any | None = None, wrap: bool = False) -> None:
        self.experts = _copy_tensor(experts, torch.long)  # a copy: traces are read-only views
        if self.experts.dim() != 3:
            raise ValueError(f"experts must be [tokens, layers, k], got shape {tuple(self.experts.shape)}")
        if weights is None:
            k = self.experts.shape[2]
            self.weights = torch.full(self.experts.shape, 1.0 / k, dtype=torch.float32)
        else:
            self.weights = _copy_tensor(weights, torch.float32)
            if self.weights.shape != self.experts.shape:
                raise ValueError(f"weights shape {tuple(self.weights.shape)} != experts shape "
                                 f"{tuple(self.experts.shape)}")
        self.wrap = wrap
        self._start: dict[Hashable, int] = {}  # open sequences, in open order
        self._cursor: dict[tuple[Hashable, int], int] = {}
        self._layout: list[tuple[Hashable, int]] | None = None
        self._lock = threading.Lock()

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    def open(self, seq: Hashable = 0, start: int = 0) -> None:
        """Start (or restart) sequence `seq` at trace row `start` for every layer."""
        with self._lock:
            self._start[seq] = start
            for key in [key for key in self._cursor if key[0] == seq]:
                del self._cursor[key]

    def close(self, seq: Hashable) -> None:
        with self._lock:
            self._start.pop(seq, None)
            for key in [key for key in self._cursor if key[0] == seq]:
                del self._cursor[key]

    def reset(self) -> None:
        with self._lock:
            self._start.clear()
            self._cursor.clear()
            self._layout = None

    def cursor(self, seq: Hashable = 0, layer: int = 0) -> int:
        """Next trace row sequence `seq` will read at MoE layer `layer`."""
        return self._cursor.get((seq, layer), self._start.get(seq, 0))

    def set_batch(self, layout: Sequence[tuple[Hashable, int]] | None) -> None:
        """Row layout of the coming forwards: [(sequence, n_tokens), ...] in row order (None: equal split)."""
        with self._lock:
            for seq, _ in layout or ():
                self._start.setdefault(seq, 0)
            self._layout = list(layout) if layout is not None else None

    def take(self, layer: int, num_tokens: int) -> tuple[Tensor, Tensor]:
        """Choices for the next `num_tokens` rows at MoE layer `layer`: (experts [T, k], weights [T, k])."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"MoE layer {layer} out of range: the trace has {self.num_layers} layers")
        with self._lock:
            if not self._start:
                self._start[0] = 0
            layout = self._layout if self._layout is not None else self._equal_split(num_tokens)
            if sum(n for _, n in layout) != num_tokens:
                raise ValueError(f"batch layout {layout} covers {sum(n for _, n in layout)} rows, "
                                 f"the forward has {num_tokens}")
            rows = []
            for seq, n in layout:
                c = self.cursor(seq, layer)
                rows.append(self._rows(c, n, seq))
                self._cursor[(seq, layer)] = c + n
            idx = torch.cat(rows)
        return self.experts[idx, layer], self.weights[idx, layer]

    def _equal_split(self, num_tokens: int) -> list[tuple[Hashable, int]]:
        seqs = list(self._start)
        if num_tokens % len(seqs):
            raise ValueError(f"{num_tokens} rows cannot be split equally among {len(seqs)} open sequences; "
                             f"call set_batch with the layout")
        return [(s, num_tokens // len(seqs)) for s in seqs]

    def _rows(self, cursor: int, n: int, seq: Hashable) -> Tensor:
        idx = torch.arange(cursor, cursor + n)
        if self.wrap:
            return idx % self.num_tokens
        if cursor + n > self.num_tokens:
            raise IndexError(f"sequence {seq!r} needs trace rows up to {cursor + n} but the trace has "
                             f"{self.num_tokens} tokens (use wrap=True to loop)")
        return idx


class ReplayDispatcher:
    """Replace the router's choices with the trace's, then run `inner` (a local or remote dispatcher)."""

    def __init__(self, inner: ExpertDispatcher, routing: ReplayRouting) -> None:
        self.inner = inner
        self.routing = routing

    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertSlots) -> Tensor:
        idx, w = self.routing.take(layer, hidden.shape[0])
        idx = idx.to(device=top_k_index.device)
        w = w.to(device=top_k_weights.device, dtype=top_k_weights.dtype)
        return self.inner.moe_forward(layer, hidden, idx, w, experts)
