"""What a simulation run measured: per request (latency, TTFT, TPOT) and per cluster."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_moe.sim.engine import EngineStats
from prism_moe.sim.workload import Requests


@dataclass
class SimResult:
    """first/finish: float [R] seconds (simulated); wall_s: the simulator's own run time."""

    server_names: tuple[str, ...]
    requests: Requests
    first: np.ndarray
    finish: np.ndarray
    stats: EngineStats
    wall_s: float
    label: str = ""
    kv_peak_bytes: dict | None = None  # per server: the most KV cache it kept at once (set by `simulate`)
    failed: np.ndarray | None = None  # bool [R]: lost to a server failure (their finish is NaN)

    @property
    def done(self) -> np.ndarray:
        """Requests that completed: bool [R] (all of them unless a server failed)."""
        return ~np.isnan(self.finish)

    @property
    def latency(self) -> np.ndarray:
        """End-to-end seconds per request: float [R] (NaN for requests lost to a failure)."""
        return self.finish - self.requests.arrival

    @property
    def ttft(self) -> np.ndarray:
        return self.first - self.requests.arrival

    @property
    def tpot(self) -> np.ndarray:
        """Seconds per output token after the first, for requests with >1 output token: float [R'] ."""
        multi = (self.requests.output > 1) & self.done
        return (self.finish[multi] - self.first[multi]) / (self.requests.output[multi] - 1)

    @property
    def makespan_s(self) -> float:
        return float(np.nanmax(self.finish)) if self.done.any() else 0.0

    def utilisation(self) -> np.ndarray:
        """GPU busy share per server over the run: float [S]."""
        span = self.makespan_s
        return np.array(self.stats.busy_s) / span if span > 0 else np.zeros(len(self.stats.busy_s))

    def link_utilisation(self) -> np.ndarray:
        """Busy share of each directed link over the run: float [S, S] (serving traffic only)."""
        span = self.makespan_s
        busy = np.array(self.stats.link_busy_s, dtype=np.float64)
        return busy / span if span > 0 else busy * 0.0

    def window(self, t0: float, t1: float = np.inf) -> np.ndarray:
        """Mask of requests that arrived in [t0, t1): bool [R]."""
        a = self.requests.arrival
        return (a >= t0) & (a < t1)

    def backlog(self) -> float:
        """Share of requests not finished when the last one arrives. Small (requests in flight / all)
        when the cluster keeps up; large when it cannot, and then the mean latency grows with the
        length of the run rather than measuring the placement."""
        if not len(self.finish):
            return 0.0
        last = float(self.requests.arrival.max())
        return float((self.finish > last).sum() / len(self.finish))

    def summary(self) -> dict:
        """Latency figures are over completed requests; `failed_requests` counts the others."""
        done = self.done
        lat, st = self.latency[done], self.stats
        pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: 0.0)
        tpot = self.tpot
        util = self.utilisation()
        out = {
            "label": self.label,
            "requests": int(len(done)),
            "mean_latency_s": float(lat.mean()) if len(lat) else 0.0,
            "p50_latency_s": pct(50),
            "p95_latency_s": pct(95),
            "p99_latency_s": pct(99),
            "mean_ttft_s": float(self.ttft[done].mean()) if len(lat) else 0.0,
            "backlog": self.backlog(),
            "max_link_utilisation": float(self.link_utilisation().max()) if len(self.server_names) > 1 else 0.0,
            "mean_tpot_s": float(tpot.mean()) if len(tpot) else 0.0,
            "cross_server_bytes": float(st.cross_bytes),
            "remote_calls": int(st.remote_calls),
            "handoffs": int(st.handoffs),
            "handoff_bytes": float(st.handoff_bytes),
            "remote_fraction": st.remote_pairs / st.pairs if st.pairs else 0.0,
            "expert_calls": int(st.pairs),
            "steps": int(st.steps),
            "events": int(st.events),
            "makespan_s": self.makespan_s,
            "utilisation": {n: float(u) for n, u in zip(self.server_names, util, strict=True)},
            "mean_latency_by_server_s": {
                n: float(lat[self.requests.server[done] == i].mean()) if (self.requests.server[done] == i).any()
                else 0.0 for i, n in enumerate(self.server_names)},
            "sim_seconds": self.wall_s,
            "expert_calls_per_s": st.pairs / self.wall_s if self.wall_s > 0 else 0.0,
        }
        if self.kv_peak_bytes is not None:
            out["kv_peak_gib"] = {n: v / 2**30 for n, v in self.kv_peak_bytes.items()}
        if st.failures:
            out["failed_requests"] = int((~done).sum())
            out["failures"] = [dict(f, server=self.server_names[f["server"]],
                                    paused_homes=[self.server_names[h] for h in f["paused_homes"]],
                                    stopped_homes=[self.server_names[h] for h in f["stopped_homes"]])
                               for f in st.failures]
        if st.migrations:
            out["migrations"] = [{k: v for k, v in m.items() if k in ("start", "end", "bytes", "experts", "dense_layers")}
                                 for m in st.migrations]
        return out
