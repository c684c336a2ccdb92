"""Link EMULATION for experiments on one machine: not a network model of record, not for production.

A `LinkEmulator` makes a loopback link behave like an edge link with a one-way propagation delay and
a bandwidth cap. `PeerClient` applies it on the client side only: a request is held back until it would
have arrived over the uplink, a reply until it would have arrived over the downlink. Each direction is
a FIFO: a transfer starts when the previous one on the same direction has finished serialising
(`bytes * 8 / bandwidth`), and the propagation delay is added after serialisation, so concurrent
transfers on one link queue for bandwidth but overlap their delay, like a real link. The time the real
loopback transfer takes is added on top (small next to emulated edge links).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class LinkProfile:
    """One-way delay in ms and bandwidth cap in Mbit/s (None: unlimited), same in both directions."""

    delay_ms: float = 0.0
    bandwidth_mbps: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth_mbps must be > 0 or None, got {self.bandwidth_mbps}")

    def serialisation_s(self, nbytes: int) -> float:
        """Seconds to push `nbytes` onto the link."""
        return 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)


@dataclass
class LinkEmulator:
    """Per-link, per-direction queue state. Times are on the event loop's monotonic clock."""

    profile: LinkProfile
    _busy_until: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})

    def reserve(self, direction: Direction, nbytes: int, now: float) -> float:
        """Book a transfer of `nbytes` that is ready at `now`; return the time it arrives at the far end."""
        start = max(now, self._busy_until[direction])
        done = start + self.profile.serialisation_s(nbytes)
        self._busy_until[direction] = done
        return done + self.profile.delay_ms / 1e3

    async def transfer(self, direction: Direction, nbytes: int) -> None:
        """Sleep until `nbytes` sent now in `direction` would have arrived."""
        loop = asyncio.get_running_loop()
        arrival = self.reserve(direction, nbytes, loop.time())
        delay = arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
