"""Expert service: answers peers' expert calls on a ROUTER socket, from an I/O thread of its own.

The I/O thread owns the socket (ZeroMQ sockets are not thread-safe). For each message it reads, it
- answers right there whatever needs no waiting: malformed input (an `error` reply), pings, empty
  batches and, in *inline* mode (`compute_threads=0`, no `executor`), the sync handler itself;
- hands the rest off: sync handlers to the compute pool (`compute_threads` workers or your `executor`),
  async handlers and control messages (migration) to the asyncio loop the service was started on. A
  finished job posts itself to the thread's outbox and wakes the thread through a socket pair; the
  thread sends the reply.

While no job is out, the thread just blocks in ZeroMQ's receive (GIL released); with jobs out it polls
the socket and the wake-up pair. Why not the asyncio loop: for a small call on a loaded 2-core box the
loop's select-and-dispatch round costs tens of microseconds of Python per message, a large share of a
loopback round trip (benchmarks/transport_overhead.py). `max_inflight` bounds the jobs out; at the bound
the socket is not read, so ZeroMQ's queues push back on senders. `close()` terminates the service's own
ZeroMQ context, which ends a blocked receive.

Wire format: see `wire.py` and docs/wire-protocol.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import zmq

from .keys import CurveIdentity, start_authenticator
from .sockets import NOBLOCK, POLLIN, recv_frame, recv_rest, send_nowait
from .wire import (
    ACK,
    DEFAULT_LIMITS,
    ERROR,
    EXPERT_CALL,
    HANDLER_ERROR,
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

#: handler(layer, expert_ids [n], hidden [n, H]) -> out [n, H]; sync or async
Handler = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | Awaitable[torch.Tensor]"]
ControlReply = tuple[dict[str, Any], dict[str, torch.Tensor]]
#: control handler(header, tensors) -> (reply fields, reply tensors); sync (thread pool) or async
ControlHandler = Callable[[dict[str, Any], dict[str, torch.Tensor]], "ControlReply | Awaitable[ControlReply]"]
#: a job's outcome: the reply's frames and the seconds its handler computed
_Done = tuple[list[Any], float]

MAX_REMOTE_MESSAGE = 2000  # chars of an error message we send


class ServiceError(Exception):
    """Raise from a handler to reply an error with a chosen code (e.g. 'not_held' during migration)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class ServiceStats:
    """Counters of an expert service, updated on its I/O thread (reads from others are fine)."""

    requests: int = 0
    expert_calls: int = 0
    tokens: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    compute_s_sum: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # by error code


def is_async(fn: Callable[..., Any]) -> bool:
    """An `async def` function, or an object with `async def __call__`."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class ExpertService:
    """Serves expert calls of peers on a ROUTER socket.

    For each valid `expert_call` it runs `handler(layer, expert_ids [n], hidden [n, H]) -> out [n, H]`
    and replies `expert_result` with `out`; invalid messages and handler exceptions get an `error`
    reply, so no input can stop the service. Inputs are zero-copy views of the received frames: read
    them, do not keep writing into them; the returned tensor must not be modified after return (it
    is sent zero-copy). Up to `max_inflight` handed-off requests are served concurrently.

    Where sync handlers run: `compute_threads` worker threads (default 1) or your `executor`, so the
    service keeps receiving and replying while experts compute (GPU or otherwise non-trivial
    compute). `compute_threads=0` (and no `executor`) selects *inline* mode: the handler runs on the
    service's I/O thread, saving the two thread hops; requests are then served one at a time, which
    suits compute that takes well under a millisecond (tiny CPU models, tests, benchmarks) or a server
    whose compute is serialised anyway. Async handlers run as tasks on the loop that ran `start()`.
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
        executor: Executor | None = None,
        compute_threads: int = 1,
        max_inflight: int = 64,
    ):
        self.address, self.handler, self.name = address, handler, name
        self.num_layers, self.num_experts, self.hidden_size = num_layers, num_experts, hidden_size
        self.identity, self.limits, self.max_inflight = identity, limits, max_inflight
        if compute_threads < 0:
            raise ValueError(f"compute_threads must be >= 0, got {compute_threads}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self._own_executor = executor is None
        self._executor: Executor | None = executor
        self._compute_threads = compute_threads
        self._async_of: tuple[Any, bool] = (None, False)  # (handler, is it async), cached
        self._control: dict[str, ControlHandler] = {}
        self.stats = ServiceStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth: Any = None
        self._thread: threading.Thread | None = None
        # jobs handed off and not answered yet; touched by the I/O thread only
        self._inflight = 0
        # finished jobs, (route, rid, job), appended by any thread, sent by the I/O thread
        self._outbox: deque[tuple[list[Any], int, Any]] = deque()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._tasks: set[asyncio.Task[_Done]] = set()  # on the loop
        self._seen: dict[bytes, Any] = {}  # expert_call headers that passed validation (decode_request)
        self._closing = False
        self._endpoint = ""

    @property
    def inline(self) -> bool:
        """Sync expert handlers run on the I/O thread itself (`compute_threads=0`, no `executor`)."""
        return self._executor is None and self._compute_threads == 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint (port resolved when the address ended in `:*`)."""
        return self._endpoint

    def on(self, msg_type: str, handler: ControlHandler) -> None:
        """Serve control messages of `msg_type` (e.g. "load_expert"); replies `ack` with the handler's
        fields and tensors."""
        if msg_type not in REPLY_TYPE or msg_type in (EXPERT_CALL, PING):
            raise ValueError(f"{msg_type!r} cannot be served by a control handler")
        self._control[msg_type] = handler

    async def start(self) -> str:
        """Bind and start serving; return the bound endpoint. Async handlers and control messages will
        run on the running loop."""
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
        if self._executor is None and self._compute_threads > 0:
            self._executor = ThreadPoolExecutor(
                self._compute_threads, thread_name_prefix=f"experts-{self.name}"
            )
        self._loop = asyncio.get_running_loop()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # the socket moves to the I/O thread here (thread start is a full memory barrier) and stays there
        self._thread = threading.Thread(
            target=self._serve, name=f"prism-service-{self.name or self._endpoint}", daemon=True
        )
        self._thread.start()
        log.info(
            "expert service %r serving on %s (curve=%s)", self.name, self._endpoint, self.identity is not None
        )
        return self._endpoint

    def reload_keys(self) -> None:
        """Re-read the cluster's public keys (after adding or removing a server)."""
        if self._auth is not None and self.identity is not None:
            self._auth.configure_curve(domain="*", location=str(self.identity.public_dir))

    async def close(self) -> None:
        """Stop serving: cancel in-flight requests (their replies are dropped) and release the socket."""
        if self._closing:
            return
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            # ends the I/O thread's receive or poll; it then closes the socket, which lets term() return.
            # In a thread: the I/O thread may be finishing an inline handler.
            await asyncio.to_thread(self._stop_io_thread)
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _stop_io_thread(self) -> None:
        assert self._ctx is not None
        self._ctx.term()
        if self._thread is not None:
            self._thread.join()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    async def __aenter__(self) -> ExpertService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------- I/O thread

    def _serve(self) -> None:
        sock, wake = self._sock, self._wake_r
        assert sock is not None and wake is not None
        wake_fd = wake.fileno()
        reading = [(sock, POLLIN), (wake_fd, POLLIN)]
        paused = [(wake_fd, POLLIN)]  # at max_inflight: only finished jobs
        try:
            while True:
                outbox = self._outbox
                while outbox:
                    self._finish(*outbox.popleft())
                if self._inflight == 0:
                    # nothing can be posted: block in ZeroMQ until a message comes (or close)
                    first = recv_frame(sock, 0, False, False)
                else:
                    ready = [s for s, _ in zmq.zmq_poll(reading if self._inflight < self.max_inflight else paused, -1)]
                    if wake_fd in ready:
                        try:
                            wake.recv(4096)
                        except BlockingIOError:
                            pass
                    if sock not in ready:
                        continue
                    try:
                        first = recv_frame(sock, NOBLOCK, False, False)
                    except zmq.Again:
                        continue
                self._on_message(recv_rest(sock, first))
        except zmq.ContextTerminated:
            pass  # close()
        except Exception:  # pragma: no cover - a bug here must not hang close()
            log.exception("expert service %r: I/O thread failed", self.name)
        finally:
            sock.close(linger=0)

    def _on_message(self, frames: list[Any]) -> None:
        stats = self.stats
        stats.requests += 1
        if len(frames) < 2:
            return  # only a routing id: nothing to answer
        # ROUTER prepends the sender's routing id; REQ senders also add an empty delimiter frame
        n_env = 2 if len(frames) > 2 and len(frames[1]) == 0 else 1
        route, body = frames[:n_env], frames[n_env:]
        stats.bytes_received += frames_nbytes(body)
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
                elif self._handler_is_async():
                    self._to_loop(route, rid, self._serve_async(rid, layer, ids, hidden))
                    return
                elif self._executor is None:  # inline
                    reply, seconds = self._compute(rid, layer, ids, hidden)
                    stats.compute_s_sum += seconds
                else:
                    job = self._executor.submit(self._compute, rid, layer, ids, hidden)
                    self._inflight += 1
                    job.add_done_callback(partial(self._post, route, rid))
                    return
            elif header["type"] == PING:
                reply = encode({"type": PONG, "id": rid, "server": self.name, "inflight": self._inflight})
            else:
                handler = self._control.get(header["type"])
                if handler is None:
                    raise ServiceError(UNSUPPORTED, f"{header['type']!r} messages are not served by this endpoint")
                self._to_loop(route, rid, self._serve_control(handler, header, tensors))
                return
        except Exception as e:
            reply = self._failure(rid, e)
        self._reply(route, rid, reply)

    def _compute(self, rid: int, layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> _Done:
        """Run the sync handler and encode its reply (on the I/O thread or a worker)."""
        t0 = time.perf_counter()
        out = _checked_output(self.handler(layer, ids, hidden), hidden)
        seconds = time.perf_counter() - t0
        return encode_expert_result(rid, layer, out, self.limits), seconds

    def _handler_is_async(self) -> bool:
        handler = self.handler  # public attribute: look again if it was replaced
        if handler is not self._async_of[0]:
            self._async_of = (handler, is_async(handler))
        return self._async_of[1]

    def _finish(self, route: list[Any], rid: int, job: concurrent.futures.Future[_Done] | asyncio.Task[_Done]) -> None:
        """Reply for a handed-off job that finished."""
        self._inflight -= 1
        if self._closing or job.cancelled():
            return
        try:
            reply, seconds = job.result()
            self.stats.compute_s_sum += seconds
        except Exception as e:
            reply = self._failure(rid, e)
        self._reply(route, rid, reply)

    def _failure(self, rid: int, e: Exception) -> list[bytes | memoryview]:
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

    def _reply(self, route: list[Any], rid: int, reply: list[bytes | memoryview]) -> None:
        assert self._sock is not None
        try:
            # a ROUTER never blocks: ZeroMQ drops a reply to a peer that is gone or not reading
            send_nowait(self._sock, [*route, *reply])
            self.stats.bytes_sent += frames_nbytes(reply)
        except zmq.ContextTerminated:
            raise
        except zmq.ZMQError as e:
            log.warning("expert service %r: reply to request %d failed: %s", self.name, rid, e)

    # ------------------------------------------------------------------- handing off, and back

    def _post(self, route: list[Any], rid: int, job: Any) -> None:
        """A job finished (any thread): queue it for the I/O thread and wake that up."""
        self._outbox.append((route, rid, job))
        wake = self._wake_w
        if wake is not None:
            try:
                wake.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed (nobody to reply to)
                pass

    def _to_loop(self, route: list[Any], rid: int, coro: Coroutine[Any, Any, _Done]) -> None:
        """Run `coro` as a task on the service's loop; its outcome comes back through `_post`."""
        assert self._loop is not None
        self._inflight += 1
        try:
            self._loop.call_soon_threadsafe(self._start_task, route, rid, coro)
        except RuntimeError:  # the loop is closed
            coro.close()
            self._inflight -= 1
            self._reply(route, rid, self._error(rid, UNSUPPORTED, "the service is shutting down"))

    def _start_task(self, route: list[Any], rid: int, coro: Coroutine[Any, Any, _Done]) -> None:
        if self._closing:
            coro.close()
            return
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(partial(self._task_done, route, rid))

    def _task_done(self, route: list[Any], rid: int, task: asyncio.Task[_Done]) -> None:
        self._tasks.discard(task)
        self._post(route, rid, task)

    async def _serve_async(self, rid: int, layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> _Done:
        t0 = time.perf_counter()
        out = _checked_output(await self.handler(layer, ids, hidden), hidden)  # type: ignore[misc]
        return encode_expert_result(rid, layer, out, self.limits), time.perf_counter() - t0

    async def _serve_control(
        self, handler: ControlHandler, header: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> _Done:
        if is_async(handler):
            result = await handler(header, tensors)  # type: ignore[misc]
        else:
            # control handlers (rare, maybe slow: loading weights) run off the loop, in its default
            # executor, whatever the compute mode
            result = await asyncio.get_running_loop().run_in_executor(None, partial(handler, header, tensors))
            if inspect.isawaitable(result):
                result = await result
        fields, out_tensors = result
        return encode({**fields, "type": ACK, "id": header["id"]}, out_tensors, self.limits), 0.0


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
