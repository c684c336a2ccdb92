"""HTTP calls from the coordinator to the servers' `/prism/*` control routes (see runtime/server.py).

HTTP, not the ZeroMQ expert link: control is rare and small, the coordinator then needs no CurveZMQ
identity, and an operator can make the same calls with curl. Weights never pass through here: a
`send` makes the source push them to the receiver over the expert link.

Every call carries the admin credential (`Authorization: Bearer <admin key>`, never the users' API key)
and the coordinator's lease holder id (`X-Prism-Coordinator`): see runtime/auth.py.
"""

from __future__ import annotations

from typing import Any

import httpx

from prism_moe.config import ClusterSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan


class ControlFailed(RuntimeError):
    """A server refused or did not answer a control call."""

    def __init__(self, server: str, what: str, detail: str, status: int | None = None) -> None:
        super().__init__(f"{server}: {what} failed: {detail}")
        self.server, self.what, self.detail, self.status = server, what, detail, status


class ServerClient:
    def __init__(self, cluster: ClusterSpec, admin_key: str | None = None, holder: str | None = None,
                 timeout: float = 60.0) -> None:
        from prism_moe.runtime.auth import HOLDER_HEADER

        self.urls = {s.name: f"http://{s.host}:{s.http_port}" for s in cluster.servers}
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        if holder:
            headers[HOLDER_HEADER] = holder
        self.holder = holder
        self.timeout = timeout
        self._http = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, server: str, method: str, path: str, timeout: float | None = None, **kw: Any) -> Any:
        try:
            r = self._http.request(method, self.urls[server] + path, timeout=timeout or self.timeout, **kw)
        except httpx.HTTPError as e:
            raise ControlFailed(server, path, f"{type(e).__name__}: {e}") from None
        if r.status_code != 200:
            try:
                body = r.json()
                detail = (body.get("error") or {}).get("message") or body.get("detail") or r.text
            except (ValueError, AttributeError):
                detail = r.text
            raise ControlFailed(server, path, f"HTTP {r.status_code}: {detail}", r.status_code)
        return r.json()

    def stats(self, server: str, timeout: float) -> dict[str, Any]:
        return self._call(server, "GET", "/prism/stats", timeout=timeout)

    def placement(self, server: str, timeout: float = 10.0) -> Placement:
        return Placement.from_dict(self._call(server, "GET", "/prism/placement", timeout=timeout))

    def load(self, server: str, experts: list[tuple[int, int]]) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/experts/load", json={"experts": experts})

    def send(self, source: str, experts: list[tuple[int, int]], to: str) -> dict[str, Any]:
        return self._call(source, "POST", "/prism/experts/send", json={"experts": experts, "to": to})

    def drop(self, server: str, experts: list[tuple[int, int]]) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/experts/drop", json={"experts": experts})

    def switch(self, server: str, placement: Placement, down: list[str], drain_timeout: float) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/placement", timeout=self.timeout + drain_timeout,
                          json={"placement": placement.to_dict(), "down": down, "drain_timeout": drain_timeout})

    def plan(self, server: str, timeout: float = 10.0) -> ExecutionPlan:
        return ExecutionPlan.from_dict(self._call(server, "GET", "/prism/plan", timeout=timeout), f"{server}'s plan")

    def switch_plan(self, server: str, plan: ExecutionPlan, down: list[str], drain_timeout: float) -> dict[str, Any]:
        """Switch `server` to `plan` (its placement version fenced like a placement switch's, then its route)."""
        return self._call(server, "POST", "/prism/plan", timeout=self.timeout + drain_timeout,
                          json={"plan": plan.to_dict(), "down": down, "drain_timeout": drain_timeout})

    def set_down(self, server: str, down: list[str]) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/down", timeout=5.0, json={"down": down})

    def lease(self, server: str, ttl: float, timeout: float = 2.0) -> dict[str, Any]:
        """Take or renew this coordinator's control lease on `server` (HTTP 409: another coordinator has it)."""
        return self._call(server, "POST", "/prism/lease", timeout=timeout, json={"holder": self.holder, "ttl": ttl})

    def release(self, server: str, timeout: float = 2.0) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/lease", timeout=timeout,
                          json={"holder": self.holder, "release": True})
