"""The coordinator's plan switches against fake servers (test_executor.FakePlanServers): `POST /plan` with an
algorithm or a plan, its validation, and the repaired plan pushed when a block-executing server goes down."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from prism_moe.config import cluster_from_dict
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

from .test_executor import NAMES, FakePlanServers


class Servers(FakePlanServers):
    def set_down(self, server, down):
        self.log.append(("set_down", server))
        return {"down": down}


@pytest.fixture
def setup():
    cluster = cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
        {"name": n, "memory_gib": 24} for n in NAMES]})
    model = cluster.model_spec()
    hosts = np.zeros((3, model.num_moe_layers, model.num_experts), bool)
    for e in range(model.num_experts):
        hosts[e % 3, :, e] = True
    fake = Servers(hosts, cluster.expert_slots(model))
    coord = Coordinator(cluster, CoordinatorConfig(transfer="peer", admin_key="k"), Placement.from_hosts(NAMES, hosts, np.ones((3, 3))),
                        model, client=fake)
    for n, st in coord.servers.items():
        st.live = True
        coord.leased.add(n)
    coord.reconciled = True
    return coord, fake


def test_post_plan_switches_every_server_to_the_algorithms_plan(setup):
    coord, fake = setup
    with TestClient(coord.app(), headers={"Authorization": "Bearer k"}) as http:
        r = http.post("/plan", json={"algorithm": "pipeline"})
        assert r.status_code == 200, r.text
        assert r.json()["ok"]
        got = http.get("/plan").json()
    assert got["algorithm"] == "pipeline" and not coord.plan.at_home
    assert all(fake.executor[n] == coord.plan.executor.tolist() for n in NAMES)
    assert all(fake.version[n] == coord.plan.placement.version for n in NAMES)
    assert (fake.held == coord.plan.placement.hosts).all()


@pytest.mark.parametrize(("body", "message"), [
    ({}, "either a plan or an algorithm"),
    ({"algorithm": "pipeline", "plan": {}}, "either a plan or an algorithm"),
    ({"algorithm": "no-such"}, "unknown algorithm"),
    ({"plan": {"format": "prism-moe-plan"}}, "plan"),
])
def test_post_plan_refuses_bad_bodies(setup, body, message):
    coord, fake = setup
    with TestClient(coord.app(), headers={"Authorization": "Bearer k"}) as http:
        r = http.post("/plan", json=body)
    assert r.status_code == 400 and message in r.text, r.text
    assert not [s for s in fake.log if s[0].startswith("switch")]


def test_a_block_executor_going_down_gets_a_plan_without_it(setup):
    coord, fake = setup
    half = coord.model.num_moe_layers // 2
    rest = coord.model.num_moe_layers - half
    executor = np.array([[0] * half + [1] * rest, [1] * (half + rest), [2] * half + [1] * rest])
    assert coord.switch_plan(ExecutionPlan(coord.placement, executor, np.ones(executor.shape, bool), "pipeline")).ok
    fake.log.clear()
    coord.servers["b"].live = False  # b ran the second half of the layers for every home
    coord.handle_down(["b"])
    assert ("set_down", "a") in fake.log and ("set_down", "c") in fake.log
    plan = coord.plan
    assert not (plan.executor[[0, 2]] == 1).any(), plan.executor
    assert all(fake.executor[n] == plan.executor.tolist() for n in ("a", "c"))
    assert plan.placement.hosts[[0, 2]].any(axis=0).all()  # b's experts were re-hosted on a and c
    assert coord.error is None
