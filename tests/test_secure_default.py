"""Secure by default across hosts: a cluster other machines reach needs Curve keys (or an explicit --insecure),
and the coordinator needs the admin key; loopback clusters start with one command as before."""

from __future__ import annotations

import pytest
import yaml

from prism_moe.cli import main
from prism_moe.config import ConfigError, cluster_from_dict, is_loopback_host

LAN = {"model": "olmoe-1b-7b", "device": "cpu",
       "servers": [{"name": "a", "memory_gib": 8, "host": "10.0.0.1", "http_port": 8001, "expert_port": 9001},
                   {"name": "b", "memory_gib": 8, "host": "127.0.0.1", "http_port": 8002, "expert_port": 9002}]}


def test_loopback_hosts():
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost"))
    assert not any(is_loopback_host(h) for h in ("10.0.0.1", "0.0.0.0", "edge-a.lan", "::"))


def test_require_secure():
    cluster = cluster_from_dict(LAN)
    assert cluster.non_loopback_hosts() == ["10.0.0.1"]
    with pytest.raises(ConfigError, match=r"10\.0\.0\.1.*prism keys --cluster"):
        cluster.require_secure(keys=False, insecure=False)
    cluster.require_secure(keys=True, insecure=False)
    cluster.require_secure(keys=False, insecure=True)
    loopback = cluster_from_dict({**LAN, "servers": [{**s, "host": "127.0.0.1"} for s in LAN["servers"]]})
    loopback.require_secure(keys=False, insecure=False)  # local demos need nothing


@pytest.mark.parametrize("command", [["serve", "--server", "a"], ["cluster", "up"], ["coordinator"]])
def test_commands_refuse_a_network_cluster_without_keys(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("PRISM_ADMIN_KEY", raising=False)
    path = tmp_path / "lan.yaml"
    path.write_text(yaml.safe_dump(LAN))
    assert main([*command, "--cluster", str(path)]) == 2
    err = capsys.readouterr().err
    assert "10.0.0.1" in err and "prism keys" in err and "--insecure" in err
