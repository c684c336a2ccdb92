"""Workloads from what engines record: SGLang's expert-distribution dumps and vLLM's EPLB load files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from prism_moe.stats import load_workload


def test_sglang_dump_sums_the_buffer_and_drops_dense_layers(tmp_path):
    lc = torch.zeros(3, 4, 8, dtype=torch.int64)  # [buffer, decoder layers, experts]; layer 0 dense
    lc[:, 1:, :] = torch.arange(8)
    lc[2, 3, 0] = 5
    p = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": lc, "average_utilization_rate_over_window": None}, p)
    w = load_workload(str(p))
    assert w.counts.shape == (3, 8) and w.trace is None
    np.testing.assert_array_equal(w.counts[0], 3 * np.arange(8))
    assert w.counts[2, 0] == 5
    assert "decoder layers 0-0" in w.notes[0]


def test_sglang_dump_refusals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"logical_count": Evil()}))
    with pytest.raises(ValueError, match="weights_only"):
        load_workload(str(p))
    torch.save({"counts": torch.ones(2, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="logical_count"):
        load_workload(str(tmp_path / "other.pt"))
    torch.save({"logical_count": torch.zeros(1, 2, 3)}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="all zeros"):
        load_workload(str(tmp_path / "empty.pt"))


def test_vllm_load_window(tmp_path):
    window = np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4)  # [window, moe layers, experts]
    save_file({"global_expert_load_window": window}, str(tmp_path / "global_expert_load_window_i0.safetensors"))
    w = load_workload(str(tmp_path / "global_expert_load_window_i0.safetensors"))
    np.testing.assert_array_equal(w.counts, window.sum(axis=0))
    save_file({"a": window, "b": window}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="one load tensor"):
        load_workload(str(tmp_path / "two.safetensors"))
