"""Hand-offs of layer blocks between servers: the home's client and the executing peer's side.

When a plan runs MoE layers first..last of home h's requests on peer p, h's forward sends one `block_call`
per block boundary on the ordinary peer channel (wire.py rules: validated header, raw tensor frames, deadlines,
Curve), and p runs those decoder layers on its own model with a KV cache of its own for h's requests:

    block_call  fields home, session, first, last (MoE layers), rows [request ids], starts [B], counts [B],
                release [request ids]; tensor hidden [B, q, H]   ->   ack with tensor hidden [B, q, H]
    block_release  fields home, session, release [request ids]   ->   ack

Row i feeds q positions starts[i]..starts[i]+q-1, of which the first counts[i] are real (a prefill's rows are
right-padded to the longest); it attends the cache entries below starts[i] + counts[i], causally. A row with
start 0 (re)starts its request's cache on p; a later row needs p to hold that request's first `start` positions,
else p answers `unknown_request` (it restarted, or dropped the cache) and the home rebuilds the request.

KV ownership: a request's cache for a block lives on the peer that executes the block (`BlockCache`, one slot
per request, counted in the peer's stats and `/metrics`). It is freed when the home says the request ended
(`release`, carried by the next call to that peer or sent on its own), and a cache untouched for `ttl_s`
seconds is freed anyway: a home that died or lost the peer's address leaks nothing. `session` tells a restarted
home's request ids from its previous life's.

Merging: calls run on the service's `blocks` worker (expert calls and migrations never wait behind a block),
which has several threads; one forward runs at a time, and the thread that runs it takes every call queued
meanwhile: calls for the same block and length from several homes (their decode steps) share one forward.
Calls do not (yet) join the server's own requests' forward: the executing server runs its users' batch and its
peers' on two threads over the same weights.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from prism_moe.model.experts import skip_padding
from prism_moe.runtime.engine.layers import UNKNOWN_REQUEST, HandoffError, LayerGate
from prism_moe.runtime.engine.slots import SlotCache, _attention_kinds, attention_masks
from prism_moe.runtime.service import ServiceError
from prism_moe.runtime.transport import PeerPool, TransportError
from prism_moe.runtime.wire import BAD_REQUEST, BLOCK_CALL, BLOCK_RELEASE

log = logging.getLogger(__name__)

BUSY = "busy"  # every cache slot of the peer is taken
_SWEEP_EVERY_S = 5.0


# ----------------------------------------------------------------------------------------------- home side

class BlockClient:
    """Sends a home's block calls through its peer pool."""

    def __init__(self, pool: PeerPool | None, home: str, session: str) -> None:
        self.pool, self.home, self.session = pool, home, session

    def run(self, server: str, first: int, last: int, rows: list[str], starts: list[int], counts: list[int],
            hidden: torch.Tensor, release: list[str]) -> torch.Tensor:
        """hidden [B, q, H] -> the block's output [B, q, H] on hidden's device and dtype; raises HandoffError."""
        fields = {"home": self.home, "session": self.session, "first": first, "last": last, "rows": rows,
                  "starts": starts, "counts": counts, "release": release}
        x = hidden.detach().to("cpu").contiguous()
        try:
            if self.pool is None or server not in self.pool:
                raise HandoffError(server, "no channel to it")
            _, tensors = self.pool[server].request(BLOCK_CALL, fields, {"hidden": x})
        except TransportError as err:
            raise HandoffError(server, str(err), getattr(err, "code", "unavailable")) from err
        out = tensors.get("hidden") if isinstance(tensors, dict) else None
        if out is None or out.shape != x.shape or out.dtype != x.dtype:
            raise HandoffError(server, f"its reply holds no hidden tensor of shape {list(x.shape)} and {x.dtype}")
        return out.to(hidden.device)

    def release(self, server: str, rows: list[str]) -> None:
        """Tell `server` these requests ended (best effort: its cache expires anyway)."""
        if self.pool is None or server not in self.pool or not rows:
            return
        try:
            self.pool[server].request(BLOCK_RELEASE, {"home": self.home, "session": self.session, "release": rows},
                                      timeout=2.0, retries=0)
        except TransportError as err:
            log.info("%s: release of %d requests' caches on %s failed (they expire there): %s", self.home, len(rows),
                     server, err)


# ----------------------------------------------------------------------------------------------- peer side

class BlockCache(SlotCache):
    """Per-layer key/value buffers [slots, heads, capacity, dim] for the blocks a peer runs; rows map to slots.

    The slot runner's `SlotCache` (growth, buffers made at the first write in the shapes the family writes,
    DeepSeek's latents too), but a call's rows sit in any slots: `set_rows` names them, their write positions and
    how far they read."""

    def __init__(self, num_layers: int, slots: int, max_len: int) -> None:
        super().__init__(num_layers, slots, max_len)
        self._slot_idx = torch.zeros(0, dtype=torch.long)
        self._pos = torch.zeros(0, 0, dtype=torch.long)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def set_rows(self, slot_idx: torch.Tensor, positions: torch.Tensor, read: int) -> None:
        """slot_idx [B]: each row's slot; positions [B, q]: where its keys go; every row reads `:read`."""
        self._slot_idx, self._pos, self._read = slot_idx, positions, read

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states [B, hk, q, dk], value_states [B, hv, q, dv] -> what the rows attend to [B, h, read, d]."""
        keys, values = self._buffers(key_states, value_states, layer_idx)
        rows = self._slot_idx
        # advanced indices on dims 0 and 2 around a slice: the indexed view is [B, q, heads, dim]
        keys[rows[:, None], :, self._pos] = key_states.transpose(1, 2)
        values[rows[:, None], :, self._pos] = value_states.transpose(1, 2)
        return keys[rows, :, :self._read], values[rows, :, :self._read]


@dataclass
class _Call:
    home: str
    session: str
    first: int
    last: int
    rows: list[str]
    starts: list[int]
    counts: list[int]
    hidden: torch.Tensor
    release: list[str]
    slots: list[int] | None = None
    out: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class _Entry:
    slot: int
    length: int  # positions cached
    touched: float


class BlockExecutor:
    """Runs peers' block calls on this server's model (`handle_call`, `handle_release`: control handlers for
    `ExpertService.on`, run on one worker thread)."""

    def __init__(self, model: Any, gate: LayerGate, *, max_len: int, max_requests: int = 128,
                 ttl_s: float = 120.0) -> None:
        if max_requests < 1 or ttl_s <= 0:
            raise ValueError("max_requests must be >= 1 and ttl_s > 0")
        self.model, self.gate = model, gate
        self.max_len, self.max_requests, self.ttl_s = max_len, max_requests, ttl_s
        config = model.config.get_text_config()
        self.hidden_size = int(config.hidden_size)
        self.num_moe_layers = max(gate.moe_of) + 1
        self._window, self._layer_types = _attention_kinds(config)
        self._dtype = next(model.parameters()).dtype
        self._cache: BlockCache | None = None  # made on the worker thread (inference tensors)
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._free = list(range(max_requests - 1, -1, -1))
        self._last_sweep = time.monotonic()
        self._lock = threading.Lock()  # entries vs stats readers
        self._compute = threading.Lock()  # one forward at a time; its holder runs every call queued
        self._queue: list[_Call] = []
        self._queue_lock = threading.Lock()
        self.calls = 0
        self.rows = 0
        self.forwards = 0  # forwards run: fewer than calls when calls merged
        self.expired = 0
        self.busy_s = 0.0  # seconds spent running calls (slots, forward, reply tensors): a round trip's share here

    # --- messages ------------------------------------------------------------------------------------------
    def handle_call(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        call = _Call(*self._parse(header, tensors), release=_str_list(header.get("release", []), "release"))
        with self._queue_lock:
            self._queue.append(call)
        with self._compute:
            if not call.done:  # nobody ran it meanwhile: run it with everything queued since
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._run_calls(batch)
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return {"rows": len(call.rows)}, {"hidden": call.out}

    def handle_release(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        home, session = _name(header.get("home"), "home"), _name(header.get("session"), "session")
        with self._lock:
            n = self._release(home, session, _str_list(header.get("release", []), "release"))
        return {"released": n}, {}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            homes: dict[str, int] = {}
            for home, _, _ in self._entries:
                homes[home] = homes.get(home, 0) + 1
            return {"requests_cached": len(self._entries), "by_home": homes, "calls": self.calls, "rows": self.rows,
                    "forwards": self.forwards, "busy_s": round(self.busy_s, 6), "expired": self.expired,
                    "kv_bytes": self._cache.nbytes() if self._cache is not None else 0,
                    "max_requests": self.max_requests}

    # --- internals -----------------------------------------------------------------------------------------
    def _run_calls(self, batch: list[_Call]) -> None:
        """Run queued calls (under `_compute`): those of one block and length share a forward."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                if self._cache is None:
                    self._cache = BlockCache(len(self.gate.moe_of), self.max_requests, self.max_len)
                with self._lock:
                    for c in batch:  # releases first: a rebuilt request may restart in the same batch
                        self._release(c.home, c.session, c.release)
                    self._sweep()
                    for c in batch:
                        try:
                            c.slots = self._slots_for(c.home, c.session, c.rows, c.starts)
                        except ServiceError as err:
                            c.error = err
                groups: dict[tuple, list[_Call]] = {}
                for c in batch:
                    if c.error is None:
                        groups.setdefault((c.first, c.last, c.hidden.shape[1], c.hidden.dtype), []).append(c)
                for (first, last, _, _), calls in groups.items():
                    self._run_group(first, last, calls)
        finally:
            for c in batch:
                c.done = True
            with self._lock:
                self.busy_s += time.perf_counter() - t0

    def _run_group(self, first: int, last: int, calls: list[_Call]) -> None:
        try:
            out = self._run(first, last, [s for c in calls for s in c.slots or ()], [s for c in calls for s in c.starts],
                            [n for c in calls for n in c.counts], torch.cat([c.hidden for c in calls]))
        except Exception as err:  # the calls of this forward fail; the others went on
            for c in calls:
                c.error = err
            return
        parts = torch.split(out.to("cpu"), [len(c.rows) for c in calls])
        now = time.monotonic()
        with self._lock:
            for c, part in zip(calls, parts, strict=True):
                c.out = part.to(c.hidden.dtype).contiguous()
                for rid, start, count in zip(c.rows, c.starts, c.counts, strict=True):
                    e = self._entries.get((c.home, c.session, rid))
                    if e is not None:
                        e.length, e.touched = start + count, now
                self.rows += len(c.rows)
            self.calls += len(calls)
            self.forwards += 1

    def _parse(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple:
        home, session = _name(header.get("home"), "home"), _name(header.get("session"), "session")
        first, last = header.get("first"), header.get("last")
        if not (_int(first) and _int(last) and 0 <= first <= last < self.num_moe_layers):
            raise ServiceError(BAD_REQUEST, f"block_call: first/last must be MoE layers 0 <= first <= last < "
                                            f"{self.num_moe_layers}, got {first!r}, {last!r}")
        hidden = tensors.get("hidden")
        if hidden is None or hidden.dim() != 3 or hidden.shape[2] != self.hidden_size or not hidden.is_floating_point():
            raise ServiceError(BAD_REQUEST, f"block_call: needs a float tensor 'hidden' [rows, q, {self.hidden_size}], "
                                            f"got {None if hidden is None else list(hidden.shape)}")
        b, q = int(hidden.shape[0]), int(hidden.shape[1])
        rows = _str_list(header.get("rows"), "rows")
        starts, counts = header.get("starts"), header.get("counts")
        if (len(rows) != b or not isinstance(starts, list) or not isinstance(counts, list) or len(starts) != b
                or len(counts) != b or b == 0 or q == 0):
            raise ServiceError(BAD_REQUEST, f"block_call: rows, starts and counts must each have one entry per row of "
                                            f"hidden ({b} rows, {q} positions, at least 1 each)")
        if len(set(rows)) != b:
            raise ServiceError(BAD_REQUEST, "block_call: a request id appears twice in rows")
        for s, c in zip(starts, counts, strict=True):
            if not (_int(s) and _int(c) and s >= 0 and 1 <= c <= q and s + q <= self.max_len):
                raise ServiceError(BAD_REQUEST, f"block_call: each row needs start >= 0, 1 <= count <= {q} and "
                                                f"start + {q} <= {self.max_len} (max length), got {s!r}, {c!r}")
        return home, session, first, last, rows, starts, counts, hidden

    def _slots_for(self, home: str, session: str, rows: list[str], starts: list[int]) -> list[int]:
        for rid, start in zip(rows, starts, strict=True):  # check every row before changing anything
            e = self._entries.get((home, session, rid))
            if start > 0 and (e is None or e.length < start):
                raise ServiceError(UNKNOWN_REQUEST, f"no cache for request {rid!r} of {home} up to position {start} "
                                                    f"here (restarted, expired or released): prefill it again")
        new = sum(1 for rid, s in zip(rows, starts, strict=True) if s == 0 and (home, session, rid) not in self._entries)
        if new > len(self._free):
            raise ServiceError(BUSY, f"{new} new requests but {len(self._free)} of {self.max_requests} block cache "
                                     f"slots free here")
        now, slots = time.monotonic(), []
        for rid, start in zip(rows, starts, strict=True):
            key = (home, session, rid)
            e = self._entries.get(key)
            if e is None:
                e = self._entries[key] = _Entry(self._free.pop(), 0, now)
            if start == 0:
                e.length = 0
            slots.append(e.slot)
        return slots

    def _run(self, first: int, last: int, slots: list[int], starts: list[int], counts: list[int],
             hidden: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        assert cache is not None
        dev = self.model.device
        b, q = hidden.shape[:2]
        s = torch.tensor(starts, device=dev)
        positions = s[:, None] + torch.arange(q, device=dev)  # [B, q]
        read = max(starts) + q
        cache.reserve(read)
        entries = torch.arange(read, device=dev).expand(b, -1)  # [B, read]: entry j holds position j
        valid = s + torch.tensor(counts, device=dev)
        keys = torch.where(entries < valid[:, None], entries, -1)
        cache.set_rows(torch.tensor(slots, device=dev), positions, read)
        masks = attention_masks(positions, keys, self._dtype, self._window, self._layer_types)
        x = hidden.to(dev, self._dtype)
        decoder = self.gate.decoder

        def forward(placeholder: torch.Tensor) -> Any:
            return decoder(inputs_embeds=placeholder, position_ids=positions, attention_mask=masks, cache=cache,
                           use_cache=True)

        padding = positions >= valid[:, None]  # a prefill's right padding: its experts' output is never read
        with skip_padding(padding.reshape(-1)):
            return self.gate.run_block(first, last, x, forward)

    def _release(self, home: str, session: str, rows: list[str]) -> int:
        n = 0
        for rid in rows:
            e = self._entries.pop((home, session, rid), None)
            if e is not None:
                self._free.append(e.slot)
                n += 1
        return n

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < min(_SWEEP_EVERY_S, self.ttl_s / 2):
            return
        self._last_sweep = now
        for key in [k for k, e in self._entries.items() if now - e.touched > self.ttl_s]:
            self._free.append(self._entries.pop(key).slot)
            self.expired += 1


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= 128:
        raise ServiceError(BAD_REQUEST, f"block message: {what!r} must be a non-empty string of at most 128 chars")
    return v


def _str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in v):
        raise ServiceError(BAD_REQUEST, f"block message: {what!r} must be a list of request ids (strings)")
    return v
