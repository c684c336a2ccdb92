"""Expert transport, client side: one channel per peer with one deadline/retry policy.

A `PeerPool` holds one `PeerChannel` per peer server. Every request (an expert call, a ping, a migration
message) is sent from the calling thread, and its reply awaited on that same thread (`Call.result()`),
on a DEALER socket that the channel lends to the thread while the thread has requests out: no event
loop, no thread hop. A thread may have many requests out on its socket (replies are matched by request
id); concurrent threads get sockets of their own. Link emulation is applied by the peer's service
(`emulation.py`), so real and emulated links take this same path.

Every attempt has a deadline; a retry resends the same request id (expert calls are idempotent), and
after `retries` further attempts the request raises `PeerUnavailable`: a call never hangs. A request whose
connection drops while it waits (the peer died) raises it at once, without waiting out its deadlines. The serving
side is `service.py` (`ExpertService`, re-exported here). Message format: `wire.py` and
docs/wire-protocol.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from .keys import CurveIdentity
from .service import MAX_REMOTE_MESSAGE, ExpertService, ServiceError, ServiceStats
from .sockets import NOBLOCK, recv_frame, recv_rest, send_nowait
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
    "Call",
    "CallEvent",
    "ExpertService",
    "PeerChannel",
    "PeerPool",
    "PeerStats",
    "PeerUnavailable",
    "RemoteError",
    "ServiceError",
    "ServiceStats",
    "TransportError",
]

log = logging.getLogger(__name__)

MAX_WAIT_MS = 100  # a waiting call's longest blocking receive before it looks at `fail_inflight` again
FIRST_CONNECT_MS = 50  # how long the first request on a new socket waits for its connection when sent
# a socket that was connected and has no connection now (the peer died or restarts): how long a request waits
# for it to come back before giving up (ZeroMQ reconnects every 0.1 s at first, so a restarted peer is back)
LOST_CONNECTION_S = 0.3


class TransportError(Exception):
    """Base of the errors a caller of the transport sees."""


class PeerUnavailable(TransportError):
    """No reply from `peer` within the deadline after all attempts (down, hung, unreachable or refused)."""

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
    """Counters for one peer, updated by the threads that run its calls (reads from others are fine)."""

    calls: int = 0
    ok: int = 0
    errors: int = 0
    unavailable: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    unmatched_replies: int = 0  # late (after the call gave up) or duplicate replies, dropped
    latency_sum_s: float = 0.0
    recent_latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=1024), repr=False)

    def add(self, outcome: str, latency_s: float) -> None:
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


# --------------------------------------------------------------------------------------------- calls


class _Link:
    """One DEALER socket to a peer, lent to one thread while that thread has requests out on it."""

    __slots__ = ("sock", "owner", "pending", "rcvtimeo", "fresh")

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.fresh = True  # nothing sent on it yet: its connection may still be under way
        self.owner = 0  # thread ident of the borrower
        self.pending: dict[int, Call] = {}  # requests out on this socket, by id
        self.rcvtimeo = -1  # the socket's current receive timeout (ms), set only when it changes


class Call:
    """A request in flight to one peer; `result()` waits for its reply on the thread that sent it.

    For an expert call the result is out [n, H]; for other requests the reply's (header, tensors).
    Raises `PeerUnavailable` after the last attempt's deadline, `RemoteError` for an error reply. Call
    `result()` or `cancel()` (on the sending thread) once: until then the call holds its socket.
    """

    __slots__ = ("_ch", "_link", "_rid", "_type", "_layer", "_hidden", "_frames", "_nbytes", "_timeout",
                 "_retries", "_expect", "_t0", "_deadline", "_epoch", "_attempts", "_sent", "_received",
                 "_unsent", "_inbox", "_outcome", "_value", "_error")

    def __init__(self, ch: PeerChannel, link: _Link, rid: int, msg_type: str, layer: int | None,
                 hidden: torch.Tensor | None, frames: list[Any], timeout: float, retries: int,
                 expect: bytes | None):
        self._ch, self._link, self._rid, self._type, self._layer = ch, link, rid, msg_type, layer
        self._hidden, self._frames, self._timeout, self._retries = hidden, frames, timeout, retries
        self._expect = expect  # frame 0 of the reply prism's service sends, for the zero-check path
        self._nbytes = frames_nbytes(frames)
        self._t0 = time.monotonic()
        self._deadline = self._t0 + timeout
        self._epoch = ch.epoch
        self._attempts, self._sent, self._received = 1, 0, 0
        self._unsent = True
        self._inbox: tuple[Any, Any, int] | None = None  # a reply another call on the socket read for us
        self._outcome: str | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        link.pending[rid] = self
        try:
            self._try_send()
        except BaseException:
            del link.pending[rid]
            raise

    def done(self) -> bool:
        return self._outcome is not None

    def cancel(self) -> bool:
        """Give up waiting (a reply that still comes is dropped); False if already finished."""
        if self._outcome is not None:
            return False
        self._check_thread()
        self._finish("cancelled")
        return True

    def result(self, timeout: float | None = None) -> Any:
        """The reply; raises PeerUnavailable, RemoteError, or TimeoutError after `timeout` seconds (the
        call then still runs: ask again or cancel)."""
        if self._outcome is None:
            self._check_thread()
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
        if self._error is not None:
            raise self._error
        if self._outcome == "cancelled":
            raise TransportError(f"the call to {self._ch.name!r} was cancelled")
        return self._value

    def _check_thread(self) -> None:
        if threading.get_ident() != self._link.owner:
            raise RuntimeError("a transport Call is waited for (or cancelled) on the thread that sent it")

    def _try_send(self) -> None:
        link = self._link
        if link.fresh:  # a socket just made connects in a few ms on a LAN: let the first call go out now
            link.sock.poll(min(FIRST_CONNECT_MS, max(1, int((self._deadline - time.monotonic()) * 1000))),
                           zmq.POLLOUT)
        try:  # with IMMEDIATE, ZeroMQ takes it only on a live connection; else wait for one in `_wait`
            send_nowait(link.sock, self._frames)
        except zmq.Again:
            self._unsent = True
            return
        link.fresh = False
        self._unsent = False
        self._sent += self._nbytes
        self._ch.stats.bytes_sent += self._nbytes

    def _wait(self, timeout: float | None) -> Any:
        ch, link = self._ch, self._link
        sock, stats = link.sock, ch.stats
        give_up = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._inbox is not None:
                return self._accept(*self._inbox)
            if ch.epoch != self._epoch:
                raise self._unavailable(ch.failed_reason)
            now = time.monotonic()
            if now >= self._deadline or (give_up is not None and now >= give_up):
                # A reply may have come while nobody was reading (the caller collected another call
                # first): it counts, like a reply landing between a deadline and its retry.
                try:
                    frame = recv_frame(sock, NOBLOCK, False, False)
                except zmq.Again:
                    if now < self._deadline:
                        raise TimeoutError(f"no reply from {ch.name!r} within {timeout}s") from None
                    if self._attempts > self._retries:
                        raise self._unavailable(
                            f"no reply within {self._timeout}s per attempt" if not self._unsent
                            else f"no connection within {self._timeout}s per attempt") from None
                    self._attempts += 1
                    stats.retries += 1
                    self._deadline = now + self._timeout
                    self._try_send()
                    continue
            else:
                until = self._deadline if give_up is None else min(self._deadline, give_up)
                # wake at least every MAX_WAIT_MS to notice `fail_inflight`
                ms = min(max(1, int((until - now) * 1000) + 1), MAX_WAIT_MS)
                if self._unsent:  # not connected yet: wait for room to send, within the deadline
                    if sock.poll(min(ms, int(LOST_CONNECTION_S * 1000)), zmq.POLLOUT):
                        self._try_send()
                    elif not link.fresh and time.monotonic() >= self._deadline - self._timeout + LOST_CONNECTION_S:
                        # this socket was connected before: the peer is gone, not still coming up
                        raise self._unavailable(f"its connection was lost and not back within "
                                                f"{LOST_CONNECTION_S}s") from None
                    continue
                if ms != link.rcvtimeo:
                    sock.rcvtimeo = link.rcvtimeo = ms
                try:  # blocks, without the GIL, until a reply or the timeout
                    frame = recv_frame(sock, 0, False, False)
                except zmq.Again:
                    # with IMMEDIATE a socket can send only over a live connection: none left means the one the
                    # request went out on is gone (the peer died or closed it), and the reply with it
                    if not sock.poll(0, zmq.POLLOUT):
                        raise self._unavailable("connection lost while waiting for the reply") from None
                    continue
            frames = recv_rest(sock, frame)
            nbytes = frames_nbytes(frames)
            stats.bytes_received += nbytes
            if self._expect is not None:
                assert self._hidden is not None
                out = expected_result(frames, self._expect, self._hidden)
                if out is not None:
                    self._received += nbytes
                    return out
            try:  # another reply (an error, a late one, another call's): the general way
                header, tensors = decode(frames, ch.limits)
                rid: int | None = header["id"]
                got: tuple[Any, Any, int] = (header, tensors, nbytes)
            except WireError as e:
                rid, got = e.request_id, (RemoteError(ch.name, BAD_REPLY, str(e)), None, nbytes)
            if rid == self._rid:
                return self._accept(*got)
            other = link.pending.get(rid) if rid is not None else None
            if other is not None and other._inbox is None:
                other._inbox = got  # a reply to another request of this thread: it finds it when it waits
            else:
                stats.unmatched_replies += 1  # a late reply to a call that gave up, or a duplicate

    def _accept(self, header: Any, tensors: Any, nbytes: int) -> Any:
        self._received += nbytes
        if isinstance(header, BaseException):
            raise header
        _check_reply(self._ch.name, header, self._type)
        if self._type == EXPERT_CALL:
            assert self._hidden is not None
            return _expert_output(self._ch.name, tensors, self._hidden)
        return header, tensors

    def _unavailable(self, reason: str) -> PeerUnavailable:
        ch = self._ch
        return PeerUnavailable(ch.name, after=time.monotonic() - self._t0, attempts=self._attempts,
                               endpoint=ch.endpoint, reason=reason)

    def _finish(self, outcome: str) -> None:
        self._outcome = outcome
        link, ch = self._link, self._ch
        link.pending.pop(self._rid, None)
        self._frames = []
        try:
            ch.record(self._type, self._layer, self._hidden, self._sent, self._received,
                      time.monotonic() - self._t0, self._attempts, outcome)
        finally:
            if not link.pending:
                ch.give_back(link)


# -------------------------------------------------------------------------------------------- channel


_socket_ids = itertools.count()


class PeerChannel:
    """Requests to one peer's expert service, from any thread, with one deadline/retry policy.

    `timeout` is the per-attempt deadline in seconds (covering link time, emulated or real, sending,
    remote compute and the reply); after `retries` further attempts a request raises `PeerUnavailable`,
    so it takes at most about `timeout * (retries + 1)`. A request whose connection drops while it waits
    (the peer process died: its host closes the TCP connection) raises `PeerUnavailable` within
    `MAX_WAIT_MS` instead: its reply cannot come, and a retry would only wait for a peer that is gone; so
    does one sent on a socket that was connected and is not (again) within `LOST_CONNECTION_S` (a peer that
    hangs keeps its connection and is found by the deadline). Each thread with requests out borrows a DEALER
    socket of its own; sockets are kept for reuse.
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        *,
        context: zmq.Context,
        me: str = "",
        identity: CurveIdentity | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout: float = 2.0,
        retries: int = 1,
        on_call: Callable[[CallEvent], None] | None = None,
    ):
        _check_policy(timeout, retries)
        self.name, self.endpoint, self.me = name, endpoint, me
        self.identity, self.limits = identity, limits
        self.timeout, self.retries, self.on_call = timeout, retries, on_call
        self.stats = PeerStats()
        self.epoch = 0  # bumped by `fail_inflight`: calls sent before then give up
        self.failed_reason = ""
        self._ctx = context
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._free: list[_Link] = []
        self._lent: dict[int, _Link] = {}  # thread ident -> its socket while it has requests out
        self._closed = False
        self._free.append(_Link(self._new_socket()))  # connecting from now on, ready for the first call

    # --- requests ---------------------------------------------------------------------------------------
    def start_call(
        self, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, *,
        timeout: float | None = None, retries: int | None = None,
    ) -> Call:
        """Send an expert call now: row i of hidden [n, H] through expert expert_ids[i] ([n] int) of MoE
        layer `layer`; `.result()` gives out [n, H] in hidden's dtype. Do not modify the inputs before it
        finishes."""
        _check_call_args(expert_ids, hidden)
        timeout, retries = self._policy(timeout, retries)
        link = self._borrow()
        try:
            rid = next(self._ids)
            frames = encode_expert_call(rid, layer, expert_ids, hidden, self.limits)
            expect = expert_result_header(rid, layer, hidden.dtype, hidden.shape)
            return Call(self, link, rid, EXPERT_CALL, layer, hidden, frames, timeout, retries, expect)
        except BaseException:
            if not link.pending:
                self.give_back(link)
            raise

    def call(self, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.start_call(layer, expert_ids, hidden, **kw).result()

    def start_request(
        self, msg_type: str, fields: Mapping[str, Any] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None, *,
        timeout: float | None = None, retries: int | None = None,
    ) -> Call:
        """Send any request type (ping, load_expert, link, ...); `.result()` gives the success reply's
        (header, tensors)."""
        if msg_type not in REPLY_TYPE:
            raise ValueError(f"{msg_type!r} is not a request type; use one of {sorted(REPLY_TYPE)}")
        timeout, retries = self._policy(timeout, retries)
        link = self._borrow()
        try:
            rid = next(self._ids)
            frames = encode({**(fields or {}), "type": msg_type, "id": rid}, tensors, self.limits)
            layer = fields.get("layer") if fields else None
            hidden = tensors.get("hidden") if tensors else None
            return Call(self, link, rid, msg_type, layer, hidden, frames, timeout, retries, None)
        except BaseException:
            if not link.pending:
                self.give_back(link)
            raise

    def request(self, msg_type: str, fields: Mapping[str, Any] | None = None,
                tensors: Mapping[str, torch.Tensor] | None = None, **kw: Any) -> tuple[dict[str, Any], Any]:
        result: tuple[dict[str, Any], Any] = self.start_request(msg_type, fields, tensors, **kw).result()
        return result

    def ping(self, timeout: float = 1.0) -> tuple[float, dict[str, Any]]:
        """(round-trip seconds, the pong header); raises PeerUnavailable."""
        t0 = time.monotonic()
        header, _ = self.request(PING, timeout=timeout, retries=0)
        return time.monotonic() - t0, header

    def fail_inflight(self, reason: str) -> None:
        """Make every request to this peer out now raise `PeerUnavailable` at once (within 0.1 s) instead of
        waiting out its deadlines: the peer is known to be gone. Later requests are sent as usual."""
        self.failed_reason = reason
        self.epoch += 1

    # --- sockets ----------------------------------------------------------------------------------------
    def _policy(self, timeout: float | None, retries: int | None) -> tuple[float, int]:
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        _check_policy(timeout, retries)
        return timeout, retries

    def _borrow(self) -> _Link:
        """The calling thread's socket to this peer (lent until its last request out finishes)."""
        me = threading.get_ident()
        link = self._lent.get(me)
        if link is not None:
            return link
        with self._lock:
            if self._closed:
                raise PeerUnavailable(self.name, after=0.0, attempts=0, endpoint=self.endpoint,
                                      reason="client closed")
            link = self._free.pop() if self._free else _Link(self._new_socket())
            link.owner = me
            self._lent[me] = link
        return link

    def give_back(self, link: _Link) -> None:
        with self._lock:
            if self._lent.get(link.owner) is link:
                del self._lent[link.owner]
            link.owner = 0
            if self._closed:
                link.sock.close(linger=0)
                self._lock.notify_all()
            else:
                self._free.append(link)

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
            # queue only on completed connections: while the peer is down, sends wait (and time out)
            # instead of piling up stale requests that would all be computed on reconnect
            sock.immediate = True
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 2000
            sock.maxmsgsize = self.limits.max_total_bytes + self.limits.max_header_bytes
            if self.me:  # the peer's link emulation knows callers by name (service._caller)
                sock.routing_id = f"{self.me}/{os.getpid()}.{next(_socket_ids)}".encode()
            if self.identity is not None:
                self.identity.apply_client(sock, self.name)
            sock.connect(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def close(self, wait: float = 0.0) -> bool:
        """Fail requests out with PeerUnavailable and close the sockets; True when all are closed (sockets
        lent to threads close when those threads' requests finish, waited for up to `wait` seconds)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self.fail_inflight("client closed")
                for link in self._free:
                    link.sock.close(linger=0)
                self._free.clear()
            return self._lock.wait_for(lambda: not self._lent, wait)

    def record(self, msg_type: str, layer: int | None, hidden: torch.Tensor | None, sent: int, received: int,
               latency: float, attempts: int, outcome: str) -> None:
        """Count one finished request in `stats` and hand it to the `on_call` hook."""
        self.stats.add(outcome, latency)
        if self.on_call is None:
            return
        ev = CallEvent(peer=self.name, type=msg_type, layer=layer,
                       tokens=0 if hidden is None else int(hidden.shape[0]), bytes_sent=sent,
                       bytes_received=received, latency_s=latency, attempts=attempts, outcome=outcome)
        try:
            self.on_call(ev)
        except Exception:
            log.exception("on_call hook failed")


def _check_policy(timeout: float, retries: int) -> None:
    if not timeout > 0 or retries < 0:
        raise ValueError(f"need timeout > 0 and retries >= 0, got {timeout}, {retries}")


def _check_call_args(expert_ids: torch.Tensor, hidden: torch.Tensor) -> None:
    if hidden.dim() != 2 or expert_ids.dim() != 1 or expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"need hidden [n, H] and expert_ids [n], got {list(hidden.shape)} and {list(expert_ids.shape)}"
        )


def _check_reply(peer: str, header: Mapping[str, Any], request_type: str) -> None:
    """Raise RemoteError for an error reply, or for a reply of the wrong type for `request_type`."""
    if header["type"] == ERROR:
        raise RemoteError(peer, str(header.get("code")), str(header.get("message"))[:MAX_REMOTE_MESSAGE])
    if header["type"] != REPLY_TYPE[request_type]:
        raise RemoteError(peer, BAD_REPLY, f"{header['type']!r} in reply to {request_type!r}")


def _expert_output(peer: str, tensors: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The `out` tensor of an expert_result, checked against the call's hidden states."""
    out = tensors.get("out")
    if out is None or out.shape != hidden.shape or out.dtype != hidden.dtype:
        got = "nothing" if out is None else f"{list(out.shape)} {out.dtype}"
        raise RemoteError(peer, BAD_REPLY, f"expected out {list(hidden.shape)} {hidden.dtype}, got {got}")
    return out


# ----------------------------------------------------------------------------------------------- pool


class PeerPool:
    """A channel to every peer, by server name, sharing one ZeroMQ context. Thread-safe.

    `name`: this server's name, which the peers' link emulation knows it by (optional elsewhere).
    """

    def __init__(
        self,
        peers: Mapping[str, str] | None = None,
        *,
        name: str = "",
        identity: CurveIdentity | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        timeout: float = 2.0,
        retries: int = 1,
        on_call: Callable[[CallEvent], None] | None = None,
    ):
        _check_policy(timeout, retries)
        self.name, self.identity, self.limits = name, identity, limits
        self.timeout, self.retries, self.on_call = timeout, retries, on_call
        self._ctx = zmq.Context()
        self._channels: dict[str, PeerChannel] = {}
        self._lock = threading.Lock()
        self._retired: list[PeerChannel] = []
        self._closed = False
        for n, endpoint in (peers or {}).items():
            self.add_peer(n, endpoint)

    def add_peer(self, name: str, endpoint: str) -> PeerChannel:
        """Connect to `name` at `endpoint`, replacing any previous channel of that name (its requests out
        fail at once with PeerUnavailable)."""
        with self._lock:
            if self._closed:
                raise TransportError("the peer pool is closed")
            ch = PeerChannel(name, endpoint, context=self._ctx, me=self.name, identity=self.identity,
                             limits=self.limits, timeout=self.timeout, retries=self.retries, on_call=self.on_call)
            old, self._channels[name] = self._channels.get(name), ch
        if old is not None:
            self._retire(old)
        return ch

    def remove_peer(self, name: str) -> None:
        with self._lock:
            old = self._channels.pop(name, None)
        if old is not None:
            self._retire(old)

    def _retire(self, ch: PeerChannel) -> None:
        if not ch.close():
            with self._lock:
                self._retired.append(ch)

    def __getitem__(self, name: str) -> PeerChannel:
        try:
            return self._channels[name]
        except KeyError:
            raise KeyError(f"unknown peer {name!r}; known: {sorted(self._channels)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._channels

    @property
    def names(self) -> list[str]:
        return list(self._channels)

    def stats(self) -> dict[str, PeerStats]:
        return {n: c.stats for n, c in self._channels.items()}

    def start_call(self, server: str, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor,
                   **kw: Any) -> Call:
        return self[server].start_call(layer, expert_ids, hidden, **kw)

    def call(self, server: str, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor,
             **kw: Any) -> torch.Tensor:
        return self[server].call(layer, expert_ids, hidden, **kw)

    def ping(self, server: str, timeout: float = 1.0) -> float:
        """Round-trip seconds to `server`; raises PeerUnavailable."""
        return self[server].ping(timeout)[0]

    def fail_inflight(self, name: str, reason: str = "declared down") -> None:
        """Requests to `name` out now raise PeerUnavailable at once (see `PeerChannel.fail_inflight`)."""
        ch = self._channels.get(name)
        if ch is not None:
            ch.fail_inflight(reason)

    def close(self, wait: float | None = None) -> None:
        """Fail requests out, close every socket (waiting up to `wait` seconds, by default the longest a
        request may take, for threads to collect theirs) and the context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            channels = [*self._channels.values(), *self._retired]
            self._channels, self._retired = {}, []
        if wait is None:
            wait = self.timeout * (self.retries + 1) + 1.0
        deadline = time.monotonic() + wait
        closed = [ch.close(max(0.0, deadline - time.monotonic())) for ch in channels]
        if all(closed):
            self._ctx.term()
        else:  # pragma: no cover - a thread that never collects its call
            log.warning("peer pool closed with requests never collected; their sockets stay open")

    def __enter__(self) -> PeerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
