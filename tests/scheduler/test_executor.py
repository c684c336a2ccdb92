"""The executor against fake servers: order of calls, slot limits, and rollback when a step fails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.scheduler.client import ControlFailed
from prism_moe.scheduler.executor import Executor, MigrationReport
from prism_moe.scheduler.migration import plan_migration

from .cases import full_swap_case

NAMES = ["a", "b", "c"]
LINK = np.ones((3, 3))


class FakeServers:
    """Holds experts per server, enforces slots and switch/drop rules like runtime/server.py does."""

    def __init__(self, hosts: np.ndarray, capacity: np.ndarray, fail: str | None = None) -> None:
        self.held = hosts.copy()
        self.routed = hosts.copy()
        self.version = dict.fromkeys(NAMES, 0)
        self.capacity, self.fail, self.log = capacity, fail, []

    def _maybe_fail(self, what: str, server: str) -> None:
        self.log.append((what, server))
        if self.fail == what:
            raise ControlFailed(server, what, "injected failure")

    def _add(self, server: str, experts) -> None:
        i = NAMES.index(server)
        for l, e in experts:
            self.held[i, l, e] = True
        assert self.held[i].sum() <= self.capacity[i], f"{server} over its slots"

    def load(self, server, experts):
        self._maybe_fail("load", server)
        self._add(server, experts)
        return {"loaded": len(experts)}

    def send(self, source, experts, to):
        self._maybe_fail("send", source)
        assert all(self.held[NAMES.index(source), l, e] for l, e in experts)
        self._add(to, experts)
        return {"sent": len(experts)}

    def switch(self, server, placement, down, drain_timeout):
        self._maybe_fail("switch", server)
        i = NAMES.index(server)
        assert not (placement.hosts[i] & ~self.held[i]).any(), "switch to experts not loaded"
        assert placement.version > self.version[server]
        self.version[server] = placement.version
        self.routed[i] = placement.hosts[i]
        return {"drained": True, "drain_ms": 0.0}

    def drop(self, server, experts):
        self._maybe_fail("drop", server)
        i = NAMES.index(server)
        for l, e in experts:
            assert not self.routed[i, l, e], "drop of a copy still routed to"
            self.held[i, l, e] = False
        return {"dropped": len(experts)}


def _run(fake: FakeServers, transfer: str = "peer"):
    old, new, cap = full_swap_case()
    versions = itertools.count(1)
    ex = Executor(fake, NAMES, LINK, cap, expert_bytes=100, next_version=lambda: next(versions), transfer=transfer)
    plan = plan_migration(old, new, cap)
    report = MigrationReport("test", 0)
    serving = ex.run(plan, Placement.from_hosts(NAMES, old, LINK), np.ones(3, bool), [], report)
    return report, serving, old, new


def test_migration_reaches_the_target_within_slots():
    old, _, cap = full_swap_case()
    fake = FakeServers(old, cap)
    report, serving, _, new = _run(fake)
    assert report.ok and (serving.hosts == new).all() and (fake.held == new).all()
    assert report.experts_loaded == 6 and report.experts_dropped == 2 and report.bytes_moved == 600
    assert all(v == serving.version for v in fake.version.values())


def test_checkpoint_transfer_moves_no_bytes_over_links():
    old, _, cap = full_swap_case()
    report, _, _, _ = _run(FakeServers(old, cap), transfer="checkpoint")
    assert report.ok and report.bytes_moved == 0


@pytest.mark.parametrize("fail", ["send", "switch"])
def test_a_failed_step_rolls_back_to_the_serving_placement(fail):
    old, _, cap = full_swap_case()
    fake = FakeServers(old, cap, fail=fail)
    report, serving, old, _ = _run(fake)
    assert not report.ok and report.rolled_back and fail in report.error
    # nothing was dropped early yet, so the old placement serves again and the extras are gone
    # the placement of the last switch all of them took (edge a gave expert 6 away before), nothing extra held
    assert (fake.held == serving.hosts).all() and serving.hosts.any(axis=0).all()
    assert serving.version == report.to_version


class FakePlanServers(FakeServers):
    """FakeServers that also take plan switches (a plan's placement switched like a placement, then its route)."""

    def __init__(self, hosts: np.ndarray, capacity: np.ndarray, fail: str | None = None,
                 fail_plan_on: str | None = None) -> None:
        super().__init__(hosts, capacity, fail)
        self.fail_plan_on = fail_plan_on
        self.executor = {n: None for n in NAMES}  # the route each server executes (None: every layer at home)

    def switch_plan(self, server, plan, down, drain_timeout):
        self.log.append(("switch_plan", server))
        if self.fail_plan_on == server and not plan.at_home:
            raise ControlFailed(server, "switch_plan", "injected failure")
        out = self.switch(server, plan.placement, down, drain_timeout)
        self.executor[server] = None if plan.at_home else plan.executor.tolist()
        return out


def _plan_run(fake: FakePlanServers, move: bool = True):
    old, new, cap = full_swap_case()
    new = new if move else old
    versions = itertools.count(1)
    ex = Executor(fake, NAMES, LINK, cap, expert_bytes=100, next_version=lambda: next(versions), transfer="peer")
    start = Placement.from_hosts(NAMES, old, LINK)
    executor = np.array([[0, 1], [1, 1], [2, 0]])  # home a runs layer 1 on b, home c layer 1 on a
    target = ExecutionPlan(Placement.from_hosts(NAMES, new, LINK), executor, np.ones((3, 2), bool), "pipeline")
    report = MigrationReport("test", 0)
    serving = ex.run(plan_migration(old, new, cap), start, np.ones(3, bool), [], report, target_plan=target,
                     serving_plan=ExecutionPlan.from_placement(start))
    return report, serving, ex, executor, old, new


@pytest.mark.parametrize("move", [True, False])
def test_a_plan_switch_loads_first_switches_the_route_last_then_drops(move):
    old, _, cap = full_swap_case()
    fake = FakePlanServers(old, cap)
    report, serving, ex, executor, _, new = _plan_run(fake, move)
    assert report.ok and (serving.hosts == new).all() and (fake.held == new).all()
    assert all(fake.executor[n] == executor.tolist() for n in NAMES)
    assert ex.plan is not None and (ex.plan.executor == executor).all() and ex.plan.placement is serving
    steps = [what for what, _ in fake.log]
    last_switch = max(i for i, s in enumerate(steps) if s == "switch_plan")
    assert "send" not in steps[last_switch:]  # every copy was loaded before the route changed
    # (drops only of copies no longer routed to: FakeServers.drop checks it)
    assert ("drop" in steps) == move


def test_a_failed_plan_switch_rolls_back_the_route():
    old, _, cap = full_swap_case()
    fake = FakePlanServers(old, cap, fail_plan_on="c")
    report, serving, ex, _, _, _ = _plan_run(fake)
    assert not report.ok and report.rolled_back
    # a and b took the plan before c refused: the rollback gives every server the serving (at-home) plan back
    assert all(fake.executor[n] is None for n in NAMES)
    assert ex.plan is not None and ex.plan.at_home and ex.plan.placement is serving
    # the placement of the last switch all of them took (edge a gave expert 6 away before), nothing extra held
    assert (fake.held == serving.hosts).all() and serving.hosts.any(axis=0).all()
