"""Cost model: seconds for the dense part and the experts of one MoE layer, and for messages on links.

Compute is a roofline per kernel call on the server's (scaled) GPU profile: max(bytes / bandwidth,
FLOPs / throughput) + a fixed overhead. Per MoE layer a server runs one dense kernel (attention,
norms, router, shared experts: the model's dense part spread evenly over its MoE layers) and one
grouped expert kernel over the distinct experts its tokens use. Each step also pays the profile's
`step_overhead_s` (the serving loop's own host work) before its first layer. Attention FLOPs over the context and
KV-cache reads are not modelled (small next to the weights at these batch sizes).

A remote call carries, per token, one hidden state out and one back (the peer combines that token's
experts it holds), plus expert ids and gate weights per (token, expert) pair and a small header.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.hardware import GpuProfile, server_profiles
from prism_moe.model.spec import ModelSpec

HEADER_BYTES = 64  # message framing: layer id, sizes
PAIR_BYTES = 8  # per (token, expert) pair: int32 expert id + fp32 gate weight


@dataclass(frozen=True)
class CostModel:
    """Per-server compute and per-link transfer costs.

    profiles: [S] scaled GPU profiles; bandwidth_bps: float [S, S] bits/s (diagonal inf);
    latency_s: float [S, S] one-way (diagonal 0).
    """

    profiles: tuple[GpuProfile, ...]
    bandwidth_bps: np.ndarray
    latency_s: np.ndarray
    num_layers: int
    expert_bytes: float
    expert_flops_per_pair: float
    dense_layer_bytes: float
    dense_layer_flops_per_token: float
    token_bytes: float
    # one-way seconds a block hand-off pays beyond the link's latency (the runtime's block call work measured
    # by `sim.calibrate.measure_handoff`; may be negative where it is below an expert call's, which the
    # calibrated latencies carry already)
    handoff_overhead_s: float = 0.0

    @classmethod
    def build(cls, cluster: ClusterSpec, model: ModelSpec) -> CostModel:
        bw, lat = cluster.link_matrices()
        # The embedding lookup reads one row per token, not the table: leave it out of the dense roofline.
        dense_params = model.dense_params - model.vocab_size * model.hidden_size
        per_layer = max(dense_params, 0) / model.num_moe_layers
        return cls(
            profiles=tuple(server_profiles(cluster)),
            bandwidth_bps=bw,
            latency_s=lat,
            num_layers=model.num_moe_layers,
            expert_bytes=float(model.expert_bytes),
            expert_flops_per_pair=float(model.expert_flops_per_token),
            dense_layer_bytes=per_layer * model.bytes_per_param,
            dense_layer_flops_per_token=2.0 * per_layer,
            token_bytes=float(model.hidden_size * model.bytes_per_param),
        )

    @property
    def num_servers(self) -> int:
        return len(self.profiles)

    def dense_s(self, server: int, tokens: int) -> float:
        """One layer's dense part for `tokens` tokens on `server`."""
        return self.profiles[server].roofline_s(self.dense_layer_bytes, self.dense_layer_flops_per_token * tokens)

    def experts_s(self, server: int, n_experts: int, n_pairs: int) -> float:
        """One grouped expert kernel: `n_experts` distinct experts read once, `n_pairs` (token, expert) products."""
        if n_pairs <= 0:
            return 0.0
        return self.profiles[server].roofline_s(n_experts * self.expert_bytes, n_pairs * self.expert_flops_per_pair)

    def request_bytes(self, n_tokens: int, n_pairs: int) -> float:
        return n_tokens * self.token_bytes + n_pairs * PAIR_BYTES + HEADER_BYTES

    def response_bytes(self, n_tokens: int) -> float:
        return n_tokens * self.token_bytes + HEADER_BYTES

    def wire_s(self, src: int, dst: int, nbytes: float) -> float:
        """Seconds the message occupies the link src -> dst (serialisation; latency comes on top)."""
        return nbytes * 8.0 / self.bandwidth_bps[src, dst]

    def engine_arrays(self) -> dict[str, list]:
        """Plain lists for the event loop's hot path (indexing lists beats numpy scalars there)."""
        return {
            "mem_bps": [p.bytes_per_s for p in self.profiles],
            "flops": [p.flops_per_s for p in self.profiles],
            "overhead": [p.kernel_overhead_s for p in self.profiles],
            "step_overhead": [p.step_overhead_s for p in self.profiles],
            "bits_s": [[8.0 / b if np.isfinite(b) else 0.0 for b in row] for row in self.bandwidth_bps],
            "lat": [list(map(float, row)) for row in self.latency_s],
        }
