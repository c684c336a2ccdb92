"""Cluster CurveZMQ key files: layout, permissions, loading and refusals (no sockets here)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq.auth

from prism_moe.runtime.keys import KeyFileError, load_identity, make_cluster_keys

pytestmark = pytest.mark.timeout(30)


def test_make_cluster_keys_layout_and_permissions(tmp_path: Path) -> None:
    out = make_cluster_keys(tmp_path / "keys", ["edge-a", "edge-b", "coordinator"])
    keys = tmp_path / "keys"
    assert sorted(p.name for p in (keys / "public").iterdir()) == [
        "coordinator.key",
        "edge-a.key",
        "edge-b.key",
    ]
    assert sorted(out) == ["coordinator", "edge-a", "edge-b"]
    for name, secret in out.items():
        assert secret == keys / "private" / f"{name}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        public, secret_key = zmq.auth.load_certificate(secret)
        assert (
            secret_key is not None and zmq.auth.load_certificate(keys / "public" / f"{name}.key")[0] == public
        )
    assert stat.S_IMODE((keys / "private").stat().st_mode) == 0o700
    assert not [p for p in keys.iterdir() if p.name not in ("public", "private")]  # temp dir removed
    # one distinct keypair per server
    assert len({zmq.auth.load_certificate(p)[0] for p in out.values()}) == 3


def test_load_identity(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path, ["a", "b"])
    ident = load_identity(tmp_path, "a")
    assert ident.name == "a" and len(ident.public_key) == 40 and len(ident.secret_key) == 40
    assert ident.peer_key("b") == zmq.auth.load_certificate(tmp_path / "public" / "b.key")[0]
    with pytest.raises(KeyFileError, match="no public key for peer 'c'"):
        ident.peer_key("c")
    with pytest.raises(KeyFileError, match="cannot load the secret key of 'c'"):
        load_identity(tmp_path, "c")


def test_refuses_overwrite_bad_and_duplicate_names(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path, ["a"])
    before = (tmp_path / "public" / "a.key").read_bytes()
    with pytest.raises(KeyFileError, match="already exist"):
        make_cluster_keys(tmp_path, ["a", "b"])
    assert (tmp_path / "public" / "a.key").read_bytes() == before
    make_cluster_keys(tmp_path, ["a"], overwrite=True)
    assert (tmp_path / "public" / "a.key").read_bytes() != before
    for bad in ["../x", "a/b", ".hidden", "", "x" * 65]:
        with pytest.raises(KeyFileError, match="cannot name a key file"):
            make_cluster_keys(tmp_path / "other", [bad])
    with pytest.raises(KeyFileError, match="duplicate"):
        make_cluster_keys(tmp_path / "other", ["a", "a"])
    with pytest.raises(KeyFileError, match="no server names"):
        make_cluster_keys(tmp_path / "other", [])


def test_load_identity_detects_mismatched_public_key(tmp_path: Path) -> None:
    make_cluster_keys(tmp_path, ["a", "b"])
    (tmp_path / "public" / "a.key").write_bytes((tmp_path / "public" / "b.key").read_bytes())
    with pytest.raises(KeyFileError, match="does not match"):
        load_identity(tmp_path, "a")
