"""The clusters the experiments simulate, as ClusterSpecs built in code (no files needed).

Figures: A100-40GB servers (1, 1, 2 GPUs) on a 500 Mbps full mesh as in the Prism paper; the models
get 30% (DeepSeek-V2-Lite) and 70% (Mixtral-8x7B) of each server's GPU memory, as in the paper.
One-way link latency 1 ms (a metro/LAN edge link; the paper gives bandwidth only). Request rate
0.05 requests/s per server: at 0.1/s the uniform placement's latency grows with the length of the run
(measured: 32 s, 47 s, 50 s mean over successive thirds of 240 requests), so it cannot keep up; at
0.05/s every algorithm reaches a steady state and differences come from placement, not from a
queue growing without bound.
"""

from __future__ import annotations

from prism_moe.config import ClusterSpec, cluster_from_dict
from prism_moe.hardware import PROFILES

RATE = 0.05  # requests/s per server
LATENCY_MS = 1.0
MEMORY_SHARE = {"deepseek-v2-lite": 0.30, "mixtral-8x7b": 0.70}
# Local workloads from distinct domains. DeepSeek-V2-Lite: ESFT per-token traces (+ prompts).
# Mixtral: Fiddler's per-layer MMLU-subject counts on base Mixtral (all 32 layers measured).
WORKLOADS = {
    "deepseek-v2-lite": ["esft:intent", "esft:law", "esft:translation"],
    "mixtral-8x7b": ["fiddler:original:international_law", "fiddler:original:college_computer_science",
                     "fiddler:original:high_school_biology"],
}
ESFT_DOMAINS = ["esft:intent", "esft:law", "esft:translation", "esft:summary"]


def server(name: str, gpu: str, gpus: int, share: float, workload: str | None, rate: float = RATE) -> dict:
    return {"name": name, "gpu": gpu, "gpus": gpus, "memory_gib": round(share * PROFILES[gpu].memory_gib * gpus, 3),
            "workload": workload, "request_rate": rate}


def paper_cluster(model: str, bandwidth_mbps: float = 500.0, rate: float = RATE, latency_ms: float = LATENCY_MS,
                  locality: bool = True, memory_share: float | None = None) -> ClusterSpec:
    """3 servers with 1, 1 and 2 A100-40GB, the paper's memory share for the model (or `memory_share`),
    one workload each (locality=False: no workload, every server's tokens routed uniformly: no own-domain
    locality)."""
    share = memory_share or MEMORY_SHARE[model]
    wl = WORKLOADS[model] if locality else [None] * 3
    return cluster_from_dict({
        "model": model,
        "servers": [server(f"edge-{i + 1}", "a100-40gb", g, share, wl[i], rate) for i, g in enumerate((1, 1, 2))],
        "network": {"bandwidth_mbps": bandwidth_mbps, "latency_ms": latency_ms},
    })


def scale_cluster(gpus: int, bandwidth_mbps: float, model: str = "deepseek-v2-lite",
                  gpus_per_server: int = 1) -> ClusterSpec:
    """`gpus` A100-40GB in servers of `gpus_per_server`, ESFT domains round-robin, uniform mesh."""
    n = max(1, gpus // gpus_per_server)
    return cluster_from_dict({
        "model": model,
        "servers": [server(f"s{i:03d}", "a100-40gb", gpus_per_server, MEMORY_SHARE[model],
                           ESFT_DOMAINS[i % len(ESFT_DOMAINS)]) for i in range(n)],
        "network": {"bandwidth_mbps": bandwidth_mbps, "latency_ms": LATENCY_MS},
    })


def hetero_cluster(links: bool, model: str = "deepseek-v2-lite") -> ClusterSpec:
    """A Jetson AGX Orin, an RTX 4090 and an A100-40GB, each giving the model 30% of its memory.

    links=False: a uniform 500 Mbps mesh. links=True: the Jetson sits on 200 Mbps / 2 ms links (a
    wireless edge node), the 4090-A100 link is 1000 Mbps.
    """
    share = MEMORY_SHARE[model]
    wl = WORKLOADS[model] if model in WORKLOADS else [None] * 3
    spec = {
        "model": model,
        "servers": [server("orin", "jetson-agx-orin", 1, share, wl[0]),
                    server("rtx4090", "rtx-4090", 1, share, wl[1]),
                    server("a100", "a100-40gb", 1, share, wl[2])],
        "network": {"bandwidth_mbps": 500, "latency_ms": LATENCY_MS},
    }
    if links:
        spec["network"]["links"] = [
            {"between": ["orin", "rtx4090"], "bandwidth_mbps": 200, "latency_ms": 2},
            {"between": ["orin", "a100"], "bandwidth_mbps": 200, "latency_ms": 2},
            {"between": ["rtx4090", "a100"], "bandwidth_mbps": 1000, "latency_ms": LATENCY_MS},
        ]
    return cluster_from_dict(spec)
