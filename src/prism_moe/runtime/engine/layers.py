"""`LayerGate`: which decoder layers a forward runs here, per thread, for executing plans (layer pipelines).

A plan (placement/plan.py) says, per home server and MoE layer, which server runs that layer for the home's
requests. The gate lets transformers' own decoder forward do the walking: it wraps each decoder layer's
`forward` (in place, as accelerate's hooks do: module names and weights stay as they are) and, on a thread
that entered one of its modes, decides per layer:

* `route(executors, handoff)`, on the home server: a layer planned here runs; at the first layer of a block
  planned on a peer, `handoff(server, first_moe, last_moe, hidden [B, q, H])` sends the hidden states and
  returns them after the block (the peer runs it with its own KV cache); the block's other layers pass the
  hidden states through untouched. Embedding, final norm and LM head stay at home.
* `only(first_moe, last_moe, hidden)`, on a peer executing a block: the decoder is called with placeholder
  inputs; the block's first layer takes `hidden` instead of its input, its last layer's output is captured
  and the rest of the decoder is skipped (`BlockDone`).

Outside a mode (other threads, a plain forward) every layer runs as usual. Plans are per MoE layer; a dense
decoder layer belongs to the block of the next MoE layer (DeepSeek's first dense layers run with MoE layer
0), and dense layers after the last MoE layer to the last one (`decoder_span`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# handoff(server, first MoE layer, last MoE layer, hidden [B, q, H]) -> hidden [B, q, H] after the block
Handoff = Callable[[str, int, int, torch.Tensor], torch.Tensor]


UNKNOWN_REQUEST = "unknown_request"  # a peer's error code: it holds no cache for a row that continues a request


class HandoffError(Exception):
    """A block hand-off to `server` failed (unreachable, refused, or a malformed reply): the forward's rows must
    be rebuilt on a route without it."""

    def __init__(self, server: str, reason: str, code: str = "unavailable") -> None:
        super().__init__(f"hand-off to {server} failed: {reason}")
        self.server, self.reason, self.code = server, reason, code


class BlockDone(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a block's last layer on a peer: carries its output, ends the decoder forward early."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("block done")
        self.hidden = hidden


def moe_of_decoder_layers(moe_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """The MoE layer whose block each decoder layer belongs to: int [num_layers]."""
    if not moe_layer_ids:
        raise ValueError("a model without MoE layers has no blocks to plan")
    out, m = [], 0
    for d in range(num_layers):
        while m < len(moe_layer_ids) - 1 and moe_layer_ids[m] < d:
            m += 1
        out.append(m)
    return out


def decoder_span(moe_of: Sequence[int], first: int, last: int) -> tuple[int, int]:
    """Decoder layers (first, last), inclusive, of the block of MoE layers first..last."""
    layers = [d for d, m in enumerate(moe_of) if first <= m <= last]
    return layers[0], layers[-1]


class _Route:
    """Home mode: executor per decoder layer (None: here)."""

    def __init__(self, executors: Sequence[str | None], moe_of: Sequence[int], handoff: Handoff) -> None:
        self.executors, self.moe_of, self.handoff = executors, moe_of, handoff

    def layer(self, d: int, run: Callable[..., Any], hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        server = self.executors[d]
        if server is None:
            return run(hidden, *args, **kwargs)
        if d > 0 and self.executors[d - 1] == server:
            return hidden  # inside a block a peer ran at its first layer
        last = d
        while last + 1 < len(self.executors) and self.executors[last + 1] == server:
            last += 1
        return self.handoff(server, self.moe_of[d], self.moe_of[last], hidden)


class _Only:
    """Peer mode: run decoder layers first..last on `hidden`, capture the last one's output."""

    def __init__(self, first: int, last: int, hidden: torch.Tensor) -> None:
        self.first, self.last, self.hidden = first, last, hidden

    def layer(self, d: int, run: Callable[..., Any], hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if d < self.first:
            return hidden  # placeholder states: nothing to compute before the block
        if d == self.first:
            hidden = self.hidden
        out = run(hidden, *args, **kwargs)
        if d == self.last:
            raise BlockDone(out[0] if isinstance(out, tuple) else out)
        return out


class LayerGate:
    """Wraps the decoder layers of `model` once; `route` and `only` pick the layers of this thread's forwards."""

    def __init__(self, model: nn.Module, moe_layer_ids: Sequence[int]) -> None:
        self.decoder = model.get_decoder()
        layers = self.decoder.layers
        self.num_layers = int(model.config.get_text_config().num_hidden_layers)
        self.moe_of = moe_of_decoder_layers(moe_layer_ids, self.num_layers)
        self._local = threading.local()
        for d, layer in enumerate(layers[: self.num_layers]):
            if getattr(layer, "prism_gate", None) is not None:
                raise ValueError(f"decoder layer {d} is already gated")
            layer.prism_gate = self
            layer.forward = self._gated(d, layer.forward)

    def _gated(self, d: int, run: Callable[..., Any]) -> Callable[..., Any]:
        local = self._local

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            mode = getattr(local, "mode", None)
            if mode is None:
                return run(hidden_states, *args, **kwargs)
            return mode.layer(d, run, hidden_states, args, kwargs)

        return forward

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Decoder layers (first, last) of the block of MoE layers first..last."""
        return decoder_span(self.moe_of, first, last)

    def executors(self, row: Sequence[str | None]) -> list[str | None]:
        """Per decoder layer, from a plan row per MoE layer (None: here)."""
        return [row[m] for m in self.moe_of]

    @contextmanager
    def route(self, moe_row: Sequence[str | None], handoff: Handoff) -> Iterator[None]:
        """This thread's forwards run the layers planned here (None in `moe_row`, per MoE layer) and hand the
        others' blocks to `handoff`."""
        with self._mode(_Route(self.executors(moe_row), self.moe_of, handoff)):
            yield

    def run_block(self, first: int, last: int, hidden: torch.Tensor, forward: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """Run MoE layers first..last (their decoder span) on hidden [B, q, H]: `forward(placeholder)` calls the
        decoder (masks, positions, cache), this returns the block's output [B, q, H]."""
        d0, d1 = self.span(first, last)
        with self._mode(_Only(d0, d1, hidden)):
            try:
                forward(hidden)
            except BlockDone as done:
                return done.hidden
        raise RuntimeError(f"the decoder forward ended without running decoder layer {d1}")

    @contextmanager
    def _mode(self, mode: Any) -> Iterator[None]:
        if getattr(self._local, "mode", None) is not None:
            raise RuntimeError("a gated forward is already running on this thread")
        self._local.mode = mode
        try:
            yield
        finally:
            self._local.mode = None
