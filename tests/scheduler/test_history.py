"""Decayed counts and workload-shift detection: hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.scheduler.history import (
    ActivationHistory,
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
