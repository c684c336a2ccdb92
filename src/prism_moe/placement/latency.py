"""`latency`: placement that minimises an estimate of request latency, not the count of remote calls.

The proxy objective (remote invocations x link cost) misses how a decode step really waits: at every
MoE layer a server waits for its slowest remote call, so a layer costs a round trip as soon as ANY
expert of ANY token in the batch is remote. With top-6 routing, holding the 70% most-used experts of
a layer still leaves most tokens with one remote expert: the layer stalls anyway. Holding whole
layers removes stalls; spreading the same slots thinly over all layers removes almost none.

Estimate, per server s and MoE layer l (seconds; `route` from `compute_routes` over `call_cost`):
  decode  D[s,l] = E over sampled batches of b_s tokens [ max over the batch's experts of call_cost[s, route] ]
  prefill P[s,l] = max over peers p [ 2 lat + P_s x q[s,l,p] x token bytes x 8 / bw  + p's expert reads ]
                   q = share of prompt tokens with an expert routed to p
  J = sum_s rate_s x sum_l (w_s x P[s,l] + O_s x D[s,l])   (O_s output tokens per request;
      w_s = 1 + requests in flight: a request also waits through the prefills of those arriving meanwhile)
Tokens come from the per-token traces (co-activation kept) or are sampled from counts.
call_cost[s,p] = 2 x latency + b_s tokens there and back over the link + p's roofline for the experts.

Search: coordinate descent over servers. For server s, with the others fixed, each layer's candidate
local sets are prefixes of one ranking (experts only s holds first, then s's demand), so the layer's
cost is a curve over n = 0..E computed in one pass (suffix maxima over the ranked experts); a
knapsack DP over layers then splits s's slots among layers. The best of this and the start
(`flow`, the exact proxy optimum, and `prism` from the registry, and a greedy fill) under J is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.hardware import server_profiles
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement, compute_routes
from prism_moe.placement.problem import ClusterStats, Problem

SAMPLE_TOKENS = 2048  # tokens per server the estimate looks at (up to 16 servers; fewer above)
GROUPS = 256  # sampled decode batches per server (up to 16 servers; 128 above)


def inclusion_probs(freq: np.ndarray, k: int) -> np.ndarray:
    """Per-expert inclusion probabilities pi = k x freq, capped at 1 with the excess spread over the rest.

    freq: float [E] summing to 1. Returns float [E] summing to k (when E >= k).
    """
    pi = np.asarray(freq, dtype=np.float64) * k
    fixed = np.zeros(len(pi), dtype=bool)
    for _ in range(len(pi)):
        over = (pi > 1.0) & ~fixed
        if not over.any():
            break
        fixed |= over
        pi[fixed] = 1.0
        rest = ~fixed
        need, have = k - fixed.sum(), pi[rest].sum()
        pi[rest] = pi[rest] * (need / have) if have > 0 else need / max(rest.sum(), 1)
    return pi


def sample_topk(freq: np.ndarray, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n tokens of k distinct experts whose inclusion probabilities are exactly k x freq (capped at 1):
    systematic PPS sampling over a random expert order per token. freq: float [E]. Returns int16 [n, k]."""
    e = len(freq)
    pi = inclusion_probs(freq, k)
    order = np.argsort(rng.random((n, e)), axis=1)
    cum = np.cumsum(pi[order], axis=1)  # [n, E], ends at k
    u = rng.random(n)
    out = np.empty((n, k), dtype=np.int16)
    rows = np.arange(n)
    for j in range(k):
        pos = np.minimum((cum <= (u + j)[:, None]).sum(axis=1), e - 1)
        out[:, j] = order[rows, pos]
    return out


@dataclass
class LatencyModel:
    """The estimate J. tokens[s]: int [L, N, k]; groups[s]: bool [L, G, E] (experts a sampled decode
    batch uses); call_cost, pre_tok_s, pre_fixed, tok_s: float [S, S]; expert_read_s: float [S].

    wait: float [S, S], set by `set_load` for a placement: the mean wait of s's call to p (both ways)
    behind p's prompt (prefill) transfers, as an M/G/1 queue (links are FIFO: a decode call queues
    behind a prompt's hidden states).
    """

    tokens: list[np.ndarray]
    groups: list[np.ndarray]
    call_cost: np.ndarray
    pre_fixed: np.ndarray
    pre_tok_s: np.ndarray
    expert_read_s: np.ndarray
    rate: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefill_weight: np.ndarray
    num_experts: int
    tok_s: np.ndarray
    wait: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.wait is None:
            self.wait = np.zeros_like(self.call_cost)

    @property
    def dec_cost(self) -> np.ndarray:
        """A decode call's cost s -> p with the queueing on both directions: float [S, S]."""
        c = self.call_cost + self.wait
        np.fill_diagonal(c, 0.0)
        return c

    def _q(self, s: int, l: int, route_sl: np.ndarray) -> np.ndarray:
        """Share of s's prompt tokens with an expert routed to each server at layer l: float [S]."""
        tgt = route_sl[self.tokens[s][l]]  # [N, k]
        srt = np.sort(tgt, axis=1)  # a target's first entry in each sorted row counts the token once
        first = np.ones_like(srt, dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        return np.bincount(srt[first], minlength=len(self.rate)) / tgt.shape[0]

    def set_load(self, hosts: np.ndarray, route: np.ndarray | None = None) -> None:
        """Queueing on the links for this placement (see `wait`).

        s's decode call to p and p's reply overlap only p's prompt transfers (s's own prompts run in
        s's own steps, never during its decode): on s -> p the replies to p's prompt calls, on p -> s
        p's prompt calls. wait[s, p] is their M/G/1 mean wait; the call pays wait[s, p] once.
        """
        route = self.routes(hosts) if route is None else route
        s_n, layers, _ = hosts.shape
        self.q = np.array([[self._q(p, l, route[p, l]) for l in range(layers)] for p in range(s_n)])  # [S, L, S]
        m1 = np.zeros((s_n, s_n))  # m[s, p]: sum over p's prompt messages that s's call meets, rate x size
        m2 = np.zeros((s_n, s_n))  # ... rate x size^2
        for p in range(s_n):
            for l in range(layers):
                q = self.q[p, l].copy()
                q[p] = 0.0
                call = self.prompt_tokens[p] * q * self.tok_s[p]  # p -> s, seconds on the wire: [S] over s
                reply = self.prompt_tokens[p] * q * self.tok_s[:, p]  # s -> p
                for size in (call, reply):
                    m1[:, p] += self.rate[p] * size
                    m2[:, p] += self.rate[p] * size**2
        self.wait = m2 / (2 * (1 - np.minimum(m1, 0.95)))

    def routes(self, hosts: np.ndarray) -> np.ndarray:
        """Each server's holder per expert, as the placement will route: int [S, L, E]. Equally cheap
        holders are spread (`compute_routes`); it matters here: it decides each peer's share of a prompt."""
        return compute_routes(hosts, self.call_cost)

    def layer_cost(self, s: int, l: int, route_sl: np.ndarray, q: np.ndarray | None = None) -> float:
        """P[s,l] + O_s x D[s,l] for server s's route row route_sl int [E] (q: its `_q`, if known)."""
        dc = self.dec_cost
        cv = np.where(route_sl == s, 0.0, dc[s, route_sl])  # [E]
        dec = (self.groups[s][l] * cv).max(axis=1).mean()
        s_n = len(self.rate)
        q = self._q(s, l, route_sl) if q is None else q  # [S]
        held = np.bincount(route_sl, minlength=s_n)  # experts each peer serves s
        cost = (self.pre_fixed[s] + self.wait[s] + self.prompt_tokens[s] * q * self.pre_tok_s[s]
                + held * self.expert_read_s)
        cost[s] = 0.0
        pre = float(np.where(q > 0, cost, 0.0).max())
        return float(self.prefill_weight[s] * pre + self.output_tokens[s] * dec)

    def total(self, hosts: np.ndarray, route: np.ndarray | None = None) -> float:
        """J for `hosts` (sets the link load for it); `route` if already computed for these hosts."""
        route = self.routes(hosts) if route is None else route
        self.set_load(hosts, route)
        s_, layers, _ = hosts.shape
        return float(sum(self.rate[s] * sum(self.layer_cost(s, l, route[s, l], self.q[s, l]) for l in range(layers))
                         for s in range(s_)))

    def step_latency(self, hosts: np.ndarray, route: np.ndarray | None = None) -> np.ndarray:
        """Estimated request latency per server (prefill + O x decode step), float [S]."""
        route = self.routes(hosts) if route is None else route
        self.set_load(hosts, route)
        return np.array([sum(self.layer_cost(s, l, route[s, l], self.q[s, l]) for l in range(hosts.shape[1]))
                         for s in range(hosts.shape[0])])

    def curves(self, s: int, l: int, rank: np.ndarray, cv_rank: np.ndarray, tgt_rank: np.ndarray) -> np.ndarray:
        """Cost of layer l for s when it holds the first n experts of `rank`, for n = 0..E: float [E+1].

        rank: int [E] expert ids; cv_rank / tgt_rank: call cost and serving peer of each ranked expert
        when not held (tgt -1 for none: cost is then that of its cheapest peer).
        """
        e = self.num_experts
        u = self.groups[s][l][:, rank] * cv_rank  # [G, E] in rank order
        suffix = np.maximum.accumulate(u[:, ::-1], axis=1)[:, ::-1]  # stall if the first n are local
        dec = np.append(suffix.mean(axis=0), 0.0)  # [E+1]
        pos = np.empty(e, dtype=np.int64)
        pos[rank] = np.arange(e)
        ok = tgt_rank >= 0
        peers = np.unique(tgt_rank[ok])  # only the peers that serve something: [P]
        peers = peers[peers != s]
        pre = np.zeros(e + 1)
        if len(peers):
            n_p = len(peers)
            peer_of = np.where(ok, np.searchsorted(peers, np.where(ok, tgt_rank, 0)), -1)
            peer_of = np.where(ok & (tgt_rank != s), peer_of, -1)  # [E] in rank order
            tok_pos = pos[self.tokens[s][l]]  # [N, k] rank position of each token's experts
            tok_peer = peer_of[tok_pos]
            # A token needs peer p while n <= the highest rank position among its experts p serves:
            # sort each token's (peer, position) descending; a peer's first entry is its highest position.
            key = np.where(tok_peer >= 0, tok_peer * e + tok_pos, -1)
            key = -np.sort(-key, axis=1)
            first = np.ones_like(key, dtype=bool)
            first[:, 1:] = key[:, 1:] // e != key[:, :-1] // e
            hist = np.bincount(key[first & (key >= 0)], minlength=n_p * e).reshape(n_p, e)
            zero = np.zeros((n_p, 1))
            q = np.concatenate([np.cumsum(hist[:, ::-1], axis=1)[:, ::-1], zero], axis=1) / tok_pos.shape[0]
            served = np.zeros((n_p, e))
            has = peer_of >= 0
            served[peer_of[has], np.flatnonzero(has)] = 1.0
            held = np.concatenate([np.cumsum(served[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
            fixed = self.pre_fixed[s, peers] + self.wait[s, peers]
            cost = (fixed[:, None] + self.prompt_tokens[s] * q * self.pre_tok_s[s, peers][:, None]
                    + held * self.expert_read_s[peers][:, None])  # [P, E+1]
            pre = np.where(q > 0, cost, 0.0).max(axis=0)
        return self.prefill_weight[s] * pre + self.output_tokens[s] * dec


def build_model(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, prompt_tokens: float,
                output_tokens: float, decode_batch: float | None, seed: int) -> LatencyModel:
    rng = np.random.default_rng(seed)
    s_n, layers, e = stats.shape
    k = model.top_k
    bw, lat = cluster.link_matrices()
    prof = server_profiles(cluster)
    rate = np.array([srv.request_rate for srv in cluster.servers], dtype=np.float64)
    tok_bits = model.hidden_size * model.bytes_per_param * 8.0
    with np.errstate(divide="ignore"):
        one_way = np.where(np.isfinite(bw), tok_bits / bw, 0.0)
    per_tok = one_way + one_way.T  # there and back
    read_s = np.array([model.expert_bytes / p.bytes_per_s for p in prof])
    # many servers: fewer samples each (the estimate's cost grows with servers x samples)
    n_sample = SAMPLE_TOKENS if s_n <= 16 else max(512, SAMPLE_TOKENS * 16 // s_n)
    n_groups = GROUPS if s_n <= 16 else GROUPS // 2
    tokens = []
    for s in range(s_n):
        tr = stats.traces[s] if s < len(stats.traces) else None
        ex = getattr(tr, "experts", None)
        if ex is not None and ex.shape[1:] == (layers, k) and len(ex) > 0:
            pick = rng.integers(0, len(ex), min(n_sample, len(ex)))
            tokens.append(np.ascontiguousarray(np.asarray(ex)[pick].transpose(1, 0, 2)))
        else:
            freq = stats.frequencies()[s]
            tokens.append(np.stack([sample_topk(freq[l], k, n_sample, rng) for l in range(layers)]))
    # Little's law with a first guess of latency (every layer stalls one round trip per step, half the
    # prompt crosses a link): requests in flight per server = the decode batch; each of them also sits
    # through the prefill steps of the requests that arrive meanwhile (prompts run whole, not chunked).
    rtt = np.where(np.isfinite(bw), 2 * lat, np.inf).min(axis=1)
    rtt = np.where(np.isfinite(rtt), rtt, 0.0)
    guess = layers * rtt * output_tokens + prompt_tokens * layers * per_tok.max(axis=1) / 2
    in_flight = rate * guess
    batch = np.clip(np.rint(in_flight), 1, 64) if decode_batch is None else np.full(s_n, float(decode_batch))
    groups = []
    for s in range(s_n):
        b = int(batch[s])
        n = tokens[s].shape[1]
        members = rng.integers(0, n, (n_groups, b))  # the same tokens at every layer
        g = np.zeros((layers, n_groups, e), dtype=bool)
        for l in range(layers):
            ex = tokens[s][l][members].reshape(n_groups, -1)
            g[l, np.arange(n_groups)[:, None], ex] = True
        groups.append(g)
    call = np.zeros((s_n, s_n))
    for s in range(s_n):
        for p in range(s_n):
            if p != s:
                experts_per_call = min(e, batch[s] * k / 2)
                call[s, p] = 2 * lat[s, p] + batch[s] * per_tok[s, p] + experts_per_call * read_s[p]
    pre_fixed = 2 * lat
    return LatencyModel(tokens, groups, call, pre_fixed, per_tok, read_s, rate,
                        np.full(s_n, float(prompt_tokens)), np.full(s_n, float(output_tokens)), 1.0 + in_flight, e,
                        one_way)


def _allocate(curves: np.ndarray, cap: int) -> np.ndarray:
    """Knapsack over layers: n [L] minimising sum_l curves[l, n_l] with sum n_l <= cap.

    curves: float [L, E+1], inf where n is not allowed. Returns int [L].
    """
    layers, width = curves.shape
    e = width - 1
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((layers, cap + 1), dtype=np.int64)
    flipped = np.ascontiguousarray(curves[:, ::-1])  # column j holds n = e - j
    pad = np.full(e, np.inf)
    for l in range(layers):
        # cand[c, j] = best[c - (e - j)] + curves[l, e - j]: all n at once over a sliding window
        win = np.lib.stride_tricks.sliding_window_view(np.concatenate([pad, best]), e + 1)  # [cap+1, E+1]
        cand = win + flipped[l]
        j = cand.argmin(axis=1)
        best = cand[np.arange(cap + 1), j]
        choice[l] = e - j
    c = int(np.argmin(best))
    out = np.zeros(layers, dtype=np.int64)
    for l in range(layers - 1, -1, -1):
        out[l] = choice[l, c]
        c -= out[l]
    return out


def _improve_server(lm: LatencyModel, hosts: np.ndarray, s: int, cap: int, demand: np.ndarray,
                    keep: np.ndarray | None = None) -> np.ndarray:
    """Best hosts[s] with the others fixed (layer prefixes of a ranking + knapsack). Returns bool [L, E]."""
    s_n, layers, e = hosts.shape
    others = np.delete(np.arange(s_n), s)
    cost_to = lm.dec_cost[s]
    curves = np.full((layers, e + 1), np.inf)
    ranks = []
    for l in range(layers):
        held_else = hosts[others, l]  # [S-1, E]
        sole = ~held_else.any(axis=0)  # only s can serve these: must stay
        # cheapest other holder per expert
        c_else = np.where(held_else, cost_to[others][:, None], np.inf)
        best_i = c_else.argmin(axis=0)
        cv = c_else.min(axis=0)
        tgt = np.where(sole, -1, others[best_i])
        cv = np.where(sole, 0.0, cv)
        kept = keep[l] if keep is not None else np.zeros(e, dtype=bool)
        rank = np.lexsort((~kept, -demand[l], ~sole))  # sole first, then by s's demand, ties: held now
        c = lm.curves(s, l, rank, cv[rank], tgt[rank])
        n_sole = int(sole.sum())
        c[:n_sole] = np.inf
        curves[l] = c
        ranks.append(rank)
    n = _allocate(curves, cap)
    out = np.zeros((layers, e), dtype=bool)
    for l in range(layers):
        out[l, ranks[l][: n[l]]] = True
    # slots the knapsack left free: most-demanded experts (replicas also serve peers)
    free = cap - int(out.sum())
    if free > 0:
        score = np.where(out, -np.inf, demand)
        pick = np.argsort(-score, axis=None)[:free]
        out.flat[pick[np.isfinite(score.flat[pick])]] = True
    return out


def _greedy_start(problem: Problem) -> np.ndarray:
    """Round-robin one copy of every expert, then fill each server with its most-demanded experts."""
    s_n, layers, e = problem.demand.shape
    hosts = np.zeros((s_n, layers, e), dtype=bool)
    cap = problem.capacity.copy()
    order = np.argsort(-problem.demand.sum(axis=0), axis=None)
    for i, f in enumerate(order):
        room = np.flatnonzero(hosts.reshape(s_n, -1).sum(axis=1) < cap)
        pref = room[np.argmax(problem.demand.reshape(s_n, -1)[room, f])] if len(room) else i % s_n
        hosts.reshape(s_n, -1)[pref, f] = True
    for s in range(s_n):
        flat = hosts[s].reshape(-1)
        for f in np.argsort(-problem.demand[s].reshape(-1)):
            if flat.sum() >= cap[s]:
                break
            flat[f] = True
    return hosts


def _start(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, problem: Problem) -> list[np.ndarray]:
    starts = [_greedy_start(problem)]
    try:
        from prism_moe.placement.registry import place  # the exact proxy optimum, when available
    except ImportError:
        return starts
    for name in ("flow", "prism"):  # flow: the exact optimum of the proxy, fastest solver
        try:
            starts.append(place(name, stats, cluster, model).hosts)
        except Exception:  # noqa: BLE001 - a start is optional; the greedy one always exists
            continue
    return starts


def latency(stats: ClusterStats, cluster: ClusterSpec, model: ModelSpec, *, prompt_tokens: float = 512,
            output_tokens: float = 128, decode_batch: float | None = None, rounds: int = 3,
            seed: int = 0, current: Placement | None = None) -> Placement:
    """Latency-aware placement (see module docstring). stats.counts float [S, L, E].

    current: the placement in service; it is one of the starts and wins ties (fewer experts to move).
    """
    problem = Problem.build(stats, cluster, model)
    lm = build_model(stats, cluster, model, prompt_tokens, output_tokens, decode_batch, seed)
    cap = problem.capacity
    freq = stats.frequencies()
    starts = _start(stats, cluster, model, problem)
    keep = None
    if current is not None and current.hosts.shape == stats.shape:
        keep = current.hosts
        starts.insert(0, current.hosts.copy())
    routes = [lm.routes(h) for h in starts]
    scored = [lm.total(h, r) for h, r in zip(starts, routes, strict=True)]
    # Little's law again with the model's own latency of the best start (the first guess is crude):
    # requests in flight decide how many other prompts a request waits through.
    i = int(np.argmin(scored))
    lm.prefill_weight = 1.0 + lm.rate * lm.step_latency(starts[i], routes[i])
    scored = [lm.total(h, r) for h, r in zip(starts, routes, strict=True)]
    i = int(np.argmin(scored))
    best_j, best = scored[i], starts[i]
    start_j = best_j
    best_route = routes[i]
    hosts = best.copy()
    lm.set_load(hosts, best_route)  # link queueing of the current placement, held fixed for a round
    order = np.argsort(-cap, kind="stable")  # big servers first: they free the small ones' sole experts
    if problem.num_servers == 1:
        rounds = 0  # one server holds every expert: there is nothing to trade
    for _ in range(rounds):
        changed = False
        for s in order.tolist():
            new = _improve_server(lm, hosts, s, int(cap[s]), freq[s], None if keep is None else keep[s])
            if (new != hosts[s]).any():
                hosts[s] = new
                changed = True
        route = lm.routes(hosts)
        j = lm.total(hosts, route)  # also sets the load of the new placement for the next round
        gain = best_j - j
        if j < best_j:
            best_j, best, best_route = j, hosts.copy(), route
        if not changed or gain < 1e-3 * best_j:
            break
    return Placement(problem.server_names, best, best_route, cap, "latency",
                     meta={"estimate_s": best_j, "start_estimate_s": start_j,
                           "estimated_latency_s": lm.step_latency(best, best_route).round(4).tolist()})
