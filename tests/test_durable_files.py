"""Durable files: atomic writes (fileio.py) and refusal of torn or foreign placement, state, trace and key files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from prism_moe.fileio import atomic_write_bytes, atomic_write_text
from prism_moe.placement.placement import Placement, PlacementError
from prism_moe.runtime.keys import KeyFileError, load_identity, make_cluster_keys
from prism_moe.runtime.launcher import STATE_FILE, LaunchError, stop_cluster
from prism_moe.stats.trace import RoutingTrace, load_trace, save_trace


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "old")
    atomic_write_bytes(path, b"new", mode=0o600)
    assert path.read_text() == "new" and oct(os.stat(path).st_mode & 0o777) == "0o600"

    class Boom(bytes):
        pass

    with pytest.raises(TypeError):  # the write fails half-way: the old file stays whole, no temp file is left
        atomic_write_bytes(path, Boom(b"x") + None)  # type: ignore[operator]
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text is not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def _placement() -> Placement:
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, :, :2] = hosts[1, :, 2:] = True
    return Placement.from_hosts(["a", "b"], hosts, np.ones((2, 2)))


def test_torn_and_foreign_placement_files_are_refused(tmp_path):
    good = tmp_path / "p.json"
    _placement().save(good)
    assert (Placement.load(good).hosts == _placement().hosts).all()
    text = good.read_bytes()
    for cut in (0, 1, len(text) // 2, len(text) - 1):
        (tmp_path / "torn.json").write_bytes(text[:cut])
        with pytest.raises(PlacementError, match="not valid JSON"):
            Placement.load(tmp_path / "torn.json")
    (tmp_path / "foreign.json").write_text(json.dumps({"servers": ["a"], "placement": {}}))
    with pytest.raises(PlacementError, match="not a prism-moe placement"):
        Placement.load(tmp_path / "foreign.json")
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(PlacementError, match="not valid JSON"):
        Placement.load(tmp_path / "bin.json")


def test_torn_and_foreign_trace_files_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(6)])
    path = save_trace(RoutingTrace(experts.astype(np.int16), None, np.array([0, 6]), 8), tmp_path / "t.safetensors")
    blob = path.read_bytes()
    for cut in (0, 7, 8, len(blob) // 2, len(blob) - 1):
        (tmp_path / "torn.safetensors").write_bytes(blob[:cut])
        with pytest.raises(ValueError, match="torn.safetensors"):
            load_trace(tmp_path / "torn.safetensors")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a prism-moe trace"):
        load_trace(tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_torn_and_foreign_state_files_are_refused(tmp_path):
    good = {"servers": {"a": {"pid": 2**22 + 1, "http": "http://127.0.0.1:1"}}}
    for blob in (json.dumps(good)[:20], "", "\xff", json.dumps({"servers": {"a": {"pid": 0}}}),
                 json.dumps({"servers": {"a": {"pid": "1234"}}}), json.dumps([1, 2]),
                 json.dumps({**good, "coordinator": {"pid": -1}})):
        (tmp_path / STATE_FILE).write_text(blob)
        with pytest.raises(LaunchError, match="state file"):
            stop_cluster(tmp_path)  # refused before anything is signalled (pid 0 or -1 would hit our own group)


def test_torn_and_foreign_key_files_are_refused(tmp_path):
    make_cluster_keys(tmp_path, ["a", "b"])
    assert load_identity(tmp_path, "a").name == "a"
    secret = tmp_path / "private" / "a.key_secret"
    text = secret.read_bytes()
    for blob in (text[: len(text) // 2], text[:-30], b"-----BEGIN OPENSSH PRIVATE KEY-----\n", b"\x00\xff"):
        secret.write_bytes(blob)
        with pytest.raises(KeyFileError):
            load_identity(tmp_path, "a")
    secret.write_bytes(text)
    public = tmp_path / "public" / "a.key"
    public.write_bytes(public.read_bytes()[:40])
    with pytest.raises(KeyFileError):
        load_identity(tmp_path, "a")
