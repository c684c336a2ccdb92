"""GPU profiles: published figures, scaling, custom profiles from the cluster file, the roofline."""

from __future__ import annotations

import pytest

from prism_moe.config import ConfigError, cluster_from_dict
from prism_moe.hardware import PROFILES, GpuProfile, get_profile, probe_cpu, server_profiles


def test_builtin_profiles_have_figures_and_sources():
    for name in ("a100-40gb", "a100-80gb", "h100", "rtx-4090", "rtx-3090", "a4000", "jetson-agx-orin", "cpu"):
        p = PROFILES[name]
        assert p.memory_gib > 0 and p.memory_bandwidth_gbs > 0 and p.bf16_tflops > 0 and p.source
    assert PROFILES["a100-40gb"].memory_bandwidth_gbs == 1555


def test_roofline_and_scaling():
    p = GpuProfile("x", 10, 100.0, 1.0, kernel_overhead_s=1e-6)
    assert p.roofline_s(1e9, 0) == pytest.approx(0.01 + 1e-6)  # memory bound
    assert p.roofline_s(0, 1e12) == pytest.approx(1.0 + 1e-6)  # compute bound
    two = p.scaled(2)
    assert (two.memory_gib, two.memory_bandwidth_gbs, two.bf16_tflops) == (20, 200.0, 2.0)


def test_custom_profile_from_cluster_and_multi_gpu_servers():
    c = cluster_from_dict({
        "model": "olmoe-1b-7b",
        "gpu_profiles": {"my-npu": {"memory_gib": 32, "memory_bandwidth_gbs": 400, "bf16_tflops": 50,
                                    "step_overhead_s": 0.002}},
        "servers": [{"name": "a", "gpu": "my-npu", "memory_gib": 8},
                    {"name": "b", "gpu": "a100-40gb", "gpus": 2, "memory_gib": 8}],
    })
    a, b = server_profiles(c)
    assert a.memory_bandwidth_gbs == 400 and a.source == "cluster file"
    assert a.step_overhead_s == 0.002 and a.kernel_overhead_s == 10e-6  # given; default
    assert b.memory_bandwidth_gbs == 2 * 1555 and b.memory_gib == 80
    with pytest.raises(ConfigError, match="unknown GPU profile"):
        get_profile("no-such-gpu", c)


def test_cpu_probe_measures_something():
    p = probe_cpu(seconds=0.15)
    assert p.memory_bandwidth_gbs > 0.1 and p.bf16_tflops > 1e-4 and p.kernel_overhead_s > 0
