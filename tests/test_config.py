"""The cluster file: validation errors say what to fix; derived facts (slots, links) are right."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.config import ConfigError, cluster_from_dict, load_cluster
from prism_moe.model.spec import GIB, load_model_spec

BASE = {"model": "deepseek-v2-lite", "servers": [{"name": "a", "memory_gib": 12}, {"name": "b", "memory_gib": 12}]}


def test_missing_field():
    with pytest.raises(ConfigError, match=r"servers: Field required"):
        cluster_from_dict({"model": "deepseek-v2-lite"})
    with pytest.raises(ConfigError, match=r"servers\.0\.memory_gib: Field required"):
        cluster_from_dict({"model": "deepseek-v2-lite", "servers": [{"name": "a"}]})


def test_unknown_field_names_the_field():
    data = {**BASE, "servers": [{"name": "a", "memory_gib": 12, "memroy": 3}]}
    with pytest.raises(ConfigError, match=r"servers\.0\.memroy: unknown field"):
        cluster_from_dict(data)
    with pytest.raises(ConfigError, match=r"netwrok: unknown field"):
        cluster_from_dict({**BASE, "netwrok": {}})


def test_duplicate_server_names():
    data = {**BASE, "servers": [{"name": "a", "memory_gib": 12}, {"name": "a", "memory_gib": 20}]}
    with pytest.raises(ConfigError, match=r"server names must be unique; repeated: \['a'\]"):
        cluster_from_dict(data)


def test_bad_values():
    with pytest.raises(ConfigError, match=r"servers\.0\.memory_gib: Input should be greater than 0"):
        cluster_from_dict({**BASE, "servers": [{"name": "a", "memory_gib": 0}]})
    with pytest.raises(ConfigError, match="may use letters, digits"):
        cluster_from_dict({**BASE, "servers": [{"name": "a b", "memory_gib": 1}]})
    with pytest.raises(ConfigError, match=r"network.links: unknown server\(s\) \['z'\]"):
        cluster_from_dict({**BASE, "network": {"links": [{"between": ["a", "z"], "bandwidth_mbps": 10}]}})
    with pytest.raises(ConfigError, match="a link joins two different servers"):
        cluster_from_dict({**BASE, "network": {"links": [{"between": ["a", "a"]}]}})
    with pytest.raises(ConfigError, match="a cluster file is a YAML mapping"):
        cluster_from_dict(["not", "a", "mapping"])


def test_infeasible_memory_message_gives_the_numbers():
    cluster = cluster_from_dict({**BASE, "servers": [{"name": "a", "memory_gib": 8}, {"name": "b", "memory_gib": 8}]})
    model = cluster.model_spec()
    slots = cluster.expert_slots(model)
    with pytest.raises(ConfigError) as e:
        cluster.check_feasible(model)
    msg = str(e.value)
    need = 1664 - int(slots.sum())
    for part in ("1664 experts", f"only {int(slots.sum())} slots", f"a: {slots[0]}", f"b: {slots[1]}",
                 "2.44 GiB dense part", f"memory for {need} more experts"):
        assert part in msg, (part, msg)


def test_memory_below_the_dense_part():
    cluster = cluster_from_dict({**BASE, "servers": [{"name": "a", "memory_gib": 2}]})
    with pytest.raises(ConfigError, match=r"server 'a': memory_gib=2(\.0)? is below the dense part of deepseek-v2-lite \(2\.44 GiB\).*at least 2\.46 GiB"):
        cluster.expert_slots(cluster.model_spec())


def test_expert_slots_and_links():
    data = {**BASE, "network": {"bandwidth_mbps": 500, "latency_ms": 2,
                                "links": [{"between": ["a", "b"], "bandwidth_mbps": 100}]}}
    cluster = cluster_from_dict(data)
    model = load_model_spec("deepseek-v2-lite")
    expected = int((12 * GIB - model.dense_bytes) // model.expert_bytes)
    assert cluster.expert_slots(model).tolist() == [expected, expected] == [593, 593]
    bw, lat = cluster.link_matrices()
    assert bw[0, 1] == bw[1, 0] == 100e6 and np.isinf(bw[0, 0])
    assert lat[0, 1] == pytest.approx(0.002) and lat[1, 1] == 0.0


def test_load_cluster_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_cluster(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster(bad)
    good = tmp_path / "c.yaml"
    good.write_text("model: deepseek-v2-lite\nservers:\n  - {name: a, memory_gib: 30}\n")
    cluster = load_cluster(good)
    assert cluster.resolve_path("x.json") == tmp_path / "x.json"
    assert cluster.server("a").memory_gib == 30
    with pytest.raises(ConfigError, match="no server named 'z'"):
        cluster.server("z")
