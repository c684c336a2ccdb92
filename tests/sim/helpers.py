"""Small synthetic clusters with round numbers, for hand-computed simulator cases."""

from __future__ import annotations

import numpy as np

from prism_moe.hardware import GpuProfile
from prism_moe.placement.placement import Placement
from prism_moe.sim.cost import CostModel
from prism_moe.sim.workload import Requests, TokenPool

MS = 1e-3


def cost_model(servers: int, layers: int = 1, bandwidth_bps: float = 8e6, latency_s: float = 1 * MS) -> CostModel:
    """Memory-bound GPUs at 1 GB/s (FLOPs never bind), no kernel overhead: a dense layer reads 1 MB
    (1 ms), one expert reads 1 MB (1 ms). A token's hidden state is 1000 bytes."""
    prof = GpuProfile("toy", 10, 1.0, 1e6, kernel_overhead_s=0.0)
    bw = np.full((servers, servers), float(bandwidth_bps))
    lat = np.full((servers, servers), float(latency_s))
    np.fill_diagonal(bw, np.inf)
    np.fill_diagonal(lat, 0.0)
    return CostModel(profiles=(prof,) * servers, bandwidth_bps=bw, latency_s=lat, num_layers=layers,
                     expert_bytes=1e6, expert_flops_per_pair=1.0, dense_layer_bytes=1e6,
                     dense_layer_flops_per_token=1.0, token_bytes=1000.0)


def const_pool(layers: int, experts_per_token: list[int], n: int = 16) -> TokenPool:
    """Every token routes to the same experts at every layer."""
    ex = np.tile(np.array(experts_per_token, dtype=np.int16), (layers, n, 1))
    return TokenPool("const", ex, np.array([0, n]), True)


def placement(hosts: np.ndarray) -> Placement:
    s = hosts.shape[0]
    lc = np.ones((s, s))
    return Placement.from_hosts([f"s{i}" for i in range(s)], hosts, lc)


def requests(rows: list[tuple[int, float, int, int]], pool: list[int] | None = None) -> Requests:
    """rows: (server, arrival s, prompt tokens, output tokens), in arrival order."""
    a = np.array(rows, dtype=np.float64)
    n = len(rows)
    return Requests(a[:, 0].astype(np.int64), a[:, 1], a[:, 2].astype(np.int64), a[:, 3].astype(np.int64),
                    np.array(pool or [0] * n, dtype=np.int64), np.zeros(n, dtype=np.int64))
