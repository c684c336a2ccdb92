"""The inputs every placement algorithm shares, as plain arrays.

S servers, L MoE layers, E routed experts per layer. An algorithm has the signature

    algorithm(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Placement

and starts with `Problem.build(stats, cluster, model)`, which turns the three into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec


@dataclass(frozen=True)
class ClusterStats:
    """Expert activation counts of each server's own requests.

    counts: float [S, L, E], servers in cluster order. traces: optional per-server per-token routing
    (`prism_moe.stats.trace.RoutingTrace`), used by trace-aware algorithms and the simulator.
    """

    counts: np.ndarray
    traces: tuple = field(default=())

    def __post_init__(self) -> None:
        c = np.asarray(self.counts, dtype=np.float64)
        if c.ndim != 3:
            raise ValueError(f"counts must be [servers, layers, experts], got shape {c.shape}")
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError("counts must be finite and non-negative")
        object.__setattr__(self, "counts", c)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.counts.shape  # type: ignore[return-value]

    def frequencies(self) -> np.ndarray:
        """Per server and layer, the share of invocations of each expert: float [S, L, E], rows sum to 1.

        A layer with no observation is taken as uniform (nothing known, nothing preferred).
        """
        c = self.counts
        tot = c.sum(axis=2, keepdims=True)
        uniform = np.full_like(c, 1.0 / c.shape[2])
        return np.where(tot > 0, c / np.where(tot > 0, tot, 1.0), uniform)


@dataclass(frozen=True)
class Problem:
    """Arrays for one placement decision.

    demand:    float [S, L, E]  expected invocations of expert (l, e) by server s's requests per unit
                                of time: per-layer frequencies x the server's request rate.
    capacity:  int [S]          expert slots after the dense part.
    link_cost: float [S, S]     seconds to send one token's hidden state to a peer and get it back.
    bandwidth: float [S, S]     link bandwidth in bits/s (diagonal infinite), for migration time;
                                None when the problem was built by hand without it.
    """

    server_names: tuple[str, ...]
    demand: np.ndarray
    capacity: np.ndarray
    link_cost: np.ndarray
    expert_bytes: int
    bandwidth: np.ndarray | None = None

    @property
    def num_servers(self) -> int:
        return self.demand.shape[0]

    @property
    def num_layers(self) -> int:
        return self.demand.shape[1]

    @property
    def num_experts(self) -> int:
        return self.demand.shape[2]

    @classmethod
    def build(cls, stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec) -> Problem:
        s, layers, experts = stats.shape
        if s != len(cluster.servers):
            raise ValueError(f"stats cover {s} servers, the cluster has {len(cluster.servers)}")
        if (layers, experts) != (model.num_moe_layers, model.num_experts):
            raise ValueError(f"stats are for {layers} layers x {experts} experts, the model {model.name} has "
                             f"{model.num_moe_layers} x {model.num_experts}; use workloads measured on this "
                             f"model family (or Workload.fit_to)")
        capacity = cluster.check_feasible(model)
        rates = np.array([srv.request_rate for srv in cluster.servers])
        demand = stats.frequencies() * rates[:, None, None]
        bw, lat = cluster.link_matrices()
        payload_bits = 2 * model.hidden_size * model.bytes_per_param * 8  # there and back
        link_cost = 2 * lat + payload_bits / bw
        return cls(tuple(cluster.server_names), demand, capacity, link_cost, model.expert_bytes, bw)
