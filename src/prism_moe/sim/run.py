"""Glue: a cluster file's servers and workloads -> token pools, arrival streams, placement stats -> a run.

    scen = build_scenario(cluster, data_dir=None, seed=0)
    placement = place("prism", scen.stats, cluster, scen.model)
    result = simulate(scen, placement, n_requests=300, seed=0)
    result.summary()["mean_latency_s"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.placement.problem import ClusterStats
from prism_moe.sim.cost import CostModel
from prism_moe.sim.engine import Engine, EngineConfig, PlacementChange, ServerFailure
from prism_moe.sim.metrics import SimResult
from prism_moe.sim.workload import (
    LengthModel,
    ServerLoad,
    TokenPool,
    generate_requests,
    pool_from_counts,
    pool_from_trace,
    text_tokens,
)

POOL_TOKENS = 8192  # tokens sampled per counts-only source (about the size of an ESFT trace)


@dataclass
class Source:
    """One workload, ready to simulate: its token pool, lengths and counts float [L, E]."""

    name: str
    pool: TokenPool
    lengths: LengthModel
    counts: np.ndarray
    trace: object | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    """A cluster with its users. `phases[s]` = ((start_s, source index), ...) for server s."""

    cluster: ClusterSpec
    model: ModelSpec
    cost: CostModel
    sources: list[Source]
    phases: list[tuple[tuple[float, int], ...]]

    @property
    def pools(self) -> list[TokenPool]:
        return [src.pool for src in self.sources]

    def loads(self) -> list[ServerLoad]:
        return [ServerLoad(srv.request_rate, ph, tuple(self.sources[i].lengths for _, i in ph))
                for srv, ph in zip(self.cluster.servers, self.phases, strict=True)]

    def stats(self, phase: int = 0) -> ClusterStats:
        """Placement input: each server's counts (and trace) in its `phase`-th workload."""
        idx = [ph[min(phase, len(ph) - 1)][1] for ph in self.phases]
        counts = np.stack([self.sources[i].counts for i in idx])
        return ClusterStats(counts, tuple(self.sources[i].trace for i in idx))

    @property
    def notes(self) -> list[str]:
        return [n for src in self.sources for n in src.notes]


def load_source(name: str | None, model: ModelSpec, data_dir: str | Path | None, rng: np.random.Generator,
                lengths: LengthModel | None = None) -> Source:
    """A workload by name (prism_moe.stats.workload names), fitted to the model. None: uniform routing."""
    if name is None:
        counts = np.ones((model.num_moe_layers, model.num_experts))
        pool = pool_from_counts("uniform", counts, model.top_k, POOL_TOKENS, rng)
        return Source("uniform", pool, lengths or LengthModel(), counts, None, ["no workload: uniform routing"])
    from prism_moe.stats.workload import load_prompts, load_workload

    w = load_workload(name, data_dir).fit_to_model(model)
    trace = w.trace
    if trace is not None and trace.top_k == model.top_k and trace.num_tokens >= 1024:
        pool = pool_from_trace(name, trace.experts, trace.seq_starts)
    else:
        if trace is not None:
            w.notes.append(f"{name}: trace too short ({trace.num_tokens} tokens) to replay; sampled from counts")
            trace = None
        pool = pool_from_counts(name, w.counts, model.top_k, POOL_TOKENS, rng)
    if lengths is None:
        prompts = load_prompts(name, data_dir)
        lengths = LengthModel(prompt_tokens=tuple(text_tokens(p) for p in prompts)) if prompts else LengthModel()
    return Source(name, pool, lengths, np.array(w.counts), trace, list(w.notes))


def build_scenario(cluster: ClusterSpec, data_dir: str | Path | None = None, seed: int = 0,
                   phases: list[list[tuple[float, str | None]]] | None = None,
                   lengths: LengthModel | None = None) -> Scenario:
    """Workloads from the cluster file (`servers[i].workload`), or `phases[s]` = [(start_s, name), ...]."""
    model = cluster.model_spec()
    rng = np.random.default_rng(seed)
    if phases is None:
        phases = [[(0.0, srv.workload)] for srv in cluster.servers]
    if len(phases) != len(cluster.servers):
        raise ValueError(f"{len(phases)} workload phase lists for {len(cluster.servers)} servers")
    sources: list[Source] = []
    index: dict[str | None, int] = {}
    ph_idx = []
    for ph in phases:
        row = []
        for t0, name in ph:
            if name not in index:
                index[name] = len(sources)
                sources.append(load_source(name, model, data_dir, rng, lengths))
            row.append((float(t0), index[name]))
        ph_idx.append(tuple(row))
    return Scenario(cluster, model, CostModel.build(cluster, model), sources, ph_idx)


def simulate(scen: Scenario, placement: Placement | ExecutionPlan, n_requests: int = 300, seed: int = 0,
             config: EngineConfig | None = None, changes: list[PlacementChange] | None = None,
             label: str = "", failures: list[ServerFailure] | None = None) -> SimResult:
    """Run `n_requests` Poisson arrivals (seeded) against `placement`; deterministic for a seed.
    `failures`: servers that die during the run (their plan repaired by `replan_without`)."""
    rng = np.random.default_rng(seed)
    reqs = generate_requests(scen.loads(), scen.pools, n_requests, rng)
    eng = Engine(scen.cost, placement, scen.pools, reqs, config, changes, failures,
                 repair_for(scen.cluster, scen.model) if failures else None)
    first, finish, stats, wall = eng.run()
    names = tuple(scen.cluster.server_names)
    kv = kv_peak_bytes(eng.plan, scen.model, reqs, finish)
    return SimResult(names, reqs, first, finish, stats, wall, label or placement.algorithm,
                     dict(zip(names, kv.tolist(), strict=True)), eng.failed)


def repair_for(cluster: ClusterSpec, model: ModelSpec):
    """The engine's repair function for this cluster: (plan, dead bool [S]) -> failover.Repair."""
    from functools import partial

    from prism_moe.placement.failover import replan_without
    from prism_moe.placement.plan import PlanSizes, server_budgets

    bw, lat = cluster.link_matrices()
    return partial(replan_without, sizes=PlanSizes.of(model), weight_budget=server_budgets(cluster)[0],
                   link_cost=2 * lat + 1.0 / bw)


def kv_peak_bytes(plan: ExecutionPlan, model: ModelSpec, reqs, finish: np.ndarray) -> np.ndarray:
    """Per server, the most KV cache it holds at once: each request keeps prompt + output tokens in every
    layer's executor from its arrival to its end (an upper bound: the cache grows while it decodes).
    With failures it is rougher: the final (repaired) plan's executors, and lost requests (finish NaN)
    counted to the end of the run. float [S]."""
    from prism_moe.placement.plan import PlanSizes

    per_token = PlanSizes.of(model).kv_token_layer
    layers_on = plan.layers_executed()  # [p, home]
    size = (reqs.prompt + reqs.output).astype(np.float64) * per_token  # bytes per layer, [R]
    t = np.concatenate([reqs.arrival, finish])
    order = np.argsort(t, kind="stable")
    sign = np.concatenate([np.ones(len(reqs)), -np.ones(len(reqs))])[order]
    idx = np.concatenate([np.arange(len(reqs))] * 2)[order]
    contrib = layers_on[:, reqs.server[idx]] * (sign * size[idx])[None, :]  # [S, 2R]
    return np.cumsum(contrib, axis=1).max(axis=1, initial=0.0)


def mean_lengths(scen: Scenario, phase: int = 0) -> tuple[float, float]:
    """Mean prompt and output tokens over the servers' workloads (rate-weighted)."""
    rates = np.array([srv.request_rate for srv in scen.cluster.servers])
    ls = [scen.sources[ph[min(phase, len(ph) - 1)][1]].lengths for ph in scen.phases]
    prompt = np.array([np.mean(x.prompt_tokens) if x.prompt_tokens else x.prompt_mean for x in ls])
    output = np.array([x.output_mean for x in ls])
    return float(prompt @ rates / rates.sum()), float(output @ rates / rates.sum())


def make_placement(scen: Scenario, algorithm: str, phase: int = 0,
                   current: Placement | None = None) -> Placement | ExecutionPlan:
    """A placement by algorithm name for the scenario's workloads in `phase`.

    `latency` is given the scenario's mean prompt/output lengths (measurable in any deployment); the
    others come from `prism_moe.placement.registry`. `current` (the placement in service) goes to the
    algorithms that can prefer keeping it, for fewer experts to migrate.
    """
    stats = scen.stats(phase)
    from prism_moe.placement.registry import PLAN_ALGORITHMS

    if algorithm in PLAN_ALGORITHMS:
        opts = {}
        if algorithm not in ("pipeline", "pipeline-rep"):
            opts["prompt_tokens"], opts["output_tokens"] = mean_lengths(scen, phase)
        return PLAN_ALGORITHMS[algorithm](stats, scen.cluster, scen.model, **opts)
    if algorithm == "latency":
        from prism_moe.placement.latency import latency

        prompt, output = mean_lengths(scen, phase)
        return latency(stats, scen.cluster, scen.model, prompt_tokens=prompt, output_tokens=output,
                       current=current)
    from prism_moe.placement.registry import keeps_current, place

    return place(algorithm, stats, scen.cluster, scen.model,
                 current=current if current is not None and keeps_current(algorithm) else None)


def algorithm_names() -> list[str]:
    try:
        from prism_moe.placement.registry import ALGORITHMS
    except ImportError:
        return ["latency"]
    from prism_moe.placement.registry import PLAN_ALGORITHMS

    return list(ALGORITHMS) + ([] if "latency" in ALGORITHMS else ["latency"]) + list(PLAN_ALGORITHMS)
