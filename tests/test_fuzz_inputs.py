"""Random mutations of cluster files, placement files and trace files: always a clear error (the project's
own error type, naming the field or the file), never a traceback from deep inside a parser (bounded
hypothesis runs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_moe.config import ConfigError, load_cluster
from prism_moe.placement.placement import Placement, PlacementError
from prism_moe.stats.trace import RoutingTrace, load_trace, save_trace

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

CLUSTER = {"model": "olmoe-1b-7b", "device": "cpu",
           "servers": [{"name": "a", "memory_gib": 8, "host": "127.0.0.1", "http_port": 8001, "workload": "esft:law"},
                       {"name": "b", "memory_gib": 8, "gpu": "a100-40gb", "request_rate": 2.0}],
           "network": {"bandwidth_mbps": 500, "latency_ms": 2,
                       "links": [{"between": ["a", "b"], "latency_ms": 5}]}}

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts and lists."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> tuple[dict, tuple]:
    doc = copy.deepcopy(base)
    path = draw(st.sampled_from(_paths(base)))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        key = draw(st.text(min_size=1, max_size=6))
        parent[key] = draw(junk)
        path = (*path[:-1], key)  # the field the error must name is the new one
    else:
        parent[path[-1]] = draw(junk)
    return doc, path


def _names_field(message: str, path: tuple) -> bool:
    return any(str(k) in message for k in path if isinstance(k, str)) or "servers" in message


@FUZZ
@given(mutated(CLUSTER))
def test_mutated_cluster_files_fail_clearly(tmp_path_factory, case):
    doc, path = case
    p = tmp_path_factory.mktemp("c") / "cluster.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        cluster = load_cluster(p)
    except ConfigError as e:
        assert str(p) in str(e) and _names_field(str(e), path), (path, str(e))
        return
    cluster.link_matrices()  # what loaded is usable
    cluster.non_loopback_hosts()


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode), st.integers(0, 400))
def test_torn_or_random_cluster_files_fail_clearly(tmp_path_factory, blob, cut):
    p = tmp_path_factory.mktemp("c") / "cluster.yaml"
    p.write_bytes(yaml.safe_dump(CLUSTER).encode()[:cut] if cut < 300 else blob)
    try:
        load_cluster(p)
    except ConfigError as e:
        assert str(p) in str(e)


def _placement_doc() -> dict:
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, :, :2] = hosts[1, :, 2:] = True
    hosts[1, 0, 0] = True
    return Placement.from_hosts(["a", "b"], hosts, np.ones((2, 2)), capacity=np.array([8, 8])).to_dict()


PLACEMENT = _placement_doc()


@FUZZ
@given(mutated(PLACEMENT))
def test_mutated_placement_files_fail_clearly(tmp_path_factory, case):
    doc, path = case
    p = tmp_path_factory.mktemp("p") / "placement.json"
    p.write_text(json.dumps(doc))
    try:
        Placement.load(p)
    except PlacementError as e:
        msg = str(e)
        assert _names_field(msg, path) or any(w in msg for w in ("placement", "server", "format")), (path, msg)


@FUZZ
@given(st.integers(0, 2000), st.binary(max_size=64))
def test_torn_or_foreign_placement_files_fail_clearly(tmp_path_factory, cut, blob):
    p = tmp_path_factory.mktemp("p") / "placement.json"
    text = json.dumps(PLACEMENT).encode()
    p.write_bytes(text[:cut] if cut < len(text) else blob)
    try:
        Placement.load(p)
    except PlacementError as e:
        assert str(p) in str(e) or "placement" in str(e)


def _trace_bytes(tmp: Path) -> bytes:
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(10)])
    t = RoutingTrace(experts.astype(np.int16), rng.random((10, 3, 2), dtype=np.float32), np.array([0, 4, 10]), 8)
    return save_trace(t, tmp / "t.safetensors").read_bytes()


@FUZZ
@given(st.data())
def test_torn_or_mutated_trace_files_fail_clearly(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("t")
    good = _trace_bytes(tmp)
    how = data.draw(st.sampled_from(["truncate", "flip", "foreign"]))
    if how == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        b = bytearray(good)
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    else:
        blob = data.draw(st.binary(max_size=300))
    p = tmp / "bad.safetensors"
    p.write_bytes(blob)
    try:
        t = load_trace(p)
    except ValueError as e:
        assert str(p) in str(e)
        return
    assert t.num_tokens == len(t.experts)  # a mutation that kept a valid trace loads as one


def _counts_doc(tmp: Path) -> dict:
    from prism_moe.stats.trace import save_counts

    counts = np.arange(2 * 4, dtype=np.int64).reshape(2, 4)
    return json.loads(save_counts(counts, tmp / "c.json", top_k=2, source="test").read_text())


@FUZZ
@given(st.data())
def test_mutated_or_torn_counts_files_fail_clearly(tmp_path_factory, data):
    from prism_moe.stats.trace import load_counts

    tmp = tmp_path_factory.mktemp("n")
    base = _counts_doc(tmp)
    p = tmp / "bad.json"
    if data.draw(st.booleans()):
        doc, path = data.draw(mutated(base))
        p.write_text(json.dumps(doc))
    else:
        text = json.dumps(base).encode()
        p.write_bytes(text[:data.draw(st.integers(0, len(text) - 1))])
    try:
        load_counts(p)
    except ValueError as e:
        assert str(p) in str(e) or "counts" in str(e), str(e)
