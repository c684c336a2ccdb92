"""Prometheus metrics of one edge server, in a registry of its own.

Each `ServerMetrics` owns a `CollectorRegistry` (not prometheus-client's global one), so several servers can
live in one test process and `/metrics` shows only its own server. The HTTP layer records requests, the engine
reports per-request timings through `observe_generation`, the dispatcher adds its device-side expert counts
through `count_experts` when metrics are rendered (`refreshers`), and the transport calls `observe_remote_call`
from its own threads (prometheus-client metrics are
thread-safe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

if TYPE_CHECKING:
    from prism_moe.runtime.engine import RequestStats

PREFIX = "prism"

# Buckets in seconds. Edge links add milliseconds; CPU test models take tens of milliseconds per step.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
REMOTE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class ServerMetrics:
    """All metrics of one server; `render()` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: str | None = None) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, PREFIX
        # --- HTTP / requests -------------------------------------------------------------------------------
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram(f"{p}_request_latency_seconds",
                                         "HTTP request latency, until the last byte of the response",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram(f"{p}_generation_latency_seconds",
                                     "Time from submission to the last token, per generation",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(f"{p}_generations", "Finished generations by finish reason", ["reason"], registry=r)
        self.running = Gauge(f"{p}_requests_running", "Generations that have produced their first token",
                             registry=r)
        self.waiting = Gauge(f"{p}_requests_waiting", "Generations submitted that have no token yet", registry=r)
        # --- experts and peers -----------------------------------------------------------------------------
        self.expert_invocations = Counter(f"{p}_expert_invocations",
                                          "Routed (token, expert) pairs computed locally or on a peer",
                                          ["layer", "kind"], registry=r)
        self.peer_bytes_sent = Counter(f"{p}_peer_bytes_sent", "Bytes sent to a peer", ["peer"], registry=r)
        self.peer_bytes_received = Counter(f"{p}_peer_bytes_received", "Bytes received from a peer", ["peer"],
                                           registry=r)
        self.remote_call_latency = Histogram(f"{p}_remote_call_latency_seconds",
                                             "Round trip of one batched remote expert call", ["peer"],
                                             buckets=REMOTE_BUCKETS, registry=r)
        self.handoff_latency = Histogram(f"{p}_handoff_latency_seconds",
                                         "Round trip of one layer-block hand-off to a peer (execution plans)", ["peer"],
                                         buckets=REMOTE_BUCKETS, registry=r)
        self.block_cache_requests = Gauge(f"{p}_block_cache_requests",
                                          "Peers' requests whose KV cache of a layer block this server holds",
                                          registry=r)
        self.block_cache_bytes = Gauge(f"{p}_block_cache_bytes",
                                       "Bytes allocated for peers' layer-block KV caches", registry=r)
        self.remote_call_errors = Counter(f"{p}_remote_call_errors", "Remote expert calls that failed", ["peer"],
                                          registry=r)
        # --- state -----------------------------------------------------------------------------------------
        self.resident_weight_bytes = Gauge(f"{p}_resident_weight_bytes",
                                           "Bytes of model weights held by this server (dense part + experts)",
                                           registry=r)
        self.placement_version = Gauge(f"{p}_placement_version", "Version of the expert placement in use",
                                       registry=r)
        self.trace_replay = Gauge(f"{p}_trace_replay", "1 when routing is replayed from a benchmark trace",
                                  registry=r)
        # Label children looked up once: `count_experts` runs once per MoE layer per flush.
        self._expert_children: dict[tuple[int, str], Counter] = {}
        # called before each render: counts kept elsewhere (the dispatcher's device counter) are added then
        self.refreshers: list[Callable[[], None]] = []

    # --- called by the HTTP layer ----------------------------------------------------------------------------
    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_latency.labels(endpoint=endpoint).observe(seconds)

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    # --- called by the engine (a stats listener, on the event loop) ------------------------------------------
    def observe_generation(self, stats: RequestStats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.completion_tokens)
        self.finished.labels(reason=stats.finish_reason).inc()
        if stats.ttft_s is not None:
            self.ttft.observe(stats.ttft_s)
        if stats.tpot_s is not None:
            self.tpot.observe(stats.tpot_s)
        self.e2e_latency.observe(stats.latency_s)

    # --- called by the experts hook and the transport ---------------------------------------------------------
    def count_experts(self, layer: int, local_n: int, remote_n: int) -> None:
        """Add `local_n` / `remote_n` routed (token, expert) pairs of MoE layer `layer`."""
        if local_n:
            self._expert_child(layer, "local").inc(local_n)
        if remote_n:
            self._expert_child(layer, "remote").inc(remote_n)

    def observe_remote_call(self, peer: str, seconds: float, bytes_out: int, bytes_in: int) -> None:
        self.remote_call_latency.labels(peer=peer).observe(seconds)
        self.observe_peer_bytes(peer, bytes_out, bytes_in)

    def observe_peer_bytes(self, peer: str, bytes_out: int, bytes_in: int) -> None:
        self.peer_bytes_sent.labels(peer=peer).inc(bytes_out)
        self.peer_bytes_received.labels(peer=peer).inc(bytes_in)

    def observe_handoff(self, peer: str, seconds: float, bytes_out: int, bytes_in: int) -> None:
        self.handoff_latency.labels(peer=peer).observe(seconds)
        self.observe_peer_bytes(peer, bytes_out, bytes_in)

    def set_block_cache(self, requests: int, nbytes: int) -> None:
        self.block_cache_requests.set(requests)
        self.block_cache_bytes.set(nbytes)

    def observe_remote_error(self, peer: str) -> None:
        self.remote_call_errors.labels(peer=peer).inc()

    def set_resident_weight_bytes(self, n: int) -> None:
        self.resident_weight_bytes.set(n)

    def set_placement_version(self, version: int) -> None:
        self.placement_version.set(version)

    def set_trace_replay(self, on: bool) -> None:
        self.trace_replay.set(1 if on else 0)

    # --- exposition -------------------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The registry in Prometheus text format (`content_type` is its media type)."""
        for refresh in self.refreshers:
            refresh()
        return generate_latest(self.registry)

    def _expert_child(self, layer: int, kind: str) -> Counter:
        key = (layer, kind)
        child = self._expert_children.get(key)
        if child is None:
            child = self._expert_children[key] = self.expert_invocations.labels(layer=str(layer), kind=kind)
        return child
