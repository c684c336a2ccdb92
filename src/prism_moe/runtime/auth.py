"""The closed control plane: who may change a server's (or the coordinator's) state over HTTP.

User traffic (`/v1/*`, guarded by the users' API key) and control (`/prism/*` routes that change state)
are separate trust levels:

* With an admin credential configured (`prism keys` writes `admin.key`; servers and the coordinator take
  it with `--admin-key-file`, `$PRISM_ADMIN_KEY`, or from the `--keys` folder), a control request must
  send `Authorization: Bearer <admin key>`. A missing or wrong credential gets 401; the users' API key
  gets 403 (it never reaches control). Keys are compared in constant time.
* With none configured, control is open to loopback clients only (local demos) and answers 403 to any
  other host: a cluster reachable over a network cannot be reconfigured by whoever reaches its port.

`ControlLease` fences coordinators: a coordinator holds a lease on every server it drives and renews it;
while a lease is held, requests to the routes it drives (`LEASED_ROUTES`) from anyone else are refused
with 409, so two coordinators never both drive a cluster (the second one waits until the first stops
renewing).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

ADMIN_KEY_ENV = "PRISM_ADMIN_KEY"
# What the lease protects: the routes a coordinator drives (what a server holds and routes to). The others
# (replay, emulated links, trace save: benchmarks and recording) need the admin key only.
LEASED_ROUTES = ("/prism/experts/", "/prism/placement", "/prism/down")
HOLDER_HEADER = "X-Prism-Coordinator"  # who sends a control request (the lease holder's id)
MIN_ADMIN_KEY_CHARS = 16


def resolve_admin_key(admin_key_file: str | os.PathLike[str] | None = None,
                      keys_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The admin credential: `admin_key_file`, else `$PRISM_ADMIN_KEY`, else `keys_dir/admin.key` when present,
    else None (control only from loopback)."""
    from prism_moe.runtime.keys import ADMIN_KEY_FILE, KeyFileError, read_admin_key

    if admin_key_file:
        return read_admin_key(admin_key_file)
    env = os.environ.get(ADMIN_KEY_ENV)
    if env:
        if len(env.strip()) < MIN_ADMIN_KEY_CHARS:
            raise KeyFileError(f"${ADMIN_KEY_ENV} is shorter than {MIN_ADMIN_KEY_CHARS} characters; use the key "
                               f"`prism keys` writes (admin.key)")
        return env.strip()
    if keys_dir is not None and (Path(keys_dir) / ADMIN_KEY_FILE).is_file():
        return read_admin_key(Path(keys_dir) / ADMIN_KEY_FILE)
    return None


def is_loopback_client(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


class ControlLease:
    """One coordinator at a time: `acquire` grants or renews a lease for `ttl` seconds; `check` refuses others."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.holder: str | None = None
        self._expires = 0.0

    def _active(self) -> str | None:
        return self.holder if self.holder is not None and self._clock() < self._expires else None

    def acquire(self, holder: str, ttl: float) -> dict[str, Any]:
        if not holder or ttl <= 0 or ttl > 300:
            raise HTTPException(400, "lease: give a holder id and a ttl in (0, 300] seconds")
        with self._lock:
            current = self._active()
            if current is not None and current != holder:
                raise HTTPException(409, f"control lease held by coordinator {current!r} for "
                                         f"{self._expires - self._clock():.1f} s more; stop it, or wait until it "
                                         f"stops renewing")
            self.holder, self._expires = holder, self._clock() + ttl
            return {"holder": holder, "expires_in": ttl}

    def release(self, holder: str) -> dict[str, Any]:
        with self._lock:
            if self._active() == holder:
                self.holder = None
            return {"holder": self._active()}

    def check(self, holder: str | None) -> None:
        with self._lock:
            current = self._active()
            if current is not None and (holder is None or not _same(holder, current)):
                raise HTTPException(409, f"control lease held by coordinator {current!r}: only it may change this "
                                         f"server for {self._expires - self._clock():.1f} s more")

    def state(self) -> dict[str, Any]:
        with self._lock:
            current = self._active()
            return {"holder": current, "expires_in": max(0.0, self._expires - self._clock()) if current else 0.0}


class ControlGuard:
    """FastAPI dependency for control routes: the admin credential (or loopback when none), then the lease."""

    def __init__(self, admin_key: str | None, api_key: str | None = None,
                 lease: ControlLease | None = None) -> None:
        if admin_key is not None and api_key is not None and _same(admin_key, api_key):
            raise ValueError("the admin key must differ from the users' API key (users must not hold control)")
        self.admin_key, self.api_key, self.lease = admin_key, api_key, lease

    def authorize(self, request: Request) -> None:
        """Credential only (the lease route itself uses this)."""
        if self.admin_key is None:
            host = request.client.host if request.client else None
            if not is_loopback_client(host):
                raise HTTPException(403, f"control routes are open to this machine only (the request came from "
                                         f"{host}); give servers and coordinator an admin key (`prism keys`, "
                                         f"--admin-key-file) to control them from another host")
            return
        given = _bearer(request)
        if given is not None and _same(given, self.admin_key):
            return
        if given is not None and self.api_key is not None and _same(given, self.api_key):
            raise HTTPException(403, "the users' API key does not grant control; send the admin key "
                                     "(`Authorization: Bearer <admin key>`)")
        raise HTTPException(401, "control route: invalid or missing admin key; send 'Authorization: Bearer "
                                 "<admin key>' (the admin.key that `prism keys` writes)",
                            headers={"WWW-Authenticate": "Bearer"})

    def __call__(self, request: Request) -> None:
        self.authorize(request)
        if self.lease is not None and request.url.path.startswith(LEASED_ROUTES):
            self.lease.check(request.headers.get(HOLDER_HEADER))
