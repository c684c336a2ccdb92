"""Migration ordering: every step stays within the slots, every switch is covered, drops follow switches."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_moe.scheduler.migration import plan_migration

from .cases import full_swap_case


def _check(old, new, cap, live, plan):
    """Replay the plan: slots, sources, coverage, switch-before-drop. Returns the final hosts."""
    held = old & live[:, None, None]
    serving = held.copy()
    for rnd in plan.rounds:
        start = held.copy()
        for ld in rnd.loads:
            assert live[ld.server]
            assert not held[ld.server, ld.layer, ld.expert]
            if ld.source is not None:
                assert live[ld.source] and start[ld.source, ld.layer, ld.expert]
            else:
                assert not (start[:, ld.layer, ld.expert] & live).any()  # checkpoint only when no live copy
            held[ld.server, ld.layer, ld.expert] = True
            assert held[ld.server].sum() <= max(cap[ld.server], old[ld.server].sum())
        if rnd.switch is not None:
            assert not (rnd.switch & ~held).any(), "a switch routes to a copy not loaded"
            # an expert with no live copy at all (repair) is covered once loaded; no other may go uncovered
            assert (rnd.switch.any(axis=0) == held.any(axis=0)).all(), "a switch leaves an expert without a holder"
            assert not rnd.switch[~live].any()
            serving = rnd.switch
        for s, l, e in rnd.drops:
            assert held[s, l, e] and not serving[s, l, e], "drop of a copy still routed to"
            held[s, l, e] = False
            assert held.any(axis=0)[l, e]
    assert (plan.reached == serving).all() and (held == serving).all()
    if plan.skipped == 0:
        assert held.any(axis=0).all()
    return held


def test_two_full_servers_swap_through_an_intermediate_switch():
    # the worked case of the multi-process test, as pure arrays: 3 servers, 2 layers x 8 experts, 8 slots
    old, new, cap = full_swap_case()
    plan = plan_migration(old, new, cap)
    _check(old, new, cap, np.ones(3, bool), plan)
    assert plan.skipped == 0 and (plan.reached == new).all()
    assert sum(r.early for r in plan.rounds) == 1  # a must drop expert 6 before its last loads


def test_deadlocked_swap_is_skipped_and_stays_valid():
    old = np.array([[[True, False]], [[False, True]]])
    new = ~old
    cap = np.array([1, 1])
    plan = plan_migration(old, new, cap)
    _check(old, new, cap, np.ones(2, bool), plan)
    assert plan.skipped == 2 and (plan.reached == old).all()


def test_repair_loads_from_checkpoint_when_no_live_copy():
    old = np.array([[[True, False]], [[False, True]]])
    new = np.array([[[True, True]], [[False, False]]])
    live = np.array([True, False])
    plan = plan_migration(old, new, np.array([2, 2]), live)
    assert [ld.source for ld in plan.loads] == [None]
    _check(old, new, np.array([2, 2]), live, plan)


@st.composite
def _case(draw):
    s = draw(st.integers(2, 4))
    layers = draw(st.integers(1, 2))
    experts = draw(st.integers(1, 5))
    n = layers * experts
    cap = np.array([draw(st.integers(1, n)) for _ in range(s)])
    live = np.array([draw(st.booleans()) for _ in range(s)])
    live[draw(st.integers(0, s - 1))] = True
    if cap[live].sum() < n:
        cap[np.flatnonzero(live)[0]] = n

    def hosts(only_live: bool) -> np.ndarray:
        h = np.zeros((s, layers, experts), dtype=bool)
        rows = np.flatnonzero(live) if only_live else np.arange(s)
        order = [(l, e) for l in range(layers) for e in range(experts)]
        for l, e in order:  # one copy of each expert, where there is room
            free = [i for i in rows if h[i].sum() < cap[i]]
            h[draw(st.sampled_from(free)), l, e] = True
        for i in rows:  # then some replicas
            for l, e in order:
                if h[i].sum() < cap[i] and draw(st.booleans()):
                    h[i, l, e] = True
        return h

    return hosts(False), hosts(True), cap, live


@settings(max_examples=150, deadline=None)
@given(_case())
def test_random_plans_never_exceed_slots(case):
    old, new, cap, live = case
    plan = plan_migration(old, new, cap, live)
    final = _check(old, new, cap, live, plan)
    if plan.skipped == 0:
        assert (final == new & live[:, None, None]).all()
