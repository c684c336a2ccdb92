"""An edge server's expert slots: loads write free slots (staged), the placement switch maps them, drops free
them, and nothing is ever held beyond the memory budget. One in-process server ("a"; its peer "b" is never
called), driven through the methods behind the /prism/experts and /prism/placement routes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prism_moe.config import ConfigError, cluster_from_dict
from prism_moe.model.grouped import compute_rows
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.runtime.launcher import free_port
from prism_moe.runtime.server import ControlError, EdgeServer, ServeOptions

NAMES = ["a", "b"]


def _placement(spec: ModelSpec, held_a: dict[int, list[int]], version: int) -> Placement:
    hosts = np.zeros((2, spec.num_moe_layers, spec.num_experts), dtype=bool)
    hosts[1] = True
    for layer, ids in held_a.items():
        hosts[0, layer, ids] = True
    return Placement.from_hosts(NAMES, hosts, np.array([[0.0, 1.0], [1.0, 0.0]]), algorithm="test",
                                version=version)


def _server(tiny_dir: Path, spec: ModelSpec, slots: float, placement: Placement) -> EdgeServer:
    cluster = cluster_from_dict({"model": str(tiny_dir), "device": "cpu", "servers": [
        {"name": n, "memory_gib": (spec.dense_bytes + slots * spec.expert_bytes) / GIB, "host": "127.0.0.1",
         "expert_port": free_port(), "http_port": 1} for n in NAMES]})
    return EdgeServer(cluster, "a", ServeOptions(placement=placement, device="cpu"))


def test_load_switch_drop_within_the_slots(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_pretrained(tiny_dir)
    server = _server(tiny_dir, spec, 6.5, _placement(spec, {0: [0, 1, 2], 1: [0, 1, 2]}, 0))  # 6 slots, full
    try:
        server.start()
        assert server.capacity == 6 and server.slots_used() == 6 and server.held() == {0: [0, 1, 2], 1: [0, 1, 2]}
        with pytest.raises(ControlError, match="1 more experts do not fit its 0 free slots"):
            server.load_experts([(1, 3)])
        with pytest.raises(ControlError, match="switch placement before dropping"):
            server.drop_experts([(0, 2)])

        server.switch_placement(_placement(spec, {0: [0, 1], 1: [0, 1, 2]}, 1))
        assert server.drop_experts([(0, 2)])["dropped"] == 1 and server.slots_used() == 5

        out = server.load_experts([(1, 3)])  # into the freed slot, staged: own tokens still go to "b"
        assert out["loaded"] == 1 and out["staged"] == 1 and server.slots_used() == 6
        assert server.staged()[1] == [3] and 3 not in server.stores[1] and server.held_count() == 5
        ref = AutoModelForCausalLM.from_pretrained(tiny_dir, experts_implementation="eager")
        mod = ref.model.layers[1].mlp.experts
        x = torch.randn(3, spec.hidden_size)
        with torch.no_grad():  # peers are already served from the staged copy, with the checkpoint's weights
            want = torch.nn.functional.linear(x, mod.gate_up_proj[3]).chunk(2, dim=-1)
            want = torch.nn.functional.linear(mod.act_fn(want[0]) * want[1], mod.down_proj[3])
            torch.testing.assert_close(compute_rows(server.stores[1], torch.tensor([3, 3, 3]), x), want)

        with pytest.raises(ControlError, match="has a holding 1 experts it has not loaded"):
            server.switch_placement(_placement(spec, {0: [0, 1, 5], 1: [0, 1, 2, 3]}, 2))
        server.switch_placement(_placement(spec, {0: [0, 1], 1: [0, 1, 2, 3]}, 2))  # maps the staged copy
        assert 3 in server.stores[1] and server.held() == {0: [0, 1], 1: [0, 1, 2, 3]}
        stats = server.stats()
        assert stats["experts_held"] == stats["slots_used"] == stats["capacity"] == 6 and not stats["staged"]
    finally:
        server.close()


def test_placement_over_the_budget_is_refused_at_start(tiny_dir: Path) -> None:
    spec = ModelSpec.from_pretrained(tiny_dir)
    server = _server(tiny_dir, spec, 2.5, _placement(spec, {0: [0, 1, 2]}, 0))
    try:
        with pytest.raises(ConfigError, match="gives it 3 experts, but memory_gib=.* leaves room for 2"):
            server.start()
    finally:
        server.close()


def test_a_plan_leaves_the_slots_of_the_dense_layers_it_does_not_execute(tiny_dir: Path) -> None:
    """A server executing only layer 0 of a plan holds that layer's dense part by the plan's statement: its slots
    are what the budget leaves beside it, so more experts fit than beside the whole dense part."""
    from prism_moe.placement.plan import ExecutionPlan, PlanSizes

    spec = ModelSpec.from_pretrained(tiny_dir)
    sizes = PlanSizes.of(spec)
    slots = 2.5  # the whole dense part leaves room for 2 experts
    budget = spec.dense_bytes + slots * spec.expert_bytes
    want = int((budget - sizes.base - sizes.dense_layer) // sizes.expert)  # one dense layer, by hand
    held = list(range(min(want, spec.num_experts)))
    assert len(held) > 2, "the tiny model must free more than 2 slots for this test"
    placement = _placement(spec, {0: held}, 0)
    plan = ExecutionPlan(placement, np.array([[0, 1], [0, 1]]), np.array([[True, False], [True, True]]), "hand")
    server = _server(tiny_dir, spec, slots, placement)
    server.options.plan = server.plan = plan
    try:
        server.start()
        assert server.capacity == want and server.held_count() == len(held)
    finally:
        server.close()
