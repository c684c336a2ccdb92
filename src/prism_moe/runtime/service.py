"""Expert service: answers peers' expert calls on a ROUTER socket. An I/O thread does only I/O; a compute
worker runs the experts.

Threads of one service:
- the **I/O thread** reads every message (ZeroMQ sockets are not thread-safe: every use of the socket
  holds `_sock_lock`), decodes and validates it, answers right there what needs no compute (malformed
  input with an `error` reply, pings, empty batches, link-emulation settings), hands expert calls to the
  compute worker and control messages to the control thread, and sends the replies they post back. It also applies link
  emulation (`emulation.py`): requests and replies of an emulated caller wait in a timer heap until the
  emulated link would have carried them; a partitioned caller's messages are dropped.
- the **compute worker** runs the handler, on its own CUDA stream when the service's device is a GPU.
  It takes every call queued when it wakes up and merges the calls of one layer (and dtype) into one
  handler call, so concurrent peers' batches for a layer share one grouped expert computation; it splits
  the result back per call. If a merged call fails, its calls are computed one by one, so each gets
  its own error.
- the **control thread** runs `load_expert` / `drop_expert` handlers (weights arriving never wait
  behind expert calls, and expert calls never wait behind them). A handler registered with a `worker`
  name runs on that worker thread instead (`block_call`s run on `blocks`: a layer block never waits
  behind a migration, nor a migration behind a block).

A computed expert call is answered by the worker itself, under the socket lock; an error, a control
reply or a reply over an emulated link is posted to the I/O thread's outbox and wakes that thread through
a socket pair. The I/O thread waits (GIL released) in poll() on ZeroMQ's file descriptor and the wake-up
pair, until input, a wake-up or the next emulated arrival. `max_inflight` bounds the jobs out; at the
bound the socket is not read, so ZeroMQ's queues push back on senders. `close()` wakes the I/O thread,
which closes the socket, then terminates the service's own ZeroMQ context.

Wire format: see `wire.py` and docs/wire-protocol.md.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import math
import queue
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from .emulation import Direction, LinkProfile, LinkTable
from .keys import CurveIdentity, start_authenticator
from .sockets import EVENTS, NOBLOCK, POLLIN, recv_frame, recv_rest, send_nowait, sockopt
from .wire import (
    ACK,
    BAD_REQUEST,
    DEFAULT_LIMITS,
    ERROR,
    EXPERT_CALL,
    HANDLER_ERROR,
    LINK,
    PING,
    PONG,
    REPLY_TYPE,
    UNSUPPORTED,
    WireError,
    WireLimits,
    decode_request,
    encode,
    encode_expert_result,
    frames_nbytes,
)

log = logging.getLogger(__name__)

#: handler(layer, expert_ids [n], hidden [n, H]) -> out [n, H]; runs on the compute worker
Handler = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
ControlReply = tuple[dict[str, Any], dict[str, torch.Tensor]]
#: control handler(header, tensors) -> (reply fields, reply tensors); runs on the control thread
ControlHandler = Callable[[dict[str, Any], dict[str, torch.Tensor]], ControlReply]

MAX_REMOTE_MESSAGE = 2000  # chars of an error message we send


class ServiceError(Exception):
    """Raise from a handler to reply an error with a chosen code (e.g. 'not_held' during migration)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class ServiceStats:
    """Counters of an expert service, updated on its I/O thread and (compute) its worker; reads from
    other threads are fine."""

    requests: int = 0
    expert_calls: int = 0
    tokens: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    compute_s_sum: float = 0.0
    handler_calls: int = 0  # handler invocations: fewer than the expert calls computed when calls merge
    merged_calls: int = 0  # expert calls computed together with others of their layer
    dropped: int = 0  # messages dropped by an emulated partition
    errors: Counter[str] = field(default_factory=Counter)  # by error code


@dataclass
class _Job:
    """An expert call handed to the compute worker."""

    route: list[Any]
    rid: int
    layer: int
    ids: torch.Tensor
    hidden: torch.Tensor


class ExpertService:
    """Serves expert calls of peers on a ROUTER socket.

    For each valid `expert_call` the compute worker runs `handler(layer, expert_ids [n], hidden [n, H])
    -> out [n, H]`, possibly on the rows of several concurrent calls of that layer at once (rows of one
    call stay contiguous and in order), and the service replies `expert_result` with the call's rows of
    `out`. Invalid messages and handler exceptions get an `error` reply, so no input can stop the
    service. Inputs are read-only views of received frames (or their concatenation); the returned tensor
    must not be modified after return (it is sent zero-copy).

    `device`: where the handler computes; on CUDA the worker runs it on a stream of its own. `links`:
    emulated links by caller name (experiments); `emulate`: also serve `link` messages, which change
    them while serving (a test or benchmark partitions or slows links this way). Without `emulate`, a
    `link` message gets `unsupported`.
    """

    def __init__(
        self,
        address: str,
        handler: Handler,
        *,
        num_layers: int,
        num_experts: int,
        hidden_size: int,
        name: str = "",
        identity: CurveIdentity | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
        device: str | torch.device | None = None,
        max_inflight: int = 64,
        links: Mapping[str, LinkProfile] | None = None,
        emulate: bool = False,
    ):
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__):
            raise TypeError("the expert handler must be a plain function: it runs on the compute worker")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.address, self.handler, self.name = address, handler, name
        self.num_layers, self.num_experts, self.hidden_size = num_layers, num_experts, hidden_size
        self.identity, self.limits, self.max_inflight = identity, limits, max_inflight
        self.device = None if device is None else torch.device(device)
        self.links = LinkTable(links)
        self.emulate = emulate or bool(links)
        self._control: dict[str, tuple[ControlHandler, str]] = {}  # type -> (handler, worker name)
        self.stats = ServiceStats()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth: Any = None
        self._io_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}  # worker name -> its threads (made at start)
        self._threads: dict[str, int] = {"control": 1}  # worker name -> how many threads it has
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._ready: list[_Job] = []  # expert calls read in this round of the I/O thread, not yet handed over
        self._busy_since = 0.0  # monotonic time the worker started its current batch (0: idle)
        # jobs handed off (I/O thread) less those answered through the outbox (I/O thread) and those the
        # worker answered itself (`_sent_by_worker`, worker): `_out()` is what is in flight
        self._inflight = 0
        self._sent_by_worker = 0
        # finished jobs, (route, rid, reply frames or the exception), appended by any thread
        self._outbox: deque[tuple[list[Any], int, Any]] = deque()
        self._sock_lock = threading.Lock()  # the I/O thread receives and replies, the worker replies
        self._sock_closed = False
        self._io_ident = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        # messages held by link emulation: (due, seq, inbound, frames); I/O thread only
        self._held: list[tuple[float, int, bool, list[Any]]] = []
        self._seq = itertools.count()
        self._seen: dict[bytes, Any] = {}  # expert_call headers that passed validation (decode_request)
        self._closing = False
        self._endpoint = ""

    @property
    def endpoint(self) -> str:
        """The bound endpoint (port resolved when the address ended in `:*`)."""
        return self._endpoint

    def on(self, msg_type: str, handler: ControlHandler, worker: str = "control", threads: int = 1) -> None:
        """Serve messages of `msg_type` (e.g. "load_expert") on the worker named `worker`: one thread by default
        (messages in arrival order), or `threads` (a handler that combines concurrent messages itself, as the
        block executor does); replies `ack` with the handler's fields and tensors."""
        if msg_type not in REPLY_TYPE or msg_type in (EXPERT_CALL, PING, LINK):
            raise ValueError(f"{msg_type!r} cannot be served by a control handler")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._threads[worker] = max(threads, self._threads.get(worker, 1))
        if self._pools and worker not in self._pools:  # started: the worker's threads first, then the route to them
            self._pools[worker] = ThreadPoolExecutor(self._threads[worker],
                                                     thread_name_prefix=f"prism-{worker}-{self.name or 'service'}")
        self._control[msg_type] = (handler, worker)

    def set_link(self, caller: str, profile: LinkProfile | None) -> None:
        """Emulate `profile` on the link from `caller` (None: a plain link; `drop`: a partition)."""
        self.links.set(caller, profile)

    def start(self) -> str:
        """Bind and start serving; return the bound endpoint."""
        if self._sock is not None or self._closing:
            raise RuntimeError("service already started")
        # own context: the ZAP authenticator is per context, and `close` terminates it
        ctx = zmq.Context()
        sock = None
        try:
            if self.identity is not None:
                self._auth = start_authenticator(ctx, self.identity.public_dir)  # before bind
            sock = ctx.socket(zmq.ROUTER)
            sock.linger = 0
            # per frame: a larger frame disconnects the peer before we allocate for it
            sock.maxmsgsize = self.limits.max_total_bytes + self.limits.max_header_bytes
            if self.identity is not None:
                self.identity.apply_server(sock)
            sock.bind(self.address)
            self._endpoint = sock.get(zmq.LAST_ENDPOINT).decode()
        except BaseException:
            if sock is not None:
                sock.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            ctx.term()
            raise
        self._ctx, self._sock = ctx, sock
        label = self.name or self._endpoint
        for worker in {"control", *(w for _, w in self._control.values())}:
            self._pools[worker] = ThreadPoolExecutor(self._threads.get(worker, 1),
                                                     thread_name_prefix=f"prism-{worker}-{label}")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._worker = threading.Thread(target=self._work, name=f"prism-experts-{label}", daemon=True)
        self._worker.start()
        # the socket moves to the I/O thread here (thread start is a full memory barrier) and stays there
        self._io_thread = threading.Thread(target=self._serve, name=f"prism-service-{label}", daemon=True)
        self._io_thread.start()
        self._io_ident = self._io_thread.ident or 0
        log.info("expert service %r serving on %s (curve=%s)", self.name, self._endpoint, self.identity is not None)
        return self._endpoint

    def reload_keys(self) -> None:
        """Re-read the cluster's public keys (after adding or removing a server)."""
        if self._auth is not None and self.identity is not None:
            self._auth.configure_curve(domain="*", location=str(self.identity.public_dir))

    def close(self) -> None:
        """Stop serving: requests in progress get no reply; the socket is released."""
        if self._closing:
            return
        self._closing = True
        self._jobs.put(None)
        if self._auth is not None:
            self._auth.stop()
        if self._io_thread is not None:
            self._wake()  # the I/O thread sees `_closing`, closes the socket and ends
            self._io_thread.join()
        if self._ctx is not None:
            self._ctx.term()
        if self._worker is not None:
            self._worker.join(timeout=5.0)  # a handler still computing finishes on its own (daemon)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def __enter__(self) -> ExpertService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- I/O thread

    def _serve(self) -> None:
        sock, wake, lock = self._sock, self._wake_r, self._sock_lock
        assert sock is not None and wake is not None
        # Blocks in poll() on ZeroMQ's FD (edge-triggered: it signals changes, so ZMQ_EVENTS is read before
        # each wait) and the wake-up pair, not inside ZeroMQ: the worker sends its replies itself, under
        # `lock`, and wakes this thread only when that send found input pending (it may have eaten the edge).
        poller = select.poll()
        poller.register(sock.get(zmq.FD), select.POLLIN)
        poller.register(wake.fileno(), select.POLLIN)
        held, outbox, ready, jobs = self._held, self._outbox, self._ready, self._jobs
        try:
            while not self._closing:
                while outbox:
                    self._finish(*outbox.popleft())
                while self._out() < self.max_inflight and not self._closing:
                    with lock:
                        if not sockopt(sock, EVENTS) & POLLIN:
                            break
                        frames = recv_rest(sock, recv_frame(sock, NOBLOCK, False, False))
                    self._on_message(frames)
                timeout = None
                if held:  # link emulation: serve or send what falls due, then wait until the next one
                    now = time.monotonic()
                    while held and held[0][0] <= now:
                        self._release(heapq.heappop(held))
                    if held:
                        timeout = max(1, math.ceil((held[0][0] - now) * 1000))
                if ready:
                    # handed over last, right before this thread lets go of the GIL in poll(): the worker
                    # woken by the first put does not then wait for the GIL as well
                    for job in ready:
                        jobs.put(job)
                    ready.clear()
                if outbox or self._closing:
                    continue
                for fd, _ in poller.poll(timeout):  # (GIL released)
                    if fd == wake.fileno():
                        try:
                            wake.recv(4096)
                        except BlockingIOError:
                            pass
        except zmq.ContextTerminated:  # pragma: no cover - close() ends this thread before terminating
            pass
        except Exception:  # pragma: no cover - a bug here must not hang close()
            log.exception("expert service %r: I/O thread failed", self.name)
        finally:
            with lock:
                self._sock_closed = True
                sock.close(linger=0)

    def _out(self) -> int:
        return self._inflight - self._sent_by_worker

    def _release(self, item: tuple[float, int, bool, list[Any]]) -> None:
        """A message held by link emulation falls due: serve it (inbound) or send it (a reply)."""
        _, _, inbound, frames = item
        if inbound:
            self._on_message(frames, arrived=True)
        else:
            self._send(frames)

    def _on_message(self, frames: list[Any], arrived: bool = False) -> None:
        if len(frames) < 2:
            return  # only a routing id: nothing to answer
        # ROUTER prepends the sender's routing id; REQ senders also add an empty delimiter frame
        n_env = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1
        route, body = frames[:n_env], frames[n_env:]
        nbytes = frames_nbytes(body)
        if self.links and not arrived and self._emulated(route, "up", nbytes, frames):
            return
        stats = self.stats
        stats.requests += 1
        stats.bytes_received += nbytes
        rid = 0  # id 0 = unattributable; clients number requests from 1
        try:
            header, tensors, call = decode_request(
                body, self.limits, self.num_layers, self.num_experts, self.hidden_size, self._seen
            )
            rid = header["id"]
            if call is not None:
                layer, ids, hidden = call
                stats.expert_calls += 1
                n = hidden.shape[0]
                stats.tokens += n
                if n == 0:
                    reply = encode_expert_result(rid, layer, hidden, self.limits)
                else:
                    self._inflight += 1
                    self._ready.append(_Job(route, rid, layer, ids, hidden))  # for the worker (`_serve`)
                    return
            elif header["type"] == PING:
                busy = self._busy_since
                reply = encode({"type": PONG, "id": rid, "server": self.name, "inflight": self._out(),
                                "busy_s": time.monotonic() - busy if busy else 0.0})
            elif header["type"] == LINK:
                reply = self._on_link(header)
            else:
                served = self._control.get(header["type"])
                if served is None:
                    raise ServiceError(UNSUPPORTED, f"{header['type']!r} messages are not served by this endpoint")
                handler, worker = served
                self._inflight += 1
                job = self._pools[worker].submit(_control_reply, handler, header, tensors, self.limits)
                job.add_done_callback(lambda f, route=route, rid=rid: self._post(route, rid, _outcome(f)))
                return
        except Exception as e:
            reply = self._failure(rid, e)
        self._reply(route, reply)

    def _on_link(self, header: dict[str, Any]) -> list[Any]:
        """A `link` message: emulate a delay, a bandwidth cap or a partition on the link from `peer`."""
        if not self.emulate:
            raise ServiceError(UNSUPPORTED, "link emulation is off on this server (experiments only: "
                                            "`network.emulate: true` in the cluster file)")
        peer = header.get("peer")
        if not isinstance(peer, str) or not 0 < len(peer) <= 200:
            raise ServiceError(BAD_REQUEST, f"link: 'peer' must be a server name, got {peer!r}")
        if header.get("clear"):
            self.links.set(peer, None)
        else:
            try:
                profile = LinkProfile(delay_ms=float(header.get("delay_ms", 0.0)),
                                      bandwidth_mbps=_opt_float(header.get("bandwidth_mbps")),
                                      drop=bool(header.get("drop", False)))
            except (TypeError, ValueError) as e:
                raise ServiceError(BAD_REQUEST, f"link: {e}") from None
            self.links.set(peer, profile)
        return encode({"type": ACK, "id": header["id"], "server": self.name,
                       "links": sorted(self.links.profiles())})

    def _finish(self, route: list[Any], rid: int, outcome: Any) -> None:
        """Reply for a handed-off job that finished: its reply frames or the exception it raised."""
        self._inflight -= 1
        if self._closing:
            return
        self._reply(route, self._failure(rid, outcome) if isinstance(outcome, BaseException) else outcome)

    def _failure(self, rid: int, e: BaseException) -> list[bytes | memoryview]:
        """The error reply for an exception raised while serving request `rid`."""
        if isinstance(e, WireError):
            return self._error(e.request_id if e.request_id is not None else rid, e.code, str(e))
        if isinstance(e, ServiceError):
            return self._error(rid, e.code, e.message)
        # a handler bug must not take the service down
        log.error("expert service %r: handler failed", self.name, exc_info=e)
        return self._error(rid, HANDLER_ERROR, f"{type(e).__name__}: {e}")

    def _error(self, rid: int, code: str, message: str) -> list[bytes | memoryview]:
        self.stats.errors[code] += 1
        return encode({"type": ERROR, "id": rid, "code": code, "message": message[:MAX_REMOTE_MESSAGE]})

    def _reply(self, route: list[Any], reply: list[Any]) -> None:
        nbytes = frames_nbytes(reply)
        self.stats.bytes_sent += nbytes
        if self.links and self._emulated(route, "down", nbytes, [*route, *reply]):
            return
        self._send([*route, *reply])

    def _emulated(self, route: list[Any], direction: Direction, nbytes: int, frames: list[Any]) -> bool:
        """Link emulation of the caller's link, if it has one: True when the message was dropped (a partition)
        or is held in the timer heap until the emulated link would have carried it."""
        link = self.links.get(_caller(route[0]))
        if link is None:
            return False
        if link.profile.drop:
            self.stats.dropped += 1
            return True
        now = time.monotonic()
        due = link.reserve(direction, nbytes, now)
        if due <= now:
            return False
        heapq.heappush(self._held, (due, next(self._seq), direction == "up", frames))
        return True

    def _send(self, frames: list[Any]) -> None:
        """Send a reply now (from the I/O thread or the worker)."""
        sock = self._sock
        assert sock is not None
        with self._sock_lock:
            if self._sock_closed:
                return
            try:
                # a ROUTER never blocks: ZeroMQ drops a reply to a peer that is gone or not reading
                send_nowait(sock, frames)
            except zmq.ZMQError as e:
                log.warning("expert service %r: a reply failed: %s", self.name, e)
            if threading.get_ident() != self._io_ident and sockopt(sock, EVENTS) & POLLIN:
                self._wake()  # input waits, and this send may have eaten the FD's signal for it

    def _post(self, route: list[Any], rid: int, outcome: Any) -> None:
        """A job finished (any thread): queue it for the I/O thread and wake that up."""
        self._outbox.append((route, rid, outcome))
        self._wake()

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (nobody to reply to)
                pass

    # ------------------------------------------------------------------------------ compute worker

    def _work(self) -> None:
        stream = None
        if self.device is not None and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)  # expert compute never queues behind the model's own work
        jobs = self._jobs
        stop = False
        while not stop:
            job = jobs.get()
            if job is None:
                return
            batch = [job]
            while not jobs.empty():  # every call queued meanwhile: same-layer calls merge
                more = jobs.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._busy_since = time.monotonic()
            try:
                groups = [batch] if len(batch) == 1 else _by_layer(batch)
                if stream is None:
                    for group in groups:
                        self._compute(group)
                else:
                    with torch.cuda.stream(stream):
                        for group in groups:
                            self._compute(group)
            finally:
                self._busy_since = 0.0
            if self._outbox:
                self._wake()

    def _compute(self, group: list[_Job]) -> None:
        """Run the handler once for calls of one layer and dtype; post each call's reply to the outbox."""
        t0 = time.perf_counter()
        stats = self.stats
        if len(group) > 1:
            try:
                hidden = torch.cat([j.hidden for j in group])
                out = _checked_output(self.handler(group[0].layer, torch.cat([j.ids for j in group]), hidden), hidden)
            except Exception:  # compute them one by one: each call gets its own outcome
                pass
            else:
                stats.handler_calls += 1
                stats.merged_calls += len(group)
                stats.compute_s_sum += time.perf_counter() - t0
                parts = torch.split(out, [j.hidden.shape[0] for j in group])
                for j, part in zip(group, parts, strict=True):
                    self._done(j, encode_expert_result(j.rid, j.layer, part, self.limits))
                return
        for j in group:
            outcome: Any
            try:
                out = _checked_output(self.handler(j.layer, j.ids, j.hidden), j.hidden)
                outcome = encode_expert_result(j.rid, j.layer, out, self.limits)
            except Exception as e:
                outcome = e
            stats.handler_calls += 1
            self._done(j, outcome)
        stats.compute_s_sum += time.perf_counter() - t0

    def _done(self, job: _Job, outcome: Any) -> None:
        """A computed call: reply from here (one thread wake-up less per call), or through the I/O thread
        where it needs that thread (an error reply, a job counted in flight there, emulated links)."""
        if isinstance(outcome, BaseException) or self.links:
            self._outbox.append((job.route, job.rid, outcome))
            return
        self._sent_by_worker += 1
        self.stats.bytes_sent += frames_nbytes(outcome)
        self._send([*job.route, *outcome])


def _by_layer(batch: list[_Job]) -> list[list[_Job]]:
    """Calls grouped by (layer, dtype), in order of first arrival."""
    groups: dict[tuple[int, torch.dtype], list[_Job]] = {}
    for j in batch:
        groups.setdefault((j.layer, j.hidden.dtype), []).append(j)
    return list(groups.values())


def _caller(routing_id: Any) -> str:
    """The caller's name from a DEALER's routing id `name/unique` (`transport.PeerPool` sets it)."""
    return bytes(routing_id).rpartition(b"/")[0].decode("utf-8", "replace")


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _control_reply(
    handler: ControlHandler, header: dict[str, Any], tensors: dict[str, torch.Tensor], limits: WireLimits
) -> list[Any]:
    fields, out_tensors = handler(header, tensors)
    return encode({**fields, "type": ACK, "id": header["id"]}, out_tensors, limits)


def _outcome(fut: Future[Any]) -> Any:
    """A finished control job's reply frames, or the exception it raised."""
    if fut.cancelled():
        return ServiceError(UNSUPPORTED, "the service is shutting down")
    exc = fut.exception()
    return exc if exc is not None else fut.result()


def _checked_output(out: Any, hidden: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ServiceError(HANDLER_ERROR, f"handler returned {type(out).__name__}, expected a tensor")
    if out.shape != hidden.shape:
        raise ServiceError(
            HANDLER_ERROR, f"handler returned shape {list(out.shape)} for hidden {list(hidden.shape)}"
        )
    if out.dtype is hidden.dtype and out.is_cpu and not out.requires_grad:
        return out  # the common case, without the cost of a no-op .detach().to()
    return out.detach().to(device="cpu", dtype=hidden.dtype)
