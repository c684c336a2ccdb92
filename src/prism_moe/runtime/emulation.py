"""Link EMULATION for experiments on one machine: not a network model of record, not for production.

The expert service (the callee) applies it to each caller's traffic, on its I/O thread, so a caller's
remote-call path is the same on emulated and real links. Per caller, a `LinkEmulator` makes the loopback
link behave like an edge link with a one-way propagation delay and a bandwidth cap: a request is held
until it would have arrived over the uplink, a reply until it would have arrived over the downlink. Each
direction is a FIFO: a transfer starts when the previous one in the same direction has finished
serialising (`bytes * 8 / bandwidth`), and the propagation delay is added after serialisation, so
concurrent transfers on one link queue for bandwidth but overlap their delay, like a real link. The
real loopback time is added on top (small next to emulated edge links).

A profile with `drop=True` is a partition: everything between the caller and the service is dropped,
in both directions, while the TCP connection stays up (the caller only sees its deadlines pass, as with
a hung peer). `LinkTable` holds a service's profiles by caller name; it can change while serving.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class LinkProfile:
    """One-way delay in ms and bandwidth cap in Mbit/s (None: unlimited), same in both directions;
    `drop`: a partition (nothing gets through)."""

    delay_ms: float = 0.0
    bandwidth_mbps: float | None = None
    drop: bool = False

    def __post_init__(self) -> None:
        if not self.delay_ms >= 0:  # (also refuses NaN)
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if self.bandwidth_mbps is not None and not self.bandwidth_mbps > 0:
            raise ValueError(f"bandwidth_mbps must be > 0 or None, got {self.bandwidth_mbps}")

    def serialisation_s(self, nbytes: int) -> float:
        """Seconds to push `nbytes` onto the link."""
        return 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)


@dataclass
class LinkEmulator:
    """Per-link, per-direction queue state. Times are `time.monotonic()` seconds."""

    profile: LinkProfile
    _busy_until: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})

    def reserve(self, direction: Direction, nbytes: int, now: float) -> float:
        """Book a transfer of `nbytes` that is ready at `now`; return the time it arrives at the far end."""
        start = max(now, self._busy_until[direction])
        done = start + self.profile.serialisation_s(nbytes)
        self._busy_until[direction] = done
        return done + self.profile.delay_ms / 1e3


class LinkTable:
    """A service's emulated links by caller name (empty: nothing emulated). Thread-safe: `set` may run
    on any thread while the service's I/O thread reads `get`."""

    def __init__(self, links: Mapping[str, LinkProfile] | None = None) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, LinkEmulator] = {n: LinkEmulator(p) for n, p in (links or {}).items()}

    def __bool__(self) -> bool:
        return bool(self._links)

    def get(self, caller: str) -> LinkEmulator | None:
        return self._links.get(caller)

    def set(self, caller: str, profile: LinkProfile | None) -> None:
        """Emulate `profile` on the link from `caller` from now on (None: a plain link again)."""
        with self._lock:  # copy-on-write: the I/O thread reads the dict without a lock
            links = dict(self._links)
            if profile is None:
                links.pop(caller, None)
            else:
                links[caller] = LinkEmulator(profile)
            self._links = links

    def profiles(self) -> dict[str, LinkProfile]:
        return {n: e.profile for n, e in self._links.items()}
