"""A real 3-process cluster with an admin key: the closed control plane, coordinator restarts mid-migration,
and two coordinators fenced by the control lease.

Tiny Mixtral (2 MoE layers x 8 experts), 8 slots per server; P0 gives server i the experts e % 3 == i.
A coordinator "killed" at a point of a migration is reproduced exactly: a client with another holder id
makes the calls that coordinator would have made up to that point, holding a short lease, and stops.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.placement.placement import Placement
from prism_moe.runtime.keys import make_admin_key, read_admin_key
from prism_moe.runtime.launcher import start_local_cluster
from prism_moe.scheduler.client import ControlFailed, ServerClient
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

from .split_cluster import greedy_refs, hosts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAMES = ["edge-a", "edge-b", "edge-c"]
USER_KEY = "users-key-0123456789"
PROMPT = "Experts live on several machines and"


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    ckpt = make_tiny_model("mixtral", tmp / "ckpt", seed=2)
    spec = ModelSpec.from_pretrained(ckpt)
    p0, _ = hosts(spec)
    Placement.from_hosts(NAMES, p0, np.ones((3, 3)), algorithm="split-by-id").save(tmp / "p0.json")
    memory_gib = (spec.dense_bytes + 8.5 * spec.expert_bytes) / GIB
    cluster = cluster_from_dict({"model": str(ckpt), "device": "cpu",
                                 "servers": [{"name": n, "memory_gib": memory_gib} for n in NAMES]})
    admin_file = make_admin_key(tmp / "keys" / "admin.key")
    ref = greedy_refs(ckpt, [PROMPT], 6)[PROMPT]
    args = ["--placement", str(tmp / "p0.json"), "--timeout", "2", "--api-key", USER_KEY,
            "--admin-key-file", str(admin_file), "--threads", "1"]
    lc = start_local_cluster(cluster, tmp / "run", args, health_timeout=120, log=lambda *_: None)
    try:
        yield lc, spec, read_admin_key(admin_file), ref
    finally:
        lc.stop()


def _snapshot(urls: dict[str, str]) -> dict[str, tuple]:
    out = {}
    for n, url in urls.items():
        s = httpx.get(f"{url}/prism/stats", timeout=10).json()
        lease = httpx.get(f"{url}/prism/lease", timeout=10).json()
        out[n] = (s["placement_version"], s["held"], s["down"], s["replay"], lease["holder"])
    return out


def _held(url: str, kind: str = "held") -> dict[int, list[int]]:
    """What a server holds (routes its own tokens to), or has `staged` (loaded, not yet switched to)."""
    stats = httpx.get(f"{url}/prism/stats", timeout=10).json()
    return {int(k): sorted(v) for k, v in (stats.get(kind) or {}).items()}


def _serves_correctly(lc, ref) -> None:
    prompt_ids, want = ref
    model = lc.cluster.resolve_path(lc.cluster.model).name
    for n, url in lc.endpoints().items():
        r = httpx.post(f"{url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {USER_KEY}"},
                       json={"model": model, "prompt": prompt_ids, "max_tokens": 6, "temperature": 0,
                             "return_token_ids": True})
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, (n, r.text)


def test_every_control_route_refuses_without_the_admin_key(cluster_run):
    lc, spec, admin, ref = cluster_run
    urls = lc.endpoints()
    url = urls["edge-a"]
    before = _snapshot(urls)
    p = Placement.from_dict(httpx.get(f"{url}/prism/placement", timeout=10).json())
    hosts = p.hosts.copy()
    hosts[0, :, 1] = True
    newer = Placement.from_hosts(NAMES, hosts, np.ones((3, 3)), version=p.version + 5).to_dict()
    routes = [("/prism/experts/load", {"experts": [[0, 1]]}),
              ("/prism/experts/send", {"experts": [[0, 0]], "to": "edge-b"}),
              ("/prism/experts/drop", {"experts": [[0, 0]]}),
              ("/prism/placement", {"placement": newer, "down": ["edge-c"]}),
              ("/prism/down", {"down": ["edge-b", "edge-c"]}),
              ("/prism/replay", {"workload": "esft:law"}),
              ("/prism/trace/save", None),
              ("/prism/links", {"peer": "edge-b", "drop": True}),
              ("/prism/lease", {"holder": "intruder", "ttl": 60})]
    for path, body in routes:
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {USER_KEY}"}, 403),
                                ({"Authorization": "Bearer not-the-key"}, 401),
                                ({"Authorization": f"Bearer {USER_KEY}", "X-Prism-Coordinator": "x"}, 403)):
            r = httpx.post(url + path, json=body, headers=headers, timeout=10)
            assert r.status_code == status, (path, headers, r.status_code, r.text)
    assert _snapshot(urls) == before  # nothing changed anywhere
    # the same calls with the admin key do act (the refusals above were not a broken route)
    client = ServerClient(lc.cluster, admin, holder="operator")
    try:
        assert client.load("edge-a", [(0, 1)])["loaded"] == 1
        assert 1 in _held(url, "staged")[0]  # loaded, staged until a placement routes to it
        assert client.drop("edge-a", [(0, 1)])["dropped"] == 1
    finally:
        client.close()
    assert _snapshot(urls) == before
    _serves_correctly(lc, ref)


def _coordinator(lc, spec, admin) -> Coordinator:
    config = CoordinatorConfig(period=1e9, poll_interval=0.3, down_after=2.0, replan_on_shift=False,
                               admin_key=admin, lease_seconds=2.0)
    return Coordinator(lc.cluster, config, model=spec)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _consistent(lc, spec) -> tuple[int, np.ndarray]:
    """Every server on one placement version, holding exactly what it routes to; every expert has a copy."""
    urls = lc.endpoints()
    placements = [Placement.from_dict(httpx.get(f"{u}/prism/placement", timeout=10).json()) for u in urls.values()]
    assert len({p.version for p in placements}) == 1, [p.version for p in placements]
    p = placements[0]
    for i, u in enumerate(urls.values()):
        held = _held(u)
        assert {l: np.flatnonzero(p.hosts[i, l]).tolist() for l in range(spec.num_moe_layers)} == \
            {l: held.get(l, []) for l in range(spec.num_moe_layers)}
        assert not any(_held(u, "staged").values())  # no copy left loaded but unused
    assert p.hosts.any(axis=0).all()
    return p.version, p.hosts


@pytest.mark.parametrize("killed", ["after_load", "after_partial_switch", "before_drop"])
def test_a_restarted_coordinator_finishes_or_rolls_back(cluster_run, killed):
    lc, spec, admin, ref = cluster_run
    version, hosts = _consistent(lc, spec)
    # the "dead" coordinator moves an expert (every layer) to the emptiest server from one that holds it
    dst = int(np.argmin(hosts.sum(axis=(1, 2))))
    src, e = next((s, e) for s in range(3) for e in range(spec.num_experts)
                  if s != dst and hosts[s, :, e].all() and not hosts[dst, :, e].any())
    dead = ServerClient(lc.cluster, admin, holder="dead-coordinator")
    try:
        for n in NAMES:
            dead.lease(n, 1.0)
        dead.send(NAMES[src], [(l, e) for l in range(spec.num_moe_layers)], NAMES[dst])
        target = hosts.copy()
        target[dst, :, e], target[src, :, e] = True, False
        p1 = Placement.from_hosts(NAMES, target, np.ones((3, 3)), version=version + 1)
        if killed != "after_load":
            for n in (NAMES[:2] if killed == "after_partial_switch" else NAMES):
                dead.switch(n, p1, [], 5.0)
    finally:
        dead.close()
    _serves_correctly(lc, ref)  # a half-done migration still serves every expert
    coord = _coordinator(lc, spec, admin)
    coord.start()
    try:
        _wait(lambda: coord.reconciled, 20, "the new coordinator did not take over after the lease lapsed")
        new_version, new_hosts = _consistent(lc, spec)
        assert new_version >= version and coord.placement.version == new_version
        if killed == "after_load":  # rolled back: the loaded copies are gone, the source still holds it
            assert (new_hosts == hosts).all()
        else:  # finished: the expert lives on its new holder only
            assert (new_hosts == target).all()
        _serves_correctly(lc, ref)
    finally:
        coord.stop()


def test_two_coordinators_never_both_drive(cluster_run):
    lc, spec, admin, _ = cluster_run
    first = _coordinator(lc, spec, admin)
    first.start()
    second = _coordinator(lc, spec, admin)
    try:
        _wait(lambda: first.reconciled, 20, "the first coordinator did not take control")
        second.start()
        time.sleep(1.0)
        assert not second.holds_control() and not second.reconciled
        assert first.holder in (second.lease_error or "")
        with pytest.raises(ControlFailed) as err:  # the servers themselves refuse it
            second.client.set_down("edge-a", ["edge-c"])
        assert err.value.status == 409
        assert "edge-c" not in httpx.get(f"{lc.endpoints()['edge-a']}/prism/stats", timeout=10).json()["down"]
        # the coordinator's own control routes take the admin key too
        from fastapi.testclient import TestClient

        with TestClient(first.app()) as http:
            assert http.post("/replan?dry_run=true").status_code == 401
            assert http.post("/replan?dry_run=true", headers={"Authorization": f"Bearer {USER_KEY}"}).status_code == 401
            assert http.post("/migrate", json={}).status_code == 401
            ok = http.post("/replan?dry_run=true", headers={"Authorization": f"Bearer {admin}"})
            assert ok.status_code == 200 and ok.json()["migrate"] in (True, False)
            assert http.get("/state").json()["control"]["reconciled"]
        first.stop()  # releases its leases: the second takes over at its next poll
        _wait(lambda: second.reconciled and second.holds_control(), 10, "the second coordinator did not take over")
        assert not first.holds_control() or first._stop.is_set()
    finally:
        first.stop() if not first._stop.is_set() else None
        second.stop()
