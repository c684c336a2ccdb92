"""Expert transport, client side: a server's clients to its peers' expert services (DEALER sockets).

Threading model: `PeerClient`s live on one asyncio event loop (selector-based: the default on Linux
and macOS), driven through ZeroMQ's edge-triggered FD (`_LoopSocket`; lighter than `zmq.asyncio`).
Code that is not async (the model's forward runs in a normal thread) uses `LoopThread` (a loop in a
daemon thread) and `SyncPeerPool`, whose `start_call` sends an expert call from the calling thread on a
socket of its own (`DirectCall`) and waits for the reply there. The serving side is `service.py`
(`ExpertService`, re-exported here).

Message format: see `wire.py` and docs/wire-protocol.md. Every request carries an id; a client keeps
many requests in flight on one DEALER socket and matches replies by id. Every call has a per-attempt
deadline and a bounded number of retries, then raises `PeerUnavailable`: a call never hangs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
import zmq

from .emulation import LinkEmulator, LinkProfile
from .keys import CurveIdentity
from .service import MAX_REMOTE_MESSAGE, ExpertService, ServiceError, ServiceStats
from .sockets import (
    EVENTS,
    NOBLOCK,
    POLLIN,
    POLLOUT,
        recv_frame,
    recv_rest,
    send_nowait,
    sockopt,
)
from .wire import (
    BAD_REPLY,
    DEFAULT_LIMITS,
    ERROR,
    EXPERT_CALL,
    PING,
    REPLY_TYPE,
    WireError,
    WireLimits,
    decode,
    encode,
    encode_expert_call,
    expected_result,
    expert_result_header,
    frames_nbytes,
)

__all__ = [
    "CallEvent",
    "DirectCall",
    "ExpertService",
    "LoopThread",
    "PeerClient",
    "PeerPool",
    "PeerStats",
    "PeerUnavailable",
    "RemoteError",
    "ServiceError",
    "ServiceStats",
    "SyncPeerPool",
    "TransportError",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TransportError(Exception):
    """Base of the errors a caller of the transport sees."""


class PeerUnavailable(TransportError):
    """No reply from `peer` within the deadline after all attempts (down, unreachable or refused)."""

    def __init__(
        self, peer: str, *, after: float, attempts: int, endpoint: str = "", reason: str = "no reply"
    ):
        self.peer, self.after, self.attempts, self.endpoint = peer, after, attempts, endpoint
        where = f" at {endpoint}" if endpoint else ""
        super().__init__(
            f"peer {peer!r}{where} unavailable: {reason} after {attempts} attempt(s), {after:.3f}s"
        )


class RemoteError(TransportError):
    """The peer answered with an error (or with a malformed reply: code `bad_reply`). Not retried."""

    def __init__(self, peer: str, code: str, message: str):
        self.peer, self.code, self.message = peer, code, message
        super().__init__(f"peer {peer!r} replied {code}: {message}")


def _check_reply(peer: str, header: Mapping[str, Any], request_type: str) -> None:
    """Raise RemoteError for an error reply, or for a reply of the wrong type for `request_type`."""
    if header["type"] == ERROR:
        raise RemoteError(peer, str(header.get("code")), str(header.get("message"))[:MAX_REMOTE_MESSAGE])
    if header["type"] != REPLY_TYPE[request_type]:
        raise RemoteError(peer, BAD_REPLY, f"{header['type']!r} in reply to {request_type!r}")


# ---------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class CallEvent:
    """One finished client request, handed to `on_call` hooks (e.g. Prometheus counters/histograms).

    `outcome`: "ok", "error" (the peer replied an error), "unavailable" (PeerUnavailable) or "cancelled".
    `bytes_sent` counts every attempt; `latency_s` spans all attempts.
    """

    peer: str
    type: str
    layer: int | None
    tokens: int
    bytes_sent: int
    bytes_received: int
    latency_s: float
    attempts: int
    outcome: str


@dataclass
class PeerStats:
    """Counters for one peer link, updated by the thread that ran the call (reads from others are fine)."""

    calls: int = 0
    ok: int = 0
    errors: int = 0
    unavailable: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    unmatched_replies: int = 0  # late (after timeout) or duplicate replies, dropped
    latency_sum_s: float = 0.0
    recent_latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024), repr=False)

    def record(self, ev: CallEvent) -> None:
        self._add(ev.outcome, ev.latency_s)

    def _add(self, outcome: str, latency_s: float) -> None:
        self.calls += 1
        if outcome == "ok":
            self.ok += 1
            self.latency_sum_s += latency_s
            self.recent_latencies_s.append(latency_s)
        elif outcome == "error":
            self.errors += 1
        elif outcome == "unavailable":
            self.unavailable += 1

    def latency_quantile(self, q: float) -> float | None:
        """Quantile of the latest successful call latencies (seconds), None before any."""
        xs = sorted(self.recent_latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


# ----------------------------------------------------------------------------------------- socket


class _SocketClosed(ConnectionError):
    """The socket was closed while a send waited for room."""


class _LoopSocket:
    """A sync ZeroMQ socket driven by the running asyncio loop through its edge-triggered FD.

    Received messages go straight from the FD callback to `on_message` (no future, no task switch);
    sends are non-blocking and only wait, for POLLOUT, when ZeroMQ has no room (e.g. a DEALER with
    IMMEDIATE and no connection yet). On a 2-core box this costs ~100 us less CPU per message than
    `zmq.asyncio`. The FD signals changes only, and any socket call may consume that signal, so after
    each of our own operations ZMQ_EVENTS is re-checked and pending work rescheduled.
    """

    MAX_BATCH = 64  # messages per callback before yielding to other loop work

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[zmq.Frame]], None],
    ):
        self.sock, self._on_message = sock, on_message
        self._loop = asyncio.get_running_loop()
        self._fd = sock.get(zmq.FD)
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = self._closed = self._processing = False
        self._loop.add_reader(self._fd, self._process)
        self.kick()  # messages may already be queued

    def kick(self) -> None:
        """Look at the socket again soon (once per loop iteration at most)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._process)

    def _process(self) -> None:
        self._scheduled = False
        sock = self.sock
        self._processing = True  # sends made by on_message need no ZMQ_EVENTS check: we re-check below
        try:
            for _ in range(self.MAX_BATCH):
                if self._closed:
                    return
                events = sockopt(sock, EVENTS)
                if events & POLLOUT and self._waiters:
                    for w in self._waiters:
                        if not w.done():
                            w.set_result(None)
                    self._waiters.clear()
                if not events & POLLIN:
                    return
                try:
                    frames = recv_rest(sock, recv_frame(sock, NOBLOCK, False, False))
                except zmq.Again:
                    return
                try:
                    self._on_message(frames)
                except Exception:
                    log.exception("message handler failed")
        finally:
            self._processing = False
        self.kick()  # more queued: continue after other callbacks had a turn

    def try_send(self, frames: list[Any]) -> bool:
        """Send one multipart message if ZeroMQ can take it now; False (nothing sent) if it cannot."""
        sock = self.sock
        try:
            send_nowait(sock, frames)
        except zmq.Again:
            return False
        if not self._processing:  # (_process looks at ZMQ_EVENTS again anyway)
            events = sockopt(sock, EVENTS)  # the send may have eaten the FD signal for queued input
            if events & POLLIN or (events & POLLOUT and self._waiters):
                self.kick()
        return True

    async def send(self, frames: list[Any]) -> None:
        """Send one multipart message, waiting (cancellably) while ZeroMQ cannot take it."""
        while not self.try_send(frames):
            if self._closed:
                raise _SocketClosed("socket closed")
            w = self._loop.create_future()
            self._waiters.append(w)
            self.kick()
            try:
                await w
            finally:
                if w in self._waiters:
                    self._waiters.remove(w)

    def fail_waiters(self, reason: str) -> None:
        """Fail the sends waiting for room now (their peer is known to be gone)."""
        for w in self._waiters:
            if not w.done():
                w.set_exception(_SocketClosed(reason))
        self._waiters.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)  # before the FD goes away with the socket
        for w in self._waiters:
            if not w.done():  # fail the waiting sends rather than cancel their callers
                w.set_exception(_SocketClosed("socket closed"))
        self._waiters.clear()
        self.sock.close(linger=0)



# --------------------------------------------------------------------------------------------- client


class PeerClient:
    """Requests to one peer's expert service over a DEALER socket; many may be in flight at once.

    `timeout` is the per-attempt deadline in seconds (covering emulated link time, sending, remote
    compute and the reply); after `retries` further attempts the call raises `PeerUnavailable`, so a
    call takes at most about `timeout * (retries + 1)`. Retries resend the same request id, and a late
    reply to an earlier attempt is accepted: expert calls are idempotent. All methods must run on the
    loop where `connect()` ran.
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        identity: CurveIdentity | None = None,
        server_key: bytes | None = None,
        link: LinkProfile | LinkEmulator | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout: float = 2.0,
        retries: int = 1,
        on_call: Callable[[CallEvent], None] | None = None,
    ):
        if timeout <= 0 or retries < 0:
            raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")
        self.name, self.endpoint = name, endpoint
        self.identity, self.server_key, self.limits = identity, server_key, limits
        self.timeout, self.retries, self.on_call = timeout, retries, on_call
        self.link = LinkEmulator(link) if isinstance(link, LinkProfile) else link
        self.stats = PeerStats()
        self._ctx, self._own_ctx = context, context is None
        self._io: _LoopSocket | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = False

    async def connect(self) -> PeerClient:
        """Create the socket and start receiving replies (connection itself is asynchronous)."""
        if self._io is not None:
            return self
        if self._ctx is None:
            self._ctx = zmq.Context()
        self._io = _LoopSocket(self.new_socket(self._ctx), self._on_reply)
        return self

    def new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        """A DEALER connected to this peer with the client's settings (keys, limits)."""
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            # queue only on completed connections: while the peer is down, sends wait (and time out)
            # instead of piling up stale requests that would all be computed on reconnect
            sock.immediate = True
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 2000
            sock.maxmsgsize = self.limits.max_total_bytes + self.limits.max_header_bytes
            if self.identity is not None:
                self.identity.apply_client(sock, self.name, self.server_key)
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    async def close(self) -> None:
        """Fail requests still in flight with PeerUnavailable and release the socket."""
        if self._closed:
            return
        self._closed = True
        if self._io is not None:
            self._io.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(self.name, after=0.0, attempts=0, reason="client closed"))
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()

    async def __aenter__(self) -> PeerClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        layer: int,
        expert_ids: torch.Tensor,
        hidden: torch.Tensor,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> torch.Tensor:
        """Run the peer's experts: row i of hidden [n, H] through expert expert_ids[i] ([n] int) of MoE
        layer `layer`; return out [n, H] in hidden's dtype. Do not modify the inputs before it returns."""
        _check_call_args(expert_ids, hidden)
        _, tensors = await self.request(
            EXPERT_CALL,
            {"layer": layer},
            {"hidden": hidden, "expert_ids": expert_ids},
            timeout=timeout,
            retries=retries,
        )
        return _expert_output(self.name, tensors, hidden)

    async def ping(self, *, timeout: float = 1.0, retries: int = 0) -> float:
        """Round-trip time in seconds; raises PeerUnavailable."""
        t0 = asyncio.get_running_loop().time()
        await self.request(PING, timeout=timeout, retries=retries)
        return asyncio.get_running_loop().time() - t0

    async def request(
        self,
        msg_type: str,
        fields: Mapping[str, Any] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Send any request type (expert_call, ping, load_expert, ...) and return the success reply's
        (header, tensors). Raises RemoteError for an error reply, PeerUnavailable after the deadline."""
        if msg_type not in REPLY_TYPE:
            raise ValueError(f"{msg_type!r} is not a request type; use one of {sorted(REPLY_TYPE)}")
        if self._io is None or self._closed:
            raise TransportError(
                f"client for {self.name!r} is {'closed' if self._closed else 'not connected'}"
            )
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")
        rid = next(self._ids)
        header_fields = {**fields, "type": msg_type, "id": rid} if fields else {"type": msg_type, "id": rid}
        frames = encode(header_fields, tensors, self.limits)
        nbytes = frames_nbytes(frames)
        loop = asyncio.get_running_loop()
        io, pending, stats = self._io, self._pending, self.stats
        t0, attempts, sent, received, outcome = loop.time(), 0, 0, 0, "cancelled"
        # One waiter future per attempt, in `_pending[rid]`, armed with a plain timer for the attempt's
        # deadline (cheaper than asyncio.timeout + shield). A reply to any attempt resolves whichever
        # waiter is current; one that lands after a deadline fired is kept for the next attempt.
        try:
            while True:
                attempts += 1
                w: asyncio.Future[Any] = loop.create_future()
                pending[rid] = w
                deadline = loop.time() + timeout
                try:
                    if self.link is not None or not io.try_send(frames):
                        async with asyncio.timeout_at(deadline):
                            if self.link is not None:
                                await self.link.transfer("up", nbytes)
                            await io.send(frames)
                    sent += nbytes
                    stats.bytes_sent += nbytes
                    timer = loop.call_at(deadline, _expire, w)
                    try:
                        header, rtensors, received = await w
                    finally:
                        timer.cancel()
                    break
                except (zmq.ZMQError, _SocketClosed) as e:
                    outcome = "unavailable"
                    reason = "client closed" if self._closed else f"send failed: {e}"
                    raise PeerUnavailable(
                        self.name,
                        after=loop.time() - t0,
                        attempts=attempts,
                        endpoint=self.endpoint,
                        reason=reason,
                    ) from None
                except (TimeoutError, _AttemptExpired):
                    # a reply that arrived after the deadline fired, or while a send was waiting
                    late = pending.get(rid)
                    if late is not None and late.done() and not late.cancelled():
                        exc = late.exception()
                        if exc is None:
                            header, rtensors, received = late.result()
                            break
                        if not isinstance(exc, _AttemptExpired):
                            raise exc from None
                    if attempts > retries:
                        outcome = "unavailable"
                        raise PeerUnavailable(
                            self.name,
                            after=loop.time() - t0,
                            attempts=attempts,
                            endpoint=self.endpoint,
                            reason=f"no reply within {timeout}s per attempt",
                        ) from None
                    stats.retries += 1
            _check_reply(self.name, header, msg_type)  # (RemoteError: outcome "error", below)
            outcome = "ok"
            return header, rtensors
        except RemoteError:
            outcome = "error"
            raise
        except PeerUnavailable:
            outcome = "unavailable"
            raise
        finally:
            fut = pending.pop(rid, None)
            if fut is not None:
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # a failure nobody awaits any more must not be logged as unretrieved
            hidden = tensors.get("hidden") if tensors else None
            self.record(
                msg_type,
                fields.get("layer") if fields else None,
                hidden,
                sent,
                received,
                loop.time() - t0,
                attempts,
                outcome,
            )

    def record(
        self,
        msg_type: str,
        layer: int | None,
        hidden: torch.Tensor | None,
        sent: int,
        received: int,
        latency: float,
        attempts: int,
        outcome: str,
    ) -> None:
        """Count one finished request in `stats` and hand it to the `on_call` hook."""
        if self.on_call is None:
            self.stats._add(outcome, latency)
            return
        ev = CallEvent(
            peer=self.name,
            type=msg_type,
            layer=layer,
            tokens=0 if hidden is None else int(hidden.shape[0]),
            bytes_sent=sent,
            bytes_received=received,
            latency_s=latency,
            attempts=attempts,
            outcome=outcome,
        )
        self.stats.record(ev)
        try:
            self.on_call(ev)
        except Exception:
            log.exception("on_call hook failed")

    def fail_inflight(self, reason: str) -> None:
        """Fail the requests in flight now with `PeerUnavailable` (call on the client's loop)."""
        if self._io is not None:
            self._io.fail_waiters(reason)  # sends still waiting for a connection
        for w in list(self._pending.values()):
            if not w.done():
                w.set_exception(
                    PeerUnavailable(self.name, after=0.0, attempts=0, endpoint=self.endpoint, reason=reason)
                )

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        nbytes = frames_nbytes(frames)
        self.stats.bytes_received += nbytes
        result: Any
        try:
            header, tensors = decode(frames, self.limits)
            rid: int | None = header["id"]
            result = (header, tensors, nbytes)
        except WireError as e:
            rid, result = e.request_id, RemoteError(self.name, BAD_REPLY, str(e))
        if rid is None or rid not in self._pending:
            self.stats.unmatched_replies += 1
            return
        if self.link is not None:
            # the reply "arrives" once the emulated downlink has carried it
            loop = asyncio.get_running_loop()
            loop.call_at(self.link.reserve("down", nbytes, loop.time()), self._deliver, rid, result)
        else:
            self._deliver(rid, result)

    def _deliver(self, rid: int, result: Any) -> None:
        w = self._pending.get(rid)
        if w is None:
            self.stats.unmatched_replies += 1
        elif not w.done():
            _resolve(w, result)
        elif not w.cancelled() and isinstance(w.exception(), _AttemptExpired):
            # the attempt's deadline just fired and its retry has not started yet: keep the reply for it
            kept = w.get_loop().create_future()
            _resolve(kept, result)
            self._pending[rid] = kept
        else:
            self.stats.unmatched_replies += 1


def _check_call_args(expert_ids: torch.Tensor, hidden: torch.Tensor) -> None:
    if hidden.dim() != 2 or expert_ids.dim() != 1 or expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"need hidden [n, H] and expert_ids [n], got {list(hidden.shape)} and {list(expert_ids.shape)}"
        )


def _expert_output(peer: str, tensors: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The `out` tensor of an expert_result, checked against the call's hidden states."""
    out = tensors.get("out")
    if out is None or out.shape != hidden.shape or out.dtype != hidden.dtype:
        got = "nothing" if out is None else f"{list(out.shape)} {out.dtype}"
        raise RemoteError(peer, BAD_REPLY, f"expected out {list(hidden.shape)} {hidden.dtype}, got {got}")
    return out


class _AttemptExpired(Exception):
    """Set on a request's waiter when its attempt's deadline passes."""


def _expire(w: asyncio.Future[Any]) -> None:
    if not w.done():
        w.set_exception(_AttemptExpired())


def _resolve(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


class PeerPool:
    """Clients to every peer, by server name, sharing one ZeroMQ context. Use on one event loop."""

    def __init__(
        self,
        peers: Mapping[str, str] | None = None,
        *,
        identity: CurveIdentity | None = None,
        links: Mapping[str, LinkProfile] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout: float = 2.0,
        retries: int = 1,
        on_call: Callable[[CallEvent], None] | None = None,
    ):
        self._initial = dict(peers or {})
        self.identity, self.links, self.limits = identity, dict(links or {}), limits
        self.timeout, self.retries, self.on_call = timeout, retries, on_call
        self._ctx: zmq.Context | None = None
        self._clients: dict[str, PeerClient] = {}

    async def start(self) -> PeerPool:
        if self._ctx is None:
            self._ctx = zmq.Context()
            for name, endpoint in self._initial.items():
                await self.add_peer(name, endpoint)
        return self

    async def add_peer(self, name: str, endpoint: str, link: LinkProfile | None = None) -> PeerClient:
        """Connect to `name` at `endpoint`, replacing any previous client of that name."""
        if self._ctx is None:
            raise RuntimeError("pool not started")
        await self.remove_peer(name)
        client = PeerClient(
            name,
            endpoint,
            context=self._ctx,
            identity=self.identity,
            link=link or self.links.get(name),
            limits=self.limits,
            timeout=self.timeout,
            retries=self.retries,
            on_call=self.on_call,
        )
        self._clients[name] = await client.connect()
        return client

    async def remove_peer(self, name: str) -> None:
        client = self._clients.pop(name, None)
        if client is not None:
            await client.close()

    def __getitem__(self, name: str) -> PeerClient:
        try:
            return self._clients[name]
        except KeyError:
            raise KeyError(f"unknown peer {name!r}; known: {sorted(self._clients)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._clients

    @property
    def names(self) -> list[str]:
        return list(self._clients)

    def stats(self) -> dict[str, PeerStats]:
        return {n: c.stats for n, c in self._clients.items()}

    async def call(
        self, server: str, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        return await self[server].call(layer, expert_ids, hidden, **kw)

    async def call_many(
        self,
        requests: Mapping[str, tuple[int, torch.Tensor, torch.Tensor]],
        *,
        timeout: float | None = None,
        retries: int | None = None,
        return_exceptions: bool = False,
    ) -> dict[str, Any]:
        """Send {server: (layer, expert_ids [n], hidden [n, H])} to all servers at once; return
        {server: out [n, H]}. Waits for every call; then raises the first failure unless
        `return_exceptions`, in which case failed servers map to their exception."""
        clients = {s: self[s] for s in requests}
        results = await asyncio.gather(
            *(
                clients[s].call(l, ids, h, timeout=timeout, retries=retries)
                for s, (l, ids, h) in requests.items()
            ),
            return_exceptions=True,
        )
        out = dict(zip(requests, results, strict=True))
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return out

    async def ping_all(self, timeout: float = 1.0) -> dict[str, float | None]:
        """{server: round-trip seconds, or None if it did not answer within `timeout`}."""
        names = list(self._clients)
        rtts = await asyncio.gather(
            *(self._clients[n].ping(timeout=timeout) for n in names), return_exceptions=True
        )
        return {n: (None if isinstance(r, BaseException) else r) for n, r in zip(names, rtts, strict=True)}

    async def close(self) -> None:
        for name in list(self._clients):
            await self.remove_peer(name)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> PeerPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ------------------------------------------------------------------------------------ sync facade


class LoopThread:
    """An asyncio event loop running in a daemon thread, for transport objects used from sync code.

    `submit(coro)` schedules a coroutine on the loop from any other thread and returns a
    concurrent.futures.Future; `run(coro)` waits for it. Create services and pools through it
    (`lt.run(service.start())`) so their sockets belong to this loop.
    """

    def __init__(self, name: str = "prism-transport"):
        self.loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for t in pending:
                t.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise RuntimeError("LoopThread is closed")
        # like asyncio.run_coroutine_threadsafe, with less machinery: one handle to start a task, one
        # done callback to hand its outcome over, and cancellation forwarded from the caller's side
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(_start_task, self.loop, coro, cf)
        return cf

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop: await the coroutine instead")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop (cancelling what still runs on it) and join the thread."""
        if self._closed:
            return
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], cf: concurrent.futures.Future[T]
) -> None:
    if cf.cancelled():
        coro.close()
        return
    try:
        task = loop.create_task(coro)
    except BaseException as e:  # pragma: no cover - create_task failing (loop closing)
        coro.close()
        if cf.set_running_or_notify_cancel():
            cf.set_exception(e)
        raise
    task.add_done_callback(partial(_task_done, cf))
    cf.add_done_callback(partial(_forward_cancel, loop, task))


def _task_done(cf: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    if task.cancelled():
        cf.cancel()
        return
    if not cf.set_running_or_notify_cancel():
        task.exception()  # cf was cancelled: the outcome is not wanted
        return
    exc = task.exception()
    if exc is None:
        cf.set_result(task.result())
    else:
        cf.set_exception(exc)


def _forward_cancel(
    loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], cf: concurrent.futures.Future[Any]
) -> None:
    if cf.cancelled() and not task.done():
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:
            pass  # the loop is closed


MAX_WAIT_MS = 100  # a direct call's longest blocking receive before it looks at `fail_inflight` again


class _DirectLink:
    """A plain DEALER to one peer, used straight from the calling thread: no hop onto the event loop.

    One call at a time holds it (`lock`, taken without waiting: when it is busy, a call goes the loop
    way instead). A reply that arrives after its call gave up is read and dropped by a later call.
    """

    def __init__(self, client: PeerClient, ctx: zmq.Context):
        self.client = client
        self.sock = client.new_socket(ctx)
        self.lock = threading.Lock()
        self.rcvtimeo = -1  # the socket's current receive timeout (ms), set only when it changes
        self.retired = False  # the peer was removed or replaced: close once the holder lets go
        self.failed = 0  # bumped by `SyncPeerPool.fail_inflight`: calls started before give up at once
        self.failed_reason = ""

    def close(self) -> None:
        self.sock.close(linger=0)


class DirectCall:
    """An expert call sent from the caller's thread; `result()` waits for its reply on that thread.

    The same contract as `PeerClient.call` (per-attempt deadline, retries with the same request id,
    `PeerUnavailable` after the last, `RemoteError` for an error reply), without the two thread hops of
    going through the event loop: on loopback that is about half the Python cost of a small call. It
    holds its peer's link until `result()` or `cancel()`; call one of them.
    """

    def __init__(
        self,
        link: _DirectLink,
        rid: int,
        layer: int,
        hidden: torch.Tensor,
        frames: list[Any],
        timeout: float,
        retries: int,
    ):
        self._link, self._rid, self._layer, self._hidden = link, rid, layer, hidden
        self._frames, self._timeout, self._retries = frames, timeout, retries
        self._nbytes = frames_nbytes(frames)
        self._t0 = time.monotonic()
        self._deadline = self._t0 + timeout
        self._failed = link.failed
        self._attempts, self._sent, self._received = 1, self._nbytes, 0
        link.client.stats.bytes_sent += self._nbytes  # the first attempt went out in `try_direct`
        self._outcome: str | None = None  # set once finished
        self._value: torch.Tensor | None = None
        self._error: BaseException | None = None
        # made while the request travels: the reply prism's service sends, byte for byte
        self._expect = expert_result_header(rid, layer, hidden.dtype, hidden.shape)

    def done(self) -> bool:
        return self._outcome is not None

    def cancel(self) -> bool:
        """Give up waiting (the reply, if it comes, is dropped); False if already finished."""
        if self._outcome is not None:
            return False
        self._finish("cancelled")
        return True

    def result(self, timeout: float | None = None) -> torch.Tensor:
        """out [n, H]; raises PeerUnavailable, RemoteError, or TimeoutError after `timeout` seconds
        (the call then still runs: ask again or cancel)."""
        if self._outcome is None:
            try:
                self._value = self._wait(timeout)
            except (PeerUnavailable, RemoteError) as e:
                self._error = e
                self._finish("unavailable" if isinstance(e, PeerUnavailable) else "error")
            except TimeoutError:
                raise
            except BaseException:
                self._finish("cancelled")
                raise
            else:
                self._finish("ok")
        if self._outcome == "cancelled":
            raise concurrent.futures.CancelledError()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def _wait(self, timeout: float | None) -> torch.Tensor:
        link, client = self._link, self._link.client
        sock, stats = link.sock, client.stats
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._deadline or (give_up is not None and now >= give_up):
                # A reply may have arrived while nobody was reading (the caller collected another call
                # first): it counts, like a reply landing between a deadline and its retry.
                try:
                    frame = recv_frame(sock, NOBLOCK, False, False)
                except zmq.Again:
                    if now < self._deadline:
                        raise TimeoutError(f"no reply from {client.name!r} within {timeout}s") from None
                    if self._attempts > self._retries:
                        raise self._unavailable(
                            now, f"no reply within {self._timeout}s per attempt"
                        ) from None
                    self._attempts += 1
                    stats.retries += 1
                    self._deadline = now + self._timeout
                    self._resend()
                    continue
            else:
                if link.failed != self._failed:
                    raise self._unavailable(now, link.failed_reason)
                until = self._deadline if give_up is None else min(self._deadline, give_up)
                # wake at least every MAX_WAIT_MS to notice `fail_inflight`
                ms = min(max(1, int((until - now) * 1000) + 1), MAX_WAIT_MS)
                if ms != link.rcvtimeo:
                    sock.rcvtimeo = link.rcvtimeo = ms
                try:  # blocks, without the GIL, until a reply or the timeout
                    frame = recv_frame(sock, 0, False, False)
                except zmq.Again:
                    continue
            frames = recv_rest(sock, frame)
            nbytes = frames_nbytes(frames)
            stats.bytes_received += nbytes
            out = expected_result(frames, self._expect, self._hidden)
            if out is not None:
                self._received += nbytes
                return out
            try:  # another reply (an error, a late one, a peer encoding differently): the general way
                header, tensors = decode(frames, client.limits)
            except WireError as e:
                if e.request_id != self._rid:
                    stats.unmatched_replies += 1
                    continue
                raise RemoteError(client.name, BAD_REPLY, str(e)) from None
            if header["id"] != self._rid:
                stats.unmatched_replies += 1  # a late reply to a call that gave up
                continue
            self._received += nbytes
            _check_reply(client.name, header, EXPERT_CALL)
            return _expert_output(client.name, tensors, self._hidden)

    def _unavailable(self, now: float, reason: str) -> PeerUnavailable:
        client = self._link.client
        return PeerUnavailable(
            client.name,
            after=now - self._t0,
            attempts=self._attempts,
            endpoint=client.endpoint,
            reason=reason,
        )

    def _resend(self) -> None:
        """Send the request again, waiting (up to the attempt's deadline) for a connection to the peer."""
        sock = self._link.sock
        ms = max(1, int((self._deadline - time.monotonic()) * 1000))
        if not sock.poll(ms, zmq.POLLOUT):
            return  # still no connection: this attempt times out
        send_nowait(sock, self._frames)
        self._sent += self._nbytes
        self._link.client.stats.bytes_sent += self._nbytes

    def _finish(self, outcome: str) -> None:
        self._outcome = outcome
        link = self._link
        try:
            link.client.record(
                EXPERT_CALL,
                self._layer,
                self._hidden,
                self._sent,
                self._received,
                time.monotonic() - self._t0,
                self._attempts,
                outcome,
            )
        finally:
            self._frames = []
            if link.retired:
                link.close()
            link.lock.release()


class SyncPeerPool:
    """`PeerPool` for threads without an event loop (the model's forward). Thread-safe.

    `start_call` sends an expert call right from the calling thread on a per-peer socket of its own
    (`DirectCall`) and returns a handle whose `result()` waits for the reply there: no hop onto the
    event loop and back. It goes the loop way (a concurrent.futures.Future) when the peer's link is
    emulated (the emulator's timers live on the loop), its direct socket is busy with another call, or
    the peer is not connected yet. `submit*` always go through the `LoopThread` (its own unless one is
    passed, e.g. the one hosting this server's ExpertService); `call*` block. Every call is bounded by
    its timeout and retries.
    """

    def __init__(
        self, peers: Mapping[str, str] | None = None, *, loop_thread: LoopThread | None = None, **pool_kw: Any
    ):
        self._own_loop = loop_thread is None
        self.loop_thread = loop_thread if loop_thread is not None else LoopThread()
        self.pool = PeerPool(peers, **pool_kw)
        self._direct_ctx = zmq.Context()
        self._direct: dict[str, _DirectLink] = {}
        self._direct_lock = threading.Lock()  # guards the dict (links are made lazily, from any thread)
        self._closed = False
        try:
            self.loop_thread.run(self.pool.start())
        except BaseException:
            if self._own_loop:
                self.loop_thread.close()
            self._direct_ctx.term()
            raise

    def start_call(
        self,
        server: str,
        layer: int,
        expert_ids: torch.Tensor,
        hidden: torch.Tensor,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> DirectCall | concurrent.futures.Future[torch.Tensor]:
        """Send one expert call now; `.result(timeout)` of the returned handle gives out [n, H].
        Call `.result()` or `.cancel()` on it. Do not modify the inputs before it finishes."""
        call = self.try_direct(server, layer, expert_ids, hidden, timeout=timeout, retries=retries)
        if call is not None:
            return call
        return self.submit(server, layer, expert_ids, hidden, timeout=timeout, retries=retries)

    def try_direct(
        self,
        server: str,
        layer: int,
        expert_ids: torch.Tensor,
        hidden: torch.Tensor,
        *,
        timeout: float | None = None,
        retries: int | None = None,
    ) -> DirectCall | None:
        """`start_call` on the direct socket, or None (nothing sent) where only the loop way can go now."""
        client = self.pool[server]
        _check_call_args(expert_ids, hidden)
        timeout = client.timeout if timeout is None else timeout
        retries = client.retries if retries is None else retries
        if timeout <= 0 or retries < 0:
            raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")
        link = None if client.link is not None or self._closed else self._link(server, client)
        if link is None or not link.lock.acquire(blocking=False):
            return None
        try:
            rid = next(client._ids)
            frames = encode_expert_call(rid, layer, expert_ids, hidden, client.limits)
            send_nowait(link.sock, frames)
        except zmq.Again:  # not connected (yet): the loop way waits for the connection within the deadline
            link.lock.release()
            return None
        except BaseException:
            link.lock.release()
            raise
        return DirectCall(link, rid, layer, hidden, frames, timeout, retries)

    def _link(self, server: str, client: PeerClient) -> _DirectLink | None:
        link = self._direct.get(server)
        if link is not None and link.client is client:
            return link
        with self._direct_lock:
            if self._closed:
                return None
            old = self._direct.get(server)
            if old is not None and old.client is client:
                return old
            if old is not None:  # the peer was replaced (add_peer)
                self._retire(old)
            link = self._direct[server] = _DirectLink(client, self._direct_ctx)
            return link

    @staticmethod
    def _retire(link: _DirectLink) -> None:
        link.retired = True
        if link.lock.acquire(blocking=False):  # else its call closes it when it finishes
            link.close()
            link.lock.release()

    def submit(
        self, server: str, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, **kw: Any
    ) -> concurrent.futures.Future[torch.Tensor]:
        return self.loop_thread.submit(self.pool.call(server, layer, expert_ids, hidden, **kw))

    def call(
        self, server: str, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        return self.start_call(server, layer, expert_ids, hidden, **kw).result()

    def submit_many(
        self, requests: Mapping[str, tuple[int, torch.Tensor, torch.Tensor]], **kw: Any
    ) -> concurrent.futures.Future[dict[str, Any]]:
        return self.loop_thread.submit(self.pool.call_many(requests, **kw))

    def call_many(
        self, requests: Mapping[str, tuple[int, torch.Tensor, torch.Tensor]], **kw: Any
    ) -> dict[str, Any]:
        return self.submit_many(requests, **kw).result()

    def ping(self, server: str, timeout: float = 1.0) -> float:
        return self.loop_thread.run(self.pool[server].ping(timeout=timeout))

    def add_peer(self, name: str, endpoint: str, link: LinkProfile | None = None) -> None:
        with self._direct_lock:
            old = self._direct.pop(name, None)
            if old is not None:
                self._retire(old)
        self.loop_thread.run(self.pool.add_peer(name, endpoint, link))

    def remove_peer(self, name: str) -> None:
        with self._direct_lock:
            link = self._direct.pop(name, None)
            if link is not None:
                self._retire(link)
        self.loop_thread.run(self.pool.remove_peer(name))

    def stats(self) -> dict[str, PeerStats]:
        return self.pool.stats()

    def fail_inflight(self, name: str, reason: str = "declared down") -> None:
        """Make every call to `name` in flight now raise `PeerUnavailable` at once (within 0.1 s for a
        direct call) instead of waiting out its deadlines: the peer is known to be gone. Later calls are
        sent as usual."""
        link = self._direct.get(name)
        if link is not None:
            link.failed_reason = reason
            link.failed += 1
        if name in self.pool:
            client = self.pool[name]
            self.loop_thread.loop.call_soon_threadsafe(client.fail_inflight, reason)

    def close(self) -> None:
        with self._direct_lock:
            self._closed = True
            links, self._direct = list(self._direct.values()), {}
        all_closed = True
        for link in links:
            # a call still holding a link ends within its deadline and retries
            wait = link.client.timeout * (link.client.retries + 1) + 1.0
            if link.lock.acquire(timeout=wait):
                link.close()
                link.lock.release()
            else:  # pragma: no cover - a caller that never collects its call
                all_closed = False
        if all_closed:
            self._direct_ctx.term()
        try:
            if not self.loop_thread.closed:
                self.loop_thread.run(self.pool.close(), timeout=10)
        finally:
            if self._own_loop:
                self.loop_thread.close()

    def __enter__(self) -> SyncPeerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
