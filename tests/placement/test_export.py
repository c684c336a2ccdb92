"""Placements in SGLang's and DeepSeek EPLB's formats: hand-checked layouts and the engines' format rules."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.model.spec import load_model_spec
from prism_moe.placement.export import (
    ExportError,
    check_sglang_map,
    eplb_tables,
    physical_layout,
    sglang_physical_to_logical,
)


def test_hand_case_two_servers():
    # 1 layer, 4 experts; server 0 (1 GPU) holds 0, 1; server 1 (1 GPU) holds 1, 2, 3
    hosts = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 1]]], dtype=bool)
    load = np.array([[10.0, 40.0, 30.0, 20.0]])
    lay = physical_layout(hosts, np.array([1, 1]), load)
    assert lay.slots_per_gpu == 3 and lay.padding == 1
    # server 0: its experts heaviest first (1, 0), then the heaviest it lacks (2) as padding
    np.testing.assert_array_equal(lay.phy2log, [[1, 0, 2, 1, 2, 3]])
    phy2log, log2phy, logcnt = eplb_tables(lay, 4)
    np.testing.assert_array_equal(logcnt, [[1, 2, 2, 1]])
    np.testing.assert_array_equal(log2phy, [[[1, -1], [0, 3], [2, 4], [5, -1]]])


def test_server_gpus_split_its_experts_and_every_gpu_gets_equal_slots():
    rng = np.random.default_rng(0)
    s_n, layers, e = 3, 4, 16
    hosts = rng.random((s_n, layers, e)) < 0.5
    hosts[0] |= ~hosts.any(axis=0)  # every expert somewhere
    gpus = np.array([1, 2, 1])
    load = rng.random((layers, e))
    lay = physical_layout(hosts, gpus, load)
    spg = lay.slots_per_gpu
    assert lay.phy2log.shape == (layers, 4 * spg)
    owner = np.repeat([0, 1, 1, 2], spg)  # server of each slot
    for l in range(layers):
        for s in range(s_n):
            on_server = set(lay.phy2log[l, owner == s].tolist())
            assert set(np.flatnonzero(hosts[s, l]).tolist()) <= on_server  # the placement is kept
        for g in range(4):  # no GPU holds an expert twice
            slots = lay.phy2log[l, g * spg:(g + 1) * spg]
            assert len(set(slots.tolist())) == spg
    check_sglang_map(lay.phy2log, e, 4)
    phy2log, log2phy, logcnt = eplb_tables(lay, e)
    for l in range(layers):  # log2phy and phy2log describe the same slots
        for x in range(e):
            slots = log2phy[l, x][log2phy[l, x] >= 0]
            assert len(slots) == logcnt[l, x] and (phy2log[l, slots] == x).all()
    assert logcnt.sum() == lay.phy2log.size


def test_sglang_map_spans_the_decoder_layers():
    spec = load_model_spec("deepseek-v2-lite")  # decoder layer 0 is dense
    hosts = np.ones((2, spec.num_moe_layers, spec.num_experts), dtype=bool)
    lay = physical_layout(hosts, np.array([1, 1]), np.ones((spec.num_moe_layers, spec.num_experts)))
    m = sglang_physical_to_logical(lay, spec.moe_layer_ids, spec.num_hidden_layers, spec.num_experts)
    assert m.shape == (27, 128)
    np.testing.assert_array_equal(m[0], np.arange(128) % 64)  # SGLang's trivial map for the dense layer
    np.testing.assert_array_equal(m[1:], lay.phy2log)
    check_sglang_map(m, 64, 2)


def test_sglang_rules_refuse_bad_maps():
    with pytest.raises(ExportError, match="multiple of 3"):
        check_sglang_map(np.zeros((1, 4), dtype=np.int64), 2, 3)
    with pytest.raises(ExportError, match="no physical slot"):
        check_sglang_map(np.array([[0, 0, 1, 1]]), 3, 2)
    with pytest.raises(ExportError, match="in 0..1"):
        check_sglang_map(np.array([[0, 2]]), 2, 2)
