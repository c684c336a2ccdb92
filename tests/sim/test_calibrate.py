"""calibrated_cost maps measured CPU times onto the unchanged CostModel (no model, no cluster)."""

import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.sim.calibrate import (
    Calibration,
    PathRecords,
    calibrated_cost,
    fit_server_path,
    shared_cores_slowdown,
)
from prism_moe.sim.cost import CostModel


def test_calibrated_cost_reproduces_the_measured_times():
    cluster = cluster_from_dict({"model": "olmoe-1b-7b", "servers": [
        {"name": "a", "gpu": "a100-40gb", "memory_gib": 8}, {"name": "b", "gpu": "a100-40gb", "memory_gib": 8}],
        "network": {"bandwidth_mbps": 500, "latency_ms": 2}})
    cost = CostModel.build(cluster, cluster.model_spec())
    cal = Calibration(dense_layer_s=700e-6, dense_token_s=40e-6, expert_call_s=100e-6, expert_s=150e-6,
                      call_overhead_s=250e-6, step_overhead_s=3e-3)
    c = calibrated_cost(cost, cal)
    assert c.dense_s(0, 1) == pytest.approx(700e-6)
    assert c.dense_s(0, 100) == pytest.approx(100 * 40e-6 + 100e-6)
    assert c.experts_s(1, 5, 30) == pytest.approx(100e-6 + 5 * 150e-6)
    assert c.latency_s[0, 1] == pytest.approx(2e-3 + 125e-6)
    assert c.latency_s[0, 0] == 0
    assert all(p.step_overhead_s == pytest.approx(3e-3) for p in c.profiles)
    slow = calibrated_cost(cost, cal, slowdown=2)
    assert slow.experts_s(0, 5, 30) == pytest.approx(2 * c.experts_s(0, 5, 30))
    assert slow.dense_s(0, 1) == pytest.approx(2 * 700e-6)
    assert slow.latency_s[0, 1] == pytest.approx(2e-3 + 250e-6)  # the link's own delay is not CPU work


def test_per_server_slowdowns_and_the_hand_off_cost():
    cluster = cluster_from_dict({"model": "olmoe-1b-7b", "servers": [
        {"name": n, "gpu": "a100-40gb", "memory_gib": 8} for n in "abc"],
        "network": {"bandwidth_mbps": 500, "latency_ms": 2}})
    cost = CostModel.build(cluster, cluster.model_spec())
    cal = Calibration(dense_layer_s=700e-6, dense_token_s=40e-6, expert_call_s=100e-6, expert_s=150e-6,
                      call_overhead_s=250e-6, handoff_s=1050e-6)
    c = calibrated_cost(cost, cal, slowdown=[1.0, 2.0, 3.0])
    assert [c.dense_s(s, 1) for s in range(3)] == pytest.approx([700e-6, 1400e-6, 2100e-6])
    assert c.experts_s(2, 5, 30) == pytest.approx(3 * (100e-6 + 5 * 150e-6))
    assert c.latency_s[0, 2] == pytest.approx(2e-3 + 250e-6 * 2.0 / 2)  # the mean of its ends' factors, half
    # a hand-off round trip costs 1050 us beyond the link: the latencies carry 250 us, the rest comes on top
    assert 2 * c.handoff_overhead_s == pytest.approx((1050e-6 - 250e-6) * 2.0)
    assert calibrated_cost(cost, Calibration(700e-6, 40e-6, 100e-6, 150e-6, 250e-6)).handoff_overhead_s == 0


def test_shared_cores_slowdown_by_hand():
    # busy 0.5, 1.0, 0.25 of 2 s: server 0 shares 2 cores with 1.0 + 0.25 of the others' -> (1 + 1.25) / 2;
    # server 1 with 0.75 -> below 1: no slowdown; server 2 with 1.5 -> 1.25
    f = shared_cores_slowdown([1.0, 2.0, 0.5], 2.0, cores=2)
    assert f.tolist() == pytest.approx([1.125, 1.0, 1.25])
    # 3 s of calls' host work spread over the servers: +0.5 utilisation each (capped at 1): 1.0, 1.0, 0.75
    assert shared_cores_slowdown([1.0, 2.0, 0.5], 2.0, cores=2, host_s=3.0).tolist() == pytest.approx(
        [1.375, 1.375, 1.5])
    assert shared_cores_slowdown([0.1, 0.1], 1.0, cores=4).tolist() == [1.0, 1.0]  # room for all: no slowdown


# --- fit_server_path: the terms back from records made with known ones ------------------------------------
TRUE = dict(dense=1e-3, per_token=50e-6, call=300e-6, expert=40e-6, per_call=200e-6, gap=5e-3, beyond=1.5e-3)
LAYERS, DECODE, PREFILL, LINK = 2, 4, 8, 4e-3


def _records() -> PathRecords:
    """Two prefill forwards of 8 tokens, then 12 decode forwards of 4 tokens, back to back with the step gap;
    each MoE layer takes call + expert x local + per_call x calls + what it waits; every call that was waited
    for took link + the peer's compute + `beyond`."""
    t = TRUE
    rec = PathRecords([], [], [])
    now = 0.0
    kinds = [PREFILL, PREFILL] + [DECODE] * 12
    for f, tokens in enumerate(kinds):
        moe = 0.0
        for layer in range(LAYERS):
            local, calls = 1 + (f + 2 * layer) % 5, (f + layer) % 3
            wait = 2e-3 * calls
            dt = t["call"] + t["expert"] * local + t["per_call"] * calls + wait
            rec.layers.append((f, dt, wait, local, calls))
            moe += dt
            for c in range(calls):
                k = 1 + (f + c) % 4
                rec.calls.append((LINK + t["call"] + t["expert"] * k + t["beyond"], k))
        dense = t["dense"] if tokens == DECODE else t["call"] + t["per_token"] * tokens
        end = now + moe + LAYERS * dense
        rec.forwards.append((now, end, tokens))
        now = end + t["gap"]
    return rec


def test_fit_server_path_recovers_the_terms_the_records_were_made_with():
    cal, per_call = fit_server_path(_records(), LAYERS, DECODE, LINK)
    t = TRUE
    assert cal.dense_layer_s == pytest.approx(t["dense"])
    assert cal.dense_token_s == pytest.approx(t["per_token"])
    assert cal.expert_call_s == pytest.approx(t["call"])
    assert cal.expert_s == pytest.approx(t["expert"])
    assert per_call == pytest.approx(t["per_call"])
    # the caller's own work per call rides on the call, beyond the link and the peer's compute
    assert cal.call_overhead_s == pytest.approx(t["beyond"] + t["per_call"])
    assert cal.step_overhead_s == pytest.approx(t["gap"])


def test_fit_server_path_says_what_is_missing():
    rec = _records()
    rec.forwards[:] = rec.forwards[:2]
    with pytest.raises(RuntimeError, match="0 decode and 2 prefill forwards"):
        fit_server_path(rec, LAYERS, DECODE, LINK)


@pytest.mark.slow
def test_measure_server_path_times_a_real_server_and_its_peer(tmp_path):
    """The whole path on a tiny model: a server in this process, its peer a `prism serve` process."""
    from prism_moe.model.tiny import make_tiny_model
    from prism_moe.sim.calibrate import measure_server_path

    ckpt = make_tiny_model("mixtral", tmp_path / "ckpt", seed=1)
    cal = measure_server_path(ckpt, batch=2, prompt_tokens=8, new_tokens=6, repeats=1, delay_ms=1.0,
                              work_dir=tmp_path)
    for name, value in cal.__dict__.items():
        assert 0 <= value < 1.0, (name, value)
    # a decode layer's dense part and a remote call over a 1 ms link are real work on a CPU
    assert cal.dense_layer_s > 0 and cal.expert_s > 0
