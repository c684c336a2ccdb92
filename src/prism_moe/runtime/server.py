"""One edge server: the dense model plus its placed experts, an expert service for peers, an HTTP API.

`EdgeServer.start()` does, in order: load the dense weights and this server's experts from the
checkpoint (`load_partial`); start the ZeroMQ expert service that computes those experts for peers;
connect to every peer's expert service; attach the cluster dispatcher to the model (so missing experts
go to the peer the placement names); wrap the model in the continuous-batching `Engine`. `app()` gives
the FastAPI app (OpenAI API, /health, /metrics, /prism/stats) that `prism serve` runs with uvicorn.

`prism serve` (`run_server`) runs two processes: this one (the model, its batching loop as a `RunnerHost`, the
expert service, the control routes, on a Unix socket) and an API process it starts (runtime/api_process.py: the
public HTTP port, the OpenAI routes and the `Engine` frontend; everything else it forwards here), so that HTTP never
holds the model loop's GIL. `--api-in-process` keeps one process.

Live migration and failures (driven by `prism coordinator`, see docs/operations.md) use the control
routes under `/prism/`: load experts from the local checkpoint, send held experts to a peer (a
`load_expert` message on the expert link carrying the weight tensors), switch to a new placement version
(draining calls made under the old one), drop experts, and learn which peers are down. The expert
service answers a call for an expert it no longer holds with `not_held`, so the caller re-routes.

Threads: the expert service answers peers on an I/O thread of its own, computes their calls on its
compute worker (merging concurrent calls of one layer) and runs migration messages on its control thread;
the model runs on the engine's (or the host's) generation thread, HTTP on uvicorn's loop. The model's own expert calls
are sent and awaited on its generation thread, through the peer pool's channels (`PeerPool.start_call`);
emulated links (`network.emulate`) are applied by each peer's service, on that same path.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from prism_moe.config import ClusterSpec, ConfigError
from prism_moe.placement.placement import Placement, PlacementError
from prism_moe.runtime.metrics import ServerMetrics

log = logging.getLogger(__name__)


# tensors of one expert on the wire (`load_expert`), in `ExpertSlots.get` order
_WIRE_PARTS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


@dataclass
class ServeOptions:
    """What `prism serve` takes besides the cluster file and the server name."""

    placement: Placement
    plan: Any = None  # an ExecutionPlan whose placement is `placement` (None: every layer runs at home)
    device: str = "auto"
    api_key: str | None = None
    admin_key: str | None = None  # control routes' credential (None: control from loopback only)
    keys_dir: Path | None = None
    replay: str | None = None  # workload source whose per-token trace drives the routers (benchmark mode)
    data_dir: str | None = None
    call_timeout: float = 10.0
    call_retries: int = 1
    # requests decoded together (vLLM's CPU default max_num_seqs is 128); measured at 64 streams here: 1.3-1.5x the
    # tokens/s of 32, the decode step's expert weights being read once for twice the rows (docs/results.md)
    max_running: int = 64
    push_chunk_bytes: int = 64 * 2**20  # experts per `load_expert` message to a peer, by bytes
    record_trace: str | None = None  # write this server's per-token routing trace here ("{server}": its name)
    record_max_tokens: int = 1_000_000  # stop recording after this many tokens (memory bound)
    # HTTP API and the Engine frontend in a child process (runtime/api_process.py), the model's loop no longer sharing
    # its process's GIL with HTTP: measured 1.1-1.2x the tokens/s at 16 and 64 streams (docs/results.md); False: one
    api_process: bool = True


class ControlError(Exception):
    """A control request that cannot be done (HTTP `status`); nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ExpertsBody(BaseModel):
    experts: list[tuple[int, int]] = Field(description="[[moe_layer, expert], ...]")
    to: str | None = Field(default=None, description="send: the peer that loads them")


class PlanBody(BaseModel):
    plan: dict[str, Any] = Field(description="an execution plan (prism place --algorithm pipeline|hybrid --out)")
    down: list[str] | None = None
    drain_timeout: float = Field(default=10.0, ge=0, allow_inf_nan=False)


class PlacementBody(BaseModel):
    placement: dict[str, Any]
    down: list[str] | None = None
    # finite: JSON's Infinity would pass `ge=0`, switch the placement, then overflow the wait (a 500)
    drain_timeout: float = Field(default=10.0, ge=0, allow_inf_nan=False)


class DownBody(BaseModel):
    down: list[str]


class ReplayBody(BaseModel):
    workload: str


class LinkBody(BaseModel):
    """Emulate this server's side of the link from `peer` (fault injection, experiments): its service holds
    or drops `peer`'s requests and the replies to them. A partition is `drop` set on both servers."""

    peer: str = Field(min_length=1, max_length=64, description="the server at the other end of the link")
    drop: bool = Field(default=False, description="drop everything from and to `peer` (a partition)")
    delay_ms: float = Field(default=0.0, ge=0, le=60_000, description="one-way delay added in each direction")
    bandwidth_mbps: float | None = Field(default=None, gt=0, description="bandwidth cap; null: none")


def checkpoint_dir(cluster: ClusterSpec) -> Path:
    """The checkpoint folder the runtime loads: `checkpoint`, else `model` when it is a folder."""
    for candidate in (cluster.checkpoint, cluster.model):
        if candidate:
            p = cluster.resolve_path(candidate)
            if (p / "config.json").is_file():
                return p
    raise ConfigError("the runtime needs a checkpoint folder (config.json + safetensors + tokenizer): set "
                      "`checkpoint:` in the cluster file, or make `model:` a checkpoint folder "
                      "(`prism make-tiny-model --out DIR` writes one)")


def _median(xs: list[float]) -> float | None:
    return float(np.median(xs)) if xs else None


def _links_for(cluster: ClusterSpec, me: str) -> dict[str, Any]:
    """Link emulation profiles of the links from each peer to `me`, by peer name, which `me`'s expert
    service applies to that peer's calls (only when `network.emulate` is on)."""
    if not cluster.network.emulate:
        return {}
    from prism_moe.runtime.emulation import LinkProfile

    bw, lat = cluster.link_matrices()
    i = cluster.server_names.index(me)
    return {n: LinkProfile(delay_ms=float(lat[j, i] * 1e3), bandwidth_mbps=float(bw[j, i] / 1e6))
            for j, n in enumerate(cluster.server_names) if j != i}


class EdgeServer:
    def __init__(self, cluster: ClusterSpec, name: str, options: ServeOptions) -> None:
        self.cluster = cluster
        self.name = name
        self.spec_server = cluster.server(name)
        self.options = options
        self.placement = options.placement
        from prism_moe.placement.plan import ExecutionPlan

        self.plan = options.plan if options.plan is not None else ExecutionPlan.from_placement(options.placement)
        if self.plan.placement is not options.placement:
            raise ConfigError("ServeOptions: `plan` must be the plan of `placement`")
        if list(self.placement.server_names) != cluster.server_names:
            raise ConfigError(f"the placement is for servers {list(self.placement.server_names)}, the cluster "
                              f"file has {cluster.server_names}")
        self.metrics = ServerMetrics(name)
        self.service: Any = None
        self.pool: Any = None
        self.engine: Any = None
        self.host: Any = None  # RunnerHost: the batching loop, driven by the API process (run_server)
        self.dispatcher: Any = None
        self.stores: dict[int, Any] = {}
        self.resident_bytes = 0
        self._started_at = 0.0
        self.model: Any = None
        self.gate: Any = None  # LayerGate over the model's decoder layers (plans)
        self.blocks: Any = None  # BlockExecutor: peers' layer blocks
        self.block_client: Any = None  # this server's hand-offs
        self.capacity = 0  # expert slots this server's memory allows (cluster file)
        self._replay: Any = None
        self._ckpt: Any = None
        self.checkpoint_experts = False  # whether the local checkpoint has every routed expert
        self._control_lock = threading.Lock()  # one load/drop/switch at a time: slot counts stay exact
        self.recorder: Any = None  # ForwardRecorder when --record-trace is given
        self.record_path: Path | None = None
        self._save_lock = threading.Lock()  # one trace save at a time
        from prism_moe.runtime.auth import ControlGuard, ControlLease

        self.lease = ControlLease()  # one coordinator drives this server at a time
        self.control_guard = ControlGuard(options.admin_key, options.api_key, self.lease)

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        from transformers import AutoTokenizer

        from prism_moe.model.experts import attach
        from prism_moe.model.loading import Checkpoint, load_partial, resident_weight_bytes
        from prism_moe.model.spec import ModelSpec
        from prism_moe.runtime.dispatch import ClusterDispatcher
        from prism_moe.runtime.engine import Engine, resolve_device
        from prism_moe.runtime.transport import ExpertService, PeerPool

        ckpt = checkpoint_dir(self.cluster)
        spec = ModelSpec.from_pretrained(ckpt)
        p = self.placement
        if (p.num_layers, p.num_experts) != (spec.num_moe_layers, spec.num_experts):
            raise ConfigError(f"the placement is for {p.num_layers} layers x {p.num_experts} experts, the "
                              f"checkpoint {ckpt} has {spec.num_moe_layers} x {spec.num_experts}")
        device = resolve_device(self.options.device)
        log.info("%s: loading %s on %s with %d experts", self.name, ckpt, device, int(p.experts_used()[
            p.server_names.index(self.name)]))
        # the expert slots are preallocated for the whole memory budget: live loads never allocate
        me = self.cluster.server_names.index(self.name)
        self.capacity = int(self.cluster.expert_slots(spec)[me])
        if not self.plan.at_home:  # the plan's memory statement: the dense part of the layers it executes here
            from prism_moe.placement.plan import PlanSizes, server_budgets

            self.capacity = int(self.plan.expert_slots(PlanSizes.of(spec), server_budgets(self.cluster)[0])[me])
        held = int(p.experts_used()[p.server_names.index(self.name)])
        if held > self.capacity:
            raise ConfigError(f"server {self.name}: the placement gives it {held} experts, but memory_gib="
                              f"{self.spec_server.memory_gib} leaves room for {self.capacity} after the dense part; "
                              f"give it more memory or use a placement computed for this cluster file")
        model, self.stores = load_partial(ckpt, p.held(self.name), device=str(device), capacity=self.capacity,
                                          packed=True)  # experts and dense layers oneDNN-packed on a CPU
        self.model = model
        self._ckpt = Checkpoint.open(ckpt)  # the expert index, kept for live loads
        self.checkpoint_experts = self._ckpt.holds_all_experts()
        self.resident_bytes = resident_weight_bytes(model, self.stores)
        self.metrics.set_resident_weight_bytes(self.resident_bytes)
        self.metrics.set_placement_version(p.version)

        identity = None
        if self.options.keys_dir is not None:
            from prism_moe.runtime.keys import load_identity

            identity = load_identity(self.options.keys_dir, self.name)

        host, port = self.spec_server.host, self.spec_server.expert_port
        if not port:
            raise ConfigError(f"server {self.name}: expert_port is not set (prism cluster up picks free ports; "
                              f"a real cluster gives them in the cluster file)")
        # peers' calls compute on the service's worker (its own CUDA stream on a GPU); emulated links are
        # applied there too, to each peer's traffic
        self.service = ExpertService(f"tcp://{host}:{port}", self._serve_experts, num_layers=spec.num_moe_layers,
                                     num_experts=spec.num_experts, hidden_size=spec.hidden_size, name=self.name,
                                     identity=identity, device=device, links=_links_for(self.cluster, self.name),
                                     emulate=self.cluster.network.emulate)
        # on the service's control thread: peers' expert calls never queue behind incoming weights
        self.service.on("load_expert", self._on_load_message)
        self.service.on("drop_expert", self._on_drop_message)
        # peers' layer blocks (plans) on a worker of their own; the model is shared with this server's own loop
        from prism_moe.runtime.blocks import BlockExecutor
        from prism_moe.runtime.engine.layers import LayerGate
        from prism_moe.runtime.wire import BLOCK_CALL, BLOCK_RELEASE

        self.gate = LayerGate(model, spec.moe_layer_ids)
        max_len = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 16384)
        self.blocks = BlockExecutor(model, self.gate, max_len=min(max_len, 16384),
                                    max_requests=self.options.max_running * max(1, len(self.cluster.servers) - 1))
        self.metrics.refreshers.append(self._refresh_block_metrics)
        self.service.on(BLOCK_CALL, self.blocks.handle_call, worker="blocks", threads=8)  # calls combine (blocks.py)
        self.service.on(BLOCK_RELEASE, self.blocks.handle_release, worker="blocks")
        self.service.start()
        peers = {s.name: f"tcp://{s.host}:{s.expert_port}" for s in self.cluster.servers if s.name != self.name}
        if peers:
            self.pool = PeerPool(peers, name=self.name, identity=identity, timeout=self.options.call_timeout,
                                 retries=self.options.call_retries, on_call=self._on_call)

        self.dispatcher = ClusterDispatcher(self.name, p, self.pool, self.metrics, stores=self.stores)
        if self.options.record_trace:
            self._start_recording(spec)
        dispatcher: Any = self.dispatcher
        if self.options.replay:
            dispatcher = self._replay_dispatcher(spec)
        attach(model, dispatcher, spec, self.stores)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        import secrets

        from prism_moe.runtime.blocks import BlockClient
        from prism_moe.runtime.engine.plans import PlanRunner

        self.block_client = BlockClient(self.pool, self.name, secrets.token_hex(8))  # a new session per start

        def runner(*args: Any) -> Any:  # (re)made by the engine: always with the current plan's route
            return PlanRunner(*args, gate=self.gate, client=self.block_client, route=self._route(self.plan),
                              health=self.dispatcher)

        self.engine = Engine(model, tokenizer, device=None, max_running=self.options.max_running, slot_runner=runner)
        self.model_name = ckpt.name
        self._started_at = time.time()

    @property
    def runner(self) -> Any:
        """The batching loop now running (the engine's, or the host's when the API runs in its own process)."""
        if self.host is not None:
            return self.host.runner
        return self.engine.runner if self.engine is not None else None

    def host_runner(self, to_host: str, from_host: str) -> Any:
        """Run the batching loop for an API process (`RunnerHost` bound at the two ipc addresses) instead of the
        in-process engine: `app()` then serves everything but the OpenAI routes. Started by the app's lifespan."""
        from prism_moe.runtime.engine.remote import RunnerHost

        self.host = RunnerHost(self.engine.make_runner, to_host, from_host)
        self.host.on_http = self.metrics.observe_request
        return self.host

    def _start_recording(self, spec: Any) -> None:
        """Record every forward's routing (what the dispatcher routes, so replayed routing under --replay)."""
        from prism_moe.runtime.recording import ForwardRecorder

        assert self.options.record_trace
        self.record_path = Path(self.options.record_trace.replace("{server}", self.name)).expanduser()
        self.record_path.parent.mkdir(parents=True, exist_ok=True)  # fail at start, not at shutdown
        self.recorder = ForwardRecorder(spec.num_moe_layers, spec.top_k, spec.num_experts,
                                        max_tokens=self.options.record_max_tokens,
                                        source=f"prism serve {self.name} {time.strftime('%Y-%m-%dT%H:%M:%S')}",
                                        model=spec.name, name=self.name)
        self.dispatcher.recorder = self.recorder
        log.info("%s: recording routing traces to %s (at most %d tokens)", self.name, self.record_path,
                 self.options.record_max_tokens)

    def save_trace(self) -> dict[str, Any]:
        """Write the routing trace recorded so far to the --record-trace file (recording goes on)."""
        if self.recorder is None or self.record_path is None:
            raise ControlError(409, f"server {self.name} does not record a trace (start it with --record-trace)")
        with self._save_lock:
            out = self.recorder.save(self.record_path)
        log.info("%s: saved routing trace of %d tokens (%d forwards) to %s", self.name, out["tokens"],
                 out["sequences"], out["path"])
        return {"server": self.name, **out}

    def _replay_dispatcher(self, spec: Any) -> Any:
        from prism_moe.model.replay import ReplayDispatcher, ReplayRouting
        from prism_moe.stats.workload import load_workload

        wl = load_workload(self.options.replay, self.options.data_dir)
        if wl.trace is None:
            raise ConfigError(f"trace replay needs per-token traces; {self.options.replay} has counts only "
                              f"(use esft:<domain>, mixtral-decode:<set> or a trace file)")
        t = wl.trace
        if (t.num_layers, t.num_experts) != (spec.num_moe_layers, spec.num_experts) or t.top_k != spec.top_k:
            raise ConfigError(f"trace {self.options.replay} is {t.num_layers} layers x {t.num_experts} experts "
                              f"top-{t.top_k}; the model is {spec.num_moe_layers} x {spec.num_experts} "
                              f"top-{spec.top_k}: make the tiny model with that shape")
        self.metrics.set_trace_replay(True)
        # One global cursor: every forward's rows take the next trace tokens, the same rows at every layer,
        # so each token keeps its real cross-layer routing whatever continuous batching puts in a step.
        self._replay = ReplayDispatcher(self.dispatcher, ReplayRouting(t.experts, t.weights, wrap=True))
        return self._replay

    def set_replay(self, workload: str) -> dict[str, Any]:
        """Benchmark mode: replay another workload's trace from now on (a workload shift)."""
        from prism_moe.model.replay import ReplayRouting
        from prism_moe.stats.workload import load_workload

        if self._replay is None:
            raise ControlError(409, "this server does not replay a trace (start it with --replay)")
        try:
            t = load_workload(workload, self.options.data_dir).trace
        except (ValueError, OSError) as err:  # a bad name or file is the caller's error, not a 500
            raise ControlError(400, f"cannot load workload {workload!r}: {err}") from err
        p, k = self.placement, self._replay.routing.experts.shape[2]
        if t is None or (t.num_layers, t.num_experts, t.top_k) != (p.num_layers, p.num_experts, k):
            raise ControlError(400, f"{workload}: needs a per-token trace of {p.num_layers} layers x "
                                    f"{p.num_experts} experts top-{k}")
        self._replay.routing = ReplayRouting(t.experts, t.weights, wrap=True)
        self.options.replay = workload
        return {"server": self.name, "replay": workload}

    def close(self) -> None:
        if self.engine is not None and self.engine.is_running:
            self.engine.stop()
        if self.host is not None and self.host.is_running:
            self.host.stop()
        if self.recorder is not None:
            try:
                self.save_trace()
            except Exception:  # closing must go on (ports, threads) even if the disk is full
                log.exception("%s: could not save the routing trace to %s", self.name, self.record_path)
            self.recorder = None
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.pool is not None:
            self.pool.close()
        if self.service is not None:
            self.service.close()

    # --- expert service and metrics hooks -------------------------------------------------------------------
    def _serve_experts(self, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """A peer's batch: expert_ids [n], hidden [n, H] (CPU, from the wire) -> [n, H] on CPU. Held and
        staged experts are served (a copy being loaded for a migration serves peers before this server's own
        placement switch); a concurrent drop cannot pull an expert mid-compute (`ExpertSlots.reading`)."""
        from prism_moe.model.grouped import compute_rows
        from prism_moe.model.slots import MissingExpertError

        store = self.stores[layer]
        try:
            device = store.pool.device
            return compute_rows(store, expert_ids, hidden, self.dispatcher.grouped_on(device),
                                self.dispatcher.onednn_on(device, store.pool.dtype))
        except MissingExpertError as err:  # a distinct code, so a caller can re-route (e.g. mid-migration)
            from prism_moe.runtime.service import ServiceError

            raise ServiceError("not_held", f"server {self.name}: {err}") from None

    def _refresh_block_metrics(self) -> None:
        st = self.blocks.stats()
        self.metrics.set_block_cache(st["requests_cached"], st["kv_bytes"])

    def _route(self, plan: Any) -> Any:
        """This server's row of `plan`, with peers' names (None: here)."""
        from prism_moe.runtime.engine.plans import Route

        names, me = plan.server_names, plan.server_names.index(self.name)

        def who(i: int) -> str | None:
            return None if i < 0 or i == me else names[i]

        backups = plan.backup[me] if plan.backup is not None else np.full(plan.num_layers, -1)
        return Route(plan.placement.version, tuple(who(int(i)) for i in plan.executor[me]),
                     tuple(who(int(i)) for i in backups))

    def plan_info(self) -> dict[str, Any]:
        from prism_moe.placement.plan import blocks

        me = self.plan.server_names.index(self.name)
        runner = self.runner
        out = {"algorithm": self.plan.algorithm, "version": self.plan.placement.version, "at_home": self.plan.at_home,
               "blocks": [[a, b, self.plan.server_names[p]] for a, b, p in blocks(self.plan.executor[me])],
               "executes_for_peers": self.blocks.stats() if self.blocks is not None else None}
        if runner is not None and hasattr(runner, "info"):
            out["runner"] = runner.info()
        return out

    def switch_plan(self, plan: Any, down: list[str] | None = None, drain_timeout: float = 10.0) -> dict[str, Any]:
        """Execute `plan` from now on: its placement is switched like any (version fenced, copies loaded before),
        then this server's requests take its route; running ones are rebuilt on it (tokens kept)."""
        if list(plan.server_names) != list(self.plan.server_names):
            raise ControlError(400, f"plan for servers {list(plan.server_names)}, this cluster has "
                                    f"{list(self.plan.server_names)}")
        out = self.switch_placement(plan.placement, down, drain_timeout, plan)
        log.warning("%s: executing plan %s v%d: %s", self.name, plan.algorithm or "given", plan.placement.version,
                    self.plan_info()["blocks"])
        return {**out, "plan": self.plan_info()}

    def _on_call(self, ev: Any) -> None:
        if ev.outcome != "ok":
            self.metrics.observe_remote_error(ev.peer)
        elif ev.type == "expert_call":
            self.metrics.observe_remote_call(ev.peer, ev.latency_s, ev.bytes_sent, ev.bytes_received)
        elif ev.type == "block_call":
            self.metrics.observe_handoff(ev.peer, ev.latency_s, ev.bytes_sent, ev.bytes_received)
        else:  # migration weights, releases, pings: bytes between servers all the same
            self.metrics.observe_peer_bytes(ev.peer, ev.bytes_sent, ev.bytes_received)

    def stats(self) -> dict[str, Any]:
        """Activation counts of this server's own tokens (what `/prism/stats` returns for the scheduler).

        `counts` are cumulative since start (a poller takes differences; a drop means a restart);
        `routed_local`/`routed_remote` count (token, expert) pairs as they were actually routed.
        """
        d = self.dispatcher
        split = d.counter.split()  # one copy of the device counter: [layers, experts, local|remote]
        counts = split.sum(axis=2)
        me = self.placement.server_names.index(self.name)
        hosts = d.placement.hosts[me]
        total = int(counts.sum())
        local = int(counts[hosts].sum())
        peers = self.pool.stats() if self.pool else {}
        return {"server": self.name, "placement_version": d.placement.version,
                "counts": counts.tolist(), "invocations": total, "local_invocations": local,
                "remote_fraction": (total - local) / total if total else 0.0,
                "routed_local": int(split[..., 0].sum()), "routed_remote": int(split[..., 1].sum()),
                "failovers": d.failovers, "down": d.down(),
                "remote_call_p50_s": _median([q for ps in peers.values()
                                              if (q := ps.latency_quantile(0.5)) is not None]),
                "peer_bytes_sent": sum(ps.bytes_sent for ps in peers.values()),
                "peer_bytes_received": sum(ps.bytes_received for ps in peers.values()),
                "held": {str(k): v for k, v in self.held().items() if v}, "experts_held": self.held_count(),
                "capacity": self.capacity, "slots_used": self.slots_used(),
                "staged": {str(k): v for k, v in self.staged().items() if v}, "started_at": self._started_at,
                "checkpoint_experts": self.checkpoint_experts,
                "resident_weight_bytes": self.resident_bytes, "trace_replay": bool(self.options.replay),
                "replay": self.options.replay, "trace_recording": self._recording_stats(),
                "plan": self.plan_info()}

    def _recording_stats(self) -> dict[str, Any] | None:
        r = self.recorder
        if r is None:
            return None
        return {"path": str(self.record_path), "tokens": r.num_tokens, "forwards": r.num_sequences,
                "max_tokens": r.max_tokens, "stopped": r.stopped, "dropped_forwards": r.dropped_forwards}

    # --- live migration: write a free slot, send, switch (publish), drop ------------------------------------
    def held(self) -> dict[int, list[int]]:
        return {layer: store.held for layer, store in self.stores.items()}

    def staged(self) -> dict[int, list[int]]:
        """Experts written into slots but not yet mapped for this server's own tokens (awaiting a switch)."""
        return {layer: store.staged for layer, store in self.stores.items()}

    def held_count(self) -> int:
        return sum(len(store) for store in self.stores.values())

    def slots_used(self) -> int:
        """Slots taken (held, staged, or dropped and not yet reusable): what memory is accounted in."""
        pool = next(iter(self.stores.values())).pool if self.stores else None
        return 0 if pool is None else pool.capacity - pool.free_slots()

    def _free_slots(self) -> int:
        return self.capacity - self.slots_used()

    def _check_ids(self, experts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        p = self.placement
        bad = [(l, e) for l, e in experts if not (0 <= l < p.num_layers and 0 <= e < p.num_experts)]
        if bad:
            raise ControlError(400, f"experts {bad[:5]} out of range ({p.num_layers} layers x {p.num_experts})")
        return [(int(l), int(e)) for l, e in experts]

    def _add_experts(self, weights: dict[tuple[int, int], tuple[torch.Tensor | None, ...]]) -> dict[str, Any]:
        """Write these experts into free slots, staged until the next placement switch maps them (those already
        held or staged are skipped); refuse, writing nothing, if they would not fit the free slots.
        `weights[(layer, e)]` = (gate_up [2I, H], down [H, I], gate_up_bias [2I] | None, down_bias [H] | None)."""
        from prism_moe.model.slots import NoFreeSlotError

        with self._control_lock:
            new = {k: w for k, w in weights.items() if not self.stores[k[0]].has_weights(k[1])}
            if len(new) > self._free_slots():
                raise ControlError(409, f"server {self.name}: loading {len(new)} experts needs {len(new)} free "
                                        f"slots, it has {self._free_slots()} of {self.capacity} "
                                        f"({self.held_count()} held): drop some after a placement switch first")
            try:
                for (l, e), w in new.items():
                    self.stores[l].write(e, *w)
            except NoFreeSlotError as err:  # dropped slots still read by a stuck forward
                raise ControlError(409, f"server {self.name}: {err}") from err
            except ValueError as err:
                raise ControlError(400, f"server {self.name}: {err}") from err
            return {"server": self.name, "loaded": len(new), "experts_held": self.held_count(),
                    "staged": sum(len(v) for v in self.staged().values()), "slots_used": self.slots_used()}

    def load_experts(self, experts: list[tuple[int, int]]) -> dict[str, Any]:
        """Load experts from this server's own checkpoint (read only their bytes) into free slots (staged)."""
        experts = self._check_ids(experts)
        if not self.checkpoint_experts:
            raise ControlError(409, f"the checkpoint of {self.name} lacks some experts: send them from a peer")
        missing = [k for k in experts if not self.stores[k[0]].has_weights(k[1])]
        if len(missing) > self._free_slots():  # before reading anything
            raise ControlError(409, f"server {self.name}: {len(missing)} more experts do not fit its "
                                    f"{self._free_slots()} free slots ({self.held_count()} held of {self.capacity})")
        pool = next(iter(self.stores.values())).pool
        t0 = time.perf_counter()
        # the index opened at start serves every load (load_expert_weights re-opens it per expert)
        with self._ckpt.reader() as reader:
            read = {(l, e): self._ckpt.expert_weights(reader, l, e, device=pool.device, dtype=pool.dtype)
                    for l, e in missing}
        out = self._add_experts({k: (w.gate_up, w.down, w.gate_up_bias, w.down_bias) for k, w in read.items()})
        return {**out, "source": "checkpoint", "seconds": time.perf_counter() - t0}

    def send_experts(self, experts: list[tuple[int, int]], to: str) -> dict[str, Any]:
        """Send held experts to peer `to` (`load_expert` messages with the weights); returns when it holds them."""
        from prism_moe.model.slots import MissingExpertError
        from prism_moe.runtime.transport import TransportError
        from prism_moe.runtime.wire import DEFAULT_LIMITS

        experts = self._check_ids(experts)
        if self.pool is None or to not in self.pool:
            raise ControlError(400, f"{to!r} is not a peer of {self.name}")
        chunks: list[list[tuple[int, int, dict[str, torch.Tensor]]]] = [[]]
        size = 0
        for l, e in experts:
            store = self.stores[l]
            with store.reading():  # a copy taken before a concurrent drop may free the slot
                try:
                    parts = store.get(e)
                except MissingExpertError:
                    raise ControlError(409, f"server {self.name} does not hold layer {l} expert {e}") from None
                tensors = {name: t.cpu().clone() for name, t in zip(_WIRE_PARTS, parts, strict=True) if t is not None}
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            # a message holds at most 8 experts, the wire's tensor count (biases: 4 tensors an expert) and
            # push_chunk_bytes
            per_message = min(8, DEFAULT_LIMITS.max_tensors // len(tensors))
            if chunks[-1] and (len(chunks[-1]) == per_message or size + nbytes > self.options.push_chunk_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((l, e, tensors))
            size += nbytes
        t0 = time.perf_counter()
        try:
            sent = self._push(to, [c for c in chunks if c])
        except TransportError as err:
            raise ControlError(502, f"{self.name} -> {to}: {err}") from err
        return {"server": self.name, "to": to, "sent": len(experts), "bytes": sent,
                "seconds": time.perf_counter() - t0}

    def _push(self, to: str, chunks: list[list[tuple[int, int, dict[str, torch.Tensor]]]]) -> int:
        from prism_moe.runtime.transport import Call
        from prism_moe.runtime.wire import LOAD_EXPERT

        channel = self.pool[to]

        def one(chunk: list[tuple[int, int, dict[str, torch.Tensor]]]) -> tuple[Call, int]:
            tensors = {f"{name}.{i}": t for i, (_, _, parts) in enumerate(chunk) for name, t in parts.items()}
            call = channel.start_request(LOAD_EXPERT, {"experts": [[l, e] for l, e, _ in chunk]}, tensors,
                                         timeout=max(self.options.call_timeout, 30.0), retries=0)
            return call, sum(t.numel() * t.element_size() for t in tensors.values())

        calls = [one(c) for c in chunks]  # every chunk in flight before any is awaited
        try:
            for call, _ in calls:
                call.result()
        finally:
            for call, _ in calls:
                call.cancel()  # (a no-op for those that finished)
        return sum(n for _, n in calls)

    def _on_load_message(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """`load_expert` from a peer: fields experts [[l, e], ...], tensors gate_up_proj.i / down_proj.i (+
        gate_up_proj_bias.i / down_proj_bias.i for biased families), canonical layout; written into free slots."""
        from prism_moe.runtime.service import ServiceError

        try:
            experts = self._check_ids([tuple(x) for x in header.get("experts", [])])
            weights = {k: (tensors[f"gate_up_proj.{i}"], tensors[f"down_proj.{i}"],
                           tensors.get(f"gate_up_proj_bias.{i}"), tensors.get(f"down_proj_bias.{i}"))
                       for i, k in enumerate(experts)}
            return self._add_experts(weights), {}
        except ControlError as err:
            raise ServiceError("no_capacity" if err.status == 409 else "bad_request", err.message) from None
        except (KeyError, TypeError, ValueError) as err:
            raise ServiceError("bad_request", f"load_expert: {err}") from None

    def drop_experts(self, experts: list[tuple[int, int]]) -> dict[str, Any]:
        """Stop holding (or staging) experts the current placement no longer routes to this server: their map
        entries flip back to -1 and their slots are freed."""
        experts = self._check_ids(experts)
        me = self.placement.server_names.index(self.name)
        with self._control_lock:
            routed = [(l, e) for l, e in experts if self.dispatcher.placement.hosts[me, l, e]]
            if routed:
                raise ControlError(409, f"placement version {self.dispatcher.placement.version} still has "
                                        f"{self.name} holding {routed[:5]}: switch placement before dropping")
            dropped = 0
            for l, e in experts:
                if self.stores[l].has_weights(e):
                    self.stores[l].drop(e)
                    dropped += 1
        return {"server": self.name, "dropped": dropped, "experts_held": self.held_count(),
                "slots_used": self.slots_used()}

    def _on_drop_message(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from prism_moe.runtime.service import ServiceError

        try:
            return self.drop_experts([tuple(x) for x in header.get("experts", [])]), {}
        except ControlError as err:
            raise ServiceError("bad_request", err.message) from None

    def set_down(self, down: list[str]) -> None:
        """The coordinator's list of down servers. A newly down peer's connection is replaced, which fails
        the calls waiting on it now (they fail over) instead of after their timeout."""
        newly = [n for n in down if n != self.name and not self.dispatcher.is_down(n)]
        self.dispatcher.set_down(down)
        if self.pool is None:
            return
        for n in newly:
            if n in self.pool:
                s = self.cluster.server(n)
                self.pool.add_peer(n, f"tcp://{s.host}:{s.expert_port}")

    def set_link(self, body: LinkBody) -> dict[str, Any]:
        """Emulate the link from a peer on this server's expert service (a plain link again when nothing is
        set); see `LinkBody`."""
        from dataclasses import asdict

        from prism_moe.runtime.emulation import LinkProfile

        if body.peer not in self.cluster.server_names or body.peer == self.name:
            raise ControlError(400, f"{body.peer!r} is not a peer of {self.name}; peers: "
                                    f"{[n for n in self.cluster.server_names if n != self.name]}")
        plain = not body.drop and body.delay_ms == 0 and body.bandwidth_mbps is None
        self.service.set_link(body.peer, None if plain else LinkProfile(body.delay_ms, body.bandwidth_mbps, body.drop))
        log.warning("%s: link from %s now %s", self.name, body.peer, "plain" if plain else body.model_dump())
        return {"server": self.name, "links": {n: asdict(p) for n, p in self.service.links.profiles().items()}}

    def switch_placement(self, placement: Placement, down: list[str] | None = None,
                         drain_timeout: float = 10.0, plan: Any = None) -> dict[str, Any]:
        """Route by `placement` from now on; wait (up to `drain_timeout` s) for calls made under older ones. With
        `plan` (whose placement `placement` is), this server's requests also take the plan's route; without, the
        current plan's layer blocks are kept over the new placement."""
        if list(placement.server_names) != list(self.placement.server_names):
            raise ControlError(400, f"placement for servers {list(placement.server_names)}, this cluster has "
                                    f"{list(self.placement.server_names)}")
        me = placement.server_names.index(self.name)
        with self._control_lock:
            current = self.dispatcher.placement.version
            if placement.version <= current:
                same = placement.version == current and (placement.hosts == self.dispatcher.placement.hosts).all()
                if same and (plan is None or (plan.executor == self.plan.executor).all()):  # a repeat: done already
                    return {"server": self.name, "placement_version": current, "drained": True, "drain_ms": 0.0}
                raise ControlError(409, f"placement version {placement.version} is not newer than {current}")
            lacking = [(int(l), int(e)) for l, e in np.argwhere(placement.hosts[me])
                       if not self.stores[int(l)].has_weights(int(e))]
            if lacking:
                raise ControlError(409, f"placement version {placement.version} has {self.name} holding "
                                        f"{len(lacking)} experts it has not loaded, e.g. {lacking[:5]}")
            if down is not None:
                self.set_down(down)
            for layer, store in self.stores.items():  # flip the maps of the staged copies it now routes here
                store.publish([e for e in store.staged if placement.hosts[me, layer, e]])
            self.placement = placement
            self.plan = plan if plan is not None else self.plan.with_placement(placement)
            runner = self.runner
            if plan is not None and runner is not None and hasattr(runner, "set_route"):
                runner.set_route(self._route(plan))  # running requests are rebuilt on it at the loop's next step
            self.metrics.set_placement_version(placement.version)
            t0 = time.perf_counter()
            self.dispatcher.set_placement(placement)
        drained = self.dispatcher.drain(placement.version, drain_timeout)
        out = {"server": self.name, "placement_version": placement.version, "drained": drained,
               "drain_ms": (time.perf_counter() - t0) * 1e3}
        if not drained:
            out["inflight"] = self.dispatcher.inflight()
            log.warning("%s: calls of older placements still in flight after %.1f s: %s", self.name, drain_timeout,
                        "; ".join(self.dispatcher.inflight_calls(placement.version)))
        return out

    # --- HTTP -----------------------------------------------------------------------------------------------
    def app(self) -> Any:
        from prism_moe.runtime.http_api import create_app

        def health() -> dict[str, Any]:
            return {"server": self.name, "placement_version": self.dispatcher.placement.version,
                    "experts_held": self.held_count(),
                    "peers": sorted(self.pool.names) if self.pool else [],
                    "trace_replay": bool(self.options.replay), "plan": self.plan_info()}

        if self.host is not None:  # the API process has the OpenAI routes and the Engine frontend
            app = create_app(self.host, self.metrics, self.model_name, extra_health=health, openai=False)
        else:
            app = create_app(self.engine, self.metrics, self.model_name, api_key=self.options.api_key,
                             extra_health=health)
        app.add_api_route("/prism/stats", self.stats, methods=["GET"])
        self._add_control_routes(app)
        return app

    def _add_control_routes(self, app: Any) -> None:
        """POST /prism/experts/{load,send,drop}, GET|POST /prism/placement, /prism/down, /prism/replay,
        POST /prism/trace/save (write the --record-trace file now), GET|POST /prism/lease. Every POST needs
        the admin credential (runtime/auth.py), checked before the body is read; GETs are read-only."""
        from typing import get_type_hints

        from fastapi import Depends, Request
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, Field

        control = [Depends(self.control_guard)]

        def guarded(fn: Any) -> Any:
            # sync handlers: FastAPI runs them in its thread pool, off the event loop
            def handler(request: Request, body: Any) -> Any:
                try:
                    return fn(body)
                except ControlError as err:
                    return JSONResponse({"error": {"message": err.message, "server": self.name}},
                                        status_code=err.status)
            # real classes, not the strings of `from __future__ import annotations`: FastAPI reads them
            handler.__annotations__ = {"request": Request, "body": get_type_hints(fn)["body"]}
            return handler

        def load(body: ExpertsBody) -> dict[str, Any]:
            return self.load_experts(body.experts)

        def send(body: ExpertsBody) -> dict[str, Any]:
            if not body.to:
                raise ControlError(400, "send needs `to`: the peer that loads the experts")
            return self.send_experts(body.experts, body.to)

        def drop(body: ExpertsBody) -> dict[str, Any]:
            return self.drop_experts(body.experts)

        def switch(body: PlacementBody) -> dict[str, Any]:
            try:
                placement = Placement.from_dict(body.placement)
            except PlacementError as err:
                raise ControlError(400, f"bad placement: {err}") from err
            return self.switch_placement(placement, body.down, body.drain_timeout)

        def switch_plan(body: PlanBody) -> dict[str, Any]:
            from prism_moe.placement.plan import ExecutionPlan

            try:
                plan = ExecutionPlan.from_dict(body.plan, "plan")
            except PlacementError as err:
                raise ControlError(400, f"bad plan: {err}") from err
            return self.switch_plan(plan, body.down, body.drain_timeout)

        def set_down(body: DownBody) -> dict[str, Any]:
            self.set_down(body.down)
            return {"server": self.name, "down": self.dispatcher.down()}

        def replay(body: ReplayBody) -> dict[str, Any]:
            return self.set_replay(body.workload)

        def links(body: LinkBody) -> dict[str, Any]:
            return self.set_link(body)

        for path, fn in (("/prism/experts/load", load), ("/prism/experts/send", send),
                         ("/prism/experts/drop", drop), ("/prism/placement", switch), ("/prism/plan", switch_plan),
                         ("/prism/down", set_down),
                         ("/prism/replay", replay), ("/prism/links", links)):
            app.add_api_route(path, guarded(fn), methods=["POST"], dependencies=control)
        app.add_api_route("/prism/placement", lambda: self.dispatcher.placement.to_dict(), methods=["GET"])
        app.add_api_route("/prism/plan", lambda: self.plan.to_dict(), methods=["GET"])

        def save_trace(request: Request) -> Any:  # no body; sync: the save runs in FastAPI's thread pool
            try:
                return self.save_trace()
            except ControlError as err:
                return JSONResponse({"error": {"message": err.message, "server": self.name}}, status_code=err.status)

        save_trace.__annotations__ = {"request": Request}
        app.add_api_route("/prism/trace/save", save_trace, methods=["POST"], dependencies=control)

        class LeaseBody(BaseModel):
            holder: str = Field(min_length=1, max_length=128)
            ttl: float = Field(default=6.0, gt=0, le=300)
            release: bool = False

        def lease(body: LeaseBody) -> Any:
            out = self.lease.release(body.holder) if body.release else self.lease.acquire(body.holder, body.ttl)
            return {"server": self.name, "placement_version": self.dispatcher.placement.version, **out}

        lease.__annotations__ = {"body": LeaseBody, "return": Any}
        # the credential only: the lease is what this route grants
        app.add_api_route("/prism/lease", lease, methods=["POST"], dependencies=[Depends(self.control_guard.authorize)])
        app.add_api_route("/prism/lease", lambda: {"server": self.name, **self.lease.state()}, methods=["GET"])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_server(cluster: ClusterSpec, name: str, options: ServeOptions) -> None:
    """Start the server and serve HTTP until SIGINT/SIGTERM (what `prism serve` does)."""
    import uvicorn

    server = EdgeServer(cluster, name, options)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default SIGTERM action
    # the process would die there, before `close()` saves the trace and releases the sockets.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        s = cluster.server(name)
        if not s.http_port:
            raise ConfigError(f"server {name}: http_port is not set")
        server.start()
        if not options.api_process:
            uvicorn.run(server.app(), host=s.host, port=s.http_port, log_level="warning")
            return
        with tempfile.TemporaryDirectory(prefix="prism-serve-") as private:  # 0700: only this user connects
            _serve_split(server, s.host, s.http_port, Path(private))
    finally:
        server.close()


def _serve_split(server: EdgeServer, host: str, port: int, private: Path) -> None:
    """The model's process (this one: the model app on a Unix socket) and its API process (the public port)."""
    import uvicorn

    from prism_moe.runtime.api_process import start_api_process

    to_host, from_host, core = f"ipc://{private}/runner-in", f"ipc://{private}/runner-out", str(private / "model.sock")
    server.host_runner(to_host, from_host)
    app = server.app()
    child = start_api_process(checkpoint_dir(server.cluster), server.model_name, host, port, core, to_host, from_host,
                              server.options.max_running, server.options.api_key)
    stopping = threading.Event()
    died: list[int] = []

    def watch() -> None:  # an API process that dies takes the server down: visible, not half alive
        code = child.wait()
        if not stopping.is_set():
            died.append(code)
            log.error("%s: the API process exited (code %s); stopping the server", server.name, code)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="prism-api-watch", daemon=True).start()
    try:
        # the API process forwards each client's address (X-Forwarded-For): only it can reach this socket
        uvicorn.run(app, uds=core, log_level="warning", proxy_headers=True, forwarded_allow_ips="*")
        if died:
            raise RuntimeError(f"the API process exited (code {died[0]}); the server stopped with it")
    finally:
        stopping.set()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
