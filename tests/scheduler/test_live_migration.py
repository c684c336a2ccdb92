"""A real 3-process cluster: live migration under load, failover when a server dies, rejoin.

Tiny Mixtral (2 MoE layers x 8 experts, top-2), 8 expert slots per server. P0 gives server i the experts
e with e % 3 == i. P1 replicates edge-c's experts (2, 5) on edge-a and moves expert 6 from edge-a to
edge-b: edge-a has 2 free slots for 4 new experts, so it must drop expert 6 early, after edge-b has it,
behind an intermediate placement switch. Weights travel peer to peer (`transfer="peer"`). Requests run
on every server throughout; each must succeed with the tokens of single-process transformers.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import numpy as np
import pytest

from prism_moe.placement.placement import Placement

from .load import Load
from .split_cluster import NAMES, PROMPTS, hosts, restart, split_cluster, stats

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    with split_cluster(tmp_path_factory.mktemp("live"), MAX_TOKENS) as run:
        yield run


def test_migration_under_load_loses_nothing(cluster_run):
    lc, coord, refs, spec, _ = cluster_run
    urls = lc.endpoints()
    _, p1 = hosts(spec)
    target = Placement.from_hosts(NAMES, p1, np.ones((3, 3)))
    with Load(urls, refs, lc.cluster.resolve_path(lc.cluster.model).name, PROMPTS, MAX_TOKENS) as load:
        load.wait(NAMES, after=0.0)
        t_start = time.monotonic()
        report = coord.migrate_to(target, "test")
        t_end = time.monotonic()
        load.wait(NAMES, after=t_end)
    failed = [r for r in load.results if not r.ok]
    assert not failed, failed[:3]
    assert report.ok and not report.rolled_back, report
    assert report.experts_loaded == 6 and report.experts_dropped == 2
    assert report.bytes_moved == 6 * spec.expert_bytes  # peer to peer, not from the checkpoint
    assert report.rounds >= 2  # edge-a dropped expert 6 early, behind an intermediate switch
    overlapping = [r for r in load.results if r.start < t_end and r.end > t_start]
    assert overlapping, "no request was in flight during the migration"
    for i, n in enumerate(NAMES):
        s = stats(urls[n])
        assert s["placement_version"] == report.to_version
        held = {int(k): v for k, v in s["held"].items()}
        assert held == {l: np.flatnonzero(p1[i, l]).tolist() for l in range(spec.num_moe_layers)}
        assert s["experts_held"] <= s["capacity"] == 8


def test_failover_and_rejoin(cluster_run):
    lc, coord, refs, spec, args = cluster_run
    urls = lc.endpoints()
    model_name = lc.cluster.resolve_path(lc.cluster.model).name
    _, p1 = hosts(spec)
    if not (coord.placement.hosts == p1).all():  # when run alone
        assert coord.migrate_to(Placement.from_hosts(NAMES, p1, np.ones((3, 3)))).ok
    # every expert of edge-c has a copy on edge-a, so the others lose nothing when it dies
    os.killpg(lc.procs["edge-c"].pid, signal.SIGKILL)
    lc.procs["edge-c"].wait(timeout=10)
    t_kill = time.monotonic()
    with Load({n: urls[n] for n in NAMES[:2]}, refs, model_name, PROMPTS, MAX_TOKENS) as load:
        load.wait(NAMES[:2], after=t_kill)
        deadline = time.monotonic() + 20
        while coord.servers["edge-c"].live:
            assert time.monotonic() < deadline, "the coordinator did not mark edge-c down"
            time.sleep(0.1)
        load.wait(NAMES[:2], after=time.monotonic())
    failed = [r for r in load.results if not r.ok]
    assert not failed, [f[4] for f in failed[:3]]
    assert "edge-c" in stats(urls["edge-b"])["down"]
    assert coord.error is None and not coord.live_mask()[2]

    # edge-c comes back (with the placement file it started with): it is given the current placement
    version_down = coord.placement.version
    restart(lc, "edge-c", args)
    deadline = time.monotonic() + 90
    while not coord.servers["edge-c"].live or coord.placement.version <= version_down:
        assert time.monotonic() < deadline, "edge-c did not rejoin"
        time.sleep(0.2)
    version = coord.placement.version
    for n in NAMES:
        assert stats(urls[n])["placement_version"] == version
        assert "edge-c" not in stats(urls[n])["down"]
    prompt_ids, want = refs[PROMPTS[0]]
    r = httpx.post(f"{urls['edge-c']}/v1/completions", timeout=60, json={
        "model": model_name, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0,
        "return_token_ids": True})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
