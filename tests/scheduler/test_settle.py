"""One re-plan for shifts detected close together: the settle rule, its wiring, and the minimal move set."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from prism_moe.placement.cost import migration_bytes
from prism_moe.placement.placement import Placement
from prism_moe.scheduler import coordinator as coordinator_mod
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig
from prism_moe.scheduler.history import PendingShifts, replan_due
from prism_moe.scheduler.migration import minimal_move_bytes, plan_migration


def test_replan_due_waits_for_quiet_then_caps():
    assert not replan_due(None, None, now=100.0, settle=5.0)  # nothing pending
    assert not replan_due(10.0, 10.0, now=14.9, settle=5.0)
    assert replan_due(10.0, 10.0, now=15.0, settle=5.0)
    assert not replan_due(10.0, 13.0, now=17.0, settle=5.0)  # a later shift extends the wait
    assert replan_due(10.0, 13.0, now=18.0, settle=5.0)
    assert replan_due(10.0, 24.0, now=25.0, settle=5.0)  # cap: 3 x settle after the first
    assert not replan_due(10.0, 24.0, now=25.0, settle=5.0, max_wait=20.0)
    assert replan_due(10.0, 10.0, now=10.0, settle=0.0)  # no settle: at once


def test_pending_shifts_fold_servers_into_one_take():
    p = PendingShifts(settle=2.0)
    p.add([], now=0.0)
    assert not p.due(100.0)
    p.add(["a"], now=10.0)
    p.add(["b", "a"], now=11.0)
    assert not p.due(12.5)
    p.add(["c"], now=12.5)
    assert not p.due(14.0) and p.due(14.5)
    assert p.take() == ["a", "b", "c"]
    assert not p.due(100.0) and p.take() == []


def _bare_coordinator(monkeypatch, polls, settle=2.0):
    """A Coordinator with only what step() uses: scripted polls, a fake clock, recorded re-plans."""
    c = Coordinator.__new__(Coordinator)
    c.config = CoordinatorConfig(period=1e9, settle=settle)
    c.pending_shifts = PendingShifts(c.config.settle, c.config.settle_max)
    c._replan_now = threading.Event()
    c._stop = threading.Event()
    c._last_plan = 0.0
    clock = {"t": 0.0}
    monkeypatch.setattr(coordinator_mod.time, "monotonic", lambda: clock["t"])
    it = iter(polls)
    c.poll = lambda: ([], [], next(it))
    c.replans = []
    c.replan = lambda reason="requested", dry_run=False: c.replans.append((clock["t"], reason))
    c.holds_control = lambda: True  # the control lease and the rebuilt state are test_control_plane's
    c.reconciled = True
    return c, clock


def test_step_replans_once_for_servers_shifting_a_few_polls_apart(monkeypatch):
    # edge-a shifts at t=1, edge-b at t=2, edge-c at t=3.5 (as detection lags differ); polls every 0.5 s
    times = [0.5 * i for i in range(1, 21)]
    shifted = {1.0: ["edge-a"], 2.0: ["edge-b"], 3.5: ["edge-c"]}
    c, clock = _bare_coordinator(monkeypatch, [shifted.get(t, []) for t in times])
    for t in times:
        clock["t"] = t
        c.step()
    assert c.replans == [(5.5, "workload shift on edge-a, edge-b, edge-c")]


def test_step_without_settle_replans_at_each_shift(monkeypatch):
    c, clock = _bare_coordinator(monkeypatch, [["edge-a"], [], ["edge-b"]], settle=0.0)
    for t in (1.0, 2.0, 3.0):
        clock["t"] = t
        c.step()
    assert [t for t, _ in c.replans] == [1.0, 3.0]


def test_a_requested_replan_covers_pending_shifts(monkeypatch):
    c, clock = _bare_coordinator(monkeypatch, [["edge-a"], [], [], [], []])
    clock["t"] = 1.0
    c.step()
    c.request_replan()
    for t in (1.5, 2.0, 4.0, 6.0):
        clock["t"] = t
        c.step()
    assert c.replans == [(1.5, "requested")]


def test_minimal_move_bytes_is_the_cost_models_migration_bytes():
    rng = np.random.default_rng(0)
    old = rng.random((3, 2, 8)) < 0.5
    new = rng.random((3, 2, 8)) < 0.5
    old[0], new[0] = True, True  # every expert held somewhere
    names = ["a", "b", "c"]
    link = np.ones((3, 3)) - np.eye(3)
    p_old = Placement.from_hosts(names, old, link, None, "x")
    p_new = Placement.from_hosts(names, new, link, None, "x")
    assert minimal_move_bytes(old, new, 100) == migration_bytes(p_old, p_new, None, _Model(100))
    live = np.array([True, True, False])
    assert minimal_move_bytes(old, new, 100, live) == 100 * int((new & ~old)[:2].sum())
    # a plan with room to spare loads exactly the minimal move set
    plan = plan_migration(old, new, np.full(3, 16), np.ones(3, bool))
    assert len(plan.loads) * 100 == minimal_move_bytes(old, new, 100)


class _Model:
    def __init__(self, expert_bytes: int) -> None:
        self.expert_bytes = expert_bytes


if __name__ == "__main__":
    pytest.main([__file__])


@pytest.mark.parametrize("field, value", [("poll_interval", 0.0), ("period", float("nan")), ("lease_seconds", 301.0),
                                          ("lease_seconds", 0.0), ("margin", 1.0), ("down_after", -1.0),
                                          ("settle", float("inf"))])
def test_config_refuses_values_the_loop_cannot_run_with(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        CoordinatorConfig(**{field: value})
