"""The edge server's experts dispatcher: local experts here, the rest on the peer the placement names.

`ClusterDispatcher` is the model layer's `RemoteDispatcher` wired to this cluster: `locate` reads the
routing table of the current `Placement` (swapped atomically by `set_placement`, so a step sees one
version), `remote` hands each target server's batch to the ZeroMQ peer pool without blocking, and `count`
adds every routing decision (per expert, local vs remote) to a device counter for metrics and the scheduler.

Live migration and failures (see docs/operations.md):
* `set_placement(p, drain_timeout)` swaps the table, then waits until the calls issued under older
  versions have finished, so the coordinator may drop an old copy once every server has switched.
* A call whose peer is unavailable, or answers `not_held` (it dropped the expert meanwhile), is retried
  at once on another holder of those experts in the current placement; an unavailable peer is avoided
  by `locate` until a background probe (a ping every `probe_interval` seconds) finds it answering again,
  at most `suspect_ttl` seconds (or until the coordinator's `set_down` says otherwise). A peer that hangs
  (process stopped, sockets open) or sits behind a partition is found by the call deadlines exactly like
  a dead one. When no other copy exists, the call waits up to `repair_wait` seconds for a placement that
  re-hosts it. Failovers run on the model's thread, inside the batch's `result()`.
* Each forward reads one version of a layer's slot map (`ExpertSlots.reading`): a concurrent drop flips
  the map for later forwards, and its slot is not reused until the forwards that may read it have finished.
* Activations are counted on the device (`ActivationCounter`, int [layers, experts, local|remote]) and read
  only when stats or metrics are polled, so counting adds no host sync to a forward.

With `recorder` set (`prism serve --record-trace`, a `prism_moe.runtime.recording.ForwardRecorder`),
`moe_forward` also hands each layer's top-k ids and gate weights to it, so the server keeps per-token traces.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prism_moe.model.experts import RemoteDispatcher
from prism_moe.model.grouped import compute_rows
from prism_moe.model.slots import ExpertSlots, SlotView
from prism_moe.placement.placement import Placement
from prism_moe.runtime.metrics import ServerMetrics
from prism_moe.runtime.transport import Call, PeerPool, PeerUnavailable, RemoteError, TransportError

log = logging.getLogger(__name__)

NOT_HELD = "not_held"  # error code of a peer asked for an expert it does not hold (see server.py)


class ActivationCounter:
    """Expert activations of this server's own tokens, split by where they were computed.

    Counts live in an int64 tensor [layers, experts + 1, 2] (local, remote; the extra row takes padding) on
    the model's device and are added to with one `index_add_` per MoE layer, no host sync; `split` and
    `snapshot` copy them out (stats polls).
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.shape = (num_layers, num_experts + 1, 2)
        self._counts: Tensor | None = None
        self._one = torch.ones(1, dtype=torch.int64)
        self._offset = np.zeros(self.shape, dtype=np.int64)  # what a reset subtracts (never written on device)
        self._lock = threading.Lock()

    def _on(self, device: torch.device) -> Tensor:
        c = self._counts
        if c is None or c.device != device:
            with self._lock:
                c = self._counts = (torch.zeros(self.shape, dtype=torch.int64, device=device) if c is None
                                    else c.to(device))
        return c

    def add_codes(self, layer: int, codes: Tensor) -> None:
        """Count route codes [S]: 2 * expert + (0 local | 1 remote); 2 * num_experts is padding."""
        counts = self._on(codes.device)
        one = self._one if self._one.device == codes.device else torch.ones(1, dtype=torch.int64,
                                                                             device=codes.device)
        self._one = one
        counts[layer].view(-1).index_add_(0, codes, one.expand(codes.shape[0]))

    def add(self, layer: int, top_k_index: Tensor) -> None:
        """Count top_k_index [T, k] (< 0: padding, skipped) as computed locally."""
        self.add_codes(layer, 2 * top_k_index.reshape(-1).remainder(self.shape[1]))

    def split(self, reset: bool = False) -> np.ndarray:
        """int [layers, experts, 2]: (local, remote) activations since start (or the last reset)."""
        with self._lock:
            raw = (self._counts.to("cpu", copy=True).numpy() if self._counts is not None
                   else np.zeros(self.shape, np.int64))
            out = raw - self._offset
            if reset:
                self._offset = raw
        return out[:, :-1]

    def snapshot(self, reset: bool = False) -> np.ndarray:
        """int [layers, experts]: activations since start (or the last reset)."""
        return self.split(reset).sum(axis=2)


class _Tag:
    """The placement version a remote call counts under for draining (None while it waits for a repair)."""

    __slots__ = ("version", "closed", "layer", "server", "how", "since")

    def __init__(self, layer: int, server: str) -> None:
        self.version: int | None = None
        self.closed = False  # its caller is done with it: a failover still winding down must not count it again
        # what the log says when a drain times out (formatted only then: this is made for every remote batch)
        self.layer, self.server, self.how, self.since = layer, server, "", time.monotonic()

    def describe(self, now: float) -> str:
        return (f"layer {self.layer} -> {self.server} ({self.how}) under version {self.version}, "
                f"{now - self.since:.1f} s")


def can_fail_over(err: Exception) -> bool:
    """A failed batch may go to another holder: its peer is unavailable, or no longer holds the experts."""
    return isinstance(err, PeerUnavailable) or (isinstance(err, RemoteError) and err.code == NOT_HELD)


class _Reply:
    """One remote batch of a forward step: its call to the placement's holder, then, if that fails over,
    the batch's experts on other holders. `result()` runs on the model's thread, failover included.

    A call completes only when collected, so before a failover (which may wait for a repair) the batch
    first collects its siblings, the layer's other batches: a sibling answered meanwhile must not stay
    counted as in flight under the old placement, or the repair's switch would wait for it while this
    failover waits for that switch.
    """

    def __init__(self, owner: ClusterDispatcher, layer: int, server: str, ids: Tensor, x: Tensor,
                 call: Call | None, tag: _Tag, siblings: list[_Reply], error: Exception | None = None) -> None:
        self._owner, self._layer, self._server, self._ids, self._x = owner, layer, server, ids, x
        self._call, self._tag, self._siblings = call, tag, siblings
        self._finished = False
        # the first attempt's (value, error); known at once when there was nothing to send
        self._outcome: tuple[Tensor | None, BaseException | None] | None = None if call else (None, error)

    def _first_attempt(self, timeout: float | None) -> tuple[Tensor | None, BaseException | None]:
        """Wait for the call itself (no failover); a success or a final error lets go of the tag."""
        if self._outcome is None:
            assert self._call is not None
            try:
                self._outcome = (self._call.result(timeout), None)
                self._finish()
            except (PeerUnavailable, RemoteError) as err:
                self._outcome = (None, err)
                if not can_fail_over(err):
                    self._finish()
            except BaseException:
                self._call.cancel()  # e.g. a timeout: the attempt must let go of its peer's socket
                self._finish()
                raise
        return self._outcome

    def result(self, timeout: float | None = None) -> Tensor:
        try:
            value, err = self._first_attempt(timeout)
            if value is not None:
                return value
            assert isinstance(err, Exception)
            if not can_fail_over(err):
                raise err
            for sib in self._siblings:
                if sib is not self:
                    try:
                        sib._first_attempt(timeout)
                    except BaseException:  # noqa: S110 - its own result() reports it
                        pass
            return self._owner._failover(self._layer, self._server, self._ids, self._x, err, (), self._tag)
        finally:
            self._finish()

    def cancel(self) -> bool:
        """Stop waiting for it (a forward that failed elsewhere)."""
        if self._call is not None:
            self._call.cancel()
        self._finish()
        return True

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._owner._track(self._tag, None, close=True)

class ClusterDispatcher(RemoteDispatcher):
    """Route missing experts to peers by the placement's routing table; count what goes where."""

    def __init__(self, me: str, placement: Placement, pool: PeerPool | None,
                 metrics: ServerMetrics | None = None, timeout: float | None = 30.0,
                 suspect_ttl: float = 30.0, repair_wait: float = 10.0, probe_interval: float = 0.5,
                 stores: Mapping[int, ExpertSlots] | None = None, path: str = "auto") -> None:
        super().__init__(timeout=timeout, path=path)
        self.me = me
        self.pool = pool
        self.metrics = metrics
        self._placement = placement
        self._me = placement.server_names.index(me)
        self.counter = ActivationCounter(placement.num_layers, placement.num_experts)
        self.suspect_ttl = suspect_ttl
        self.repair_wait = repair_wait
        self.probe_interval = probe_interval
        self._prober: threading.Thread | None = None  # pings suspected peers while there are any
        self._closed = threading.Event()
        self.stores: Mapping[int, ExpertSlots] = stores or {}  # this server's slots (local fallback)
        self._down: frozenset[str] = frozenset()  # servers the coordinator declared down
        self._suspect: dict[str, float] = {}  # server -> monotonic time until which we avoid it
        self._inflight: Counter[int] = Counter()  # remote calls in flight, by placement version
        self._tracked: set[_Tag] = set()  # the calls behind `_inflight`
        self._cv = threading.Condition()
        self.failovers = 0  # batches (or parts) re-sent to another holder
        self._reported = np.zeros((placement.num_layers, 2), dtype=np.int64)  # (local, remote) given to metrics
        if metrics is not None:
            metrics.refreshers.append(self.flush_metrics)  # device-side counts reach Prometheus when it reads
        # optional per-token trace recorder (`prism serve --record-trace`): sees every forward's routing,
        # layer by layer on the generation thread (`prism_moe.runtime.recording.ForwardRecorder`)
        self.recorder: Any = None

    @classmethod
    def all_local(cls, num_layers: int, num_experts: int) -> ClusterDispatcher:
        """The dispatcher of a one-server cluster holding every expert: `prism serve`'s experts path with no
        peers (benchmarks and calibration measure the hook's own cost with it)."""
        hosts = np.ones((1, num_layers, num_experts), dtype=bool)
        return cls("me", Placement.from_hosts(["me"], hosts, np.zeros((1, 1))), None)

    @property
    def placement(self) -> Placement:
        return self._placement

    def set_placement(self, placement: Placement, drain_timeout: float | None = None) -> bool:
        """Switch the routing table (one attribute store: a forward step reads one version per layer).

        With `drain_timeout`, wait until remote calls issued under older versions have finished; returns
        False if some were still running after that many seconds.
        """
        if placement.server_names != self._placement.server_names:
            raise ValueError("a new placement must name the same servers in the same order")
        with self._cv:
            self._placement = placement
        if drain_timeout is None:
            return True
        return self.drain(placement.version, drain_timeout)

    def drain(self, version: int, timeout: float) -> bool:
        """Wait until no remote call issued under a placement version below `version` is in flight."""
        with self._cv:
            return self._cv.wait_for(lambda: not any(n for v, n in self._inflight.items() if v < version),
                                     timeout)

    def inflight(self) -> dict[int, int]:
        """Remote calls in flight by the placement version they were issued under."""
        with self._cv:
            return dict(self._inflight)

    def inflight_calls(self, below: int | None = None) -> list[str]:
        """What the calls in flight are (those issued under versions below `below`), oldest first."""
        now = time.monotonic()
        with self._cv:
            tags = sorted((t for t in self._tracked if below is None or (t.version or 0) < below),
                          key=lambda t: t.since)
            return [t.describe(now) for t in tags]

    # --- liveness --------------------------------------------------------------------------------------------
    def set_down(self, names: Iterable[str]) -> None:
        """The coordinator's view of which servers are down (replaces it; clears local suspicions of others).
        Calls in flight to a newly declared server fail over at once instead of waiting out its deadlines."""
        down = frozenset(names)
        newly = down - self._down
        self._down = down
        with self._cv:  # model threads add suspicions meanwhile: neither lose one nor iterate a changing dict
            self._suspect = {n: t for n, t in self._suspect.items() if n in down}
        if self.pool is not None:
            for name in newly:
                if name in self.pool:
                    self.pool.fail_inflight(name, "declared down by the coordinator")

    def is_down(self, name: str) -> bool:
        return name in self._down or self._suspect.get(name, 0.0) > time.monotonic()

    def down(self) -> list[str]:
        return sorted(n for n in self._placement.server_names if self.is_down(n))

    def suspect(self, name: str) -> None:
        """A call of another kind (a block hand-off) found no answer from `name`: avoid it as `_suspect_peer` does."""
        self._suspect_peer(name)

    def _suspect_peer(self, name: str) -> None:
        """Avoid `name` (its call found no answer) until a probe hears from it, at most `suspect_ttl` s."""
        with self._cv:
            self._suspect[name] = time.monotonic() + self.suspect_ttl
            if self._prober is None and not self._closed.is_set():
                self._prober = threading.Thread(target=self._probe, name=f"prism-probe-{self.me}", daemon=True)
                self._prober.start()

    def _probe(self) -> None:
        """Ping suspected peers every `probe_interval` s; one that answers (and whose compute worker is not
        stuck) is routed to again. Ends when none is suspected."""
        while not self._closed.wait(self.probe_interval):
            now = time.monotonic()
            suspects = [n for n, until in list(self._suspect.items()) if until > now]
            for name in suspects:
                if self._answers(name):
                    log.info("%s: peer %s answers again; routing to it", self.me, name)
                    self._suspect.pop(name, None)
            with self._cv:
                if not any(until > time.monotonic() for until in list(self._suspect.values())):
                    self._prober = None
                    return
        with self._cv:
            self._prober = None

    def _answers(self, name: str) -> bool:
        if self.pool is None or name not in self.pool:
            return False
        ch = self.pool[name]
        try:
            _, pong = ch.ping(timeout=self.probe_interval)
        except (TransportError, KeyError):
            return False
        busy = pong.get("busy_s", 0.0)
        return isinstance(busy, int | float) and busy < ch.timeout

    def close(self) -> None:
        """Stop probing peers (the pool is the server's to close)."""
        self._closed.set()

    def _alternative(self, p: Placement, layer: int, expert_id: int, exclude: Iterable[str],
                     suspects: bool = False) -> str | None:
        """Another live holder of (layer, expert) in `p`, spread deterministically; None when none is left.
        `suspects`: holders only suspected here (not declared down by the coordinator) count too."""
        skip = set(exclude) | {self.me}
        holders = [n for n in (p.server_names[i] for i in np.flatnonzero(p.hosts[:, layer, expert_id]))
                   if n not in skip and not (n in self._down if suspects else self.is_down(n))]
        if not holders:
            return None
        return holders[(layer * p.num_experts + expert_id + self._me) % len(holders)]

    # --- routing ---------------------------------------------------------------------------------------------
    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertSlots) -> Tensor:
        rec = self.recorder
        if rec is not None:
            rec.observe(layer, top_k_index, top_k_weights)
        return super().moe_forward(layer, hidden, top_k_index, top_k_weights, experts)

    def count(self, layer: int, top_k_index: Tensor, idx: Tensor, view: SlotView) -> None:
        self.counter.add_codes(layer, view.route_code[idx])

    @property
    def local_invocations(self) -> int:
        """Routed (token, expert) pairs computed here, cumulative (reads the device counter)."""
        return int(self.counter.split()[..., 0].sum())

    @property
    def remote_invocations(self) -> int:
        return int(self.counter.split()[..., 1].sum())

    def flush_metrics(self) -> None:
        """Add the pairs counted since the last flush to the Prometheus counters (when metrics are read)."""
        if self.metrics is None:
            return
        by_layer = self.counter.split().sum(axis=1)  # [layers, 2]
        with self._cv:
            new, self._reported = by_layer - self._reported, by_layer
        for layer, (local, remote) in enumerate(new.tolist()):
            self.metrics.count_experts(layer, max(local, 0), max(remote, 0))

    def locate(self, layer: int, expert_id: int) -> Hashable:
        p = self._placement
        target = p.server_names[int(p.route[self._me, layer, expert_id])]
        # Down: route around it at once (if no other copy exists, try it anyway). Me: this forward read its
        # slot map before a switch mapped the expert here; the copy it moves from serves until the drop.
        if target == self.me or self.is_down(target):
            target = self._alternative(p, layer, expert_id, ()) or target
        return target

    def remote(self, layer: int, batches: dict[Hashable, tuple[Tensor, Tensor]]) -> Mapping[Hashable, Any]:
        if self.pool is None and any(str(s) != self.me for s in batches):
            raise RuntimeError(f"server {self.me} has no peers but layer {layer} needs experts it does not hold")
        out: dict[Hashable, Any] = {}
        replies: list[_Reply] = []  # this layer's batches, which collect each other before a failover
        try:
            for server, (ids, x) in batches.items():
                name = str(server)
                if name == self.me:  # no other copy (see `locate`): the slots map it by now
                    out[server] = self._compute_here(layer, ids, x)
                    continue
                tag = _Tag(layer, name)
                self._track(tag, self._placement.version)
                # The wire carries CPU tensors; the reply is moved back to the model's device in `combine`.
                ids, x = ids.cpu(), x.detach().cpu()
                call, error = None, None
                if name in self._down:
                    # The coordinator declared it down and `locate` found no other copy: sending would only
                    # wait out a dead peer's deadlines (holding up the repair's switch meanwhile), so the
                    # batch waits for the repair in `result()`, counted nowhere. (A server only suspected
                    # locally is still tried: it may be back.)
                    tag.how = "holder down"
                    self._track(tag, None)
                    error = PeerUnavailable(name, after=0.0, attempts=0, reason="marked down")
                else:
                    tag.how = "call"
                    try:  # sent now, from this thread; collected (and failed over) in `result()`
                        call = self.pool.start_call(name, layer, ids, x)
                    except PeerUnavailable as err:  # its channel was just replaced or closed
                        error = err
                    except BaseException:
                        self._track(tag, None, close=True)
                        raise
                out[server] = reply = _Reply(self, layer, name, ids, x, call, tag, replies, error)
                replies.append(reply)
        except BaseException:
            for reply in out.values():
                reply.cancel()
            raise
        return out

    def _track(self, tag: _Tag, version: int | None, close: bool = False) -> None:
        """Count a top-level call as in flight under `version` (None: not in flight on any holder); `close`:
        the caller is done with it (finished or given up), so it never counts again."""
        with self._cv:
            if tag.closed:
                return
            tag.closed = close
            if tag.version is not None:
                self._inflight[tag.version] -= 1
                if self._inflight[tag.version] <= 0:
                    del self._inflight[tag.version]
            tag.version = version
            if version is not None:
                self._inflight[version] += 1
                self._tracked.add(tag)
            else:
                self._tracked.discard(tag)
            self._cv.notify_all()

    def _failover(self, layer: int, server: str, ids: Tensor, x: Tensor, err: Exception,
                  tried: tuple[str, ...], tag: _Tag | None) -> Tensor:
        """The batch `server` failed with `err`: send its experts to other holders (on the model's thread)."""
        if isinstance(err, PeerUnavailable):
            self._suspect_peer(server)
        tried = (*tried, server)
        placement = self._placement
        targets = self._regroup(placement, layer, ids, tried)
        if targets is None:
            # No other copy: the coordinator is re-hosting it (repair). Wait for that placement rather
            # than fail every request of this step; give up after `repair_wait` seconds.
            # While waiting it is in flight nowhere: a switch must not wait for it (the repair's own
            # intermediate switch would otherwise wait for a call that waits for the repair).
            if tag is not None:
                self._track(tag, None)
            log.warning("%s: layer %d experts %s: no holder left to try after %s (%s); waiting up to %.0f s for a "
                        "placement that re-hosts them", self.me, layer, sorted(set(ids.tolist())), tried, err,
                        self.repair_wait)
            # (from the placement regrouped above: a switch landing just now must count as the change)
            version, deadline = placement.version, time.monotonic() + self.repair_wait
            while targets is None and time.monotonic() < deadline:
                time.sleep(0.05)
                if self._placement.version != version:
                    version, tried = self._placement.version, (server,)
                    targets = self._regroup(self._placement, layer, ids, tried)
            if targets is None:
                raise err
            if tag is not None:
                self._track(tag, version)
        self.failovers += 1
        parts: dict[str, tuple[Tensor, Tensor, Tensor, Any]] = {}
        try:
            for s, es in targets.items():  # every part sent before any is awaited
                m = torch.isin(ids, torch.tensor(es, dtype=ids.dtype))
                call: Any = None
                if s != self.me:
                    try:
                        call = self._start(s, layer, ids[m], x[m])
                    except PeerUnavailable as e:
                        call = e
                parts[s] = (m, ids[m], x[m], call)
            out = torch.empty_like(x)
            for s in list(parts):
                m, p_ids, p_x, call = parts.pop(s)
                out[m] = self._collect(layer, s, p_ids, p_x, call, tried)
            return out
        except BaseException:
            for *_, call in parts.values():
                if isinstance(call, Call):
                    call.cancel()
            raise

    def _start(self, server: str, layer: int, ids: Tensor, x: Tensor) -> Call:
        assert self.pool is not None
        return self.pool.start_call(server, layer, ids, x)

    def _regroup(self, p: Placement, layer: int, ids: Tensor, tried: tuple[str, ...]) -> dict[str, list[int]] | None:
        """{holder: expert ids} for the batch's experts on holders not tried (this server when its slots map
        the expert now); None when some expert has no such holder."""
        store = self.stores.get(layer)
        targets: dict[str, list[int]] = {}
        for e in ids.unique().tolist():
            # a holder only suspected here is tried before waiting for a repair: a suspicion may be stale (a
            # process that was stopped sees every deadline of its own calls pass at once when it resumes)
            alt = self.me if store is not None and e in store else (
                self._alternative(p, layer, e, tried) or self._alternative(p, layer, e, tried, suspects=True))
            if alt is None:
                return None
            targets.setdefault(alt, []).append(e)
        return targets

    def _collect(self, layer: int, server: str, ids: Tensor, x: Tensor, call: Any, tried: tuple[str, ...]) -> Tensor:
        """A failover part's result: the call's (failed over again if need be), or computed here."""
        if isinstance(call, Call | Exception):
            try:
                if isinstance(call, Exception):
                    raise call
                out: Tensor = call.result()
                return out
            except (PeerUnavailable, RemoteError) as err:
                if not can_fail_over(err):
                    raise
                return self._failover(layer, server, ids, x, err, tried, None)
        return self._compute_here(layer, ids, x)  # loaded here meanwhile (e.g. by a repair)

    def _compute_here(self, layer: int, ids: Tensor, x: Tensor) -> Tensor:
        """Rows whose experts this server's slots map (outside the forward's own split): ids [m], x [m, H]."""
        store = self.stores[layer]
        device = store.pool.device
        return compute_rows(store, ids, x, self.grouped_on(device), self.onednn_on(device, store.pool.dtype))
