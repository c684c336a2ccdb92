"""`Placement`: which experts each server holds, and who serves each expert a server lacks.

hosts: bool [S, L, E]  server s holds expert e of MoE layer l.
route: int  [S, L, E]  the server that computes (l, e) for server s's tokens; s itself when local.

A Placement is validated on construction (every expert hosted somewhere, routes point at holders,
memory respected when capacities are given) and saved/loaded as versioned JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_moe.fileio import atomic_write_text

FORMAT = "prism-moe-placement"
FORMAT_VERSION = 1


class PlacementError(ValueError):
    """A placement that breaks a constraint; the message names the server, layer and expert."""


def _count(d: dict, field: str) -> int:
    v = d.get(field)
    if type(v) is not int or v < 1:
        raise PlacementError(f"placement field {field!r} must be a positive integer, got {v!r}")
    return v


def compute_routes(hosts: np.ndarray, link_cost: np.ndarray) -> np.ndarray:
    """For each server and expert, the holder reached over the cheapest link.

    hosts: bool [S, L, E]; link_cost: float [S, S] (diagonal ignored: a local expert routes to itself).
    Ties between equally cheap holders are spread evenly and deterministically over (layer, expert),
    so a popular expert with several replicas does not send every peer to the same one.
    Returns int [S, L, E].
    """
    hosts = np.asarray(hosts, dtype=bool)
    s, layers, experts = hosts.shape
    cost = np.asarray(link_cost, dtype=np.float64).copy()
    np.fill_diagonal(cost, -1.0)  # local always wins
    route = np.empty((s, layers, experts), dtype=np.int64)
    spread = (np.arange(layers)[:, None] * experts + np.arange(experts)[None, :])  # [L, E]
    for src in range(s):
        c = np.where(hosts, cost[src][:, None, None], np.inf)  # [S, L, E]
        best = c.min(axis=0)
        tied = c <= best[None] + 1e-9 * np.abs(best[None]) + 1e-15  # [S, L, E]
        n_tied = tied.sum(axis=0)
        pick = (spread + src) % np.maximum(n_tied, 1)  # which of the tied holders
        rank = np.cumsum(tied, axis=0) - 1  # position of each holder among the tied
        chosen = tied & (rank == pick[None])
        route[src] = chosen.argmax(axis=0)
    return route


@dataclass(frozen=True)
class Placement:
    server_names: tuple[str, ...]
    hosts: np.ndarray
    route: np.ndarray
    capacity: np.ndarray | None = None
    algorithm: str = ""
    version: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        hosts = np.asarray(self.hosts, dtype=bool)
        route = np.asarray(self.route, dtype=np.int64)
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "server_names", tuple(self.server_names))
        if hosts.ndim != 3:
            raise PlacementError(f"hosts must be [servers, layers, experts], got shape {hosts.shape}")
        s, layers, experts = hosts.shape
        if len(self.server_names) != s:
            raise PlacementError(f"{len(self.server_names)} server names for {s} servers")
        if route.shape != hosts.shape:
            raise PlacementError(f"route shape {route.shape} differs from hosts shape {hosts.shape}")
        orphans = np.argwhere(~hosts.any(axis=0))
        if len(orphans):
            l, e = orphans[0]
            raise PlacementError(f"{len(orphans)} experts have no server, e.g. layer {l} expert {e}")
        if (route < 0).any() or (route >= s).any():
            raise PlacementError("route names a server index out of range")
        served = np.take_along_axis(hosts, route, axis=0) if s else hosts
        # take_along_axis over axis 0 with index [S, L, E]: served[a, l, e] = hosts[route[a, l, e], l, e]
        if not served.all():
            a, l, e = np.argwhere(~served)[0]
            raise PlacementError(f"server {self.server_names[a]} routes layer {l} expert {e} to "
                                 f"{self.server_names[route[a, l, e]]}, which does not hold it")
        local = route == np.arange(s)[:, None, None]
        if (local != hosts).any():
            a, l, e = np.argwhere(local != hosts)[0]
            raise PlacementError(f"server {self.server_names[a]} layer {l} expert {e}: a held expert must be "
                                 f"served locally, and only a held one")
        if self.capacity is not None:
            cap = np.asarray(self.capacity, dtype=np.int64)
            object.__setattr__(self, "capacity", cap)
            used = hosts.sum(axis=(1, 2))
            over = np.flatnonzero(used > cap)
            if len(over):
                i = over[0]
                raise PlacementError(f"server {self.server_names[i]} holds {used[i]} experts but has "
                                     f"memory for {cap[i]}")

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def from_hosts(cls, server_names, hosts: np.ndarray, link_cost: np.ndarray, capacity=None,
                   algorithm: str = "", **kw: Any) -> Placement:
        """Build with routes over the cheapest links (see `compute_routes`)."""
        hosts = np.asarray(hosts, dtype=bool)
        return cls(tuple(server_names), hosts, compute_routes(hosts, link_cost), capacity, algorithm, **kw)

    # ---- facts -------------------------------------------------------------------------------------

    @property
    def num_servers(self) -> int:
        return self.hosts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.hosts.shape[1]

    @property
    def num_experts(self) -> int:
        return self.hosts.shape[2]

    def experts_used(self) -> np.ndarray:
        """Experts held per server: int [S]."""
        return self.hosts.sum(axis=(1, 2))

    def held(self, server: str | int) -> dict[int, list[int]]:
        """{layer: sorted expert ids} held by one server."""
        i = server if isinstance(server, int) else self.server_names.index(server)
        return {layer: np.flatnonzero(self.hosts[i, layer]).tolist() for layer in range(self.num_layers)}

    def remote_fraction(self, demand: np.ndarray) -> float:
        """Share of expert invocations (demand float [S, L, E]) that are not local."""
        total = float(demand.sum())
        return float((demand * ~self.hosts).sum() / total) if total > 0 else 0.0

    def remote_cost(self, demand: np.ndarray, link_cost: np.ndarray) -> float:
        """Expected seconds of remote round trips: sum demand x link cost of the route. [S,L,E] x [S,S]."""
        s = np.arange(self.num_servers)[:, None, None]
        return float((demand * link_cost[s, self.route]).sum())

    def moved_from(self, old: Placement) -> np.ndarray:
        """Experts this placement adds relative to `old`: bool [S, L, E] (what a migration must copy)."""
        return self.hosts & ~old.hosts

    # ---- JSON --------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "algorithm": self.algorithm,
            "version": self.version,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "servers": list(self.server_names),
            "capacity": None if self.capacity is None else self.capacity.tolist(),
            "placement": {n: {str(k): v for k, v in self.held(i).items()} for i, n in enumerate(self.server_names)},
            "route": {n: self.route[i].tolist() for i, n in enumerate(self.server_names)},
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()))  # a crash leaves the old file or the new one

    @classmethod
    def from_dict(cls, d: Any) -> Placement:
        """Validate a placement document field by field; every refusal names the field."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlacementError(f"not a prism-moe placement (expected \"format\": \"{FORMAT}\")")
        if d.get("format_version") != FORMAT_VERSION:
            raise PlacementError(f"placement format_version {d.get('format_version')!r} is not supported; "
                                 f"this prism-moe reads version {FORMAT_VERSION}")
        names = d.get("servers")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
                or len(set(names)) != len(names):
            raise PlacementError(f"placement field 'servers' must be a list of distinct server names, got {names!r}")
        layers, experts = _count(d, "num_layers"), _count(d, "num_experts")
        if len(names) * layers * experts > 10**8:
            raise PlacementError(f"placement fields 'num_layers' x 'num_experts' ({layers} x {experts}) are too large")
        hosts = np.zeros((len(names), layers, experts), dtype=bool)
        per_server, routes = d.get("placement"), d.get("route")
        for name, value in (("placement", per_server), ("route", routes)):
            if not isinstance(value, dict) or set(value) != set(names):
                raise PlacementError(f"placement JSON is missing or mistypes a field: '{name}' must map every server in 'servers' ({names}), "
                                     f"got {sorted(value) if isinstance(value, dict) else type(value).__name__}")
        for i, n in enumerate(names):
            if not isinstance(per_server[n], dict):
                raise PlacementError(f"placement field 'placement.{n}' must map layers to expert id lists")
            for k, ids in per_server[n].items():
                layer = int(k) if isinstance(k, str) and k.isdigit() else -1
                if not 0 <= layer < layers:
                    raise PlacementError(f"placement field 'placement.{n}': layer {k!r} is not in 0..{layers - 1}")
                if not isinstance(ids, list) or not all(type(e) is int and 0 <= e < experts for e in ids):
                    raise PlacementError(f"placement field 'placement.{n}.{k}': expert ids must be in "
                                         f"0..{experts - 1} (a list of integers), got {ids!r}"[:300])
                if len(set(ids)) != len(ids):
                    raise PlacementError(f"placement field 'placement.{n}.{k}': an expert is listed twice in {ids}")
                hosts[i, layer, ids] = True
        try:
            route = np.array([routes[n] for n in names])
        except ValueError:
            route = np.zeros(0)
        if route.shape != hosts.shape or route.dtype.kind not in "iu":
            raise PlacementError(f"placement field 'route' must give each server [{layers}][{experts}] server "
                                 f"indices, got shape {route.shape} of {route.dtype}")
        cap = d.get("capacity")
        if cap is not None and (not isinstance(cap, list) or len(cap) != len(names)
                                or not all(type(c) is int and c >= 0 for c in cap)):
            raise PlacementError(f"placement field 'capacity' must be null or one slot count per server, got {cap!r}")
        version, algorithm, meta = d.get("version", 0), d.get("algorithm", ""), d.get("meta")
        if type(version) is not int or version < 0:
            raise PlacementError(f"placement field 'version' must be a non-negative integer, got {version!r}")
        if not isinstance(algorithm, str) or not (meta is None or isinstance(meta, dict)):
            raise PlacementError("placement fields 'algorithm' (a string) and 'meta' (a mapping or null) are mistyped")
        return cls(tuple(names), hosts, route.astype(np.int64), None if cap is None else np.array(cap), algorithm,
                   version, dict(meta or {}))

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlacementError(f"{path}: not valid JSON (a torn or foreign file?): {e}") from None
        return cls.from_dict(data)
