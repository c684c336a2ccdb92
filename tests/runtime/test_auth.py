"""The control plane's guard (runtime/auth.py) on a bare FastAPI app, and admin key files."""

from __future__ import annotations

import os
import stat

import pytest
from fastapi import Depends, FastAPI, HTTPException
from fastapi.testclient import TestClient

from prism_moe.runtime.auth import (
    ADMIN_KEY_ENV,
    ControlGuard,
    ControlLease,
    is_loopback_client,
    resolve_admin_key,
)
from prism_moe.runtime.keys import KeyFileError, make_admin_key, read_admin_key

USER_KEY = "user-key-0123456789"


def _app(guard: ControlGuard) -> tuple[TestClient, list[int]]:
    changed: list[int] = []
    app = FastAPI()

    @app.post("/prism/down", dependencies=[Depends(guard)])
    def down(body: dict) -> dict:
        changed.append(1)
        return {"ok": True}

    return TestClient(app), changed  # TestClient's client host is "testclient": not loopback


def test_admin_key_is_required_and_the_users_key_is_refused(tmp_path):
    admin = read_admin_key(make_admin_key(tmp_path / "admin.key"))
    client, changed = _app(ControlGuard(admin, USER_KEY))
    assert client.post("/prism/down", json={}).status_code == 401
    assert client.post("/prism/down", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post("/prism/down", json={}, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == 403 and "users' API key" in r.json()["detail"]
    # the credential is checked before the body: a bad body without it is still 401, not 400
    assert client.post("/prism/down", content=b"{not json").status_code == 401
    assert changed == []
    assert client.post("/prism/down", json={}, headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    assert changed == [1]


def test_without_an_admin_key_control_is_for_loopback_only():
    client, changed = _app(ControlGuard(None, USER_KEY))
    r = client.post("/prism/down", json={}, headers={"Authorization": f"Bearer {USER_KEY}"})
    assert r.status_code == 403 and "this machine only" in r.json()["detail"]
    assert changed == []
    assert is_loopback_client("127.0.0.1") and is_loopback_client("::1") and is_loopback_client("localhost")
    assert not is_loopback_client("10.0.0.5") and not is_loopback_client("testclient") and not is_loopback_client(None)


def test_admin_key_must_differ_from_the_users_key():
    with pytest.raises(ValueError, match="must differ"):
        ControlGuard(USER_KEY, USER_KEY)


def test_lease_fences_a_second_coordinator():
    now = [0.0]
    lease = ControlLease(clock=lambda: now[0])
    lease.check(None)  # nobody holds it: an operator may act
    lease.acquire("a", 5)
    lease.check("a")
    with pytest.raises(Exception, match="held by coordinator 'a'") as e:
        lease.acquire("b", 5)
    assert e.value.status_code == 409
    with pytest.raises(Exception, match="only it may change"):
        lease.check("b")
    with pytest.raises(Exception, match="only it may change"):
        lease.check(None)
    now[0] = 4.0
    lease.acquire("a", 5)  # renewed
    now[0] = 8.0
    with pytest.raises(HTTPException):
        lease.acquire("b", 5)
    now[0] = 9.5  # lapsed: the next coordinator takes over, the old one is fenced out
    lease.acquire("b", 5)
    with pytest.raises(HTTPException):
        lease.check("a")
    lease.release("a")  # not the holder: no effect
    assert lease.state()["holder"] == "b"
    lease.release("b")
    assert lease.state()["holder"] is None


def test_admin_key_files(tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    path = make_admin_key(tmp_path / "admin.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = read_admin_key(path)
    with pytest.raises(KeyFileError, match="already exists"):
        make_admin_key(path)
    assert read_admin_key(make_admin_key(path, overwrite=True)) != key
    key = read_admin_key(path)
    assert resolve_admin_key(None, tmp_path) == key  # from the --keys folder
    assert resolve_admin_key(None, tmp_path / "nowhere") is None
    monkeypatch.setenv(ADMIN_KEY_ENV, "short")
    with pytest.raises(KeyFileError, match="shorter"):
        resolve_admin_key()
    monkeypatch.setenv(ADMIN_KEY_ENV, "an-operator-chosen-secret")
    assert resolve_admin_key(None, tmp_path) == "an-operator-chosen-secret"
    assert resolve_admin_key(path) == key  # the file flag wins
    # torn and foreign files are refused, never half-read
    (tmp_path / "torn.key").write_text(key[:20])
    (tmp_path / "foreign.key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "binary.key").write_bytes(b"\xff\xfe\x00")
    for name in ("torn.key", "foreign.key", "binary.key"):
        with pytest.raises(KeyFileError, match="admin key"):
            read_admin_key(tmp_path / name)


def test_the_lease_guards_the_routes_a_coordinator_drives_only(tmp_path):
    admin = read_admin_key(make_admin_key(tmp_path / "admin.key"))
    lease = ControlLease()
    guard = ControlGuard(admin, USER_KEY, lease)
    app = FastAPI()
    for path in ("/prism/down", "/prism/experts/load", "/prism/placement", "/prism/replay", "/prism/links"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["POST"], dependencies=[Depends(guard)])
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {admin}"}
    lease.acquire("coordinator-1", 30)
    for path in ("/prism/down", "/prism/experts/load", "/prism/placement"):
        assert client.post(path, headers=auth).status_code == 409
        assert client.post(path, headers={**auth, "X-Prism-Coordinator": "coordinator-2"}).status_code == 409
        assert client.post(path, headers={**auth, "X-Prism-Coordinator": "coordinator-1"}).status_code == 200
    for path in ("/prism/replay", "/prism/links"):  # benchmark routes: the admin key is enough
        assert client.post(path, headers=auth).status_code == 200
        assert client.post(path).status_code == 401
