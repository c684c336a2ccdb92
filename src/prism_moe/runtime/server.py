"""One edge server: the dense model plus its placed experts, an expert service for peers, an HTTP API.

`EdgeServer.start()` does, in order: load the dense weights and this server's experts from the
checkpoint (`load_partial`); start the ZeroMQ expert service that computes those experts for peers;
connect to every peer's expert service; attach the cluster dispatcher to the model (so missing experts
go to the peer the placement names); wrap the model in the continuous-batching `Engine`. `app()` gives
the FastAPI app (OpenAI API, /health, /metrics, /prism/stats) that `prism serve` runs with uvicorn.

Threads: the transport runs on one asyncio loop thread (`LoopThread`), the model on the engine's
generation thread, HTTP on uvicorn's loop. Nothing of the model runs on an event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prism_moe.config import ClusterSpec, ConfigError
from prism_moe.placement.placement import Placement
from prism_moe.runtime.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """What `prism serve` takes besides the cluster file and the server name."""

    placement: Placement
    device: str = "auto"
    api_key: str | None = None
    keys_dir: Path | None = None
    replay: str | None = None  # workload source whose per-token trace drives the routers (benchmark mode)
    data_dir: str | None = None
    call_timeout: float = 10.0
    call_retries: int = 1
    max_running: int = 32


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


def _links_for(cluster: ClusterSpec, me: str) -> dict[str, Any]:
    """Per-peer link emulation profiles (only when `network.emulate` is on)."""
    if not cluster.network.emulate:
        return {}
    from prism_moe.runtime.emulation import LinkProfile

    bw, lat = cluster.link_matrices()
    i = cluster.server_names.index(me)
    return {n: LinkProfile(delay_ms=float(lat[i, j] * 1e3), bandwidth_mbps=float(bw[i, j] / 1e6))
            for j, n in enumerate(cluster.server_names) if j != i}


class EdgeServer:
    def __init__(self, cluster: ClusterSpec, name: str, options: ServeOptions) -> None:
        self.cluster = cluster
        self.name = name
        self.spec_server = cluster.server(name)
        self.options = options
        self.placement = options.placement
        if list(self.placement.server_names) != cluster.server_names:
            raise ConfigError(f"the placement is for servers {list(self.placement.server_names)}, the cluster "
                              f"file has {cluster.server_names}")
        self.metrics = ServerMetrics(name)
        self.loop_thread: Any = None
        self.service: Any = None
        self.pool: Any = None
        self.engine: Any = None
        self.dispatcher: Any = None
        self.stores: dict[int, Any] = {}
        self.resident_bytes = 0

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        from transformers import AutoTokenizer

        from prism_moe.model.experts import attach
        from prism_moe.model.loading import load_partial, resident_weight_bytes
        from prism_moe.model.spec import ModelSpec
        from prism_moe.runtime.dispatch import ClusterDispatcher
        from prism_moe.runtime.engine import Engine, resolve_device
        from prism_moe.runtime.transport import ExpertService, LoopThread, SyncPeerPool

        ckpt = checkpoint_dir(self.cluster)
        spec = ModelSpec.from_pretrained(ckpt)
        p = self.placement
        if (p.num_layers, p.num_experts) != (spec.num_moe_layers, spec.num_experts):
            raise ConfigError(f"the placement is for {p.num_layers} layers x {p.num_experts} experts, the "
                              f"checkpoint {ckpt} has {spec.num_moe_layers} x {spec.num_experts}")
        device = resolve_device(self.options.device)
        log.info("%s: loading %s on %s with %d experts", self.name, ckpt, device, int(p.experts_used()[
            p.server_names.index(self.name)]))
        model, self.stores = load_partial(ckpt, p.held(self.name), device=str(device))
        self.resident_bytes = resident_weight_bytes(model, self.stores)
        self.metrics.set_resident_weight_bytes(self.resident_bytes)
        self.metrics.set_placement_version(p.version)

        identity = None
        if self.options.keys_dir is not None:
            from prism_moe.runtime.keys import load_identity

            identity = load_identity(self.options.keys_dir, self.name)

        self.loop_thread = LoopThread(f"prism-transport-{self.name}")
        host, port = self.spec_server.host, self.spec_server.expert_port
        if not port:
            raise ConfigError(f"server {self.name}: expert_port is not set (prism cluster up picks free ports; "
                              f"a real cluster gives them in the cluster file)")
        self.service = ExpertService(f"tcp://{host}:{port}", self._serve_experts, num_layers=spec.num_moe_layers,
                                     num_experts=spec.num_experts, hidden_size=spec.hidden_size, name=self.name,
                                     identity=identity)
        self.loop_thread.run(self.service.start())
        peers = {s.name: f"tcp://{s.host}:{s.expert_port}" for s in self.cluster.servers if s.name != self.name}
        if peers:
            self.pool = SyncPeerPool(peers, loop_thread=self.loop_thread, identity=identity,
                                     links=_links_for(self.cluster, self.name), timeout=self.options.call_timeout,
                                     retries=self.options.call_retries, on_call=self._on_call)

        self.dispatcher = ClusterDispatcher(self.name, p, self.pool, self.metrics)
        dispatcher: Any = self.dispatcher
        if self.options.replay:
            dispatcher = self._replay_dispatcher(spec)
        attach(model, dispatcher, spec, self.stores)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        self.engine = Engine(model, tokenizer, device=None, max_running=self.options.max_running)
        self.model_name = ckpt.name

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
        return ReplayDispatcher(self.dispatcher, ReplayRouting(t.experts, t.weights, wrap=True))

    def close(self) -> None:
        if self.engine is not None and self.engine.is_running:
            self.engine.stop()
        if self.pool is not None:
            self.pool.close()
        if self.service is not None and self.loop_thread is not None and not self.loop_thread.closed:
            self.loop_thread.run(self.service.close(), timeout=10)
        if self.loop_thread is not None:
            self.loop_thread.close()

    # --- expert service and metrics hooks -------------------------------------------------------------------
    def _serve_experts(self, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """A peer's batch: expert_ids [n], hidden [n, H] (CPU, from the wire) -> [n, H] on CPU."""
        store = self.stores[layer]
        missing = sorted(set(expert_ids.unique().tolist()) - set(store.held))
        if missing:  # a distinct code, so a caller can re-route (e.g. mid-migration)
            from prism_moe.runtime.transport import ServiceError

            raise ServiceError("not_held", f"server {self.name} does not hold layer {layer} experts {missing}")
        ref = store.get(store.held[0])[0]
        out = store.compute_batch(expert_ids.to(ref.device), hidden.to(ref.device, ref.dtype))
        return out.to("cpu", hidden.dtype)

    def _on_call(self, ev: Any) -> None:
        if ev.outcome == "ok":
            self.metrics.observe_remote_call(ev.peer, ev.latency_s, ev.bytes_sent, ev.bytes_received)
        else:
            self.metrics.observe_remote_error(ev.peer)

    def stats(self) -> dict[str, Any]:
        """Activation counts of this server's own tokens (what `/prism/stats` returns for the scheduler)."""
        counts = self.dispatcher.counter.snapshot()
        me = self.placement.server_names.index(self.name)
        hosts = self.dispatcher.placement.hosts[me]
        total = int(counts.sum())
        local = int(counts[hosts].sum())
        return {"server": self.name, "placement_version": self.dispatcher.placement.version,
                "counts": counts.tolist(), "invocations": total, "local_invocations": local,
                "remote_fraction": (total - local) / total if total else 0.0,
                "resident_weight_bytes": self.resident_bytes, "trace_replay": bool(self.options.replay)}

    # --- HTTP -----------------------------------------------------------------------------------------------
    def app(self) -> Any:
        from prism_moe.runtime.http_api import create_app

        def health() -> dict[str, Any]:
            return {"server": self.name, "placement_version": self.dispatcher.placement.version,
                    "experts_held": int(self.placement.experts_used()[self.placement.server_names.index(self.name)]),
                    "peers": sorted(self.pool.pool.names) if self.pool else [],
                    "trace_replay": bool(self.options.replay)}

        app = create_app(self.engine, self.metrics, self.model_name, api_key=self.options.api_key,
                         extra_health=health)
        app.add_api_route("/prism/stats", self.stats, methods=["GET"])
        return app


def run_server(cluster: ClusterSpec, name: str, options: ServeOptions) -> None:
    """Start the server and serve HTTP until SIGINT/SIGTERM (what `prism serve` does)."""
    import uvicorn

    server = EdgeServer(cluster, name, options)
    try:
        server.start()
        s = cluster.server(name)
        if not s.http_port:
            raise ConfigError(f"server {name}: http_port is not set")
        uvicorn.run(server.app(), host=s.host, port=s.http_port, log_level="warning")
    finally:
        server.close()
