"""The dispatcher's side of migration and failures, in one process on loopback ZeroMQ.

Server "a" (the dispatcher under test) sends to peers "b" and "c" (real ExpertServices whose experts
multiply by expert id + 1). A peer answering `not_held` or not answering at all is failed over to
another holder; with no other holder the call waits for a placement that re-hosts the expert, and a
switch does not wait for such a call.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from prism_moe.placement.placement import Placement
from prism_moe.runtime.dispatch import ClusterDispatcher
from prism_moe.runtime.transport import ExpertService, PeerPool, PeerUnavailable, ServiceError

NAMES = ["a", "b", "c"]
H = 4


class Peer:
    def __init__(self, name: str, held: set[int]) -> None:
        self.name, self.held, self.calls = name, held, 0

        def handler(layer: int, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            missing = set(ids.tolist()) - self.held
            if missing:
                raise ServiceError("not_held", f"{name} does not hold {sorted(missing)}")
            return x * (ids[:, None] + 1).to(x.dtype)

        self.service = ExpertService("tcp://127.0.0.1:*", handler, num_layers=1, num_experts=4, hidden_size=H,
                                     name=name)
        self.endpoint = self.service.start()


def _placement(hosts: list[list[int]], version: int, link: np.ndarray) -> Placement:
    h = np.zeros((3, 1, 4), dtype=bool)
    for s, es in enumerate(hosts):
        h[s, 0, es] = True
    return Placement.from_hosts(NAMES, h, link, version=version)


@pytest.fixture
def setup():
    b, c = Peer("b", {1, 2}), Peer("c", {1, 2, 3})
    pool = PeerPool({"b": b.endpoint, "c": c.endpoint}, name="a", timeout=0.3, retries=0)
    link = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]], dtype=float)  # a prefers b
    p0 = _placement([[0], [1, 2], [1, 2, 3]], 0, link)
    d = ClusterDispatcher("a", p0, pool, repair_wait=5.0)
    yield d, b, c, link
    d.close()
    pool.close()
    for peer in (b, c):
        peer.service.close()


def _x(n: int) -> torch.Tensor:
    return torch.arange(n * H, dtype=torch.float32).reshape(n, H)


def test_not_held_fails_over_to_another_holder(setup):
    d, b, c, _ = setup
    assert d.locate(0, 1) == "b"
    b.held.clear()  # b dropped its copies (a migration it has not been told about yet)
    ids = torch.tensor([1, 1, 2])
    out = d.remote(0, {"b": (ids, _x(3))})["b"].result(10)
    assert torch.equal(out, _x(3) * (ids[:, None] + 1))
    assert d.failovers == 1 and c.calls == 1
    assert d.inflight() == {}


def test_unavailable_peer_is_avoided_and_a_lone_copy_waits_for_the_repair(setup):
    d, b, c, link = setup
    c.service.close()  # c dies: it held the only copy of expert 3
    got: dict[str, torch.Tensor] = {}

    def model_thread() -> None:  # sends the batch and collects it: failover and repair wait included
        got["y"] = d.remote(0, {"c": (torch.tensor([3, 3]), _x(2))})["c"].result(10)

    waiter = threading.Thread(target=model_thread)
    waiter.start()
    deadline = time.monotonic() + 5
    while d.inflight() or not d.is_down("c"):  # after c's timeout the call waits for a repair: counted nowhere
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert waiter.is_alive() and d.locate(0, 1) == "b"
    b.held.add(3)  # the repair loads expert 3 on b, then every server switches
    assert d.set_placement(_placement([[0], [1, 2, 3], [1, 2, 3]], 1, link), drain_timeout=1.0)
    waiter.join(10)
    assert torch.equal(got["y"], _x(2) * 4)


def test_without_any_copy_the_call_fails_after_the_repair_wait(setup):
    d, _, c, _ = setup
    d.repair_wait = 0.2
    c.service.close()
    with pytest.raises(PeerUnavailable):
        d.remote(0, {"c": (torch.tensor([3]), _x(1))})["c"].result(10)


def test_call_answered_not_held_fails_over_on_the_callers_thread(setup):
    d, b, c, _ = setup
    ids = torch.tensor([1, 2, 2])
    reply = d.remote(0, {"b": (ids, _x(3))})["b"]
    assert torch.equal(reply.result(10), _x(3) * (ids[:, None] + 1))
    b.held.clear()
    reply = d.remote(0, {"b": (ids, _x(3))})["b"]
    assert d.inflight() == {0: 1}  # counted for draining until collected
    assert torch.equal(reply.result(10), _x(3) * (ids[:, None] + 1))
    assert d.failovers == 1 and c.calls == 1 and d.inflight() == {}
    # a reply collected by nobody is let go with cancel(): nothing stays in flight
    b.held.update({1, 2})
    reply = d.remote(0, {"b": (ids, _x(3))})["b"]
    assert reply.cancel() and d.inflight() == {}


def test_a_switch_draining_old_calls_does_not_hold_up_new_steps(setup):
    """Live migration's switch waits for calls of the old placement; steps under the new one go on."""
    d, b, c, link = setup
    release = threading.Event()
    plain = b.service.handler

    def slow_for_expert_2(layer: int, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if 2 in ids.tolist():
            release.wait(10)  # an old-version call still running on b
        return plain(layer, ids, x)

    b.service.handler = slow_for_expert_2
    try:
        old = d.remote(0, {"b": (torch.tensor([2]), _x(1))})["b"]
        assert d.inflight() == {0: 1}
        # version 1 routes experts 1 and 2 to c only (b keeps its copies until the switch has drained)
        p1 = _placement([[0], [], [1, 2, 3]], 1, link)
        switched: list[bool] = []
        switcher = threading.Thread(target=lambda: switched.append(d.set_placement(p1, drain_timeout=10)))
        switcher.start()
        time.sleep(0.1)
        assert switcher.is_alive()  # draining the old call
        t0 = time.monotonic()
        new = d.remote(0, {d.locate(0, 1): (torch.tensor([1, 1]), _x(2))})
        assert list(new) == ["c"]
        assert torch.equal(new["c"].result(10), _x(2) * 2)
        assert time.monotonic() - t0 < 2.0 and switcher.is_alive()  # the new step did not wait for the drain
        release.set()
        assert torch.equal(old.result(10), _x(1) * 3)
        switcher.join(10)
        assert switched == [True] and d.inflight() == {}
    finally:
        release.set()
        b.service.handler = plain


def test_a_failover_waiting_for_the_repair_lets_go_of_its_layers_other_direct_calls(setup):
    """Batches to b (answers) and c (stops answering; sole holder of expert 3) in one layer: collecting c's
    first makes it wait for the repair, whose switch drains version 0. b's answered batch must not stay
    counted under version 0 meanwhile, or the switch and the failover wait for each other."""
    d, b, c, link = setup
    hang = threading.Event()
    plain = c.service.handler
    c.service.handler = lambda layer, ids, x: (hang.wait(10), plain(layer, ids, x))[1]
    try:
        got: dict[str, torch.Tensor] = {}

        def model_thread() -> None:  # sends both batches, collects c first: timeout after 0.3 s, repair wait
            replies = d.remote(0, {"b": (torch.tensor([1]), _x(1)), "c": (torch.tensor([3, 3]), _x(2))})
            got["c"] = replies["c"].result(20)
            got["b"] = replies["b"].result(1)  # kept from when c's failover collected it

        waiter = threading.Thread(target=model_thread)
        waiter.start()
        deadline = time.monotonic() + 5
        while d.inflight():
            assert time.monotonic() < deadline, d.inflight_calls()
            time.sleep(0.02)
        b.held.add(3)
        assert d.set_placement(_placement([[0], [1, 2, 3], [1, 2, 3]], 1, link), drain_timeout=2.0)
        waiter.join(10)
        assert torch.equal(got["c"], _x(2) * 4)
        assert torch.equal(got["b"], _x(1) * 2)
        assert d.inflight() == {}
    finally:
        hang.set()
        c.service.handler = plain


def test_a_batch_for_a_server_declared_down_waits_for_the_repair_without_sending(setup):
    d, b, c, link = setup
    c.service.close()
    d.set_down(["c"])  # the coordinator's word: c is down; expert 3 has no other copy yet
    calls_before = c.calls
    t0 = time.monotonic()
    fut = d.remote(0, {d.locate(0, 3): (torch.tensor([3]), _x(1))})["c"]
    assert d.inflight() == {}  # counted nowhere: the repair's switch does not wait for it
    b.held.add(3)
    assert d.set_placement(_placement([[0], [1, 2, 3], [1, 2, 3]], 1, link), drain_timeout=1.0)
    assert torch.equal(fut.result(10), _x(1) * 4)
    assert time.monotonic() - t0 < 1.0  # no peer deadline (0.3 s here) waited out
    assert c.calls == calls_before


def test_declaring_a_server_down_fails_its_calls_in_flight_at_once(setup):
    """A direct call to c, which stopped answering, fails over as soon as the coordinator declares c down,
    not after its deadline (30 s here)."""
    d, b, c, link = setup
    d.pool["c"].timeout = 30.0
    hang = threading.Event()
    plain = c.service.handler
    c.service.handler = lambda layer, ids, x: (hang.wait(10), plain(layer, ids, x))[1]
    try:
        got: dict[str, torch.Tensor] = {}
        waiter = threading.Thread(
            target=lambda: got.setdefault("y", d.remote(0, {"c": (torch.tensor([1, 2]), _x(2))})["c"].result(20)))
        waiter.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        d.set_down(["c"])
        waiter.join(5)
        assert time.monotonic() - t0 < 1.0
        assert torch.equal(got["y"], _x(2) * torch.tensor([[2.0], [3.0]]))  # failed over to b
        assert d.failovers == 1
    finally:
        hang.set()
        c.service.handler = plain


def test_a_holder_only_suspected_is_tried_before_waiting_for_a_repair(setup):
    """A suspicion may be stale (a server resumed from SIGSTOP finds every deadline of its calls passed): when
    no unsuspected holder is left, a failover tries the suspected ones before waiting for a repair."""
    d, b, c, _ = setup
    d._suspect["b"] = time.monotonic() + 60  # b answers, but this server still suspects it
    assert d.locate(0, 1) == "c"
    c.held.clear()  # c dropped its copies: it answers not_held
    ids = torch.tensor([1, 2])
    t0 = time.monotonic()
    out = d.remote(0, {"c": (ids, _x(2))})["c"].result(10)
    assert torch.equal(out, _x(2) * (ids[:, None] + 1))
    assert time.monotonic() - t0 < 2.0 and b.calls == 1  # no repair wait (5 s here)
