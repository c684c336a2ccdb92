"""Layer pipelines, the plans llama.cpp RPC, exo, prima.cpp and vLLM's pipeline parallelism execute.

Each used server (a stage) holds the dense part and every expert of a contiguous block of MoE layers,
plus the embedding and head; every request, whatever its home, runs each block on its stage (one
hand-off per block boundary, one from home to the first stage and one back).

`pipeline`: blocks proportional to each server's memory, in cluster order (as exo splits).
`replicate=True` (`pipeline-rep`, `pipeline-opt-rep`): the same split, plus a second copy of every
block that fits on another server's spare memory (`backup_owners`), recorded as the plan's backup
executor: when a stage fails, its blocks run on the backup without loading anything.
`pipeline-opt`: the partition (and stage order) minimising the estimated request latency over the
GPUs and links, as prima.cpp's Halda does: for each stage order (all orders up to 6 servers, else
servers by decreasing speed) a dynamic program over (stage, layers placed, last used stage) finds the
exact best contiguous split, stages allowed to be skipped. A stage's cost is its layers' roofline
time for the mean prompt and a decode step, inflated by 1 / (1 - utilisation) at the cluster's
request rate (a stage is a queue every request passes), plus the hops.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from prism_moe.config import ClusterSpec, ConfigError
from prism_moe.hardware import server_profiles
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan, PlanSizes, server_budgets
from prism_moe.placement.problem import ClusterStats


def max_layers(cluster: ClusterSpec, model: ModelSpec) -> np.ndarray:
    """Whole layers (dense + every expert) each server can hold beside the embedding and head: int [S]."""
    sizes = PlanSizes.of(model)
    weights, _ = server_budgets(cluster)
    return np.maximum(np.floor((weights - sizes.base) / sizes.full_layer), 0).astype(np.int64)


def backup_owners(owner: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """A second holder for each layer where memory allows: int [L] (-1: no room anywhere).

    Block by block, the copies go to the server (not the block's own) with the most spare whole layers,
    filling it before moving to the next, so a failed stage's block mostly moves as one block (one hop).
    owner int [L]; cap int [S] whole layers each server can hold.
    """
    owner = np.asarray(owner, dtype=np.int64)
    spare = np.asarray(cap, dtype=np.int64) - np.bincount(owner, minlength=len(cap))
    out = np.full(len(owner), -1, dtype=np.int64)
    current = -1
    for l, p in enumerate(owner.tolist()):
        if current < 0 or current == p or spare[current] <= 0:
            room = np.where(np.arange(len(cap)) == p, -1, spare)
            current = int(np.argmax(room)) if room.max() > 0 else -1
        if current >= 0:
            out[l] = current
            spare[current] -= 1
    return out


def plan_from_blocks(cluster: ClusterSpec, model: ModelSpec, owner: np.ndarray, algorithm: str,
                     meta: dict | None = None, replicate: bool = False) -> ExecutionPlan:
    """The pipeline plan where layer l runs on owner[l] for every home: owner int [L]. With `replicate`,
    each layer also gets a backup holder where memory allows (`backup_owners`)."""
    s_n, layers, e = len(cluster.servers), model.num_moe_layers, model.num_experts
    hosts = np.zeros((s_n, layers, e), dtype=bool)
    hosts[owner, np.arange(layers)] = True
    dense = np.zeros((s_n, layers), dtype=bool)
    dense[owner, np.arange(layers)] = True
    backup = None
    meta = dict(meta or {})
    if replicate:
        second = backup_owners(owner, max_layers(cluster, model))
        has = second >= 0
        hosts[second[has], np.flatnonzero(has)] = True
        dense[second[has], np.flatnonzero(has)] = True
        backup = np.tile(second, (s_n, 1))
        meta["replicated_layers"] = int(has.sum())
        algorithm = f"{algorithm}-rep"
    bw, lat = cluster.link_matrices()
    placement = Placement.from_hosts(cluster.server_names, hosts, 2 * lat + 1.0 / bw, algorithm=algorithm)
    plan = ExecutionPlan(placement, np.tile(owner, (s_n, 1)), dense, algorithm, meta, backup)
    weights, _ = server_budgets(cluster)
    plan.check_memory(PlanSizes.of(model), weights)
    return plan


def pipeline(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *, replicate: bool = False) -> ExecutionPlan:
    """Memory-proportional contiguous blocks in cluster order (largest remainders, capped by what fits)."""
    layers = model.num_moe_layers
    cap = max_layers(cluster, model)
    if cap.sum() < layers:
        raise ConfigError(f"a pipeline of {model.name} needs {layers} whole layers; the servers' memory holds "
                          f"{int(cap.sum())} ({', '.join(f'{n}: {c}' for n, c in zip(cluster.server_names, cap, strict=True))})")
    mem = np.array([s.memory_gib for s in cluster.servers], dtype=np.float64)
    share = layers * mem / mem.sum()
    n = np.minimum(np.floor(share).astype(np.int64), cap)
    while n.sum() < layers:  # the largest remainder among servers with room
        room = n < cap
        i = int(np.argmax(np.where(room, share - n, -np.inf)))
        n[i] += 1
    owner = np.repeat(np.arange(len(n)), n)
    return plan_from_blocks(cluster, model, owner, "pipeline", {"layers_per_server": n.tolist()}, replicate)


def stage_costs(cluster: ClusterSpec, model: ModelSpec, prompt_tokens: float, output_tokens: float,
                batch: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per server: seconds of one layer for a prompt and for a decode step, and GPU seconds one request
    spends per layer there ([S] each). Roofline of the dense part and the experts the tokens use."""
    sizes = PlanSizes.of(model)
    prof = server_profiles(cluster)
    k, e = model.top_k, model.num_experts
    dense_flops = 2 * sizes.dense_layer / model.bytes_per_param
    pre, dec, work = [], [], []
    for p in prof:
        def layer(tokens: float, p=p) -> float:
            distinct = e * (1 - (1 - k / e) ** tokens)  # experts a batch of `tokens` uses
            dense = max(sizes.dense_layer / p.bytes_per_s, dense_flops * tokens / p.flops_per_s)
            experts = max(distinct * sizes.expert / p.bytes_per_s,
                          tokens * k * model.expert_flops_per_token / p.flops_per_s)
            return dense + experts + 2 * p.kernel_overhead_s
        pre.append(layer(prompt_tokens))
        dec.append(layer(batch))
        work.append(pre[-1] + output_tokens * dec[-1] / batch)
    return np.array(pre), np.array(dec), np.array(work)


def pipeline_opt(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *, prompt_tokens: float = 512,
                 output_tokens: float = 128, replicate: bool = False) -> ExecutionPlan:
    """The exact best contiguous split under the estimate of the module docstring (per stage order)."""
    s_n, layers = len(cluster.servers), model.num_moe_layers
    cap = max_layers(cluster, model)
    if cap.sum() < layers:
        return pipeline(stats, cluster, model, replicate=replicate)  # raises the clear error
    rate = np.array([s.request_rate for s in cluster.servers], dtype=np.float64)
    total_rate = float(rate.sum())
    batch = max(1.0, total_rate * 10.0)  # requests decoding together, a rough Little's-law guess
    pre, dec, work = stage_costs(cluster, model, prompt_tokens, output_tokens, batch)
    bw, lat = cluster.link_matrices()
    tok_bits = model.hidden_size * model.bytes_per_param * 8
    hop = np.zeros((s_n, s_n))  # one request's hops a -> b over its whole life: prompt + decode steps
    for a in range(s_n):
        for b in range(s_n):
            if a != b:
                hop[a, b] = (lat[a, b] + prompt_tokens * tok_bits / bw[a, b]
                             + output_tokens * (lat[a, b] + tok_bits / bw[a, b]))
    w = rate / total_rate

    def stage(p: int, n: int) -> float:
        """A request's time in stage p holding n layers, queueing included."""
        rho = min(total_rate * n * work[p], 0.98)
        return n * (pre[p] + output_tokens * dec[p]) / (1 - rho)

    orders = (itertools.permutations(range(s_n)) if s_n <= 6
              else [tuple(np.argsort([-p.flops_per_s for p in server_profiles(cluster)], kind="stable"))])
    best = (math.inf, None)
    for order in orders:
        cost, owner = _split(order, layers, cap, stage, hop, w)
        if cost < best[0]:
            best = (cost, owner)
    return plan_from_blocks(cluster, model, np.array(best[1]), "pipeline-opt", {"estimate_s": best[0]}, replicate)


def _split(order, layers: int, cap: np.ndarray, stage, hop: np.ndarray, w: np.ndarray):
    """DP over the servers of `order`: f[l][last] = best cost with layers 0..l-1 placed, `last` the stage
    that ran layer l-1 (-1: none yet). Hops from each home to the first stage and back from the last
    are weighted by the homes' request shares w."""
    inf = math.inf
    f = {(0, -1): (0.0, [])}
    for p in order:
        nxt = dict(f)  # p skipped
        for (l, last), (c, own) in f.items():
            for n in range(1, min(int(cap[p]), layers - l) + 1):
                hop_in = float(w @ hop[:, p]) if last < 0 else hop[last, p]
                key = (l + n, p)
                val = c + stage(p, n) + hop_in
                if val < nxt.get(key, (inf,))[0]:
                    nxt[key] = (val, own + [p] * n)
        f = nxt
    best = (inf, None)
    for (l, last), (c, own) in f.items():
        if l == layers and last >= 0:
            total = c + float(hop[last, :] @ w)
            if total < best[0]:
                best = (total, own)
    return best
