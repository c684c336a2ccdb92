"""The batching loop in the model's process, its frontend in the API process: `RunnerHost` and `RemoteRunner`.

Python runs one thread of a process at a time (the GIL). With HTTP, SSE and detokenisation in the model's process,
every wake-up of theirs stalls the batching loop between two torch ops: a thread holding the GIL 20% of the time
made a decode step 1.25-1.3x slower here. So, as vLLM v1 splits its API server from its engine core, `prism serve`
runs the HTTP API and the `Engine` frontend in a child process (`runtime/api_process.py`); the model's process keeps
the model, the runner and everything else. Measured: 1.1-1.2x the tokens/s of one process at 16 and 64 streams.

* `RunnerHost` (model's process) runs the real runner for requests that arrive over ZeroMQ and sends each step's
  outputs back as one message. It restarts a runner whose thread died, as `Engine` does.
* `RemoteRunner` (API process) is the `Runner` the `Engine` drives: it forwards requests and turns the host's
  messages back into `RunnerOutput`s, logprobs included (written into each request's sampler, as a local runner
  does).

Two PUSH/PULL socket pairs on `ipc://` paths in a private (0700) folder, msgpack maps; `op` names each message:
  API -> model:  add (id, prompt, max_new_tokens, eos, params: the `SamplingParams` fields), cancel (id),
                 score (call, prompt, top), stats (the `RequestStats` fields), http (endpoint, status, seconds)
  model -> API:  out (items: [[id, new token ids, finished, error | None, logprobs | None], ...]: one per step),
                 scored (call, result | error)
Logprobs travel as [token, logprob, [[id, logprob], ...]]. The host checks every message it is sent and drops
(logging) what is malformed; a malformed `add` is answered with an error for that request.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import msgpack
import torch
import zmq

from prism_moe.runtime.engine.frontend import RequestStats
from prism_moe.runtime.engine.runners import Runner, RunnerOutput, RunnerRequest, pump_outputs
from prism_moe.runtime.engine.sampling import SamplingParams, SequenceSampler, TokenLogprobs

log = logging.getLogger(__name__)

SCORE_TIMEOUT_S = 600.0  # a prompt's scoring forward; the caller's HTTP request waits this long at most


def _pack(msg: dict[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)  # logit_bias has int keys


def _lp_out(lp: TokenLogprobs) -> list[Any]:
    return [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


def _lp_in(x: list[Any]) -> TokenLogprobs:
    return TokenLogprobs(int(x[0]), float(x[1]), tuple((int(i), float(v)) for i, v in x[2]))


def _socket(ctx: zmq.Context, kind: int, address: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address) if bind else sock.connect(address)
    return sock


# --- the API process's side ----------------------------------------------------------------------------------------
class RemoteRunner:
    """A `Runner` whose loop runs in the model's process (a `RunnerHost` bound at `to_host` and `from_host`).

    `get_results` (the `Engine`'s pump thread) is the only reader; the other methods may be called from any thread.
    `pause` and `prompt_logits` are the model process's business: they raise here.
    """

    def __init__(self, to_host: str, from_host: str) -> None:
        self.to_host, self.from_host = to_host, from_host
        self._ctx = zmq.Context.instance()
        self._push: zmq.Socket | None = None
        self._pull: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._pull_lock = threading.Lock()  # a socket is not thread-safe: `stop` closes it between two reads
        self._lock = threading.Lock()  # guards _requests and _scores
        self._requests: dict[str, tuple[RunnerRequest, list[int]]] = {}
        self._scores: dict[int, Future] = {}
        self._calls = itertools.count()
        self._running = False

    def start(self) -> None:
        if self._running:
            return
        self._push = _socket(self._ctx, zmq.PUSH, self.to_host, bind=False)
        self._pull = _socket(self._ctx, zmq.PULL, self.from_host, bind=False)
        self._running = True

    def stop(self, timeout: float | None = None) -> None:
        self._running = False
        with self._lock:
            scores, self._scores = self._scores, {}
            self._requests.clear()
        for fut in scores.values():
            fut.set_exception(RuntimeError("engine stopped"))
        with self._send_lock:
            if self._push is not None:
                self._push.close(0)
                self._push = None
        with self._pull_lock:
            if self._pull is not None:
                self._pull.close(0)
                self._pull = None

    def is_running(self) -> bool:
        return self._running

    def _send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            if self._push is None:
                raise RuntimeError("engine stopped")
            self._push.send(_pack(msg))

    def add_request(self, request: RunnerRequest) -> bool:
        if not self._running:
            return False
        with self._lock:
            self._requests[request.id] = (request, [])
        self._send({"op": "add", "id": request.id, "prompt": request.prompt, "max_new_tokens": request.max_new_tokens,
                    "eos": sorted(request.eos), "params": dataclasses.asdict(request.sampler.params)})
        return True

    def cancel_request(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)
        if self._running:
            self._send({"op": "cancel", "id": request_id})

    def send_stats(self, stats: RequestStats) -> None:
        """An ended request's stats, for the model process's metrics (an `Engine` listener); lost if stopped."""
        self._try_send({"op": "stats", **dataclasses.asdict(stats)})

    def send_http(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request, for the model process's metrics; lost if stopped."""
        self._try_send({"op": "http", "endpoint": endpoint, "status": int(status), "seconds": float(seconds)})

    def _try_send(self, msg: dict[str, Any]) -> None:
        try:
            self._send(msg)
        except (RuntimeError, zmq.ZMQError):
            log.debug("metrics message dropped: the runner is stopped")

    def get_results(self, timeout: float | None = None) -> list[RunnerOutput]:
        with self._pull_lock:
            pull = self._pull
            if pull is None or not pull.poll(100 if timeout is None else int(timeout * 1000)):
                return []
            msgs = []
            while True:
                try:
                    msgs.append(_unpack(pull.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        outs: list[RunnerOutput] = []
        for msg in msgs:
            if msg.get("op") == "out":
                outs.extend(self._outputs(msg["items"]))
            elif msg.get("op") == "scored":
                with self._lock:
                    fut = self._scores.pop(msg["call"], None)
                if fut is not None:
                    if "error" in msg:
                        fut.set_exception(RuntimeError(msg["error"]))
                    else:
                        fut.set_result([None if x is None else _lp_in(x) for x in msg["result"]])
        return outs

    def _outputs(self, items: list[list[Any]]) -> Iterator[RunnerOutput]:
        for request_id, new, finished, error, lps in items:
            with self._lock:
                entry = self._requests.get(request_id)
                if entry is not None and (finished or error is not None):
                    del self._requests[request_id]
            if entry is None:  # cancelled meanwhile
                continue
            request, tokens = entry
            tokens.extend(new)
            if lps:
                request.sampler.logprobs.extend(_lp_in(x) for x in lps)
            yield RunnerOutput(request_id, list(tokens), bool(finished), error)

    @contextmanager
    def pause(self) -> Iterator[None]:
        raise RuntimeError("the batching loop runs in the model's process: pause it there")
        yield  # pragma: no cover

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        raise RuntimeError("the model runs in another process: use prompt_logprobs")

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[TokenLogprobs | None]:
        fut: Future = Future()
        call = next(self._calls)
        with self._lock:
            self._scores[call] = fut
        self._send({"op": "score", "call": call, "prompt": prompt, "top": top})
        return fut.result(SCORE_TIMEOUT_S)


# --- the model process's side --------------------------------------------------------------------------------------
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_STATS_FIELDS = {f.name for f in dataclasses.fields(RequestStats)}


class WireError(ValueError):
    """A message from the API process that is not what the protocol says."""


def _ids(x: Any, what: str) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        raise WireError(f"{what} must be a list of token ids")
    return x


def parse_add(msg: dict[str, Any]) -> RunnerRequest:
    """The request of an `add` message, or `WireError` saying what is wrong."""
    request_id, params = msg.get("id"), msg.get("params")
    if not isinstance(request_id, str) or not request_id:
        raise WireError("add: id must be a non-empty string")
    prompt = _ids(msg.get("prompt"), "add: prompt")
    max_new = msg.get("max_new_tokens")
    if not isinstance(max_new, int) or max_new < 1:
        raise WireError("add: max_new_tokens must be an int >= 1")
    if not isinstance(params, dict) or not set(params) <= _SAMPLING_FIELDS:
        raise WireError(f"add: params must be a map of SamplingParams fields ({sorted(_SAMPLING_FIELDS)})")
    try:
        sampling = SamplingParams(**params)
    except TypeError as e:
        raise WireError(f"add: params: {e}") from None
    return RunnerRequest(request_id, prompt, max_new, frozenset(_ids(msg.get("eos"), "add: eos")),
                         SequenceSampler(sampling, prompt))


class RunnerHost:
    """Runs `make_runner()`'s loop for a `RemoteRunner`: binds `to_host` (PULL) and `from_host` (PUSH).

    What the model process's HTTP app and server read of an `Engine`: `is_running`, `num_running`, `num_waiting`,
    `restarts`, `runner`, `start`/`stop`, listeners of `RequestStats` (`add_listener`) and `on_http` for the HTTP
    requests the API process answered.
    """

    def __init__(self, make_runner: Callable[[], Runner], to_host: str, from_host: str) -> None:
        self.make_runner, self.to_host, self.from_host = make_runner, to_host, from_host
        self.runner: Runner | None = None
        self.restarts = 0
        self.on_http: Callable[[str, int, float], None] | None = None
        self._listeners: list[Callable[[RequestStats], None]] = []
        self._ctx = zmq.Context.instance()
        self._push: zmq.Socket | None = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _sent and _waiting
        self._sent: dict[str, tuple[RunnerRequest, int]] = {}  # in flight: tokens (and logprobs) sent so far
        self._waiting: set[str] = set()  # in flight without a first token
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- what an Engine offers the server and the HTTP app ---------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._sent) - len(self._waiting)

    def add_listener(self, fn: Callable[[RequestStats], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[RequestStats], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.is_running:
            return
        self._stopping.clear()
        self.runner = self.make_runner()
        self.runner.start()
        pull = _socket(self._ctx, zmq.PULL, self.to_host, bind=True)
        self._push = _socket(self._ctx, zmq.PUSH, self.from_host, bind=True)
        self._threads = [threading.Thread(target=self._in_loop, args=(pull,), name="prism-host-in", daemon=True),
                         threading.Thread(target=self._out_loop, name="prism-host-out", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self.runner is not None:
            self.runner.stop(timeout)
        for t in self._threads:
            t.join(timeout)
        with self._send_lock:
            if self._push is not None:
                self._push.close(0)
                self._push = None

    def _send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            if self._push is not None:
                self._push.send(_pack(msg))

    # --- requests in -----------------------------------------------------------------------------------------------
    def _in_loop(self, pull: zmq.Socket) -> None:
        try:
            while not self._stopping.is_set():
                if not pull.poll(100):
                    continue
                try:
                    msg = _unpack(pull.recv())
                    if not isinstance(msg, dict):
                        raise WireError("a message must be a map")
                    self._handle(msg)
                except (WireError, ValueError, TypeError, msgpack.UnpackException) as e:
                    log.error("dropped a malformed message from the API process: %s", e)
        finally:
            pull.close(0)

    def _handle(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "add":
            try:
                request = parse_add(msg)
            except WireError as e:
                if isinstance(msg.get("id"), str):
                    self._send({"op": "out", "items": [[msg["id"], [], False, f"bad request: {e}", None]]})
                raise
            with self._lock:
                self._sent[request.id] = (request, 0)
                self._waiting.add(request.id)
            runner = self.runner
            if runner is None or not runner.add_request(request):
                self._forget(request.id)
                self._send({"op": "out", "items": [[request.id, [], False, "engine is not accepting requests "
                                                    "(restarting or stopping); retry", None]]})
        elif op == "cancel":
            if isinstance(msg.get("id"), str) and self.runner is not None:
                self._forget(msg["id"])
                self.runner.cancel_request(msg["id"])
        elif op == "score":
            call, top = msg.get("call"), msg.get("top")
            if not isinstance(call, int) or not isinstance(top, int):
                raise WireError("score: call and top must be ints")
            prompt = _ids(msg.get("prompt"), "score: prompt")
            threading.Thread(target=self._score, args=(call, prompt, top), name="prism-host-score", daemon=True).start()
        elif op == "stats":
            fields = {k: v for k, v in msg.items() if k != "op"}
            if set(fields) != _STATS_FIELDS:
                raise WireError(f"stats: expected fields {sorted(_STATS_FIELDS)}")
            stats = RequestStats(**fields)
            for fn in list(self._listeners):
                try:
                    fn(stats)
                except Exception:  # a metrics bug must not stop the loop
                    log.exception("request stats listener failed")
        elif op == "http":
            if self.on_http is not None:
                self.on_http(str(msg.get("endpoint")), int(msg.get("status", 0)), float(msg.get("seconds", 0.0)))
        else:
            raise WireError(f"unknown op {op!r}")

    def _score(self, call: int, prompt: list[int], top: int) -> None:
        runner = self.runner
        try:
            if runner is None:
                raise RuntimeError("engine is not running")
            result = runner.prompt_logprobs(prompt, top)
            self._send({"op": "scored", "call": call, "result": [None if x is None else _lp_out(x) for x in result]})
        except Exception as e:
            self._send({"op": "scored", "call": call, "error": str(e)})

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._sent.pop(request_id, None)
            self._waiting.discard(request_id)

    # --- outputs out -----------------------------------------------------------------------------------------------
    def _out_loop(self) -> None:
        assert self.runner is not None
        pump_outputs(self.runner, self._stopping, self._send_outputs, self._restarted)

    def _send_outputs(self, outs: list[RunnerOutput]) -> None:
        items = [item for item in map(self._item, outs) if item is not None]
        if items:
            self._send({"op": "out", "items": items})

    def _restarted(self) -> None:
        self.restarts += 1

    def _item(self, out: RunnerOutput) -> list[Any] | None:
        with self._lock:
            entry = self._sent.get(out.request_id)
            if entry is None:  # cancelled
                return None
            request, n = entry
            new = out.generated_tokens[n:]
            if out.is_finished():
                del self._sent[out.request_id]
            else:
                self._sent[out.request_id] = (request, len(out.generated_tokens))
            if new or out.is_finished():
                self._waiting.discard(out.request_id)
        lps = None
        if request.sampler.params.logprobs is not None:
            lps = [_lp_out(lp) for lp in request.sampler.logprobs[n:len(out.generated_tokens)]]
        return [out.request_id, new, out.finished, out.error, lps]
