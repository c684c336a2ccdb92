"""`hybrid`: per home server and layer, run the layer at home with local experts, at home with remote
expert calls (Prism), or hand the hidden states to a peer that runs it (pipeline), jointly with what
each server holds; minimising an estimate of the mean request latency.

Estimate (`PlanEstimate`), per home h, for its mean prompt P and output O tokens, decode batch b_h:
  layer l on executor p: roofline of the dense part and the experts for P tokens (prefill) and for b_h
  tokens (a decode step), + a stall when p lacks experts h's tokens use: a round trip carrying the
  share of tokens that need a peer (prefill), or, with the probability that a batch of b_h tokens
  needs any peer, one carrying the batch (decode); token routing from h's own trace or counts.
  hand-off a -> b: latency + P (prefill) or b_h (each decode step) hidden states over the link.
  GPU and link times are inflated by 1 / (1 - utilisation) at the servers' request rates.
  latency_h = prefill_h + O x step_h;  J = rate-weighted mean of latency_h.

Search, for a layout where server p holds whole layers (dense part and every expert) of a cyclic
range of n_p layers, n_p as many as its memory allows: for a fixed layout each home's best executor
sequence is a shortest path over (layer, executor) (`best_paths`, exact for the estimate); the range
starts are found by coordinate descent (every start of one server with the others fixed, a few
sweeps, from the tilings of every server order up to 4 servers, a few beyond), with the
utilisation re-estimated between rounds (one sweep beyond 8 servers). The result is compared under J
with the plans of `flow`, `prism`, `latency` (up to 8 servers), `pipeline` and `pipeline-opt` (every layer at home is one of the executor choices, and a
pipeline is one of the layouts), and the best is returned: hybrid never estimates worse than them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.hardware import server_profiles
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.pipeline import max_layers, pipeline, pipeline_opt
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan, PlanSizes, server_budgets
from prism_moe.placement.problem import ClusterStats

MAX_UTIL = 0.95
# `latency` placement is a rival up to this many servers; beyond, its search takes most of the time
# budget (18 s at 16 servers) and the block layouts win by a wide margin on every link we model
LATENCY_RIVAL_MAX_SERVERS = 8


@dataclass
class PlanEstimate:
    """Costs the estimate needs. pre/dec: float [S] one layer's GPU seconds for a prompt / a decode
    step of home h's batch on server p, indexed [h, p]; tokens[h]: int [L, N, k] h's token routing;
    lat, bits_s: float [S, S] one-way latency and seconds per bit."""

    pre: np.ndarray
    dec: np.ndarray
    tokens: list[np.ndarray]
    lat: np.ndarray
    bits_s: np.ndarray
    tok_bits: float
    rate: np.ndarray
    prompt: float
    output: float
    batch: np.ndarray

    @classmethod
    def build(cls, stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, prompt_tokens: float,
              output_tokens: float, seed: int = 0) -> PlanEstimate:
        s_n = len(cluster.servers)
        tokens = _sample_tokens(stats, model, 2048 if s_n <= 8 else 256, np.random.default_rng(seed))
        rate = np.array([s.request_rate for s in cluster.servers], dtype=np.float64)
        sizes = PlanSizes.of(model)
        prof = server_profiles(cluster)
        k, e = model.top_k, model.num_experts
        bw, lat = cluster.link_matrices()
        tok_bits = model.hidden_size * model.bytes_per_param * 8.0
        # Little's law with a pipeline-like first guess: requests in flight decode together
        batch = np.clip(np.rint(rate * output_tokens * 0.05), 1, 64)

        def layer_s(p, tokens: float) -> float:
            distinct = e * (1 - (1 - k / e) ** tokens)
            dense = max(sizes.dense_layer / p.bytes_per_s, 2 * sizes.dense_layer / model.bytes_per_param * tokens
                        / p.flops_per_s)
            ex = max(distinct * sizes.expert / p.bytes_per_s, tokens * k * model.expert_flops_per_token / p.flops_per_s)
            return dense + ex + 2 * p.kernel_overhead_s

        pre = np.array([[layer_s(p, prompt_tokens) for p in prof] for _ in range(s_n)])
        dec = np.array([[layer_s(p, batch[h]) for p in prof] for h in range(s_n)])
        with np.errstate(divide="ignore"):
            bits_s = np.where(np.isfinite(bw), 1.0 / bw, 0.0)
        return cls(pre, dec, tokens, lat, bits_s, tok_bits, rate, float(prompt_tokens), float(output_tokens),
                   batch)

    # ---- pieces -----------------------------------------------------------------------------------

    def local_share(self, hosts: np.ndarray) -> np.ndarray:
        """share[h, l, p]: of h's tokens at layer l, those whose experts p holds all of: float [S, L, S]."""
        s_n, layers, _ = hosts.shape
        if hosts.all():
            return np.ones((s_n, layers, s_n))
        out = np.zeros((s_n, layers, s_n))
        for h in range(s_n):
            for l in range(layers):
                tok = self.tokens[h][l]  # [N, k]
                out[h, l] = hosts[:, l][:, tok].all(axis=2).mean(axis=1)
        return out

    def layer_costs(self, hosts: np.ndarray, gpu_util: np.ndarray, link_util: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prefill, decode step) seconds of layer l of home h on executor p: float [S, L, S] each."""
        share = self.local_share(hosts)
        slow = 1.0 / (1.0 - np.minimum(gpu_util, MAX_UTIL))  # [S] per executor
        lslow = 1.0 / (1.0 - np.minimum(link_util, MAX_UTIL))  # [S, S]
        rtt = 2 * self.lat + 0 * self.bits_s
        near = np.where(np.eye(len(self.rate), dtype=bool), np.inf, rtt).min(axis=1)  # [S] a peer's latency
        near = np.where(np.isfinite(near), near, 0.0)
        wire = (self.bits_s * lslow).max(axis=1)  # [S] the slowest link out of p, seconds per bit
        pre = self.pre[:, None, :] * slow[None, None, :]  # [S, L, S]
        dec = self.dec[:, None, :] * slow[None, None, :]
        need = 1.0 - share
        pre = pre + np.where(need > 1e-9, near[None, None, :] + need * self.prompt * self.tok_bits * 2
                             * wire[None, None, :], 0.0)
        b = self.batch[:, None, None]
        p_stall = 1.0 - share ** b
        dec = dec + p_stall * (near[None, None, :] + b * self.tok_bits * 2 * wire[None, None, :])
        return pre, dec

    def hop_costs(self, link_util: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prefill, decode step) seconds of a hand-off a -> b for home h: float [S(h), S(a), S(b)]."""
        lslow = 1.0 / (1.0 - np.minimum(link_util, MAX_UTIL))
        per_bit = self.bits_s * lslow
        pre = self.lat[None] + self.prompt * self.tok_bits * per_bit[None]
        dec = self.lat[None] + self.batch[:, None, None] * self.tok_bits * per_bit[None]
        return np.broadcast_to(pre, dec.shape), dec

    def utilisation(self, plan: ExecutionPlan, hosts_share: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """GPU busy share per server [S] and link busy share [S, S] of a plan at the request rates."""
        s_n = len(self.rate)
        gpu = np.zeros(s_n)
        link = np.zeros((s_n, s_n))
        per_req_bits_pre = self.prompt * self.tok_bits
        per_req_bits_dec = self.output * self.tok_bits  # one token per decode step of this request
        for h in range(s_n):
            path = [h] + plan.executor[h].tolist() + [h]
            for p in plan.executor[h].tolist():
                gpu[p] += self.rate[h] * (self.pre[h, p] + self.output * self.dec[h, p] / self.batch[h])
            for a, b in zip(path[:-1], path[1:], strict=True):
                if a != b:
                    link[a, b] += self.rate[h] * (per_req_bits_pre + per_req_bits_dec) * self.bits_s[a, b]
        if not plan.at_home:
            return gpu, link
        # expert calls: each token that needs a peer sends its hidden state there and back
        share = self.local_share(plan.placement.hosts) if hosts_share is None else hosts_share
        for h in range(s_n):
            need = (1.0 - share[h, :, h]).sum()  # layers' shares of tokens with a remote expert
            bits = self.rate[h] * need * (self.prompt + self.output) * self.tok_bits
            for p in range(s_n):
                if p != h:
                    link[h, p] += bits * self.bits_s[h, p] / max(s_n - 1, 1)
                    link[p, h] += bits * self.bits_s[p, h] / max(s_n - 1, 1)
        return gpu, link

    def total(self, plan: ExecutionPlan) -> tuple[float, np.ndarray]:
        """(J, latency per home [S]) of a plan."""
        gpu, link = self.utilisation(plan)
        pre, dec = self.layer_costs(plan.placement.hosts, gpu, link)
        hpre, hdec = self.hop_costs(link)
        s_n = len(self.rate)
        lat = np.zeros(s_n)
        for h in range(s_n):
            ex = plan.executor[h]
            layers = np.arange(len(ex))
            t_pre = pre[h, layers, ex].sum()
            t_dec = dec[h, layers, ex].sum()
            path = [h] + ex.tolist() + [h]
            for a, b in zip(path[:-1], path[1:], strict=True):
                if a != b:
                    t_pre += hpre[h, a, b]
                    t_dec += hdec[h, a, b]
            lat[h] = t_pre + self.output * t_dec
        return float(self.rate @ lat / self.rate.sum()), lat


def _sample_tokens(stats: ClusterStats, model: ModelSpec, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per server, n tokens' experts int [L, n, k]: from its trace (co-activation kept) or sampled from its
    counts with the simulator's sampler."""
    from prism_moe.placement.latency import sample_topk

    s_n, layers, _ = stats.shape
    k = model.top_k
    freq = stats.frequencies()
    out = []
    for s in range(s_n):
        tr = stats.traces[s] if s < len(stats.traces) else None
        ex = getattr(tr, "experts", None)
        if ex is not None and ex.shape[1:] == (layers, k) and len(ex) > 0:
            pick = rng.integers(0, len(ex), min(n, len(ex)))
            out.append(np.ascontiguousarray(np.asarray(ex)[pick].transpose(1, 0, 2)))
        else:
            out.append(np.stack([sample_topk(freq[s, l], k, n, rng) for l in range(layers)]))
    return out


def best_paths(cost: np.ndarray, hop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per home h the executor sequence minimising sum_l cost[h, l, p_l] + hops (home -> p_0 ... -> home).

    cost: float [S, L, S] (inf: p cannot run l); hop: float [S, S, S] ([h, a, b]). Exact shortest path
    over (layer, executor). Returns (executor int [S, L], cost float [S]).
    """
    s_n, layers, _ = cost.shape
    homes = np.arange(s_n)
    f = hop[homes, homes, :] + cost[:, 0]  # [H, S]: arriving at layer 0 on p
    back = np.zeros((layers, s_n, s_n), dtype=np.int64)  # [l, h, b]: best previous executor
    for l in range(1, layers):
        cand = f[:, :, None] + hop  # [h, a, b]
        back[l] = cand.argmin(axis=1)
        f = np.take_along_axis(cand, back[l][:, None, :], axis=1)[:, 0, :] + cost[:, l]
    f = f + hop[homes, :, homes]  # the way back home
    p = f.argmin(axis=1)
    tot = f[homes, p]
    ex = np.zeros((s_n, layers), dtype=np.int64)
    for l in range(layers - 1, -1, -1):
        ex[:, l] = p
        p = back[l, homes, p]
    return ex, tot


def _ranges(starts: np.ndarray, n: np.ndarray, layers: int) -> np.ndarray:
    """hold[p, l]: layer l is in server p's cyclic range [starts[p], starts[p] + n[p]): bool [S, L]."""
    off = (np.arange(layers)[None, :] - starts[:, None]) % layers
    return off < n[:, None]


def _block_plan(hold: np.ndarray, ex: np.ndarray, cluster: ClusterSpec, model: ModelSpec) -> ExecutionPlan:
    s_n, layers = hold.shape
    hosts = np.repeat(hold[:, :, None], model.num_experts, axis=2)
    bw, lat = cluster.link_matrices()
    placement = Placement.from_hosts(cluster.server_names, hosts, 2 * lat + 1.0 / bw, algorithm="hybrid")
    return ExecutionPlan(placement, ex, hold.copy(), "hybrid")


def hybrid(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *, prompt_tokens: float = 512,
           output_tokens: float = 128, sweeps: int = 3, seed: int = 0) -> ExecutionPlan:
    """See the module docstring. Returns the plan with the lowest estimated mean request latency."""
    from prism_moe.placement.registry import place

    layers = model.num_moe_layers
    est = PlanEstimate.build(stats, cluster, model, prompt_tokens, output_tokens, seed)
    candidates: list[ExecutionPlan] = []
    for name in ("flow", "prism"):
        candidates.append(ExecutionPlan.from_placement(place(name, stats, cluster, model)))
    if len(cluster.servers) <= LATENCY_RIVAL_MAX_SERVERS:
        from prism_moe.placement.latency import latency

        candidates.append(ExecutionPlan.from_placement(latency(stats, cluster, model, prompt_tokens=prompt_tokens,
                                                               output_tokens=output_tokens)))
    if len(cluster.servers) > 8:
        sweeps = min(sweeps, 1)
    n = np.minimum(max_layers(cluster, model), layers)
    if n.sum() >= layers:
        candidates.append(pipeline(stats, cluster, model))
        candidates.append(pipeline_opt(stats, cluster, model, prompt_tokens=prompt_tokens,
                                       output_tokens=output_tokens))
        block = _search_blocks(est, n, cluster, model, sweeps)
        if block is not None:
            candidates.append(block)
    scored = [(est.total(p)[0], i) for i, p in enumerate(candidates)]
    j, i = min(scored)
    best = candidates[i]
    meta = dict(best.meta, estimate_s=j, chosen=best.algorithm or "hybrid",
                candidates={c.algorithm or f"#{k}": s for (s, k), c in zip(scored, candidates, strict=True)})
    return ExecutionPlan(best.placement, best.executor, best.dense, "hybrid", meta, best.backup)


def _search_blocks(est: PlanEstimate, n: np.ndarray, cluster: ClusterSpec, model: ModelSpec,
                   sweeps: int) -> ExecutionPlan | None:
    s_n, layers = len(n), model.num_moe_layers
    gpu = np.zeros(s_n)
    link = np.zeros((s_n, s_n))
    full = np.ones((s_n, layers, model.num_experts), dtype=bool)  # costs of a whole-layer holder

    def evaluate(starts: np.ndarray, pre, dec, hpre, hdec) -> tuple[float, np.ndarray, np.ndarray]:
        hold = _ranges(starts, n, layers)
        if not hold.any(axis=0).all():
            return math.inf, hold, None
        mask = np.where(hold.T[None, :, :], 0.0, np.inf)  # [1, L, S]
        cost = pre + est.output * dec + mask
        hop = hpre + est.output * hdec
        ex, tot = best_paths(cost, hop)
        return float(est.rate @ tot / est.rate.sum()), hold, ex

    orders = list(itertools.permutations(range(s_n))) if s_n <= 4 else [tuple(range(s_n)),
                                                                         tuple(np.argsort(-n, kind="stable"))]
    def descend(starts: np.ndarray, costs) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Coordinate descent over the range starts, one server at a time, every start tried."""
        j, hold, ex = evaluate(starts, *costs)
        for _ in range(sweeps):
            improved = False
            for p in range(s_n):
                if n[p] == 0 or n[p] >= layers:
                    continue
                for a in range(layers):
                    if a == starts[p]:
                        continue
                    trial = starts.copy()
                    trial[p] = a
                    jt, ht, et = evaluate(trial, *costs)
                    if jt < j - 1e-12:
                        j, starts, hold, ex, improved = jt, trial, ht, et, True
            if not improved:
                break
        return j, starts, hold, ex

    costs = (*est.layer_costs(full, gpu, link), *est.hop_costs(link))
    best = (math.inf, None, None, None)
    for order in orders:  # from a tiling: each server's range after the previous one's
        starts = np.zeros(s_n, dtype=np.int64)
        pos = 0
        for p in order:
            starts[p] = pos % layers
            pos += n[p]
        got = descend(starts, costs)
        if got[0] < best[0]:
            best = got
    if best[2] is None:
        return None
    # once more from the best layout, with the GPU and link utilisation that layout puts on them
    gpu, link = est.utilisation(_block_plan(best[2], best[3], cluster, model))
    costs = (*est.layer_costs(full, gpu, link), *est.hop_costs(link))
    j, _, hold, ex = descend(best[1], costs)
    best = (j, hold, ex)
    if best[1] is None:
        return None
    plan = _block_plan(best[1], best[2], cluster, model)
    weights, _ = server_budgets(cluster)
    plan.check_memory(PlanSizes.of(model), weights)
    # hold only the blocks some home runs there (the rest of a range is spare memory)
    used = np.zeros_like(best[1])
    for h in range(s_n):
        used[plan.executor[h], np.arange(layers)] = True
    return _block_plan(used, plan.executor, cluster, model)


def plan_decision(current: ExecutionPlan, candidate: ExecutionPlan, stats: ClusterStats, cluster: ClusterSpec,
                  model: ModelSpec, period_s: float, *, prompt_tokens: float = 512, output_tokens: float = 128,
                  margin: float = 0.0) -> dict:
    """Move to `candidate` only when C(candidate) + T_mig < C(current) x (1 - margin), the scheduler's rule
    for placements applied to plans: C(P) = period x sum_h rate_h x estimated request latency_h under
    `stats` (request-seconds spent over the period), T_mig = `plan_migration_seconds` (experts and dense
    blocks over the links)."""
    from prism_moe.placement.cost import plan_fetched_bytes, plan_migration_seconds

    est = PlanEstimate.build(stats, cluster, model, prompt_tokens, output_tokens)
    sizes = PlanSizes.of(model)

    def cost(plan: ExecutionPlan) -> float:
        return float(period_s * (est.rate @ est.total(plan)[1]))

    c_cur, c_new = cost(current), cost(candidate)
    t_mig = plan_migration_seconds(current, candidate, cluster.link_matrices()[0], sizes)
    return {"migrate": bool(c_new + t_mig < c_cur * (1 - margin)), "cost_current": c_cur, "cost_candidate": c_new,
            "migration_seconds": t_mig, "migration_bytes": float(plan_fetched_bytes(current, candidate, sizes).sum())}
