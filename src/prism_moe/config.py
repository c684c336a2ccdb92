"""The cluster file: which model, which servers (memory, GPU, workload, addresses), which network.

A YAML file validated with pydantic; every error names the field and says how to fix it.

```yaml
model: deepseek-v2-lite          # preset, or a path to a HF config / checkpoint folder
servers:
  - name: edge-a
    gpu: a100-40gb               # profile name (simulator and cost model)
    gpus: 1
    memory_gib: 12               # memory this server may use for model weights
    workload: esft:intent        # what its local requests look like
  - name: edge-b
    memory_gib: 12
    workload: esft:law
network: {bandwidth_mbps: 500, latency_ms: 2}   # full mesh; per-link overrides in `links`
```
"""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prism_moe.model.spec import GIB, ModelSpec, format_bytes, load_model_spec


class ConfigError(ValueError):
    """A cluster file that cannot be used; the message says what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LinkSpec(_Strict):
    """Override of the default network for one pair of servers (both directions)."""

    between: tuple[str, str]
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    latency_ms: float | None = Field(default=None, ge=0)


class NetworkSpec(_Strict):
    bandwidth_mbps: float = Field(default=1000.0, gt=0, description="default link bandwidth, megabits/s")
    latency_ms: float = Field(default=1.0, ge=0, description="default one-way latency, milliseconds")
    links: list[LinkSpec] = Field(default_factory=list)
    emulate: bool = Field(default=False, description="runtime: emulate these links on one machine "
                          "(added delay and bandwidth cap in the transport)")


class GpuProfileSpec(_Strict):
    """A custom GPU profile for the simulator and cost model (published figures)."""

    memory_gib: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0, description="GB/s")
    bf16_tflops: float = Field(gt=0, description="dense bf16 TFLOP/s")
    kernel_overhead_s: float = Field(default=10e-6, ge=0, description="fixed cost of one kernel call (launch, sync)")
    step_overhead_s: float = Field(default=0.0, ge=0, description="serving loop's host work per step")


class ServerSpec(_Strict):
    name: str = Field(min_length=1)
    gpu: str = "a100-40gb"
    gpus: int = Field(default=1, ge=1)
    memory_gib: float = Field(gt=0, description="memory for model weights: dense part + expert slots")
    workload: str | None = None
    request_rate: float = Field(default=1.0, gt=0, description="requests/s of local users (simulator; "
                                "also weights this server's workload in placement)")
    host: str = "127.0.0.1"
    http_port: int | None = Field(default=None, ge=0, le=65535)
    expert_port: int | None = Field(default=None, ge=0, le=65535)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"server name {v!r} may use letters, digits, '-', '_' and '.' only")
        return v


class ClusterSpec(_Strict):
    model: str
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    checkpoint: str | None = Field(default=None, description="runtime: safetensors checkpoint folder")
    device: str = Field(default="auto", description="runtime: 'auto' (cuda when present), 'cpu', 'cuda:0', ...")
    servers: list[ServerSpec] = Field(min_length=1)
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    gpu_profiles: dict[str, GpuProfileSpec] = Field(default_factory=dict)
    base_dir: str = Field(default=".", exclude=True, description="folder of the cluster file; paths are relative to it")

    @model_validator(mode="after")
    def _check_names(self) -> ClusterSpec:
        names = [s.name for s in self.servers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"server names must be unique; repeated: {dup}")
        for link in self.network.links:
            unknown = [n for n in link.between if n not in names]
            if unknown:
                raise ValueError(f"network.links: unknown server(s) {unknown}; servers are {names}")
            if link.between[0] == link.between[1]:
                raise ValueError(f"network.links: a link joins two different servers, got {list(link.between)}")
        return self

    # ---- derived facts -------------------------------------------------------------------------

    def non_loopback_hosts(self) -> list[str]:
        """Server hosts other machines can reach (anything but 127.x, ::1 and localhost)."""
        return sorted({s.host for s in self.servers if not is_loopback_host(s.host)})

    def require_secure(self, keys: bool, insecure: bool, what: str = "prism serve") -> None:
        """Refuse a cluster reachable from other hosts whose peers would talk in plaintext (no Curve keys),
        unless the operator said `--insecure`. Loopback-only clusters need nothing."""
        hosts = self.non_loopback_hosts()
        if hosts and not keys and not insecure:
            raise ConfigError(
                f"{what}: the cluster file has hosts other machines reach ({', '.join(hosts)}) and no keys were "
                f"given: anyone on the network could call or load experts. Make keys with `prism keys --cluster "
                f"CLUSTER.yaml --out keys/`, copy the folder to every machine (each keeping only its own "
                f"private/ key) and pass `--keys keys/` (it also holds admin.key, the control credential); or "
                f"pass --insecure to run without them on a network you trust")

    @property
    def server_names(self) -> list[str]:
        return [s.name for s in self.servers]

    def server(self, name: str) -> ServerSpec:
        for s in self.servers:
            if s.name == name:
                return s
        raise ConfigError(f"no server named {name!r} in the cluster; servers are {self.server_names}")

    def model_spec(self) -> ModelSpec:
        return load_model_spec(self.model, base_dir=self.base_dir, dtype=self.dtype)

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path

    def link_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """(bandwidth bits/s [S, S], one-way latency s [S, S]); the diagonal is infinite / zero."""
        names = self.server_names
        n = len(names)
        bw = np.full((n, n), self.network.bandwidth_mbps * 1e6)
        lat = np.full((n, n), self.network.latency_ms / 1e3)
        for link in self.network.links:
            i, j = names.index(link.between[0]), names.index(link.between[1])
            for a, b in ((i, j), (j, i)):
                if link.bandwidth_mbps is not None:
                    bw[a, b] = link.bandwidth_mbps * 1e6
                if link.latency_ms is not None:
                    lat[a, b] = link.latency_ms / 1e3
        np.fill_diagonal(bw, np.inf)
        np.fill_diagonal(lat, 0.0)
        return bw, lat

    def expert_slots(self, model: ModelSpec) -> np.ndarray:
        """Routed experts each server can hold after the dense part: int [S].

        Raises ConfigError when a server cannot even hold the dense part.
        """
        slots = []
        for s in self.servers:
            free = s.memory_gib * GIB - model.dense_bytes
            if free < 0:
                raise ConfigError(
                    f"server {s.name!r}: memory_gib={s.memory_gib} is below the dense part of {model.name} "
                    f"({format_bytes(model.dense_bytes)}); every server holds the whole dense part, so give it "
                    f"at least {(model.dense_bytes + model.expert_bytes) / GIB:.3g} GiB")
            slots.append(min(int(math.floor(free / model.expert_bytes)), model.total_experts))
        return np.array(slots, dtype=np.int64)

    def check_feasible(self, model: ModelSpec) -> np.ndarray:
        """Expert slots per server, after checking that one copy of every expert fits somewhere."""
        slots = self.expert_slots(model)
        if slots.sum() < model.total_experts:
            need = model.total_experts - int(slots.sum())
            raise ConfigError(
                f"the cluster cannot hold one copy of every expert of {model.name}: {model.total_experts} experts "
                f"({format_bytes(model.total_experts * model.expert_bytes)}) but only {int(slots.sum())} slots "
                f"({', '.join(f'{n}: {k}' for n, k in zip(self.server_names, slots, strict=True))}) after the "
                f"{format_bytes(model.dense_bytes)} dense part on each server; add memory for {need} more "
                f"experts ({format_bytes(need * model.expert_bytes)}) or another server")
        return slots


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume other machines reach it


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid cluster file"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/configuration in README)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def cluster_from_dict(data: Any, base_dir: str | Path = ".", source: str = "cluster") -> ClusterSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a cluster file is a YAML mapping with 'model' and 'servers'")
    try:
        return ClusterSpec.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster YAML file; paths inside it are relative to its folder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"cluster file {p} not found (examples/ has ready ones)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text (UTF-8) file ({e}); a cluster file is YAML") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the cluster file: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return cluster_from_dict(data, base_dir=p.resolve().parent, source=str(p))


def dump_cluster(cluster: ClusterSpec) -> str:
    return yaml.safe_dump(cluster.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
