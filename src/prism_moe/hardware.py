"""GPU profiles (published figures) and the roofline time of a kernel on them.

A low-level module: the simulator and latency-aware placement both import it; it imports only
`config` (for custom profiles in the cluster file). Figures are per device; a server with `gpus: n`
gets n x memory, bandwidth and FLOP/s (experts are spread over its GPUs; intra-server transfers are
not modelled). Peak figures are used as they are, without a derating factor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np

from prism_moe.config import ClusterSpec, ConfigError


@dataclass(frozen=True)
class GpuProfile:
    """One device (or a multi-GPU server once `scaled`).

    memory_gib: device memory; memory_bandwidth_gbs: GB/s (1e9 bytes/s); bf16_tflops: dense bf16
    tensor throughput, 1e12 FLOP/s; kernel_overhead_s: fixed cost of one roofline call (launch, sync);
    step_overhead_s: host-side cost of one serving step outside the model (batch building, sampling,
    handing tokens out), 0 where not measured (the published GPU profiles; `prism_moe.sim.calibrate`
    measures it for this machine's serving loop).
    """

    name: str
    memory_gib: float
    memory_bandwidth_gbs: float
    bf16_tflops: float
    kernel_overhead_s: float = 10e-6
    source: str = ""
    step_overhead_s: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.memory_bandwidth_gbs * 1e9

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12

    def roofline_s(self, nbytes: float, flops: float) -> float:
        """Seconds for a kernel that reads `nbytes` and does `flops`: the slower of the two, plus overhead."""
        return max(nbytes / self.bytes_per_s, flops / self.flops_per_s) + self.kernel_overhead_s

    def scaled(self, gpus: int) -> GpuProfile:
        """A server of `gpus` such devices: memory, bandwidth and FLOP/s add up (ideal expert parallelism)."""
        if gpus == 1:
            return self
        return replace(self, name=f"{gpus}x{self.name}", memory_gib=self.memory_gib * gpus,
                       memory_bandwidth_gbs=self.memory_bandwidth_gbs * gpus, bf16_tflops=self.bf16_tflops * gpus)


# Kernel launch + sync on a GPU is ~5-10 us (CUDA launch latency); 10 us per roofline call is used.
PROFILES: dict[str, GpuProfile] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4): 40 GB HBM2, 1,555 GB/s, BF16 312 TFLOPS dense.
    "a100-40gb": GpuProfile("a100-40gb", 40, 1555, 312, source="NVIDIA A100 datasheet"),
    # Same datasheet, 80 GB SXM4: HBM2e 2,039 GB/s, BF16 312 TFLOPS dense.
    "a100-80gb": GpuProfile("a100-80gb", 80, 2039, 312, source="NVIDIA A100 datasheet"),
    # NVIDIA H100 datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity = 989 dense.
    "h100": GpuProfile("h100", 80, 3350, 989, source="NVIDIA H100 datasheet"),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: 24 GB GDDR6X, 1,008 GB/s,
    # BF16 tensor with FP32 accumulate 165.2 TFLOPS dense (330.3 sparse).
    "rtx-4090": GpuProfile("rtx-4090", 24, 1008, 165.2, source="NVIDIA Ada whitepaper"),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: 24 GB GDDR6X, 936 GB/s, BF16/FP32-acc 71 TFLOPS dense.
    "rtx-3090": GpuProfile("rtx-3090", 24, 936, 71, source="NVIDIA GA102 whitepaper"),
    # NVIDIA RTX A4000 datasheet: 16 GB GDDR6, 448 GB/s, tensor 153.4 TFLOPS with sparsity = 76.7 dense.
    "a4000": GpuProfile("a4000", 16, 448, 76.7, source="NVIDIA RTX A4000 datasheet"),
    # NVIDIA Jetson AGX Orin series technical brief (64 GB module): 64 GB LPDDR5 shared, 204.8 GB/s;
    # GPU 170 sparse INT8 TOPS -> 85 dense INT8 -> 42.5 dense FP16/BF16 (Ampere: FP16 = INT8 / 2).
    "jetson-agx-orin": GpuProfile("jetson-agx-orin", 64, 204.8, 42.5, source="NVIDIA Jetson AGX Orin brief"),
    # The development machine's CPU (2 cores), measured with `probe_cpu()`: numpy float32 sum of a
    # 256 MiB array 7.0-7.7 GB/s, 1024^3 matmul 0.15-0.24 TFLOP/s, a 64x64 matmul call 5 us; 23.5 GiB RAM.
    "cpu": GpuProfile("cpu", 23.5, 7.3, 0.2, kernel_overhead_s=5e-6, source="measured: prism_moe.hardware.probe_cpu"),
}


def probe_cpu(seconds: float = 1.0) -> GpuProfile:
    """Measure this machine: streaming read bandwidth (sum of a 256 MiB array) and matmul FLOP/s.

    float32 matmul is the stand-in for bf16 on a CPU (numpy has no bf16 BLAS).
    """
    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    a.sum()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 3:
        a.sum()
        n += 1
    bw = n * a.nbytes / (time.perf_counter() - t0)
    m = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    m @ m
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 3:
        m @ m
        n += 1
    flops = n * 2 * 1024**3 / (time.perf_counter() - t0)
    s = np.ones((64, 64), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(1000):
        s @ s
    overhead = (time.perf_counter() - t0) / 1000
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = PROFILES["cpu"].memory_gib
    return GpuProfile("cpu", round(mem, 1), round(bw / 1e9, 2), round(flops / 1e12, 4),
                      kernel_overhead_s=overhead, source="measured: prism_moe.hardware.probe_cpu")


def get_profile(name: str, cluster: ClusterSpec | None = None) -> GpuProfile:
    """A profile by name: the cluster file's `gpu_profiles` first, then the built-in ones."""
    if cluster is not None and name in cluster.gpu_profiles:
        p = cluster.gpu_profiles[name]
        return GpuProfile(name, p.memory_gib, p.memory_bandwidth_gbs, p.bf16_tflops, source="cluster file",
                          kernel_overhead_s=p.kernel_overhead_s, step_overhead_s=p.step_overhead_s)
    if name in PROFILES:
        return PROFILES[name]
    known = sorted(PROFILES) + sorted(cluster.gpu_profiles if cluster else ())
    raise ConfigError(f"unknown GPU profile {name!r}; use one of {known} or define it under gpu_profiles "
                      f"(memory_gib, memory_bandwidth_gbs, bf16_tflops)")


def server_profiles(cluster: ClusterSpec) -> list[GpuProfile]:
    """The (scaled) profile of each server, in cluster order."""
    return [get_profile(s.gpu, cluster).scaled(s.gpus) for s in cluster.servers]
