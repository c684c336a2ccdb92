"""Decayed counts and workload-shift detection: hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.scheduler.history import (
    ActivationHistory,
    change_point,
    decay_factor,
    detect_shift,
    js_divergence,
    shift_distance,
    tv_distance,
)


def test_decay_factor_halves_every_half_life():
    assert decay_factor(0, 10) == 1.0
    assert decay_factor(10, 10) == pytest.approx(0.5)
    assert decay_factor(30, 10) == pytest.approx(0.125)
    assert decay_factor(5, float("inf")) == 1.0


def test_distances_by_hand():
    p, q = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert tv_distance(p, q) == pytest.approx(1.0)
    assert js_divergence(p, q) == pytest.approx(1.0)  # bits: disjoint supports
    assert tv_distance(p, p) == 0.0 and js_divergence(p, p) == pytest.approx(0.0)
    # [0.5, 0.5, 0, 0] vs [0.25, 0.25, 0.25, 0.25]: TV = 0.5 * (0.25 + 0.25 + 0.25 + 0.25)
    assert tv_distance(np.array([.5, .5, 0, 0]), np.full(4, .25)) == pytest.approx(0.5)


def test_shift_distance_averages_layers():
    older = np.array([[[10, 0], [10, 0]]], dtype=float)  # [S=1, L=2, E=2]
    recent = np.array([[[0, 10], [10, 0]]], dtype=float)  # layer 0 flipped, layer 1 same
    assert shift_distance(older, recent).tolist() == [0.5]


def test_detect_shift_needs_enough_samples_and_a_real_change():
    older = np.zeros((3, 1, 4))
    recent = np.zeros((3, 1, 4))
    older[:, 0, 0] = 1000  # everyone used expert 0
    recent[0, 0, 3] = 1000  # server 0 moved to expert 3: TV 1
    recent[1, 0, 0] = 1000  # server 1 unchanged
    recent[2, 0, 3] = 5  # server 2 moved, but only 5 samples
    assert detect_shift(older, recent, threshold=0.3, min_per_layer=100).tolist() == [True, False, False]


def test_history_decays_rates_and_resets_on_shift():
    h = ActivationHistory((1, 1, 2), half_life=10.0, window=5.0)
    h.observe(np.array([[[100.0, 0.0]]]), now=0.0)
    h.observe(np.array([[[100.0, 0.0]]]), now=10.0)  # first batch halves: 50 + 100
    assert h.counts[0, 0].tolist() == [150.0, 0.0]
    assert h.elapsed[0] == pytest.approx(10.0)
    assert h.rates()[0, 0, 0] == pytest.approx(15.0)
    # the window keeps only the last 5 s: the shift compares it with the older part
    h.observe(np.array([[[0.0, 100.0]]]), now=20.0)
    assert h.recent()[0, 0].tolist() == [0.0, 100.0]
    assert h.older()[0, 0].tolist() == [75.0, 0.0]
    shifted = detect_shift(h.older(), h.recent(), threshold=0.5, min_per_layer=10)
    assert shifted.tolist() == [True]
    h.reset_to_recent(shifted)
    assert h.counts[0, 0].tolist() == [0.0, 100.0]


def _polls(rng: np.random.Generator, shares: np.ndarray, n: int, per_poll: int = 200) -> np.ndarray:
    """n polls of one server: [n, L, E] multinomial counts from per-layer shares [L, E]."""
    return np.stack([np.stack([rng.multinomial(per_poll, p) for p in shares]) for _ in range(n)]).astype(float)


def test_change_point_finds_where_the_routing_changed():
    rng = np.random.default_rng(0)
    layers, experts = 4, 16
    a = rng.dirichlet(np.ones(experts), size=layers)
    b = rng.dirichlet(np.ones(experts), size=layers)
    polls = np.concatenate([_polls(rng, a, 25), _polls(rng, b, 15)])
    k, gain = change_point(polls)
    assert k == 25 and gain > layers * (experts - 1)
    # no change inside the window (same law throughout, or changed before it started): keep it all
    assert change_point(_polls(rng, a, 40))[0] == 0
    assert change_point(_polls(rng, b, 40))[0] == 0
    assert change_point(_polls(rng, a, 1)) == (0, 0.0)


def test_reset_keeps_only_the_polls_after_the_change():
    rng = np.random.default_rng(1)
    a = np.array([[0.7, 0.1, 0.1, 0.1]])
    b = np.array([[0.1, 0.1, 0.1, 0.7]])
    h = ActivationHistory((2, 1, 4), half_life=1e9, window=100.0)
    polls = np.concatenate([_polls(rng, a, 30), _polls(rng, b, 10)])
    for i, p in enumerate(polls):  # server 0 shifts at poll 30; server 1 keeps law a
        h.observe(np.stack([p, _polls(rng, a, 1)[0]]), now=float(i))
    h.reset_to_recent(np.array([True, False]))
    assert h.counts[0].sum() == pytest.approx(polls[30:].sum())  # the 10 polls after the change, no blend
    assert h.elapsed[0] == pytest.approx(10.0)
    assert h.recent()[0].sum() == pytest.approx(polls[30:].sum())
    assert h.counts[1].sum() == pytest.approx(40 * 200)  # server 1 untouched
