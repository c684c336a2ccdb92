"""Expert service + peer channels on loopback: exact results, many calls out per thread and across threads,
merging on the compute worker, deadlines and retries, hostile input, CurveZMQ accept/refuse, link emulation
and partitions in the service. Every socket is closed in finally blocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq

from prism_moe.runtime import wire
from prism_moe.runtime.emulation import LinkEmulator, LinkProfile
from prism_moe.runtime.keys import CurveIdentity, load_identity, make_cluster_keys
from prism_moe.runtime.transport import (
    CallEvent,
    ExpertService,
    PeerPool,
    PeerUnavailable,
    RemoteError,
    ServiceError,
    TransportError,
)
from prism_moe.runtime.wire import WireLimits, decode, encode

pytestmark = pytest.mark.timeout(60)

L, E, H = 4, 8, 16  # MoE layers, experts per layer, hidden size


def known(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The test experts: row i -> hidden[i] * layer + expert_ids[i]."""
    return hidden * layer + ids.to(hidden.dtype)[:, None]


@contextmanager
def serving(handler: Any = known, address: str = "tcp://127.0.0.1:*", **kw: Any) -> Iterator[ExpertService]:
    svc = ExpertService(address, handler, num_layers=L, num_experts=E, hidden_size=H,
                        name=kw.pop("name", "srv"), **kw)
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


@contextmanager
def pool_of(peers: dict[str, str], **kw: Any) -> Iterator[PeerPool]:
    pool = PeerPool(peers, **kw)
    try:
        yield pool
    finally:
        pool.close()


def dead_endpoint() -> str:
    """A loopback endpoint nobody listens on (bound by the OS, then released)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    try:
        s.bind("tcp://127.0.0.1:*")
        return s.get(zmq.LAST_ENDPOINT).decode()
    finally:
        s.close(0)
        ctx.term()


def batch(n: int = 5, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert ids [n] (below E - 1, which `Gate` does not hold) and hidden states [n, H]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, E - 1, (n,), generator=g), torch.randn(n, H, generator=g).to(dtype)


class Gate:
    """A handler that blocks its calls of `layer` until released, recording the threads it ran on."""

    def __init__(self, layer: int = 0) -> None:
        self.layer, self.open, self.entered = layer, threading.Event(), threading.Event()
        self.threads: list[str] = []
        self.sizes: list[int] = []

    def __call__(self, layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(hidden.shape[0])
        if layer == self.layer:
            self.entered.set()
            self.open.wait(10)
        missing = (ids >= E - 1).nonzero()
        if len(missing):
            raise ServiceError("not_held", f"expert {E - 1} moved away")
        return known(layer, ids, hidden)


# ------------------------------------------------------------------------------------- basic calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_call_computes_known_function_exactly(dtype: torch.dtype) -> None:
    with serving() as svc, pool_of({"srv": svc.endpoint}) as pool:
        for layer in range(L):
            ids, x = batch(7, dtype, seed=layer)
            out = pool.call("srv", layer, ids, x)
            assert out.dtype == dtype and torch.equal(out, known(layer, ids, x))
        ids32, x = batch(3)
        assert torch.equal(pool.call("srv", 1, ids32.int(), x), known(1, ids32, x))  # int32 ids too
        empty = pool.call("srv", 2, torch.empty(0, dtype=torch.int64), torch.empty(0, H))
        assert empty.shape == (0, H)
        assert pool.ping("srv") > 0
        with pytest.raises(ValueError, match=r"need hidden \[n, H\]"):
            pool.start_call("srv", 0, ids32[:2], x)
        with pytest.raises(KeyError, match="unknown peer 'nobody'"):
            pool.start_call("nobody", 0, ids32, x)
        with pytest.raises(ValueError, match="not a request type"):
            pool["srv"].request("expert_result")


def test_many_calls_out_per_thread_and_across_threads() -> None:
    with serving() as svc, pool_of({"srv": svc.endpoint}) as pool:
        ids, x = batch()
        calls = [pool.start_call("srv", layer, ids, x) for layer in range(L)]  # all out on one socket
        for layer in reversed(range(L)):  # collected in any order: replies are matched by id
            assert torch.equal(calls[layer].result(5), known(layer, ids, x))
        assert calls[0].done() and torch.equal(calls[0].result(), known(0, ids, x))  # the result is kept

        def worker(i: int) -> bool:
            wi, wx = batch(3, seed=i)
            return all(torch.equal(pool.call("srv", i % L, wi, wx), known(i % L, wi, wx)) for _ in range(3))

        with ThreadPoolExecutor(4) as ex:
            assert all(ex.map(worker, range(16)))
        ch = pool["srv"]
        assert not ch._lent and 1 <= len(ch._free) <= 4  # a socket per concurrent thread, kept for reuse
        assert pool.stats()["srv"].ok == L + 16 * 3


def test_a_call_is_collected_on_the_thread_that_sent_it() -> None:
    with serving() as svc, pool_of({"srv": svc.endpoint}) as pool:
        ids, x = batch()
        call = pool.start_call("srv", 1, ids, x)
        errors: list[BaseException] = []

        def other() -> None:
            try:
                call.result(5)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert isinstance(errors[0], RuntimeError) and "thread that sent it" in str(errors[0])
        assert torch.equal(call.result(5), known(1, ids, x))


# ------------------------------------------------------------------------ the service's threads


def test_worker_computes_and_merges_concurrent_calls_of_a_layer_while_io_stays_responsive() -> None:
    gate = Gate(layer=0)
    with serving(gate) as svc, pool_of({"srv": svc.endpoint}, timeout=5.0) as pool:
        ids, x = batch(3)
        first = pool.start_call("srv", 0, ids, x)  # holds the worker
        assert gate.entered.wait(5)
        assert pool.ping("srv") < 1.0  # the I/O thread answers while the worker computes
        inputs = [batch(2, seed=i) for i in range(4)]
        bad_ids = torch.tensor([1, E - 1])  # one call of the merged layer fails: only that one
        calls = [pool.start_call("srv", 2, i, xi) for i, xi in inputs]
        bad = pool.start_call("srv", 2, bad_ids, inputs[0][1])
        calls += [pool.start_call("srv", 3, i, xi) for i, xi in inputs]
        deadline = time.monotonic() + 5
        while svc.stats.expert_calls < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.open.set()
        assert torch.equal(first.result(5), known(0, ids, x))
        for k, c in enumerate(calls):
            layer, (i, xi) = (2 if k < 4 else 3), inputs[k % 4]
            assert torch.equal(c.result(5), known(layer, i, xi))
        with pytest.raises(RemoteError) as err:
            bad.result(5)
        assert err.value.code == "not_held"
        assert set(gate.threads) == {"prism-experts-srv"}  # never the I/O thread
        assert svc.stats.merged_calls == 4  # the four layer-3 calls ran as one handler call
        assert 8 in gate.sizes
        assert svc.stats.handler_calls < svc.stats.expert_calls


def test_control_messages_run_on_the_control_thread() -> None:
    def load(header: dict, tensors: dict) -> tuple[dict, dict]:
        return {"loaded": [header["layer"], header["expert"]], "on": threading.current_thread().name}, \
            {"w2": tensors["w"] * 2}

    gate = Gate(layer=0)
    with serving(gate) as svc, pool_of({"srv": svc.endpoint}) as pool:
        svc.on("load_expert", load)
        with pytest.raises(ValueError):
            svc.on("expert_call", load)
        ids, x = batch()
        busy = pool.start_call("srv", 0, ids, x)
        assert gate.entered.wait(5)
        # weights arrive while the worker computes: they do not wait for it
        header, tensors = pool["srv"].request(
            "load_expert", {"layer": 1, "expert": 3}, {"w": torch.ones(4, 2, dtype=torch.bfloat16)}, timeout=2.0
        )
        assert header["type"] == "ack" and header["loaded"] == [1, 3] and header["on"].startswith("prism-control")
        assert torch.equal(tensors["w2"], torch.full((4, 2), 2.0, dtype=torch.bfloat16))
        gate.open.set()
        busy.result(5)
        with pytest.raises(RemoteError, match="unsupported"):
            pool["srv"].request("drop_expert", {"layer": 0, "expert": 1})
    with pytest.raises(TypeError, match="plain function"):
        ExpertService("tcp://127.0.0.1:*", _async_handler, num_layers=L, num_experts=E, hidden_size=H)


async def _async_handler(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def test_max_inflight_pauses_reading_and_resumes() -> None:
    gate = Gate(layer=1)
    with serving(gate, max_inflight=2) as svc, pool_of({"srv": svc.endpoint}, timeout=5.0) as pool:
        inputs = [batch(2, seed=i) for i in range(4)]
        calls = [pool.start_call("srv", 1, ids, x) for ids, x in inputs]
        assert gate.entered.wait(5)
        time.sleep(0.2)
        assert svc.stats.requests == 2  # at the bound the socket is not read (ZeroMQ queues push back)
        with pytest.raises(PeerUnavailable):
            pool["srv"].ping(timeout=0.3)
        gate.open.set()
        for c, (ids, x) in zip(calls, inputs, strict=True):
            assert torch.equal(c.result(5), known(1, ids, x))
        assert pool.ping("srv") > 0


# --------------------------------------------------------------------------------- deadlines


def test_call_waits_for_a_service_that_comes_up_within_the_deadline() -> None:
    ep = dead_endpoint()
    with pool_of({"late": ep}, timeout=3.0, retries=0) as pool:
        ids, x = batch()
        call = pool.start_call("late", 1, ids, x)  # no connection yet: it waits to be sent, within its deadline
        with pytest.raises(TimeoutError):
            call.result(0.3)
        with serving(address=ep):
            assert torch.equal(call.result(5), known(1, ids, x))


def test_service_down_raises_peer_unavailable_in_bounded_time() -> None:
    ep = dead_endpoint()
    with pool_of({"gone": ep}, timeout=0.2, retries=2) as pool:
        ids, x = batch()
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable) as e:
            pool.call("gone", 0, ids, x)
        elapsed = time.monotonic() - t0
        assert e.value.peer == "gone" and e.value.attempts == 3 and e.value.after >= 0.6
        assert elapsed < 3.0
        assert "'gone'" in str(e.value) and "3 attempt(s)" in str(e.value) and ep in str(e.value)
        st = pool.stats()["gone"]
        assert st.unavailable == 1 and st.retries == 2 and st.ok == 0


def test_hanging_handler_and_closed_service_raise_peer_unavailable() -> None:
    gate = Gate(layer=0)
    ids, x = batch()
    with serving(gate) as svc, pool_of({"srv": svc.endpoint}, timeout=0.2, retries=1) as pool:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="no reply within 0.2s"):
            pool.call("srv", 0, ids, x)
        assert time.monotonic() - t0 < 2.0
        gate.open.set()
    with serving() as svc, pool_of({"srv": svc.endpoint}, timeout=0.2, retries=1) as pool:
        assert torch.equal(pool.call("srv", 1, ids, x), known(1, ids, x))
        svc.close()
        with pytest.raises(PeerUnavailable):
            pool.call("srv", 1, ids, x)


def test_retry_accepts_late_reply_and_a_reply_that_came_while_nobody_read() -> None:
    calls: list[int] = []

    def first_slow(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(layer)
        if len(calls) == 1:
            time.sleep(0.5)
        return known(layer, ids, hidden)

    with serving(first_slow) as svc, pool_of({"srv": svc.endpoint}, timeout=0.3, retries=3) as pool:
        ids, x = batch()
        assert torch.equal(pool.call("srv", 2, ids, x), known(2, ids, x))
        assert pool.stats()["srv"].retries >= 1
        # a layer collects its calls one after another: a reply that came while another call was waited
        # for counts, even when its collector comes back after the deadline
        retries = pool.stats()["srv"].retries
        call = pool.start_call("srv", 3, ids, x, retries=0)
        time.sleep(0.5)
        assert torch.equal(call.result(), known(3, ids, x))
        assert pool.stats()["srv"].retries == retries


def test_timeout_cancel_and_late_replies_dropped() -> None:
    gate = Gate(layer=2)
    with serving(gate) as svc, pool_of({"srv": svc.endpoint}, timeout=5.0) as pool:
        ids, x = batch()
        call = pool.start_call("srv", 2, ids, x)
        with pytest.raises(TimeoutError):
            call.result(0.05)  # still running: ask again or cancel
        assert call.cancel() and not call.cancel()
        with pytest.raises(TransportError, match="cancelled"):
            call.result()
        gate.open.set()
        assert torch.equal(pool.call("srv", 0, ids, x), known(0, ids, x))  # the socket was let go
        deadline = time.monotonic() + 5
        while pool.stats()["srv"].unmatched_replies == 0 and time.monotonic() < deadline:
            pool.call("srv", 0, ids, x)  # the cancelled call's late reply is read and dropped
        assert pool.stats()["srv"].unmatched_replies == 1


def test_fail_inflight_replace_and_close_end_waiting_calls_at_once() -> None:
    gate = Gate(layer=0)
    with serving(gate) as svc:
        pool = PeerPool({"srv": svc.endpoint}, timeout=10.0, retries=0)
        try:
            ids, x = batch()
            for action, says in ((lambda: pool.fail_inflight("srv", "declared down"), "declared down"),
                                 (lambda: pool.add_peer("srv", svc.endpoint), "client closed")):
                call = pool.start_call("srv", 0, ids, x)
                threading.Timer(0.2, action).start()
                t0 = time.monotonic()
                with pytest.raises(PeerUnavailable, match=says):
                    call.result()
                assert time.monotonic() - t0 < 1.0
            gate.open.set()
            assert torch.equal(pool.call("srv", 1, ids, x), known(1, ids, x))  # later calls go out as usual
            gate.open.clear()
            call = pool.start_call("srv", 0, ids, x)
            threading.Timer(0.2, pool.close, kwargs={"wait": 5.0}).start()
            with pytest.raises(PeerUnavailable, match="client closed"):
                call.result()
        finally:
            gate.open.set()
            pool.close()
    with pytest.raises(TransportError, match="closed"):
        pool.add_peer("srv", "tcp://127.0.0.1:1")


# ----------------------------------------------------------------------------- hostile input


def test_garbage_never_kills_the_service() -> None:
    def hdr(**fields: Any) -> bytes:
        return msgpack.packb({"v": 1, "type": "expert_call", "id": 42, "layer": 0, "tensors": [], **fields})

    hidden_desc = {"name": "hidden", "dtype": "float32", "shape": [1, H]}
    ids_desc = {"name": "expert_ids", "dtype": "int64", "shape": [1]}
    garbage: list[list[bytes]] = [
        [b"garbage"],
        [b""],
        [b"\xc1\xc1\xc1"],
        [msgpack.packb([1, 2, 3])],
        [b"x"] * 20,
        [hdr(v=99)],
        [hdr(type="rm -rf")],
        [hdr(tensors=[{"name": "hidden", "dtype": "float32", "shape": [2**31 - 1, 2**31 - 1]}]), b""],
        [hdr(tensors=[{"name": "hidden", "dtype": "float64", "shape": [1, H]}]), b"\0" * 8 * H],
        [hdr(tensors=[hidden_desc, ids_desc]), b"\0" * 3],
        [hdr(tensors=[hidden_desc, ids_desc]), b"\0" * 4 * H],  # missing frame
        [hdr(layer=L, tensors=[hidden_desc, ids_desc]), b"\0" * 4 * H, b"\0" * 8],  # layer out of range
        [hdr(tensors=[hidden_desc, ids_desc]), b"\0" * 4 * H, (E).to_bytes(8, "little")],  # expert id
        [hdr(type="expert_result")],
        [hdr(type="link", peer="a", drop=True)],  # link emulation is off on this service
    ]
    with serving(limits=WireLimits(max_total_bytes=4096)) as svc:
        ctx = zmq.Context()
        raw, req, big = ctx.socket(zmq.DEALER), ctx.socket(zmq.REQ), ctx.socket(zmq.DEALER)
        for s in (raw, req, big):
            s.linger = 0
            s.rcvtimeo = 5000
            s.connect(svc.endpoint)
        try:
            for frames in garbage:
                raw.send_multipart(frames)
                header, _ = decode(raw.recv_multipart())
                assert header["type"] == "error", frames
                assert header["code"] in ("bad_request", "unsupported"), header
                assert header["id"] in (0, 42)
            # a REQ peer's empty delimiter frame is kept in the reply envelope
            req.send_multipart(encode({"type": "ping", "id": 5}))
            header, _ = decode(req.recv_multipart())
            assert header["type"] == "pong" and header["id"] == 5
            # a frame above the socket's size cap disconnects that peer without an answer
            big.send_multipart([b"\0" * 200_000])
            assert not big.poll(500)
            # ...and everyone else is still served
            with pool_of({"srv": svc.endpoint}) as pool:
                ids, x = batch()
                assert torch.equal(pool.call("srv", 3, ids, x), known(3, ids, x))
            assert svc.stats.errors["bad_request"] >= 10
        finally:
            for s in (raw, req, big):
                s.close(0)
            ctx.term()


def test_handler_failures_and_bad_requests_come_back_as_remote_errors() -> None:
    def picky(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> Any:
        if layer == 0:
            raise ValueError("boom")
        if layer == 1:
            return hidden[:-1]
        if layer == 2:
            raise ServiceError("not_held", f"expert {int(ids[0])} moved away")
        return "not a tensor"

    events: list[CallEvent] = []
    with serving(picky) as svc, pool_of({"srv": svc.endpoint}, on_call=events.append) as pool:
        ids, x = batch()
        for layer, code, text in [
            (0, "handler_error", "ValueError: boom"),
            (1, "handler_error", "returned shape [4, 16]"),
            (2, "not_held", "moved away"),
            (3, "handler_error", "returned str"),
            (L, "bad_request", "out of range"),
        ]:
            with pytest.raises(RemoteError) as e:
                pool.call("srv", layer, ids, x)
            assert e.value.code == code and text in e.value.message and e.value.peer == "srv"
        with pytest.raises(RemoteError, match="bad_request"):
            pool.call("srv", 1, torch.full((5,), E), x)
        assert [ev.outcome for ev in events] == ["error"] * 6
        assert pool.stats()["srv"].errors == 6
        assert svc.stats.errors["handler_error"] == 3


def test_expected_header_then_bad_frames_is_a_bad_reply_and_the_socket_stays_in_step() -> None:
    """A peer that answers with exactly the header prism's service would send, then a wrong `out` frame."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    mode = {"now": "good"}
    stop = threading.Event()

    def serve() -> None:  # echoes hidden as `out`, or breaks the reply as `mode` says
        while not stop.is_set():
            if not router.poll(20):
                continue
            route, head, hidden, _ids = router.recv_multipart()
            header = msgpack.unpackb(head)
            n, h = header["tensors"][0]["shape"]
            reply = [wire.expert_result_header(header["id"], header["layer"], torch.float32, [n, h]), hidden]
            if mode["now"] == "short":
                reply[1] = hidden[:-4]
            elif mode["now"] == "extra":
                reply.append(b"junk")
            router.send_multipart([route, *reply])

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with pool_of({"evil": f"tcp://127.0.0.1:{port}"}, timeout=2.0, retries=0) as pool:
            ids, x = batch()
            for broken, says in (("short", "needs 320 bytes, frame has 316"), ("extra", "2 tensor frames followed")):
                mode["now"] = broken
                with pytest.raises(RemoteError, match=says) as e:
                    pool.call("evil", 1, ids, x)
                assert e.value.code == "bad_reply"
            mode["now"] = "good"
            assert torch.equal(pool.call("evil", 1, ids, x), x)
    finally:
        stop.set()
        server.join(5)
        router.close(0)
        ctx.term()


# ------------------------------------------------------------------------------------------ stats


def test_stats_and_call_hook() -> None:
    events: list[CallEvent] = []
    with serving() as svc, pool_of({"srv": svc.endpoint}, on_call=events.append) as pool:
        for n in (1, 2, 3):
            ids, x = batch(n)
            pool.call("srv", 1, ids, x)
        st = pool.stats()["srv"]
        assert (st.calls, st.ok, st.errors, st.unavailable) == (3, 3, 0, 0)
        assert [(ev.tokens, ev.layer, ev.attempts, ev.outcome) for ev in events] == [
            (1, 1, 1, "ok"), (2, 1, 1, "ok"), (3, 1, 1, "ok")]
        assert st.bytes_sent == sum(ev.bytes_sent for ev in events) > 6 * H * 4
        assert st.bytes_received == sum(ev.bytes_received for ev in events) > 6 * H * 4
        assert st.latency_quantile(0.5) is not None and st.latency_sum_s > 0
        assert svc.stats.expert_calls == 3 and svc.stats.tokens == 6 and svc.stats.compute_s_sum > 0
        assert svc.stats.bytes_received == st.bytes_sent  # payload bytes, ZeroMQ framing excluded
        assert svc.stats.bytes_sent == st.bytes_received


# ---------------------------------------------------------------------------------------- security


def test_curve_accepts_cluster_keys_and_refuses_others(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path / "cluster", ["a", "b"])
    make_cluster_keys(tmp_path / "foreign", ["mallory"])
    a, b = load_identity(tmp_path / "cluster", "a"), load_identity(tmp_path / "cluster", "b")
    foreign = load_identity(tmp_path / "foreign", "mallory")
    # mallory knows b's public key (it is public) but hers is not in the cluster's folder
    mallory = CurveIdentity("mallory", foreign.public_key, foreign.secret_key, public_dir=a.public_dir)
    ids, x = batch()
    with serving(identity=b, name="b") as svc:
        with pool_of({"b": svc.endpoint}, identity=a) as pool:
            assert torch.equal(pool.call("b", 1, ids, x), known(1, ids, x))
        for ident in (mallory, None):  # foreign key; plaintext client
            with pool_of({"b": svc.endpoint}, identity=ident, timeout=0.3, retries=1) as pool:
                t0 = time.monotonic()
                with pytest.raises(PeerUnavailable):
                    pool.call("b", 1, ids, x)
                assert time.monotonic() - t0 < 3.0
        with pool_of({"b": svc.endpoint}, identity=a) as pool:  # still serving the cluster
            assert torch.equal(pool.call("b", 2, ids, x), known(2, ids, x))


# --------------------------------------------------------------------------------------- emulation


def test_link_emulator_queues_bandwidth_and_overlaps_delay() -> None:
    link = LinkEmulator(LinkProfile(delay_ms=10, bandwidth_mbps=8))  # 1 MB/s
    assert link.reserve("up", 1_000_000, now=0.0) == pytest.approx(1.01)
    assert link.reserve("up", 1_000_000, now=0.0) == pytest.approx(2.01)  # queued behind the first
    assert link.reserve("down", 500_000, now=0.0) == pytest.approx(0.51)  # other direction is free
    assert link.reserve("up", 0, now=5.0) == pytest.approx(5.01)  # idle link: delay only
    assert LinkProfile().serialisation_s(10**9) == 0.0
    for bad in ({"delay_ms": -1}, {"bandwidth_mbps": 0}, {"delay_ms": float("nan")}):
        with pytest.raises(ValueError):
            LinkProfile(**bad)


def test_emulated_links_delay_and_cap_calls_on_the_same_path() -> None:
    ids, x = batch(64)
    with serving(links={"me": LinkProfile(delay_ms=40)}) as svc:
        with pool_of({"srv": svc.endpoint}, name="me") as pool:
            t0 = time.monotonic()
            assert torch.equal(pool.call("srv", 1, ids, x), known(1, ids, x))
            assert time.monotonic() - t0 >= 0.08 * 0.95  # one-way delay, both directions
        with pool_of({"srv": svc.endpoint}, name="other") as pool:  # an unemulated caller
            t0 = time.monotonic()
            pool.call("srv", 1, ids, x)
            assert time.monotonic() - t0 < 0.06
        slow = LinkProfile(bandwidth_mbps=1.0)
        svc.set_link("me", slow)
        with pool_of({"srv": svc.endpoint}, name="me") as pool:
            t0 = time.monotonic()
            calls = [pool.start_call("srv", 1, ids, x) for _ in range(3)]
            assert all(torch.equal(c.result(5), known(1, ids, x)) for c in calls)
            # 3 x (request >= 64*16*4 + 64*8 bytes, reply >= 64*16*4 bytes) through one 1 Mbit/s link;
            # requests queue behind each other, replies too
            per_call = slow.serialisation_s(64 * H * 4 + 64 * 8) + slow.serialisation_s(64 * H * 4)
            assert time.monotonic() - t0 >= 3 * per_call * 0.5 + per_call * 0.5


def test_partition_drops_everything_from_one_caller_until_healed_by_a_link_message() -> None:
    ids, x = batch()
    with serving(emulate=True) as svc, pool_of({"srv": svc.endpoint}, name="a", timeout=0.3, retries=0) as a, \
            pool_of({"srv": svc.endpoint}, name="ctl") as ctl:
        assert torch.equal(a.call("srv", 1, ids, x), known(1, ids, x))
        header, _ = ctl["srv"].request("link", {"peer": "a", "drop": True})
        assert header["links"] == ["a"]
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):  # sockets stay open, nothing comes back: like a hung peer
            a.call("srv", 1, ids, x)
        with pytest.raises(PeerUnavailable):
            a["srv"].ping(timeout=0.3)
        assert time.monotonic() - t0 < 1.5
        assert torch.equal(ctl.call("srv", 2, ids, x), known(2, ids, x))  # others are served
        assert svc.stats.dropped >= 2
        for bad, says in (({"peer": ""}, "server name"), ({"peer": "a", "delay_ms": -5}, "delay_ms")):
            with pytest.raises(RemoteError, match=says):
                ctl["srv"].request("link", bad)
        ctl["srv"].request("link", {"peer": "a", "clear": True})
        assert torch.equal(a.call("srv", 3, ids, x), known(3, ids, x))  # healed


def test_a_connection_lost_mid_call_raises_at_once_not_after_the_deadlines() -> None:
    """The peer goes away (here: its service closes) while a call waits for its reply: the call fails within a
    fraction of a second, not after timeout x (retries + 1) = 10 s; a hanging peer (connection kept) still
    takes its deadline (test_hanging_handler_and_closed_service_raise_peer_unavailable)."""
    gate = Gate(layer=0)
    ids, x = batch()
    svc = ExpertService("tcp://127.0.0.1:*", gate, num_layers=L, num_experts=E, hidden_size=H, name="srv")
    svc.start()
    try:
        with pool_of({"srv": svc.endpoint}, timeout=5.0, retries=1) as pool:
            assert torch.equal(pool.call("srv", 1, ids, x), known(1, ids, x))  # connected
            call = pool.start_call("srv", 0, ids, x)
            assert gate.entered.wait(5)
            t0 = time.monotonic()
            threading.Thread(target=svc.close, daemon=True).start()
            with pytest.raises(PeerUnavailable, match="connection lost"):
                call.result()
            assert time.monotonic() - t0 < 3.0
    finally:
        gate.open.set()
        svc.close()


def test_a_call_to_a_peer_whose_connection_was_lost_fails_fast_and_a_restarted_peer_serves_again() -> None:
    ids, x = batch()
    svc = ExpertService("tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H, name="srv")
    endpoint = svc.start()
    with pool_of({"srv": endpoint}, timeout=5.0, retries=1) as pool:
        assert torch.equal(pool.call("srv", 1, ids, x), known(1, ids, x))  # this thread's socket is connected
        svc.close()
        time.sleep(0.2)  # the connection is gone before the next call
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="connection was lost"):
            pool.call("srv", 1, ids, x)
        assert time.monotonic() - t0 < 2.0  # not 2 attempts x 5 s
        svc = ExpertService(endpoint, known, num_layers=L, num_experts=E, hidden_size=H, name="srv")
        svc.start()  # the same address again: ZeroMQ reconnects, calls go through
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert torch.equal(pool.call("srv", 2, ids, x), known(2, ids, x))
                    break
                except PeerUnavailable:
                    assert time.monotonic() < deadline, "the restarted peer is never called again"
                    time.sleep(0.1)
        finally:
            svc.close()
