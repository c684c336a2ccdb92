"""Activation statistics the scheduler decides on: exponentially decayed counts and shift detection.

Shapes: S servers, L MoE layers, E experts. Counts are float [S, L, E] of routed (token, expert) pairs.
Time is passed in (seconds, any monotonic origin): nothing here reads a clock, so tests replay exactly.

Why decay and reset: decayed counts forget slowly (half-life of minutes) so noise does not move experts,
but after a real workload shift the old history would keep the old placement alive for several
half-lives. So each poll compares the recent window with the older history per server; when they
differ by more than a threshold (mean total-variation distance over layers), that server's history is
replaced by the part of the recent window after the change (`change_point`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


def decay_factor(dt: float, half_life: float) -> float:
    """Weight left on counts that are `dt` seconds old: 2^(-dt / half_life) (1 for no decay)."""
    if half_life <= 0 or math.isinf(half_life):
        return 1.0
    return 0.5 ** (max(dt, 0.0) / half_life)


def normalize(counts: np.ndarray) -> np.ndarray:
    """Per layer, counts -> shares: [..., E] -> [..., E], rows sum to 1 (uniform where a row is empty)."""
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=-1, keepdims=True)
    return np.where(tot > 0, c / np.where(tot > 0, tot, 1.0), 1.0 / c.shape[-1])


def tv_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance between distributions over the last axis: [..., E] x [..., E] -> [...]."""
    return 0.5 * np.abs(np.asarray(p, float) - np.asarray(q, float)).sum(axis=-1)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0..1) over the last axis: [..., E] x [..., E] -> [...]."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)), 0.0).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def shift_distance(older: np.ndarray, recent: np.ndarray) -> np.ndarray:
    """Per server, mean over layers of the TV distance between older and recent shares: [S, L, E] -> [S]."""
    return tv_distance(normalize(older), normalize(recent)).mean(axis=-1)


def detect_shift(older: np.ndarray, recent: np.ndarray, threshold: float, min_per_layer: float) -> np.ndarray:
    """Servers whose recent routing left their older history: bool [S].

    older, recent: counts [S, L, E]. A server needs at least `min_per_layer` recent and older invocations
    per layer on average: with few samples the empirical shares are noisy (E[TV] of n samples from a
    uniform law over E experts is about sqrt(E / (2 pi n))), and the threshold must sit above that noise.
    """
    older, recent = np.asarray(older, float), np.asarray(recent, float)
    layers = older.shape[1]
    enough = (recent.sum(axis=(1, 2)) >= min_per_layer * layers) & (older.sum(axis=(1, 2)) >= min_per_layer * layers)
    return enough & (shift_distance(older, recent) > threshold)


def change_point(samples: np.ndarray) -> tuple[int, float]:
    """Where one server's routing changed within a window of poll samples [m, L, E] (counts per poll).

    Returns (k, gain): samples k.. follow the change (k = 0: no clear change inside the window). The split
    maximises the multinomial log-likelihood ratio of "two segments" over "one segment", per layer summed
    over layers; with no change that gain is noise of mean about L (E - 1) / 2 (half a chi-square), so a
    split counts only when the gain exceeds twice that.
    """
    x = np.asarray(samples, dtype=np.float64)
    m, layers, experts = x.shape
    if m < 2:
        return 0, 0.0
    prefix = np.cumsum(x, axis=0)[:-1]  # [m-1, L, E]: samples before split k = 1..m-1
    total = prefix[-1] + x[-1]
    suffix = total[None] - prefix

    def loglik(c: np.ndarray) -> np.ndarray:  # sum_e c log(c / n) per layer, summed over layers
        n = c.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(c > 0, c * np.log(np.where(c > 0, c, 1.0) / np.where(n > 0, n, 1.0)), 0.0)
        return t.sum(axis=(-1, -2))

    gain = loglik(prefix) + loglik(suffix) - loglik(total[None])  # [m-1]
    k = int(np.argmax(gain))
    if gain[k] <= layers * (experts - 1):
        return 0, float(gain[k])
    return k + 1, float(gain[k])


@dataclass
class ActivationHistory:
    """Decayed counts per server, plus a sliding recent window for shift detection.

    `observe(deltas, now)` adds one poll's new counts; `rates()` gives invocations per second
    [S, L, E] (decayed counts over decayed elapsed time, so a server reset to its window is not
    under-estimated).
    """

    shape: tuple[int, int, int]
    half_life: float = 300.0
    window: float = 30.0
    counts: np.ndarray = field(init=False)
    elapsed: np.ndarray = field(init=False)  # [S] decayed seconds of observation behind `counts`
    _recent: deque[tuple[float, np.ndarray]] = field(init=False, default_factory=deque)
    _last: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.shape)
        self.elapsed = np.zeros(self.shape[0])

    def observe(self, deltas: np.ndarray, now: float) -> None:
        """Add counts [S, L, E] that arrived since the previous call."""
        deltas = np.asarray(deltas, dtype=np.float64)
        dt = 0.0 if self._last is None else max(now - self._last, 0.0)
        f = decay_factor(dt, self.half_life)
        self.counts = self.counts * f + deltas
        self.elapsed = self.elapsed * f + dt
        self._last = now
        self._recent.append((now, deltas))
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def recent(self) -> np.ndarray:
        """Counts of the recent window, undecayed: [S, L, E]."""
        out = np.zeros(self.shape)
        for _, d in self._recent:
            out += d
        return out

    def older(self) -> np.ndarray:
        """The history without the recent window (decay makes this approximate; clipped at 0): [S, L, E]."""
        return np.clip(self.counts - self.recent(), 0.0, None)

    def window_seconds(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        return self._recent[-1][0] - self._recent[0][0]

    def reset_to_recent(self, servers: np.ndarray) -> None:
        """Forget the history of `servers` (bool [S]) except what the recent window saw after the change.

        A shift is detected once the window differs enough from the older history, typically while the
        window still holds polls from before the change: those are dropped too (`change_point`), or the
        first re-plan would fit a blend of both workloads and a later one move experts again.
        """
        if not self._recent:
            self.counts[servers] = 0.0
            self.elapsed[servers] = 0.0
            return
        times = [t for t, _ in self._recent]
        stacked = np.stack([d for _, d in self._recent])  # [m, S, L, E]
        for s in np.flatnonzero(servers):
            k, _ = change_point(stacked[:, s])
            self.counts[s] = stacked[k:, s].sum(axis=0)
            # each poll's deltas cover the time since the previous poll
            start = times[k - 1] if k > 0 else times[0] - (times[1] - times[0] if len(times) > 1 else 0.0)
            self.elapsed[s] = max(times[-1] - start, 1e-9)
            for _, d in list(self._recent)[:k]:  # older polls of this server leave the window as well
                d[s] = 0.0

    def forget(self, server: int) -> None:
        """Drop everything known about one server (it restarted or left)."""
        self.counts[server] = 0.0
        self.elapsed[server] = 0.0
        for _, d in self._recent:
            d[server] = 0.0

    def rates(self) -> np.ndarray:
        """Invocations per second: [S, L, E] (zero for a server not yet observed)."""
        el = self.elapsed[:, None, None]
        return np.where(el > 0, self.counts / np.where(el > 0, el, 1.0), 0.0)


def replan_due(first_shift: float | None, last_shift: float | None, now: float, settle: float,
               max_wait: float | None = None) -> bool:
    """Whether the shifts pending since `first_shift` (the latest at `last_shift`) should be re-planned now.

    Servers whose workloads change together are detected a few polls apart. Re-planning at the first
    detection would decide with the others' stale statistics and migrate again at the next one, so the
    re-plan waits until no new shift has come for `settle` seconds, and at most `max_wait` seconds after
    the first (default 3 x settle) so a run of shifts cannot postpone it forever. settle <= 0: at once.
    """
    if first_shift is None:
        return False
    last = first_shift if last_shift is None else last_shift
    cap = 3.0 * settle if max_wait is None else max_wait
    return settle <= 0 or now - last >= settle or now - first_shift >= cap


@dataclass
class PendingShifts:
    """Shifted servers waiting for one re-plan (see `replan_due`). Time is passed in."""

    settle: float = 5.0
    max_wait: float | None = None
    servers: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None

    def add(self, names: list[str], now: float) -> None:
        if not names:
            return
        if self.first is None:
            self.first = now
        self.last = now
        self.servers += [n for n in names if n not in self.servers]

    def due(self, now: float) -> bool:
        return replan_due(self.first, self.last, now, self.settle, self.max_wait)

    def take(self) -> list[str]:
        """The pending servers, and forget them (a re-plan covers them)."""
        names, self.servers, self.first, self.last = self.servers, [], None, None
        return names
