"""A real 3-process cluster executing plans: a live plan switch through the coordinator, then the death of a server
that executes layer blocks for the others, both under continuous greedy load.

Tiny Mixtral (2 MoE layers x 8 experts, top-2), 8 expert slots per server. The cluster starts on the placement
P0 (server i holds the experts e with e % 3 == i, every layer at home). The coordinator switches it to a pipeline
plan over P1 (edge-a also holds edge-c's experts 2 and 5, expert 6 moves to edge-b): edge-a's requests run MoE
layer 1 on edge-c, edge-b's run layer 0 on edge-c, so edge-c keeps their KV cache for those blocks. Then edge-c is
SIGKILLed mid-run: edge-a's and edge-b's requests must be rebuilt on a surviving path (tokens kept), none may fail,
and the coordinator pushes a plan without edge-c. Then edge-c comes back (it rejoins the plan), the pipeline is
switched to again and edge-c is killed once more with the coordinator not declaring it down: the homes find out
on their own (the hand-off's connection is gone) and rebuild their requests without waiting out the call deadline.
Every completed request's tokens must equal single-process transformers' greedy tokens.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan

from .load import Load
from .split_cluster import NAMES, PROMPTS, hosts, restart, split_cluster, stats

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MAX_TOKENS = 8
LONG = 24  # the kills' requests: long enough that a kill finds them decoding, with blocks on the peer
A, B, C = range(3)
PIPELINE = np.array([[A, C], [C, B], [C, C]])  # executor[home, MoE layer]


def _pipeline(spec: ModelSpec) -> ExecutionPlan:
    _, p1 = hosts(spec)
    return ExecutionPlan(Placement.from_hosts(NAMES, p1, np.ones((3, 3)), algorithm="split-by-id"), PIPELINE,
                         np.ones((3, spec.num_moe_layers), bool), "pipeline")


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    with split_cluster(tmp_path_factory.mktemp("plans"), LONG) as run:
        yield run


def _model_name(lc) -> str:
    return lc.cluster.resolve_path(lc.cluster.model).name


def _short(refs: dict) -> dict:
    """The references of MAX_TOKENS-token requests (greedy: a prefix of the longer ones)."""
    return {p: (ids, out[:MAX_TOKENS]) for p, (ids, out) in refs.items()}


def _kill_edge_c_mid_run(lc, urls, survivors) -> tuple[float, dict]:
    """SIGKILL edge-c once both survivors have requests with block caches on it; (kill time, resumed before)."""
    deadline = time.monotonic() + 30
    while True:
        runners = {n: stats(urls[n])["plan"]["runner"] for n in survivors}
        if all(st["remote_caches"].get("edge-c", 0) > 0 for st in runners.values()):
            break
        assert time.monotonic() < deadline, f"no request of {survivors} runs a block on edge-c: {runners}"
        time.sleep(0.02)
    os.killpg(lc.procs["edge-c"].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    lc.procs["edge-c"].wait(timeout=10)
    return t_kill, {n: st["resumed"] for n, st in runners.items()}


def test_live_plan_switch_loses_nothing(cluster_run):
    lc, coord, refs, spec, _ = cluster_run
    urls = lc.endpoints()
    target = _pipeline(spec)
    with Load(urls, _short(refs), _model_name(lc), PROMPTS, MAX_TOKENS) as load:
        load.wait(NAMES, after=0.0)
        resumed0 = {n: stats(urls[n])["plan"]["runner"]["resumed"] for n in NAMES}
        t_start = time.monotonic()
        report = coord.switch_plan(target, "test")
        t_end = time.monotonic()
        load.wait(NAMES, after=t_end)
    load.check(NAMES, longest=60)
    assert report.ok and not report.rolled_back, report
    over = [r for r in load.results if r.start < t_end and r.end > t_start]
    print(f"plan switch: {report.seconds:.2f} s, {report.rounds} rounds; {len(load.results)} requests, "
          f"{len(over)} overlapping it, longest {max(r.end - r.start for r in over):.2f} s; resumed "
          f"{ {n: stats(urls[n])['plan']['runner']['resumed'] - resumed0[n] for n in NAMES} }")
    assert report.experts_loaded == 6 and report.experts_dropped == 2
    assert [r for r in load.results if r.start < t_end and r.end > t_start], "nothing was in flight"
    assert (coord.plan.executor == PIPELINE).all() and coord.plan.placement.version == report.to_version
    for i, n in enumerate(NAMES):
        s = stats(urls[n])
        assert s["placement_version"] == report.to_version
        runner = s["plan"]["runner"]
        assert runner["version"] == report.to_version
        want = [[m, m, "here" if PIPELINE[i, m] == i else NAMES[PIPELINE[i, m]]] for m in range(2)]
        if want[0][2] == want[1][2]:
            want = [[0, 1, want[0][2]]]
        assert runner["path"] == want
    # requests after the switch really hand blocks to edge-c
    assert stats(urls["edge-a"])["plan"]["runner"]["handoffs"] > 0
    assert stats(urls["edge-c"])["plan"]["executes_for_peers"]["calls"] > 0


def test_block_executor_killed_mid_run(cluster_run):
    lc, coord, refs, spec, _ = cluster_run
    urls = lc.endpoints()
    if coord.plan is None or not (coord.plan.executor == PIPELINE).all():  # when run alone
        assert coord.switch_plan(_pipeline(spec), "test").ok
    survivors = NAMES[:2]
    with Load({n: urls[n] for n in survivors}, refs, _model_name(lc), PROMPTS, LONG) as load:
        load.wait(survivors, after=0.0)
        t_kill, resumed0 = _kill_edge_c_mid_run(lc, urls, survivors)
        deadline = time.monotonic() + 30
        while coord.servers["edge-c"].live or (coord.plan.executor[:2] == C).any():
            assert time.monotonic() < deadline, f"no plan without edge-c: {coord.events}"
            time.sleep(0.1)
        t_replanned = time.monotonic()
        load.wait(survivors, after=t_replanned)
    failed = [r for r in load.results if not r.ok]
    assert not failed, [f.detail for f in failed[:3]]
    inflight = [r for r in load.results if r.start < t_kill < r.end]
    assert inflight, "no request was in flight at the kill"
    before = sorted(r.end - r.start for r in load.results if r.end < t_kill)
    resumed = {n: stats(urls[n])["plan"]["runner"]["resumed"] - resumed0[n] for n in survivors}
    print(f"kill: {len(inflight)} requests in flight took up to {max(r.end - r.start for r in inflight):.2f} s "
          f"(before: median {before[len(before) // 2]:.2f} s); requests resumed {resumed}; plan without edge-c "
          f"{t_replanned - t_kill:.2f} s after the kill")
    assert sum(resumed.values()) > 0, "no running request was rebuilt: the kill found none with a cache on edge-c"
    for n in survivors:
        s = stats(urls[n])
        assert "edge-c" in s["down"]
        assert "edge-c" not in str(s["plan"]["runner"]["path"])
        assert s["placement_version"] == coord.plan.placement.version


def test_rejoin_then_a_kill_the_homes_detect_themselves(cluster_run):
    lc, coord, refs, spec, args = cluster_run
    urls = lc.endpoints()
    if coord.servers["edge-c"].live:  # when run alone
        os.killpg(lc.procs["edge-c"].pid, signal.SIGKILL)
        lc.procs["edge-c"].wait(timeout=10)
    deadline = time.monotonic() + 30
    while coord.servers["edge-c"].live:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    version_down = coord.plan.placement.version
    restart(lc, "edge-c", args)
    deadline = time.monotonic() + 90
    while not coord.servers["edge-c"].live or coord.plan.placement.version <= version_down:
        assert time.monotonic() < deadline, "edge-c did not rejoin"
        time.sleep(0.2)
    # the rejoined server executes the cluster's plan (not the placement file it started with)
    assert stats(urls["edge-c"])["plan"]["version"] == coord.plan.placement.version
    assert coord.switch_plan(_pipeline(spec), "test").ok
    survivors = NAMES[:2]
    down_after, coord.config.down_after = coord.config.down_after, 1e9  # the homes are on their own
    timeout = float(args[args.index("--timeout") + 1])
    try:
        with Load({n: urls[n] for n in survivors}, refs, _model_name(lc), PROMPTS, LONG) as load:
            load.wait(survivors, after=0.0)
            t_kill, resumed0 = _kill_edge_c_mid_run(lc, urls, survivors)
            load.wait(survivors, after=time.monotonic())
            load.wait(survivors, after=time.monotonic())
    finally:
        coord.config.down_after = down_after
    failed = [r for r in load.results if not r.ok]
    assert not failed, [f.detail for f in failed[:3]]
    inflight = [r for r in load.results if r.start < t_kill < r.end]
    assert inflight, "no request was in flight at the kill"
    stall = max(r.end - r.start for r in inflight)
    resumed = {n: stats(urls[n])["plan"]["runner"]["resumed"] - resumed0[n] for n in survivors}
    print(f"kill without the coordinator: {len(inflight)} requests in flight took up to {stall:.2f} s (call "
          f"deadline {timeout} s x 2 attempts); requests resumed {resumed}")
    assert sum(resumed.values()) > 0
    for n in survivors:
        assert "edge-c" not in str(stats(urls[n])["plan"]["runner"]["path"])  # suspected by the home itself
    assert stall < timeout, "the homes waited out the hand-off deadline before failing over"


def test_post_plan_by_algorithm_on_the_survivors(cluster_run):
    """`POST /plan {"algorithm": ...}` over HTTP: the algorithm's plan for the measured rates, without the down
    server, switched to under load with nothing lost."""
    from fastapi.testclient import TestClient

    lc, coord, refs, _, _ = cluster_run
    urls = lc.endpoints()
    if lc.procs["edge-c"].poll() is None:  # when run alone
        os.killpg(lc.procs["edge-c"].pid, signal.SIGKILL)
        lc.procs["edge-c"].wait(timeout=10)
    deadline = time.monotonic() + 30
    while coord.servers["edge-c"].live or not coord.reconciled:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    survivors = NAMES[:2]
    with Load({n: urls[n] for n in survivors}, _short(refs), _model_name(lc), PROMPTS, MAX_TOKENS) as load, \
            TestClient(coord.app(), client=("127.0.0.1", 50000)) as http:  # loopback: no admin key needed
        load.wait(survivors, after=0.0)
        r = http.post("/plan", json={"algorithm": "pipeline"})
        load.wait(survivors, after=time.monotonic())
    assert r.status_code == 200 and r.json()["ok"], r.text
    load.check(survivors, longest=60)
    plan = coord.plan
    assert plan.algorithm == "pipeline" and not plan.at_home and not (plan.executor[:2] == C).any()
    print(f"POST /plan pipeline on the survivors: blocks {plan.summary()['blocks']}, "
          f"{sum(1 for r in load.results if r.ok)} requests, none failed")
    for n in survivors:
        assert stats(urls[n])["plan"]["version"] == plan.placement.version
