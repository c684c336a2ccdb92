"""Properties on random clusters: constraints always hold, the exact methods agree with each other and
with brute force, and nothing beats them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from placement_toys import toy

from prism_moe.placement.mincost import max_local_value
from prism_moe.placement.optimal import solve_lp
from prism_moe.placement.problem import Problem
from prism_moe.placement.registry import ALGORITHMS, place

CHECKED = list(ALGORITHMS)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw, max_servers=4, max_layers=3, max_experts=5):
    """(counts [S, L, E], capacities [S], rates [S]) with room for one copy of every expert."""
    s = draw(st.integers(1, max_servers))
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(1, max_experts))
    n = layers * experts
    caps = draw(st.lists(st.integers(0, n), min_size=s, max_size=s))
    short = n - sum(caps)
    for i in range(max(short, 0)):  # top up round-robin until one copy of everything fits
        while caps[i % s] >= n:
            i += 1
        caps[i % s] += 1
    values = st.integers(0, 5)  # small integers: many ties and zeros
    counts = np.array(draw(st.lists(values, min_size=s * n, max_size=s * n)), dtype=float).reshape(s, layers, experts)
    rates = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=s, max_size=s))
    return counts, caps, rates


def remote_demand(p, demand):
    return float((demand * ~p.hosts).sum())


@SETTINGS
@given(instances())
def test_every_algorithm_respects_memory_and_covers_every_expert(inst):
    counts, caps, rates = inst
    stats, cluster, model = toy(counts, caps, rates)
    for name in CHECKED:
        p = place(name, stats, cluster, model)
        assert p.hosts.shape == counts.shape
        assert p.hosts.any(axis=0).all(), name
        assert (p.experts_used() <= np.array(caps)).all(), name
        assert (np.take_along_axis(p.hosts, p.route, axis=0)).all(), name  # routes reach holders


@SETTINGS
@given(instances())
def test_optimal_is_never_beaten_and_flow_matches_it(inst):
    counts, caps, rates = inst
    stats, cluster, model = toy(counts, caps, rates)
    demand = Problem.build(stats, cluster, model).demand
    best = remote_demand(place("optimal", stats, cluster, model), demand)
    tol = 1e-9 * max(1.0, float(demand.sum()))
    assert remote_demand(place("flow", stats, cluster, model), demand) == pytest.approx(best, abs=tol)
    for name in CHECKED:
        assert remote_demand(place(name, stats, cluster, model), demand) >= best - tol, name


def brute_force_best(value: np.ndarray, caps: list[int]) -> float:
    """Max held value over every choice of full servers that covers all experts. value: [S, N]."""
    s, n = value.shape
    choices = [list(itertools.combinations(range(n), min(c, n))) for c in caps]
    best = -math.inf
    for pick in itertools.product(*choices):
        covered = set().union(*map(set, pick))
        if len(covered) == n:
            best = max(best, sum(value[i, list(p)].sum() for i, p in enumerate(pick)))
    return best


@settings(max_examples=60, deadline=None)
@given(instances(max_servers=3, max_layers=2, max_experts=3))
def test_exact_solvers_equal_brute_force(inst):
    counts, caps, rates = inst
    stats, cluster, model = toy(counts, caps, rates)
    problem = Problem.build(stats, cluster, model)
    value = problem.demand.reshape(len(caps), -1)
    best = brute_force_best(value, caps)
    for solve in (solve_lp, max_local_value):
        hosts = solve(value, np.array(caps))
        assert hosts.any(axis=0).all() and (hosts.sum(axis=1) <= np.array(caps)).all()
        assert float((value * hosts).sum()) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("kind", ["uniform-random", "integer-ties", "shared-popularity", "sparse"])
def test_min_cost_flow_equals_lp_on_larger_instances(kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(25):
        s, n = int(rng.integers(2, 8)), int(rng.integers(5, 80))
        if kind == "uniform-random":
            value = rng.random((s, n))
        elif kind == "integer-ties":
            value = rng.integers(0, 4, (s, n)).astype(float)
        elif kind == "shared-popularity":
            value = np.outer(rng.random(s) + 0.5, rng.random(n) ** 3) * rng.lognormal(0, 0.3, (s, n))
        else:
            value = (rng.random((s, n)) < 0.2) * rng.random((s, n))
        caps = rng.integers(max(1, n // (2 * s)), n + 1, s)
        while caps.sum() < n:
            caps[rng.integers(s)] += 1
        caps = np.minimum(caps, n)
        a, b = max_local_value(value, caps), solve_lp(value, caps)
        for hosts in (a, b):
            assert hosts.any(axis=0).all() and (hosts.sum(axis=1) <= caps).all()
        assert float((value * a).sum()) == pytest.approx(float((value * b).sum()), rel=1e-12, abs=1e-12)


def test_exact_solvers_do_not_depend_on_the_scale_of_demand():
    # integer units relative to the largest value: tiny or huge demands give the same placement
    rng = np.random.default_rng(5)
    value = np.round(rng.random((5, 60)) ** 3 * 40)  # integer counts: many ties
    caps = np.array([12, 12, 15, 15, 20])
    for solve in (max_local_value, solve_lp):
        base = solve(value, caps)
        for scale in (1e-12, 1e-6, 1e6):
            assert (solve(value * scale, caps) == base).all()
