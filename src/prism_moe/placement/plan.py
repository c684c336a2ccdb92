"""`ExecutionPlan`: where each layer of each server's requests runs, and what every server holds.

A `Placement` answers "who computes expert (l, e) for server s's tokens" with every layer running at
the request's home server. A plan adds, per home server and MoE layer, the server that executes the
layer (attention, that layer's KV cache, the router, and the MoE layer through its own routes):

    executor: int  [S, L]     executor[h, l] runs layer l for requests whose home is h
    dense:    bool [S, L]     server p holds the dense weights of layer l (attention, norms, router,
                              shared experts); an executor must hold them
    placement                 which experts each server holds (hosts [S, L, E]) and, for a layer that
                              server p executes, whom p calls for an expert it lacks (route [S, L, E])
    backup:   int  [S, L]     optional: the server that takes over layer l of home h's requests when
                              executor[h, l] fails (-1: none); it holds a second copy of the layer

A request's hidden states start at its home (embedding) and end there (LM head, sampling): every
server holds the embedding and the head. Whenever executor[h, l] != executor[h, l - 1] (home before
layer 0 and after the last) the batch's hidden states are handed to the next executor: one hop per
block boundary, as in a layer pipeline. Today's placements are the plans with executor[h, l] = h and
dense everywhere (`ExecutionPlan.from_placement`).

Memory per server (`PlanSizes`): embedding + head, the dense part of each layer it holds, its experts,
within `memory_gib`; the KV cache of the requests it executes layers for is checked against the
device memory left after that budget (see `kv_bytes`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.fileio import atomic_write_text
from prism_moe.model.spec import GIB, ModelSpec, format_bytes
from prism_moe.placement.placement import Placement, PlacementError

FORMAT = "prism-moe-plan"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PlanSizes:
    """Bytes a plan's memory check needs, from the model: `base` (embedding + head + final norm, held by
    every server), `dense_layer` (one MoE layer's share of the rest of the dense part: attention, norms,
    router, shared experts; dense decoder layers are spread over the MoE layers), `expert`, and
    `kv_token_layer` (one token's KV cache in one MoE layer's share of the decoder layers)."""

    base: float
    dense_layer: float
    expert: float
    kv_token_layer: float
    num_experts: int

    @classmethod
    def of(cls, model: ModelSpec) -> PlanSizes:
        emb = model.vocab_size * model.hidden_size * model.bytes_per_param
        base = 2 * emb + model.hidden_size * model.bytes_per_param
        per_layer = max(model.dense_bytes - base, 0) / model.num_moe_layers
        kv = model.kv_bytes_per_token_layer * model.num_hidden_layers / model.num_moe_layers
        return cls(float(base), float(per_layer), float(model.expert_bytes), float(kv), model.num_experts)

    @property
    def full_layer(self) -> float:
        """A whole layer: its dense part and every expert."""
        return self.dense_layer + self.num_experts * self.expert


def server_budgets(cluster: ClusterSpec) -> tuple[np.ndarray, np.ndarray]:
    """(weight budget bytes [S] = memory_gib, KV budget bytes [S] = device memory left after it)."""
    from prism_moe.hardware import server_profiles

    weights = np.array([s.memory_gib * GIB for s in cluster.servers], dtype=np.float64)
    device = np.array([p.memory_gib * GIB for p in server_profiles(cluster)], dtype=np.float64)
    return weights, np.maximum(device - weights, 0.0)


@dataclass(frozen=True)
class ExecutionPlan:
    placement: Placement
    executor: np.ndarray
    dense: np.ndarray
    algorithm: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    backup: np.ndarray | None = None

    def __post_init__(self) -> None:
        ex = np.asarray(self.executor, dtype=np.int64)
        dense = np.asarray(self.dense, dtype=bool)
        object.__setattr__(self, "executor", ex)
        object.__setattr__(self, "dense", dense)
        if self.backup is not None:
            object.__setattr__(self, "backup", np.asarray(self.backup, dtype=np.int64))
        s, layers = self.placement.num_servers, self.placement.num_layers
        names = self.placement.server_names
        if ex.shape != (s, layers):
            raise PlacementError(f"executor must be [servers, layers] = [{s}, {layers}], got {ex.shape}")
        if dense.shape != (s, layers):
            raise PlacementError(f"dense must be [servers, layers] = [{s}, {layers}], got {dense.shape}")
        if (ex < 0).any() or (ex >= s).any():
            h, l = np.argwhere((ex < 0) | (ex >= s))[0]
            raise PlacementError(f"requests of {names[h]} at layer {l}: executor {ex[h, l]} is not a server index")
        ok = dense[ex, np.arange(layers)[None, :]]  # [S, L]: the executor holds that layer's dense part
        if not ok.all():
            h, l = np.argwhere(~ok)[0]
            raise PlacementError(f"requests of {names[h]} run layer {l} on {names[ex[h, l]]}, which does not "
                                 f"hold that layer's dense weights")
        if self.backup is not None:
            self._check_backup(self.backup, dense)

    def _check_backup(self, bk: np.ndarray, dense: np.ndarray) -> None:
        s, layers = self.executor.shape
        names = self.placement.server_names
        if bk.shape != (s, layers):
            raise PlacementError(f"backup must be [servers, layers] = [{s}, {layers}], got {bk.shape}")
        if (bk < -1).any() or (bk >= s).any():
            raise PlacementError("backup holds server indices, or -1 for none")
        has = bk >= 0
        safe = np.where(has, bk, 0)
        bad = has & ((safe == self.executor) | ~dense[safe, np.arange(layers)[None, :]]
                     | ~self.placement.hosts[safe, np.arange(layers)[None, :]].all(axis=2))
        if bad.any():
            h, l = np.argwhere(bad)[0]
            raise PlacementError(f"backup of layer {l} for {names[h]} is {names[bk[h, l]]}, which is its executor "
                                 f"or does not hold the whole layer (dense weights and every expert)")
    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def from_placement(cls, placement: Placement) -> ExecutionPlan:
        """Every layer at home, dense everywhere: the plan a Prism placement is."""
        s, layers = placement.num_servers, placement.num_layers
        return cls(placement, np.repeat(np.arange(s)[:, None], layers, axis=1), np.ones((s, layers), bool),
                   placement.algorithm, dict(placement.meta))

    def with_placement(self, placement: Placement) -> ExecutionPlan:
        """The same layer blocks over another placement (a migration under a plan keeps its route); the backups
        are dropped when one no longer holds its whole layer."""
        if placement is self.placement:
            return self
        try:
            return ExecutionPlan(placement, self.executor, self.dense, self.algorithm, self.meta, self.backup)
        except PlacementError:
            if self.backup is None:
                raise
            return ExecutionPlan(placement, self.executor, self.dense, self.algorithm, self.meta)

    # ---- facts ----------------------------------------------------------------------------------

    @property
    def num_servers(self) -> int:
        return self.placement.num_servers

    @property
    def num_layers(self) -> int:
        return self.placement.num_layers

    @property
    def num_experts(self) -> int:
        return self.placement.num_experts

    @property
    def server_names(self) -> tuple[str, ...]:
        return self.placement.server_names

    @property
    def at_home(self) -> bool:
        return bool((self.executor == np.arange(self.num_servers)[:, None]).all())

    def handoffs(self) -> np.ndarray:
        """Hand-offs per forward for each home server (block boundaries, the way out and back): int [S]."""
        home = np.arange(self.num_servers)[:, None]
        path = np.concatenate([home, self.executor, home], axis=1)
        return (path[:, 1:] != path[:, :-1]).sum(axis=1)

    def layers_executed(self) -> np.ndarray:
        """layers_executed[p, h]: layers p runs for home h's requests: int [S, S]."""
        s = self.num_servers
        out = np.zeros((s, s), dtype=np.int64)
        for h in range(s):
            out[:, h] = np.bincount(self.executor[h], minlength=s)
        return out

    def weight_bytes(self, sizes: PlanSizes) -> np.ndarray:
        """Weights each server holds: float [S]."""
        experts = self.placement.hosts.sum(axis=(1, 2))
        return sizes.base + self.dense.sum(axis=1) * sizes.dense_layer + experts * sizes.expert

    def remote_fraction(self, demand: np.ndarray) -> float:
        """Share of expert invocations (home h's demand float [S, L, E]) whose layer's executor does not hold the
        expert, so calls another server for it (a placement's `remote_fraction` when every layer runs at home)."""
        demand = np.asarray(demand, dtype=np.float64)
        total = float(demand.sum())
        if total <= 0:
            return 0.0
        held = self.placement.hosts[self.executor, np.arange(self.num_layers)[None, :]]  # [S, L, E]
        return float((demand * ~held).sum() / total)

    def expert_slots(self, sizes: PlanSizes, weight_budget: np.ndarray) -> np.ndarray:
        """Experts each server's weight budget [S] leaves room for beside what the plan says it holds of the dense
        part (embedding, head and the layers of `dense`): int [S]. (Today's runtime loads every dense layer on every
        server so that any server can take over any layer; its expert slots follow the plan's statement.)"""
        free = np.asarray(weight_budget, dtype=np.float64) - sizes.base - self.dense.sum(axis=1) * sizes.dense_layer
        return np.maximum(np.floor(free / sizes.expert + 1e-9), 0).astype(np.int64)

    def kv_bytes(self, sizes: PlanSizes, tokens_in_flight: np.ndarray) -> np.ndarray:
        """KV cache each server keeps when home h has `tokens_in_flight[h]` tokens cached: float [S]."""
        return self.layers_executed() @ np.asarray(tokens_in_flight, dtype=np.float64) * sizes.kv_token_layer

    def check_memory(self, sizes: PlanSizes, weight_budget: np.ndarray, kv_budget: np.ndarray | None = None,
                     tokens_in_flight: np.ndarray | None = None) -> None:
        """Raise PlacementError naming the server when its weights (or planned KV cache) do not fit."""
        used = self.weight_bytes(sizes)
        for i in np.flatnonzero(used > np.asarray(weight_budget) * (1 + 1e-9)):
            raise PlacementError(f"server {self.server_names[i]} would hold {format_bytes(used[i])} of weights "
                                 f"({int(self.dense[i].sum())} dense layers, "
                                 f"{int(self.placement.hosts[i].sum())} experts) but may use "
                                 f"{format_bytes(weight_budget[i])} (memory_gib)")
        if kv_budget is not None and tokens_in_flight is not None:
            kv = self.kv_bytes(sizes, tokens_in_flight)
            for i in np.flatnonzero(kv > np.asarray(kv_budget)):
                raise PlacementError(f"server {self.server_names[i]} would keep {format_bytes(kv[i])} of KV cache "
                                     f"for the planned load, more than the {format_bytes(kv_budget[i])} its device "
                                     f"has beside the weights")

    def covered(self) -> float:
        """Share of (home, layer) pairs with a backup executor (0 without backups)."""
        return 0.0 if self.backup is None else float((self.backup >= 0).mean())

    def summary(self, sizes: PlanSizes | None = None) -> dict:
        out = {"algorithm": self.algorithm, "at_home": self.at_home, "backup_coverage": self.covered(),
               "handoffs_per_forward": dict(zip(self.server_names, self.handoffs().tolist(), strict=True)),
               "dense_layers": dict(zip(self.server_names, self.dense.sum(axis=1).tolist(), strict=True)),
               "experts": dict(zip(self.server_names, self.placement.hosts.sum(axis=(1, 2)).tolist(), strict=True)),
               "blocks": {n: blocks(self.executor[h]) for h, n in enumerate(self.server_names)}}
        if sizes is not None:
            out["weight_gib"] = dict(zip(self.server_names, (self.weight_bytes(sizes) / GIB).round(2).tolist(),
                                         strict=True))
        return out

    # ---- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = self.placement.to_dict()
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "algorithm": self.algorithm,
               "executor": self.executor.tolist(), "dense": self.dense.astype(int).tolist(),
               "placement": d, "meta": _jsonable(self.meta)}
        if self.backup is not None:
            out["backup"] = self.backup.tolist()
        return out

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()))  # a reader never sees half a file, even after a crash

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> ExecutionPlan:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlacementError(f"{source}: not a prism-moe plan file (format {FORMAT!r} expected)")
        if d.get("format_version") != FORMAT_VERSION:
            raise PlacementError(f"{source}: plan format_version {d.get('format_version')!r}, this prism reads "
                                 f"{FORMAT_VERSION}")
        for key in ("executor", "dense", "placement"):
            if key not in d:
                raise PlacementError(f"{source}: missing field {key!r}")
        placement = Placement.from_dict(d["placement"])
        try:
            ex = np.asarray(d["executor"], dtype=np.int64)
            dense = np.asarray(d["dense"], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise PlacementError(f"{source}: executor and dense must be integer matrices ({e})") from None
        if not np.isin(dense, (0, 1)).all():
            raise PlacementError(f"{source}: dense must hold 0 or 1")
        backup = None
        if d.get("backup") is not None:
            try:
                backup = np.asarray(d["backup"], dtype=np.int64)
            except (TypeError, ValueError) as e:
                raise PlacementError(f"{source}: backup must be an integer matrix ({e})") from None
        try:
            return cls(placement, ex, dense.astype(bool), str(d.get("algorithm", "")), dict(d.get("meta") or {}),
                       backup)
        except PlacementError as e:
            raise PlacementError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> ExecutionPlan:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlacementError(f"cannot read plan {p}: {e}") from None
        return cls.from_dict(d, str(p))


def load_plan(path: str | Path) -> ExecutionPlan:
    """A plan file, or a placement file as the plan that runs every layer at home."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementError(f"cannot read plan or placement {p}: {e}") from None
    if isinstance(d, dict) and d.get("format") == FORMAT:
        return ExecutionPlan.from_dict(d, str(p))
    return ExecutionPlan.from_placement(Placement.load(p))


def blocks(row: np.ndarray) -> list[list[int]]:
    """Contiguous runs of one executor row int [L]: [[first layer, last layer, server], ...]."""
    out: list[list[int]] = []
    for l, p in enumerate(np.asarray(row).tolist()):
        if out and out[-1][2] == p:
            out[-1][1] = l
        else:
            out.append([l, l, p])
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
