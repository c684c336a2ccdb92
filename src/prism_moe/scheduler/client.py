"""HTTP calls from the coordinator to the servers' `/prism/*` control routes (see runtime/server.py).

HTTP, not the ZeroMQ expert link: control is rare and small, the coordinator then needs no CurveZMQ
identity, and an operator can make the same calls with curl. Weights never pass through here: a
`send` makes the source push them to the receiver over the expert link.
"""

from __future__ import annotations

from typing import Any

import httpx

from prism_moe.config import ClusterSpec
from prism_moe.placement.placement import Placement


class ControlFailed(RuntimeError):
    """A server refused or did not answer a control call."""

    def __init__(self, server: str, what: str, detail: str) -> None:
        super().__init__(f"{server}: {what} failed: {detail}")
        self.server, self.what, self.detail = server, what, detail


class ServerClient:
    def __init__(self, cluster: ClusterSpec, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.urls = {s.name: f"http://{s.host}:{s.http_port}" for s in cluster.servers}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
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
                detail = r.json().get("error", {}).get("message") or r.text
            except ValueError:
                detail = r.text
            raise ControlFailed(server, path, f"HTTP {r.status_code}: {detail}")
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

    def set_down(self, server: str, down: list[str]) -> dict[str, Any]:
        return self._call(server, "POST", "/prism/down", timeout=5.0, json={"down": down})
