"""Expert service + peer clients on loopback: exact results, concurrency, deadlines, hostile input,
CurveZMQ accept/refuse, link emulation, and the sync facade. Every socket is closed in finally blocks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from prism_moe.runtime import transport, wire
from prism_moe.runtime.emulation import LinkEmulator, LinkProfile
from prism_moe.runtime.keys import CurveIdentity, load_identity, make_cluster_keys
from prism_moe.runtime.transport import (
    CallEvent,
    ExpertService,
    LoopThread,
    PeerClient,
    PeerPool,
    PeerUnavailable,
    RemoteError,
    ServiceError,
    SyncPeerPool,
    TransportError,
)
from prism_moe.runtime.wire import WireLimits, decode, encode

pytestmark = pytest.mark.timeout(60)

L, E, H = 4, 8, 16  # MoE layers, experts per layer, hidden size


def known(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The test experts: row i -> hidden[i] * layer + expert_ids[i]."""
    return hidden * layer + ids.to(hidden.dtype)[:, None]


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def serving(handler: Any = known, **kw: Any) -> AsyncIterator[ExpertService]:
    svc = ExpertService(
        "tcp://127.0.0.1:*",
        handler,
        num_layers=L,
        num_experts=E,
        hidden_size=H,
        name=kw.pop("name", "srv"),
        **kw,
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


@asynccontextmanager
async def pool_of(peers: dict[str, str], **kw: Any) -> AsyncIterator[PeerPool]:
    pool = PeerPool(peers, **kw)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


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
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, E, (n,), generator=g), torch.randn(n, H, generator=g).to(dtype)


# ------------------------------------------------------------------------------------- basic calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_call_computes_known_function_exactly(dtype: torch.dtype) -> None:
    async def main() -> None:
        async with serving() as svc, pool_of({"srv": svc.endpoint}) as pool:
            for layer in range(L):
                ids, x = batch(7, dtype, seed=layer)
                out = await pool.call("srv", layer, ids, x)
                assert out.dtype == dtype and torch.equal(out, known(layer, ids, x))
            ids32, x = batch(3)
            out = await pool.call("srv", 1, ids32.int(), x)  # int32 ids are fine too
            assert torch.equal(out, known(1, ids32, x))
            empty = await pool.call("srv", 2, torch.empty(0, dtype=torch.int64), torch.empty(0, H))
            assert empty.shape == (0, H)

    run(main())


def test_concurrent_calls_are_served_concurrently() -> None:
    async def slow_async(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0.3)
        return known(layer, ids, hidden)

    def slow_sync(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(0.3)
        return known(layer, ids, hidden)

    async def main(handler: Any, bound: float, **kw: Any) -> None:
        async with serving(handler, **kw) as svc, pool_of({"srv": svc.endpoint}) as pool:
            inputs = [batch(4, seed=i) for i in range(8)]
            t0 = time.monotonic()
            outs = await asyncio.gather(
                *(pool.call("srv", i % L, ids, x) for i, (ids, x) in enumerate(inputs))
            )
            elapsed = time.monotonic() - t0
            for i, ((ids, x), out) in enumerate(zip(inputs, outs, strict=True)):
                assert torch.equal(out, known(i % L, ids, x))
            assert elapsed < bound, f"8 x 0.3 s calls took {elapsed:.2f}s: not concurrent"

    run(main(slow_async, 1.5))  # serial would be 2.4 s
    run(main(slow_sync, 1.8, compute_threads=4))  # two waves of four


def test_max_inflight_pauses_reading_and_resumes() -> None:
    async def slow(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0.1)
        return known(layer, ids, hidden)

    async def main() -> None:
        async with serving(slow, max_inflight=2) as svc, pool_of({"srv": svc.endpoint}) as pool:
            inputs = [batch(2, seed=i) for i in range(8)]
            t0 = time.monotonic()
            outs = await asyncio.gather(*(pool.call("srv", 1, ids, x) for ids, x in inputs))
            assert all(torch.equal(o, known(1, ids, x)) for o, (ids, x) in zip(outs, inputs, strict=True))
            assert time.monotonic() - t0 >= 4 * 0.1 * 0.95  # at most two at a time

    run(main())


def test_call_waits_for_a_service_that_comes_up_within_the_deadline() -> None:
    async def main() -> None:
        ep = dead_endpoint()
        async with pool_of({"late": ep}, timeout=3.0, retries=0) as pool:
            ids, x = batch()
            call = asyncio.create_task(pool.call("late", 1, ids, x))
            await asyncio.sleep(0.3)  # the request waits (no connection yet), it is not queued or lost
            assert not call.done()
            svc = ExpertService(ep, known, num_layers=L, num_experts=E, hidden_size=H)
            await svc.start()
            try:
                assert torch.equal(await asyncio.wait_for(call, 5.0), known(1, ids, x))
            finally:
                await svc.close()

    run(main())


def test_call_many_sends_to_all_servers_and_reports_failures() -> None:
    def plus100(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return known(layer, ids, hidden) + 100

    async def main() -> None:
        async with serving(name="a") as a, serving(plus100, name="b") as b:
            gone = dead_endpoint()
            async with pool_of(
                {"a": a.endpoint, "b": b.endpoint, "gone": gone}, timeout=0.3, retries=0
            ) as pool:
                (ia, xa), (ib, xb) = batch(3, seed=1), batch(6, seed=2)
                out = await pool.call_many({"a": (1, ia, xa), "b": (2, ib, xb)})
                assert torch.equal(out["a"], known(1, ia, xa)) and torch.equal(
                    out["b"], known(2, ib, xb) + 100
                )
                req = {"a": (1, ia, xa), "gone": (1, ia, xa)}
                out = await pool.call_many(req, return_exceptions=True)
                assert torch.equal(out["a"], known(1, ia, xa)) and isinstance(out["gone"], PeerUnavailable)
                with pytest.raises(PeerUnavailable, match="'gone'"):
                    await pool.call_many(req)
                with pytest.raises(KeyError, match="unknown peer 'nobody'"):
                    await pool.call_many({"nobody": (0, ia, xa)})
                rtts = await pool.ping_all(timeout=0.3)
                assert rtts["a"] and rtts["b"] and rtts["a"] > 0 and rtts["gone"] is None

    run(main())


def test_ping_and_local_argument_checks() -> None:
    async def main() -> None:
        async with serving(name="edge-b") as svc, PeerClient("edge-b", svc.endpoint) as client:
            assert await client.ping() > 0
            header, _ = await client.request("ping")
            assert header["type"] == "pong" and header["server"] == "edge-b"
            ids, x = batch(4)
            with pytest.raises(ValueError, match=r"need hidden \[n, H\]"):
                await client.call(0, ids[:3], x)
            with pytest.raises(ValueError, match="not a request type"):
                await client.request("expert_result")

    run(main())


# --------------------------------------------------------------------------------- deadlines


def test_service_down_raises_peer_unavailable_in_bounded_time() -> None:
    async def main() -> None:
        ep = dead_endpoint()
        async with pool_of({"gone": ep}, timeout=0.2, retries=2) as pool:
            ids, x = batch()
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailable) as e:
                await pool.call("gone", 0, ids, x)
            elapsed = time.monotonic() - t0
            assert e.value.peer == "gone" and e.value.attempts == 3 and e.value.after >= 0.6
            assert elapsed < 3.0
            assert "'gone'" in str(e.value) and "3 attempt(s)" in str(e.value) and ep in str(e.value)
            st = pool.stats()["gone"]
            assert st.unavailable == 1 and st.retries == 2 and st.ok == 0

    run(main())


def test_service_stopping_and_hanging_handler_raise_peer_unavailable() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def hang(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            await never.wait()
            return hidden

        ids, x = batch()
        async with serving(hang) as svc, pool_of({"srv": svc.endpoint}, timeout=0.2, retries=1) as pool:
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailable):
                await pool.call("srv", 0, ids, x)
            assert time.monotonic() - t0 < 2.0
        async with serving() as svc, pool_of({"srv": svc.endpoint}, timeout=0.2, retries=1) as pool:
            assert torch.equal(await pool.call("srv", 1, ids, x), known(1, ids, x))
            await svc.close()
            with pytest.raises(PeerUnavailable):
                await pool.call("srv", 1, ids, x)

    run(main())


def test_retry_accepts_late_reply() -> None:
    calls = []

    async def first_slow(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(layer)
        if len(calls) == 1:
            await asyncio.sleep(0.5)
        return known(layer, ids, hidden)

    async def main() -> None:
        async with serving(first_slow) as svc, pool_of({"srv": svc.endpoint}, timeout=0.3, retries=3) as pool:
            ids, x = batch()
            assert torch.equal(await pool.call("srv", 2, ids, x), known(2, ids, x))
            assert pool.stats()["srv"].retries >= 1

    run(main())


def test_close_fails_inflight_calls() -> None:
    async def main() -> None:
        never = asyncio.Event()

        async def hang(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            await never.wait()
            return hidden

        async with serving(hang) as svc:
            client = await PeerClient("srv", svc.endpoint, timeout=10.0).connect()
            ids, x = batch()
            task = asyncio.create_task(client.call(0, ids, x))
            await asyncio.sleep(0.1)
            await client.close()
            with pytest.raises(PeerUnavailable, match="client closed"):
                await asyncio.wait_for(task, 2.0)
            with pytest.raises(TransportError, match="closed"):
                await client.call(0, ids, x)
        # a call still waiting to be sent (no connection) fails the same way
        client = await PeerClient("gone", dead_endpoint(), timeout=10.0).connect()
        task = asyncio.create_task(client.call(0, ids, x))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(PeerUnavailable, match="client closed"):
            await asyncio.wait_for(task, 2.0)

    run(main())


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
        # expert id out of range
        [hdr(tensors=[hidden_desc, ids_desc]), b"\0" * 4 * H, (E).to_bytes(8, "little")],
        [hdr(type="expert_result")],
    ]

    async def main() -> None:
        async with serving(limits=WireLimits(max_total_bytes=4096)) as svc:
            ctx = zmq.asyncio.Context()
            raw = ctx.socket(zmq.DEALER)
            req = ctx.socket(zmq.REQ)
            big = ctx.socket(zmq.DEALER)
            for s in (raw, req, big):
                s.linger = 0
                s.connect(svc.endpoint)
            try:
                for frames in garbage:
                    await raw.send_multipart(frames)
                    header, _ = decode(await asyncio.wait_for(raw.recv_multipart(), 5.0))
                    assert header["type"] == "error", frames
                    assert header["code"] in ("bad_request", "unsupported"), header
                    assert header["id"] in (0, 42)
                # a REQ peer's empty delimiter frame is kept in the reply envelope
                await req.send_multipart(encode({"type": "ping", "id": 5}))
                header, _ = decode(await asyncio.wait_for(req.recv_multipart(), 5.0))
                assert header["type"] == "pong" and header["id"] == 5
                # a frame above the socket's size cap disconnects that peer without an answer
                await big.send_multipart([b"\0" * 200_000])
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(big.recv_multipart(), 0.5)
                # ...and everyone else is still served
                async with pool_of({"srv": svc.endpoint}) as pool:
                    ids, x = batch()
                    assert torch.equal(await pool.call("srv", 3, ids, x), known(3, ids, x))
                assert svc.stats.errors["bad_request"] >= 10
            finally:
                for s in (raw, req, big):
                    s.close(0)
                ctx.term()

    run(main())


def test_handler_failures_and_bad_requests_come_back_as_remote_errors() -> None:
    def picky(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> Any:
        if layer == 0:
            raise ValueError("boom")
        if layer == 1:
            return hidden[:-1]
        if layer == 2:
            raise ServiceError("not_held", f"expert {int(ids[0])} moved away")
        return "not a tensor"

    async def main() -> None:
        events: list[CallEvent] = []
        async with serving(picky) as svc, pool_of({"srv": svc.endpoint}, on_call=events.append) as pool:
            ids, x = batch()
            for layer, code, text in [
                (0, "handler_error", "ValueError: boom"),
                (1, "handler_error", "returned shape [4, 16]"),
                (2, "not_held", "moved away"),
                (3, "handler_error", "returned str"),
                (L, "bad_request", "out of range"),
            ]:
                with pytest.raises(RemoteError) as e:
                    await pool.call("srv", layer, ids, x)
                assert e.value.code == code and text in e.value.message and e.value.peer == "srv"
            with pytest.raises(RemoteError, match="bad_request"):
                await pool.call("srv", 1, torch.full((5,), E), x)
            with pytest.raises(RemoteError, match="unsupported"):
                await pool["srv"].request("drop_expert", {"layer": 0, "expert": 1})
            assert [ev.outcome for ev in events] == ["error"] * 7
            assert pool.stats()["srv"].errors == 7
            assert svc.stats.errors["handler_error"] == 3

    run(main())


def test_control_messages_for_migration() -> None:
    async def load(header: dict, tensors: dict) -> tuple[dict, dict]:
        return {"loaded": [header["layer"], header["expert"]]}, {"w2": tensors["w"] * 2}

    async def main() -> None:
        async with serving() as svc, pool_of({"srv": svc.endpoint}) as pool:
            svc.on("load_expert", load)
            with pytest.raises(ValueError):
                svc.on("expert_call", load)
            header, tensors = await pool["srv"].request(
                "load_expert", {"layer": 1, "expert": 3}, {"w": torch.ones(4, 2, dtype=torch.bfloat16)}
            )
            assert header["type"] == "ack" and header["loaded"] == [1, 3]
            assert torch.equal(tensors["w2"], torch.full((4, 2), 2.0, dtype=torch.bfloat16))

    run(main())


# ------------------------------------------------------------------------------------------ stats


def test_stats_and_call_hook() -> None:
    async def main() -> None:
        events: list[CallEvent] = []
        async with serving() as svc, pool_of({"srv": svc.endpoint}, on_call=events.append) as pool:
            for n in (1, 2, 3):
                ids, x = batch(n)
                await pool.call("srv", 1, ids, x)
            st = pool.stats()["srv"]
            assert (st.calls, st.ok, st.errors, st.unavailable) == (3, 3, 0, 0)
            assert [(ev.tokens, ev.layer, ev.attempts, ev.outcome) for ev in events] == [
                (1, 1, 1, "ok"),
                (2, 1, 1, "ok"),
                (3, 1, 1, "ok"),
            ]
            assert st.bytes_sent == sum(ev.bytes_sent for ev in events) > 6 * H * 4
            assert st.bytes_received == sum(ev.bytes_received for ev in events) > 6 * H * 4
            assert st.latency_quantile(0.5) is not None and st.latency_sum_s > 0
            assert svc.stats.expert_calls == 3 and svc.stats.tokens == 6
            assert svc.stats.bytes_received == st.bytes_sent  # payload bytes, ZeroMQ framing excluded

    run(main())


# ----------------------------------------------------------------------------------- sync facade


def test_sync_facade_from_plain_threads() -> None:
    with LoopThread() as lt:
        svc = ExpertService("tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H)
        ep = lt.run(svc.start())
        try:
            pool = SyncPeerPool({"srv": ep}, loop_thread=lt)  # shares the service's loop
            try:
                ids, x = batch()
                assert torch.equal(pool.call("srv", 2, ids, x), known(2, ids, x))
                futs = [pool.submit("srv", layer, ids, x) for layer in range(L)]
                for layer, f in enumerate(futs):
                    assert torch.equal(f.result(timeout=10), known(layer, ids, x))
                many = pool.call_many({"srv": (3, ids, x)})
                assert torch.equal(many["srv"], known(3, ids, x))
                assert pool.ping("srv") > 0

                def worker(i: int) -> bool:
                    wi, wx = batch(3, seed=i)
                    return torch.equal(pool.call("srv", i % L, wi, wx), known(i % L, wi, wx))

                with ThreadPoolExecutor(4) as ex:
                    assert all(ex.map(worker, range(16)))
                # call, submits, call_many, ping, worker calls
                assert pool.stats()["srv"].ok == 1 + 4 + 1 + 1 + 16
            finally:
                pool.close()
        finally:
            lt.run(svc.close())
    with pytest.raises(RuntimeError, match="closed"):
        lt.submit(asyncio.sleep(0))


def test_sync_facade_own_loop_and_unavailable_peer() -> None:
    pool = SyncPeerPool({"gone": dead_endpoint()}, timeout=0.2, retries=0)
    try:
        assert pool.loop_thread._thread.is_alive()
        ids, x = batch()
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            pool.call("gone", 0, ids, x)
        assert time.monotonic() - t0 < 2.0
    finally:
        pool.close()
    assert not pool.loop_thread._thread.is_alive()
    assert threading.active_count() < 50


# ---------------------------------------------------------------------------------------- security


def test_curve_accepts_cluster_keys_and_refuses_others(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path / "cluster", ["a", "b"])
    make_cluster_keys(tmp_path / "foreign", ["mallory"])
    a, b = load_identity(tmp_path / "cluster", "a"), load_identity(tmp_path / "cluster", "b")
    foreign = load_identity(tmp_path / "foreign", "mallory")
    # mallory knows b's public key (it is public) but hers is not in the cluster's folder
    mallory = CurveIdentity("mallory", foreign.public_key, foreign.secret_key, public_dir=a.public_dir)

    async def main() -> None:
        ids, x = batch()
        async with serving(identity=b, name="b") as svc:
            async with pool_of({"b": svc.endpoint}, identity=a) as pool:
                assert torch.equal(await pool.call("b", 1, ids, x), known(1, ids, x))
            for ident in (mallory, None):  # foreign key; plaintext client
                async with pool_of({"b": svc.endpoint}, identity=ident, timeout=0.3, retries=1) as pool:
                    t0 = time.monotonic()
                    with pytest.raises(PeerUnavailable):
                        await pool.call("b", 1, ids, x)
                    assert time.monotonic() - t0 < 3.0
            async with pool_of({"b": svc.endpoint}, identity=a) as pool:  # still serving the cluster
                assert torch.equal(await pool.call("b", 2, ids, x), known(2, ids, x))

    run(main())


# --------------------------------------------------------------------------------------- emulation


def test_link_emulator_queues_bandwidth_and_overlaps_delay() -> None:
    link = LinkEmulator(LinkProfile(delay_ms=10, bandwidth_mbps=8))  # 1 MB/s
    assert link.reserve("up", 1_000_000, now=0.0) == pytest.approx(1.01)
    assert link.reserve("up", 1_000_000, now=0.0) == pytest.approx(2.01)  # queued behind the first
    assert link.reserve("down", 500_000, now=0.0) == pytest.approx(0.51)  # other direction is free
    assert link.reserve("up", 0, now=5.0) == pytest.approx(5.01)  # idle link: delay only
    assert LinkProfile().serialisation_s(10**9) == 0.0
    with pytest.raises(ValueError):
        LinkProfile(delay_ms=-1)
    with pytest.raises(ValueError):
        LinkProfile(bandwidth_mbps=0)


def test_emulated_link_adds_at_least_the_configured_time() -> None:
    async def main() -> None:
        async with serving() as svc:
            ids, x = batch(64)
            async with pool_of({"srv": svc.endpoint}, links={"srv": LinkProfile(delay_ms=40)}) as pool:
                t0 = time.monotonic()
                assert torch.equal(await pool.call("srv", 1, ids, x), known(1, ids, x))
                assert time.monotonic() - t0 >= 0.08 * 0.95  # one-way delay, both directions
            slow = LinkProfile(bandwidth_mbps=1.0)
            async with pool_of({"srv": svc.endpoint}, links={"srv": slow}) as pool:
                t0 = time.monotonic()
                await asyncio.gather(*(pool.call("srv", 1, ids, x) for _ in range(3)))
                # 3 x (request >= 64*16*4 + 64*8 bytes, reply >= 64*16*4 bytes) through one 1 Mbit/s link;
                # requests queue behind each other, replies too
                per_call = slow.serialisation_s(64 * H * 4 + 64 * 8) + slow.serialisation_s(64 * H * 4)
                assert time.monotonic() - t0 >= 3 * per_call * 0.5 + per_call * 0.5

    run(main())


# ------------------------------------------------------------------------------- execution modes


def test_inline_mode_runs_sync_handlers_on_the_io_thread_with_all_checks() -> None:
    threads: list[str] = []

    def picky(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> Any:
        threads.append(threading.current_thread().name)
        if layer == 0:
            raise ValueError("boom")
        if layer == 1:
            return hidden[:-1]
        if layer == 2:
            raise ServiceError("not_held", "moved away")
        return known(layer, ids, hidden)

    def load(header: dict, tensors: dict) -> tuple[dict, dict]:  # sync control handler: off the loop
        return {"on": threading.current_thread().name}, {}

    async def main() -> None:
        async with serving(picky, compute_threads=0) as svc, pool_of({"srv": svc.endpoint}) as pool:
            assert svc.inline
            svc.on("load_expert", load)
            loop_thread = threading.current_thread().name
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                ids, x = batch(6, dtype)
                assert torch.equal(await pool.call("srv", 3, ids, x), known(3, ids, x))
            for layer, code in [
                (0, "handler_error"),
                (1, "handler_error"),
                (2, "not_held"),
                (L, "bad_request"),
            ]:
                with pytest.raises(RemoteError) as e:
                    await pool.call("srv", layer, ids, x)
                assert e.value.code == code
            # inline: the service's own I/O thread, neither a worker nor the loop
            assert set(threads) == {"prism-service-srv"}
            header, _ = await pool["srv"].request("load_expert", {"layer": 0, "expert": 1})
            assert header["on"] not in (loop_thread, "prism-service-srv")
            ids, x = batch(3)
            outs = await asyncio.gather(*(pool.call("srv", 3, ids, x) for _ in range(10)))
            assert all(torch.equal(o, known(3, ids, x)) for o in outs)
            assert svc.stats.expert_calls == 3 + 3 + 10 and svc.stats.compute_s_sum > 0
            assert await pool["srv"].ping() > 0

    run(main())


def test_thread_mode_runs_sync_handlers_in_the_pool_and_bounds_inflight() -> None:
    names: list[str] = []

    def slow(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        names.append(threading.current_thread().name)
        time.sleep(0.1)
        return known(layer, ids, hidden)

    async def main() -> None:
        async with serving(slow, name="tm", compute_threads=4, max_inflight=2) as svc:
            assert not svc.inline
            async with pool_of({"srv": svc.endpoint}) as pool:
                inputs = [batch(2, seed=i) for i in range(6)]
                t0 = time.monotonic()
                outs = await asyncio.gather(*(pool.call("srv", 1, ids, x) for ids, x in inputs))
                elapsed = time.monotonic() - t0
                assert all(torch.equal(o, known(1, i, x)) for o, (i, x) in zip(outs, inputs, strict=True))
                assert elapsed >= 3 * 0.1 * 0.95  # max_inflight=2 holds although 4 threads are free
                assert all(n.startswith("experts-tm") for n in names)

    run(main())
    with pytest.raises(ValueError, match="compute_threads"):
        ExpertService(
            "tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H, compute_threads=-1
        )


def test_service_close_with_a_handler_still_running_in_a_thread() -> None:
    started = threading.Event()

    def slow(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        started.set()
        time.sleep(0.3)
        return hidden

    async def main() -> None:
        async with serving(slow) as svc, pool_of({"srv": svc.endpoint}, timeout=1.0, retries=0) as pool:
            ids, x = batch()
            call = asyncio.create_task(pool.call("srv", 0, ids, x))
            while not started.is_set():
                await asyncio.sleep(0.01)
            await svc.close()  # the late result is dropped, nothing breaks
            with pytest.raises(PeerUnavailable):
                await call
            await asyncio.sleep(0.4)  # the worker finishes after the close

    run(main())


def test_reply_between_a_deadline_and_its_retry_is_kept() -> None:
    async def main() -> None:
        async with serving() as svc, PeerClient("srv", svc.endpoint) as client:
            loop = asyncio.get_running_loop()
            expired = loop.create_future()
            expired.set_exception(transport._AttemptExpired())
            client._pending[7] = expired
            client._deliver(7, ({"type": "pong", "id": 7}, {}, 10))
            kept = client._pending.pop(7)
            assert kept is not expired and kept.result()[0]["id"] == 7
            client._deliver(8, ({"type": "pong", "id": 8}, {}, 10))  # nobody waits for 8
            assert client.stats.unmatched_replies == 1
            expired.exception()

    run(main())


def test_loop_thread_submit_results_errors_and_cancellation() -> None:
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    async def fail() -> None:
        raise KeyError("nope")

    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def cancel_self() -> None:
        raise asyncio.CancelledError

    with LoopThread() as lt:
        assert lt.submit(add(2, 3)).result(5) == 5
        with pytest.raises(KeyError, match="nope"):
            lt.run(fail())
        f = lt.submit(forever())
        time.sleep(0.05)
        assert f.cancel()
        assert cancelled.wait(5)
        with pytest.raises(concurrent.futures.CancelledError):  # as with run_coroutine_threadsafe
            lt.submit(cancel_self()).result(5)
        with pytest.raises(TimeoutError):
            lt.run(forever(), timeout=0.05)


# ------------------------------------------------------------------ direct calls (no loop hop)


def _connected(pool: SyncPeerPool, peer: str, ids: torch.Tensor, x: torch.Tensor) -> None:
    """Make the peer's direct socket connected (its first call goes the loop way while it connects)."""
    deadline = time.monotonic() + 5
    while True:
        call = pool.start_call(peer, 0, ids, x)
        call.result(5)
        if isinstance(call, transport.DirectCall):
            return
        assert time.monotonic() < deadline, "the direct socket never connected"
        time.sleep(0.02)


@pytest.mark.parametrize("inline", [False, True])
def test_direct_calls_are_exact_and_fall_back_when_the_link_is_busy(inline: bool) -> None:
    with LoopThread() as lt:
        kw: dict[str, Any] = {"compute_threads": 0} if inline else {}
        svc = ExpertService("tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H, **kw)
        ep = lt.run(svc.start())
        events: list[CallEvent] = []
        pool = SyncPeerPool({"srv": ep}, loop_thread=lt, on_call=events.append)
        try:
            ids, x = batch()
            _connected(pool, "srv", ids, x)
            first = pool.start_call("srv", 1, ids, x)
            second = pool.start_call("srv", 2, ids, x)  # the direct socket is held by `first`
            assert isinstance(first, transport.DirectCall)
            assert isinstance(second, concurrent.futures.Future)
            assert torch.equal(second.result(5), known(2, ids, x))
            assert torch.equal(first.result(5), known(1, ids, x))
            assert first.done() and torch.equal(first.result(), known(1, ids, x))  # the result is kept
            for dtype in (torch.float16, torch.bfloat16):
                ids, xd = batch(4, dtype)
                call = pool.start_call("srv", 3, ids.int(), xd)
                assert isinstance(call, transport.DirectCall)
                out = call.result(5)
                assert out.dtype == dtype and torch.equal(out, known(3, ids, xd))
            empty = pool.call("srv", 0, torch.empty(0, dtype=torch.int64), torch.empty(0, H))
            assert empty.shape == (0, H)
            ok = [e for e in events if e.outcome == "ok" and e.type == "expert_call"]
            assert len(ok) == pool.stats()["srv"].ok == len(events)
            assert events[-1].bytes_sent > 0 and events[-1].bytes_received > 0
            with pytest.raises(ValueError, match="need hidden"):
                pool.start_call("srv", 0, ids, x[:2])
            with pytest.raises(KeyError, match="unknown peer"):
                pool.start_call("nobody", 0, ids, x)
        finally:
            pool.close()
            lt.run(svc.close())


def test_direct_call_retries_times_out_and_reports_remote_errors() -> None:
    calls: list[int] = []
    release = threading.Event()

    def handler(layer: int, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        calls.append(layer)
        if layer == 1 and len(calls) == 1:
            time.sleep(0.5)  # first attempt of layer 1 is late: its reply answers the retry
        if layer == 2:
            release.wait(5)  # hangs past every deadline
        if layer == 3:
            raise ServiceError("not_held", "gone")
        return known(layer, ids, hidden)

    with LoopThread() as lt:
        svc = ExpertService(
            "tcp://127.0.0.1:*", handler, num_layers=L, num_experts=E, hidden_size=H, compute_threads=4
        )
        ep = lt.run(svc.start())
        pool = SyncPeerPool({"srv": ep}, loop_thread=lt, timeout=0.3, retries=2)
        try:
            ids, x = batch()
            _connected(pool, "srv", ids, x)
            calls.clear()
            call = pool.start_call("srv", 1, ids, x)
            assert isinstance(call, transport.DirectCall)
            assert torch.equal(call.result(), known(1, ids, x))
            assert pool.stats()["srv"].retries >= 1
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailable, match="no reply within 0.3s"):
                pool.call("srv", 2, ids, x, retries=1)
            assert 0.5 < time.monotonic() - t0 < 2.0
            with pytest.raises(RemoteError) as err:
                pool.call("srv", 3, ids, x)
            assert err.value.code == "not_held"
            # a call given up on: its late reply is dropped by the next call on that socket
            call = pool.start_call("srv", 2, ids, x, timeout=5)
            with pytest.raises(TimeoutError):
                call.result(0.05)  # still running: ask again or cancel
            assert call.cancel() and not call.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                call.result()
            release.set()
            again = pool.start_call("srv", 0, ids, x)
            assert isinstance(again, transport.DirectCall)  # cancel let go of the socket
            assert torch.equal(again.result(5), known(0, ids, x))
            assert pool.stats()["srv"].unmatched_replies >= 1
        finally:
            release.set()
            pool.close()
            lt.run(svc.close())


def test_direct_calls_go_the_loop_way_on_emulated_links_and_survive_peer_changes() -> None:
    with LoopThread() as lt:
        a = ExpertService("tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H, name="a")
        b = ExpertService(
            "tcp://127.0.0.1:*",
            lambda l, i, h: known(l, i, h) + 1,
            num_layers=L,
            num_experts=E,
            hidden_size=H,
        )
        ep_a, ep_b = lt.run(a.start()), lt.run(b.start())
        pool = SyncPeerPool(
            {"a": ep_a, "slow": ep_a}, loop_thread=lt, links={"slow": LinkProfile(delay_ms=1.0)}
        )
        try:
            ids, x = batch()
            assert isinstance(pool.start_call("slow", 0, ids, x), concurrent.futures.Future)
            _connected(pool, "a", ids, x)
            held = pool.start_call("a", 1, ids, x)
            assert isinstance(held, transport.DirectCall)
            pool.add_peer("a", ep_b)  # replaced while a call holds the old socket
            assert torch.equal(held.result(5), known(1, ids, x))  # the old peer still answers it
            _connected(pool, "a", ids, x)
            assert torch.equal(pool.call("a", 1, ids, x), known(1, ids, x) + 1)  # the new peer
            pool.remove_peer("a")
            with pytest.raises(KeyError):
                pool.start_call("a", 0, ids, x)
        finally:
            pool.close()
            lt.run(a.close())
            lt.run(b.close())


def test_direct_call_collected_after_its_deadline_takes_the_reply_that_came_in_time() -> None:
    """A layer collects its calls one after another: a reply that arrived while another call was being
    waited for must count, even if the collector comes back after the deadline."""
    with LoopThread() as lt:
        svc = ExpertService("tcp://127.0.0.1:*", known, num_layers=L, num_experts=E, hidden_size=H)
        ep = lt.run(svc.start())
        pool = SyncPeerPool({"srv": ep}, loop_thread=lt, timeout=0.2, retries=0)
        try:
            ids, x = batch()
            _connected(pool, "srv", ids, x)
            call = pool.start_call("srv", 2, ids, x)
            assert isinstance(call, transport.DirectCall)
            time.sleep(0.5)  # the reply came within milliseconds; nobody read it before the deadline
            assert torch.equal(call.result(), known(2, ids, x))
            assert pool.stats()["srv"].retries == 0
        finally:
            pool.close()
            lt.run(svc.close())


def test_direct_call_checks_the_frames_after_the_header_it_expects() -> None:
    """A peer that answers with exactly the header prism's service would send, then a wrong `out` frame:
    the call fails with bad_reply and the socket stays in step for the next call."""
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
    with LoopThread() as lt:
        pool = SyncPeerPool({"evil": f"tcp://127.0.0.1:{port}"}, loop_thread=lt, timeout=2.0, retries=0)
        try:
            ids, x = batch()
            _connected(pool, "evil", ids, x)
            for broken, says in (("short", "needs 320 bytes, frame has 316"), ("extra", "2 tensor frames followed")):
                mode["now"] = broken
                call = pool.start_call("evil", 1, ids, x)
                assert isinstance(call, transport.DirectCall)
                with pytest.raises(RemoteError, match=says) as e:
                    call.result()
                assert e.value.code == "bad_reply"
            mode["now"] = "good"
            call = pool.start_call("evil", 1, ids, x)
            assert isinstance(call, transport.DirectCall) and torch.equal(call.result(), x)
        finally:
            pool.close()
            stop.set()
            server.join(5)
            router.close(0)
            ctx.term()
