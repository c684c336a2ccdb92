"""Launcher input checks that need no processes."""

import pytest

from prism_moe.config import cluster_from_dict
from prism_moe.runtime.launcher import LaunchError, LocalCluster, start_local_cluster

CLUSTER = {"model": "olmoe-1b-7b", "device": "cpu",
           "servers": [{"name": "a", "memory_gib": 8}, {"name": "b", "memory_gib": 8}]}


def test_starting_a_server_the_file_lacks_says_which(tmp_path):
    with pytest.raises(LaunchError, match=r"\['c'\] are not in the cluster file"):
        start_local_cluster(cluster_from_dict(CLUSTER), tmp_path, only=["b", "c"])
    assert not (tmp_path / "cluster.yaml").exists()  # nothing written, nothing started


def test_endpoints_list_only_the_servers_started_here(tmp_path):
    cluster = cluster_from_dict({**CLUSTER, "servers": [{**s, "http_port": 8000 + i}
                                                         for i, s in enumerate(CLUSTER["servers"])]})
    assert list(LocalCluster(tmp_path, cluster).endpoints()) == ["a", "b"]
    assert LocalCluster(tmp_path, cluster, started=("b",)).endpoints() == {"b": "http://127.0.0.1:8001"}
