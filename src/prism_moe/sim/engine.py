"""The discrete-event core: servers stepping through MoE layers, remote calls, links and GPU queues.

A heap of timed events, not simpy: one (step, layer) of a server is one event whose routing work is
vectorised over the step's tokens (Python int expert bitmasks for decode-sized batches, numpy for
prefill-sized ones; an event nothing else precedes runs inline, in heap order), and resources (a GPU, a directed link) are FIFO queues
kept as a "free at" time. simpy's generator processes and Resource request/release cost ~6 us per
use here against ~0.5 us for the free-at update (benchmarks/sim_speed.py).

Per server, continuous batching: a step admits the waiting requests (whole prompts, up to
`max_batch_tokens` new tokens and `max_batch_requests` requests) and decodes one token of every
running request, in one forward through the layers; its first layer starts after the profile's
`step_overhead_s`. With `separate_prefill` (the runtime's padded loop) the step is several forwards: one
per admitted prompt, then one decoding the requests that were running. Per MoE layer of a step, at event time t:
  GPU: dense part, then the local experts, one FIFO claim from max(t, gpu_free).
  Each peer p holding experts of this layer's tokens gets one batched call, sent when the dense part
  ends: serialised on link s->p (FIFO), + one-way latency -> ARRIVE at p, which queues on p's GPU
  (shared with p's own steps) -> RETURN over link p->s (FIFO) + latency.
  The next layer starts when the local experts and every remote call are back (the slowest one).
The step ends after the last layer: prefilled requests get their first token, running ones one more.

Resources are claimed in event-time order, except that a layer's sends are claimed at its start
event for the time the dense part ends (a few tens of microseconds later).

Execution plans (`ExecutionPlan`): layer l of home s's forward runs on executor[s, l]. When that is
not where the batch's hidden states are (home before layer 0), they are handed over first: all of the
forward's tokens serialised on that link (FIFO) + latency; the layer then claims the executor's GPU
(FIFO with its own steps and other homes' blocks: batches of different homes are not merged into one
kernel) and calls the executor's peers for experts it lacks, by the executor's routes. After the last
layer the hidden state of each request's last position goes back home for the head and sampling.

Server failures (`ServerFailure`): at its time the server stops. Requests whose home it was fail (those
not finished, and later arrivals there); so do requests in flight whose KV cache was on it (a layer it
executed for them: with a placement, none but its own). The plan is repaired by the `repair` callable
(`placement.failover.replan_without`: backups, then survivors holding the layer, then loads from each
survivor's checkpoint); homes whose executors or expert routes used the dead server pause until the
repaired plan is in place (detection + the longest load). When the survivors cannot hold the model,
those homes stop and their requests fail. The forward under way at the failure instant completes (at
most one forward's worth of work, milliseconds, is simulated as if the server answered).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.sim.cost import HEADER_BYTES, PAIR_BYTES, CostModel
from prism_moe.sim.workload import Requests, TokenPool

LAYER, ARRIVE, RETURN, WAKE, MIGRATE, CHUNK, SWITCH, FAIL = range(8)
# Migration copies go in chunks, each only when its link is idle (background priority): a serving
# message waits at most one chunk (256 KiB: 4 ms at 500 Mbps) behind a migration.
MIGRATION_CHUNK_BYTES = 256 * 2**10
SMALL_BATCH = 48  # up to this many tokens a layer is routed with Python int bitmasks, above with numpy


@dataclass(frozen=True)
class EngineConfig:
    max_batch_requests: int = 64
    max_batch_tokens: int = 4096  # new prompt tokens per step (a longer prompt runs alone)
    # The runtime's padded loop (models whose latent KV cache continuous batching cannot page, e.g.
    # DeepSeek-V2): a step prefills each admitted request in a forward of its own (its first token comes
    # at that forward's end), then decodes the requests that were already running in one more forward.
    # Admission is by `max_batch_requests` only.
    separate_prefill: bool = False


@dataclass
class PlacementChange:
    """Switch to `placement` at `time`; with `migrate`, copy the added experts first (from the holder
    with the fastest link), and switch when the last copy has landed."""

    time: float
    placement: Placement | ExecutionPlan
    migrate: bool = True


@dataclass(frozen=True)
class ServerFailure:
    """Server `server` (index) dies at `time`. Peers notice after `detect_s` (timeouts); lost weights are
    loaded from each survivor's own checkpoint at `load_gb_s` GB/s (a local NVMe disk)."""

    time: float
    server: int
    detect_s: float = 1.0
    load_gb_s: float = 2.0


@dataclass
class EngineStats:
    pairs: int = 0  # (token, expert) invocations = simulated expert calls
    remote_pairs: int = 0
    remote_calls: int = 0  # batched (layer, peer) messages
    handoffs: int = 0  # hidden states handed to another executor (block boundaries, and back home)
    handoff_bytes: float = 0.0
    cross_bytes: float = 0.0
    steps: int = 0
    layer_steps: int = 0
    events: int = 0
    busy_s: list = field(default_factory=list)  # GPU busy seconds per server
    link_busy_s: list = field(default_factory=list)  # [S][S] seconds each directed link spent sending
    migrations: list = field(default_factory=list)  # dicts: start, end, bytes, experts
    failures: list = field(default_factory=list)  # dicts: see Engine._fail


class Engine:
    def __init__(self, cost: CostModel, placement: Placement | ExecutionPlan, pools: list[TokenPool], requests: Requests,
                 config: EngineConfig | None = None, changes: list[PlacementChange] | None = None,
                 failures: list[ServerFailure] | None = None, repair=None):
        self.cost = cost
        self.failures = sorted(failures or [], key=lambda f: f.time)
        if self.failures and repair is None:
            raise ValueError("failures need a repair function (placement.failover.replan_without with the sizes)")
        self.repair = repair
        self.failed = np.zeros(len(requests), dtype=bool)  # set by run(): requests lost to failures
        self.cfg = config or EngineConfig()
        self.req = requests
        s = cost.num_servers
        self._set_placement(placement)
        placement = self.placement
        if placement.num_servers != s:
            raise ValueError(f"placement has {placement.num_servers} servers, the cluster {s}")
        layers = {p.experts.shape[0] for p in pools}
        if layers != {placement.num_layers}:
            raise ValueError(f"token pools have {sorted(layers)} layers, the placement {placement.num_layers}")
        ks = {p.experts.shape[2] for p in pools}
        if len(ks) != 1:
            raise ValueError(f"token pools disagree on top-k: {sorted(ks)}")
        # One global pool [L, N, k]; a request's token i is off + (start + i) % n.
        self.experts = np.concatenate([p.experts for p in pools], axis=1)
        if int(self.experts.max(initial=0)) >= placement.num_experts:
            raise ValueError("a token pool names an expert id beyond the placement's experts")
        offs = np.cumsum([0] + [p.num_tokens for p in pools])
        self.r_off = offs[requests.pool]
        self.r_n = np.array([p.num_tokens for p in pools])[requests.pool]
        self.r_start = requests.start % self.r_n
        self.emask = _expert_masks(self.experts)
        self.changes = sorted(changes or [], key=lambda c: c.time)

    def _set_placement(self, plan: Placement | ExecutionPlan) -> None:
        if isinstance(plan, Placement):
            plan = ExecutionPlan.from_placement(plan)
        self.plan = plan
        self.executor = plan.executor.tolist()  # [S][L]
        placement = self.placement = plan.placement
        self.route = placement.route  # [S, L, E]
        S, L, E = self.route.shape
        # Per (server, layer): [(target, bitmask of the experts it serves for this server)], local first.
        small = E <= 64
        one = np.left_shift(np.uint64(1), np.arange(E, dtype=np.uint64)) if small else None
        self.target_masks = []
        for s in range(S):
            rows = []
            for l in range(L):
                r = self.route[s, l]
                order = np.argsort(r, kind="stable")
                tg, starts = np.unique(r[order], return_index=True)
                if small:
                    masks = np.bitwise_or.reduceat(one[order], starts).tolist()
                else:
                    ids = order.tolist()
                    ends = starts.tolist()[1:] + [E]
                    masks = [sum(1 << e for e in ids[a:b]) for a, b in zip(starts.tolist(), ends, strict=True)]
                pairs = list(zip(tg.tolist(), masks, strict=True))
                rows.append(sorted(pairs, key=lambda x: x[0] != s))  # local first
            self.target_masks.append(rows)

    def _route_small(self, s: int, l: int, idx: list[int]) -> list[tuple[int, int, int, int]]:
        """(target, tokens, pairs, distinct experts) per target server of this layer's tokens, from
        per-token expert bitmasks (a token's k experts are distinct, so popcount = pairs)."""
        ems = self.emask[l]
        masks = [ems[n] for n in idx]
        union = 0
        for m in masks:
            union |= m
        out = []
        for p, hm in self.target_masks[s][l]:
            if not hm & union:
                continue
            acc = pairs = toks = 0
            for m in masks:
                x = m & hm
                if x:
                    acc |= x
                    pairs += x.bit_count()
                    toks += 1
            if pairs:
                out.append((p, toks, pairs, acc.bit_count()))
        return out

    def _route_large(self, s: int, l: int, idx: np.ndarray) -> list[tuple[int, int, int, int]]:
        """The same as `_route_small`, vectorised over the tokens idx int [T]."""
        S, E = self.route.shape[0], self.route.shape[2]
        ex = self.experts[l][idx]  # [T, k]
        tgt = self.route[s, l][ex]  # [T, k]
        flat_t = tgt.ravel()
        pairs = np.bincount(flat_t, minlength=S)
        hit = np.zeros((len(idx), S), dtype=bool)
        hit[np.arange(len(idx))[:, None], tgt] = True
        toks = hit.sum(axis=0)
        dist = np.zeros((S, E), dtype=bool)
        dist[flat_t, ex.ravel()] = True
        dist = dist.sum(axis=1)
        order = [s] + [p for p in np.flatnonzero(pairs).tolist() if p != s]
        return [(p, int(toks[p]), int(pairs[p]), int(dist[p])) for p in order if pairs[p]]

    # ---- run ----------------------------------------------------------------------------------------

    def run(self) -> tuple[np.ndarray, np.ndarray, EngineStats, float]:
        """Simulate every request to completion. Returns (first_token_time [R], finish_time [R], stats,
        wall seconds)."""
        t_wall = time.perf_counter()
        req, cost, cfg = self.req, self.cost, self.cfg
        S = cost.num_servers
        L = self.route.shape[1]
        arr = cost.engine_arrays()
        mem_bps, flops, ovh, bits_s, lat = arr["mem_bps"], arr["flops"], arr["overhead"], arr["bits_s"], arr["lat"]
        step_ovh = arr["step_overhead"]
        ebytes, eflops = cost.expert_bytes, cost.expert_flops_per_pair
        tok_b = cost.token_bytes
        handoff_ovh = cost.handoff_overhead_s
        dl_bytes, dl_flops = cost.dense_layer_bytes, cost.dense_layer_flops_per_token

        R = len(req)
        arrival = req.arrival.tolist()
        prompt = req.prompt.tolist()
        output = req.output.tolist()
        first = np.full(R, np.nan)
        finish = np.full(R, np.nan)
        failed = [False] * R  # lost to a server failure
        dead = [False] * S
        stopped = [False] * S  # a dead home, or one the survivors cannot serve: its requests fail
        paused_until = [0.0] * S  # waiting for the repaired plan
        any_failed = False
        gen = [0] * R
        by_server = [np.flatnonzero(req.server == s).tolist() for s in range(S)]
        nxt = [0] * S  # next not-yet-admitted request (index into by_server[s])
        running: list[list[int]] = [[] for _ in range(S)]
        step_new: list[list[int]] = [[] for _ in range(S)]  # prefilled by the forward under way
        step_run: list[list[int]] = [[] for _ in range(S)]  # decoded by the forward under way
        forwards: list[list[tuple[list[int], list[int]]]] = [[] for _ in range(S)]  # the step's forwards to come
        keep: list[list[int]] = [[] for _ in range(S)]  # decoded this step and not finished
        joined: list[list[int]] = [[] for _ in range(S)]  # prefilled this step and not finished
        separate = cfg.separate_prefill
        step_idx: list[np.ndarray | None] = [None] * S
        step_list: list[list[int]] = [[] for _ in range(S)]
        step_dense: list[list[float]] = [[0.0] * S for _ in range(S)]  # [home][executor]: one layer's dense time
        step_rows = [0] * S  # requests in the forward under way (rows handed back home at its end)
        loc = list(range(S))  # where home s's hidden states are
        moved = [False] * S  # layer[s]'s hand-off has landed
        k_top = self.experts.shape[2]
        layer = [0] * S
        pending = [0] * S
        layer_done = [0.0] * S
        idle = [True] * S
        gpu_free = [0.0] * S
        link_free = [[0.0] * S for _ in range(S)]
        st = EngineStats(busy_s=[0.0] * S, link_busy_s=[[0.0] * S for _ in range(S)])
        link_busy = st.link_busy_s
        heap: list = []
        counter = itertools.count()
        hpush = heapq.heappush
        n_events = 0
        r_off, r_n, r_start = self.r_off, self.r_n, self.r_start
        p_arr, ar = req.prompt, np.arange

        def push(t, kind, a, b=None):
            hpush(heap, (t, next(counter), kind, a, b))

        def token_rows(new: list[int], run: list[int]) -> np.ndarray:
            """Pool rows of a forward: the prompts of `new` (prefill), then one token of each of `run`."""
            parts = []
            if new:
                na = np.array(new)
                lens = p_arr[na]
                base = np.repeat(r_start[na] - np.cumsum(lens) + lens, lens) + ar(int(lens.sum()))
                parts.append(np.repeat(r_off[na], lens) + base % np.repeat(r_n[na], lens))
            if run:
                ra = np.array(run)
                g = np.array([gen[r] for r in run])
                parts.append(r_off[ra] + (r_start[ra] + p_arr[ra] + g - 1) % r_n[ra])
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        def begin_forward(s: int, new: list[int], run: list[int], t: float) -> None:
            """Start a forward through every layer of `new`'s prompts and `run`'s next tokens at t."""
            step_idx[s] = idx = token_rows(new, run)
            T = len(idx)
            step_list[s] = idx.tolist() if T <= SMALL_BATCH else []
            step_dense[s] = [max(dl_bytes / mem_bps[p], dl_flops * T / flops[p]) + ovh[p] for p in range(S)]
            step_new[s], step_run[s] = new, run
            step_rows[s] = len(new) + len(run)
            loc[s] = s
            layer[s] = 0
            push(t, LAYER, s)

        def start_step(s: int, t: float) -> None:
            """Admit waiting requests and start the step's (first) forward; or go idle."""
            if stopped[s] or t < paused_until[s]:
                idle[s] = True
                if not stopped[s]:
                    push(paused_until[s], WAKE, s)
                return
            if any_failed:
                running[s] = [r for r in running[s] if not failed[r]]
            mine = by_server[s]
            new: list[int] = []
            budget = math.inf if separate else cfg.max_batch_tokens
            room = cfg.max_batch_requests - len(running[s])
            i = nxt[s]
            while i < len(mine) and room > 0 and arrival[mine[i]] <= t:
                r = mine[i]
                if new and prompt[r] > budget:
                    break
                new.append(r)
                budget -= prompt[r]
                room -= 1
                i += 1
                if budget <= 0:
                    break
            nxt[s] = i
            run = running[s]
            if not new and not run:
                idle[s] = True
                if i < len(mine):
                    push(arrival[mine[i]], WAKE, s)
                return
            idle[s] = False
            st.steps += 1
            # one forward for all; or (padded loop) one per new prompt, then one for the running requests
            forwards[s] = ([([r], []) for r in new] + ([([], run)] if run else [])) if separate else [(new, run)]
            begin_forward(s, *forwards[s].pop(0), t + step_ovh[s])  # the serving loop's host work comes first

        def end_step(s: int, t: float) -> None:
            """The forward under way ended at t: tokens out; the step's next forward, or the next step."""
            if stopped[s]:
                step_new[s], step_run[s], forwards[s], keep[s], joined[s], running[s] = [], [], [], [], [], []
                idle[s] = True
                return
            for r in step_run[s]:  # decoded one more token
                if failed[r]:
                    continue
                gen[r] += 1
                if gen[r] >= output[r]:
                    finish[r] = t
                else:
                    keep[s].append(r)
            for r in step_new[s]:  # prefilled: the first token
                if failed[r]:
                    continue
                first[r] = t
                gen[r] = 1
                if output[r] <= 1:
                    finish[r] = t
                else:
                    joined[s].append(r)
            step_new[s], step_run[s] = [], []
            if forwards[s]:
                begin_forward(s, *forwards[s].pop(0), t)
                return
            running[s] = keep[s] + joined[s]
            keep[s], joined[s] = [], []
            start_step(s, t)

        def transmit(src: int, dst: int, nbytes: float, ready: float) -> float:
            """Serialise `nbytes` on link src->dst (FIFO) once ready; returns when the last bit left."""
            lf = link_free[src][dst]
            t0 = lf if lf > ready else ready
            t1 = t0 + nbytes * bits_s[src][dst]
            link_free[src][dst] = t1
            link_busy[src][dst] += t1 - t0
            st.cross_bytes += nbytes
            return t1

        def hand_off(a: int, b: int, n_tokens: int, t: float) -> float:
            """Hidden states of n_tokens from a to b, ready at t; returns when they have arrived."""
            nbytes = n_tokens * tok_b + HEADER_BYTES
            st.handoffs += 1
            st.handoff_bytes += nbytes
            return transmit(a, b, nbytes, t) + lat[a][b] + handoff_ovh

        def finish_forward(s: int, t: float, inline: bool) -> None:
            """The last layer of s's forward ended at t on loc[s]: its rows go home, then the step ends."""
            if loc[s] != s:
                push(hand_off(loc[s], s, step_rows[s], t), WAKE, s, "end")
            elif inline:
                end_step(s, t)
            else:
                push(t, WAKE, s, "end")

        def do_layer(s: int, t: float) -> None:
            """Run layer[s] of server s's step from time t; loops over layers while nothing else is due."""
            while True:
                l = layer[s]
                idx = step_idx[s]
                T = len(idx)
                e = self.executor[s][l]
                if e != loc[s] and not moved[s]:  # the block runs elsewhere: hand the batch over first
                    moved[s] = True
                    push(hand_off(loc[s], e, T, t), LAYER, s)
                    return
                moved[s] = False
                loc[s] = e
                g0 = gpu_free[e] if gpu_free[e] > t else t
                dense_end = g0 + step_dense[s][e]
                calls = self._route_small(e, l, step_list[s]) if T <= SMALL_BATCH else self._route_large(e, l, idx)
                st.pairs += T * k_top
                st.layer_steps += 1
                n_loc, d_loc = 0, 0
                n_calls = 0
                for p, nt, np_, nd in calls:
                    if p == e:
                        n_loc, d_loc = np_, nd
                        continue
                    t1 = transmit(e, p, nt * tok_b + np_ * PAIR_BYTES + HEADER_BYTES, dense_end)
                    st.remote_pairs += np_
                    n_calls += 1
                    hpush(heap, (t1 + lat[e][p], next(counter), ARRIVE, p, (s, e, nd, np_, nt)))
                st.remote_calls += n_calls
                loc_t = (max(d_loc * ebytes / mem_bps[e], n_loc * eflops / flops[e]) + ovh[e]) if n_loc else 0.0
                end = dense_end + loc_t
                gpu_free[e] = end
                st.busy_s[e] += end - g0
                layer_done[s] = end
                pending[s] = n_calls
                if n_calls:
                    return
                # all local: go on to the next layer (inline while no other event is due first)
                if l + 1 == L:
                    finish_forward(s, end, inline=True)
                    return
                layer[s] = l + 1
                if heap and heap[0][0] <= end:
                    push(end, LAYER, s)
                    return
                nonlocal n_events
                n_events += 1
                t = end

        def do_return(a: int, s: int, e: int, nt: int, t: float) -> None:
            """Holder a's reply to executor e of s's layer leaves at t; when the last reply is in, s goes on."""
            back = transmit(a, e, nt * tok_b + HEADER_BYTES, t) + lat[a][e]
            if back > layer_done[s]:
                layer_done[s] = back
            pending[s] -= 1
            if pending[s]:
                return
            when = layer_done[s]
            last = layer[s] + 1 == L
            if last:
                finish_forward(s, when, inline=not (heap and heap[0][0] <= when))
                return
            if heap and heap[0][0] <= when:
                layer[s] += 1
                hpush(heap, (when, next(counter), LAYER, s, None))
                return
            nonlocal n_events
            n_events += 1
            layer[s] += 1
            do_layer(s, when)

        def unfinished(h: int, admitted_only: bool) -> list[int]:
            mine = by_server[h][:nxt[h]] if admitted_only else by_server[h]
            return [r for r in mine if not failed[r] and math.isnan(finish[r])]

        def fail(ev: ServerFailure, t: float) -> None:
            """Server ev.server dies at t: fail what it held, repair the plan, pause or stop who used it."""
            nonlocal any_failed
            d = ev.server
            if dead[d]:
                return
            dead[d] = True
            any_failed = True
            old = self.plan
            layers_ = np.arange(L)
            uses = [bool((old.executor[h] == d).any()
                         or (old.placement.route[old.executor[h], layers_] == d).any()) for h in range(S)]
            lost: list[int] = unfinished(d, admitted_only=False)
            own = len(lost)
            stopped[d] = True
            for h in range(S):  # in-flight requests whose KV cache was on d
                if h != d and not dead[h] and (old.executor[h] == d).any():
                    lost += unfinished(h, admitted_only=True)
            in_flight = len(lost) - own
            rep = self.repair(old, np.array(dead))
            rec = {"time": t, "server": d, "detect_s": ev.detect_s, "loaded_bytes": float(rep.loaded_bytes.sum()),
                   "moved_layers": rep.moved_layers, "from_backup": rep.from_backup, "reason": rep.reason,
                   "switched_at": None, "paused_homes": [], "stopped_homes": [d]}
            affected = [h for h in range(S) if uses[h] and not dead[h]]
            if rep.plan is None:
                for h in affected:
                    stopped[h] = True
                    lost += unfinished(h, admitted_only=False)
                rec["stopped_homes"] += affected
            else:
                t_switch = t + ev.detect_s + float(rep.loaded_bytes.max(initial=0.0)) / (ev.load_gb_s * 1e9)
                for h in affected:
                    paused_until[h] = max(paused_until[h], t_switch)
                rec["switched_at"], rec["paused_homes"] = t_switch, affected
                push(t_switch, SWITCH, {"placement": rep.plan})
            for r in set(lost):
                failed[r] = True
            # the dead home's own (unfinished and later ones), other homes' in flight with KV on d, the rest
            rec["failed_requests"] = len(set(lost))
            rec["failed_own"], rec["failed_in_flight"] = own, in_flight
            st.failures.append(rec)

        changes = list(self.changes)
        for ch in changes:
            push(ch.time, MIGRATE, ch)
        for ev in self.failures:
            push(ev.time, FAIL, ev)
        for s in range(S):
            if by_server[s]:
                push(arrival[by_server[s][0]], WAKE, s)
        mig_left: dict = {}
        while heap:
            t, _, kind, a, b = heapq.heappop(heap)
            n_events += 1
            if kind == LAYER:
                do_layer(a, t)
            elif kind == ARRIVE:  # a = holder p, b = (home, executor, distinct experts, pairs, tokens)
                caller, ex_, nd, np_, nt = b
                g0 = gpu_free[a] if gpu_free[a] > t else t
                dur = max(nd * ebytes / mem_bps[a], np_ * eflops / flops[a]) + ovh[a]
                done = g0 + dur
                gpu_free[a] = done
                st.busy_s[a] += dur
                if heap and heap[0][0] <= done:
                    hpush(heap, (done, next(counter), RETURN, a, (caller, ex_, nt)))
                else:  # nothing else is due first: the reply goes out now (same order as via the heap)
                    n_events += 1
                    do_return(a, caller, ex_, nt, done)
            elif kind == RETURN:  # a = holder, b = (home, executor, tokens)
                do_return(a, b[0], b[1], b[2], t)
            elif kind == WAKE:
                if b == "end":
                    end_step(a, t)
                elif idle[a]:
                    start_step(a, t)
            elif kind == MIGRATE:
                self._start_migration(a, t, link_free, mig_left, push, st)
            elif kind == CHUNK:  # a = (src, dst), b = migration record
                src, dst = a
                if link_free[src][dst] > t:  # busy with serving traffic: try again when it is idle
                    push(link_free[src][dst], CHUNK, a, b)
                    continue
                left = mig_left[(id(b), src, dst)]
                nbytes = min(MIGRATION_CHUNK_BYTES, left)
                t0 = t
                t1 = t0 + nbytes * bits_s[src][dst]
                link_free[src][dst] = t1
                left -= nbytes
                mig_left[(id(b), src, dst)] = left
                if left > 0:
                    push(t1, CHUNK, a, b)
                else:
                    b["links_left"] -= 1
                    b["end"] = max(b["end"], t1 + lat[src][dst])
                    if b["links_left"] == 0:
                        push(b["end"], SWITCH, b)
            elif kind == SWITCH:
                self._set_placement(a["placement"])
            elif kind == FAIL:
                fail(a, t)
        st.events = n_events
        self.failed = np.array(failed, dtype=bool)
        return first, finish, st, time.perf_counter() - t_wall

    def _start_migration(self, ch: PlacementChange, t: float, link_free, mig_left, push, st: EngineStats) -> None:
        old = self.placement
        new_plan = ch.placement if isinstance(ch.placement, ExecutionPlan) else ExecutionPlan.from_placement(ch.placement)
        new = new_plan.placement
        rec = {"start": t, "end": t, "bytes": 0.0, "experts": 0, "dense_layers": 0, "placement": ch.placement,
               "links_left": 0}
        st.migrations.append(rec)
        if not ch.migrate:
            push(t, SWITCH, rec)
            return
        added = new.hosts & ~old.hosts  # [S, L, E]
        bw = self.cost.bandwidth_bps
        per_link: dict[tuple[int, int], float] = {}

        def fetch(holders: np.ndarray, d: int, nbytes: float) -> None:
            src = int(holders[np.argmax(bw[holders, d])])  # the fastest link into d
            per_link[(src, d)] = per_link.get((src, d), 0.0) + nbytes

        for d, l, e in np.argwhere(added):
            fetch(np.flatnonzero(old.hosts[:, l, e]), int(d), self.cost.expert_bytes)
        dense_added = new_plan.dense & ~self.plan.dense  # [S, L]: a plan's dense blocks move too
        for d, l in np.argwhere(dense_added):
            fetch(np.flatnonzero(self.plan.dense[:, l]), int(d), self.cost.dense_layer_bytes)
        rec["dense_layers"] = int(dense_added.sum())
        rec["experts"] = int(added.sum())
        rec["bytes"] = float(sum(per_link.values()))
        rec["links_left"] = len(per_link)
        if not per_link:
            push(t, SWITCH, rec)
            return
        for (src, dst), nbytes in sorted(per_link.items()):
            mig_left[(id(rec), src, dst)] = nbytes
            push(t, CHUNK, (src, dst), rec)


def _expert_masks(experts: np.ndarray) -> list[list[int]]:
    """Per layer, per token: the bitmask of its experts as a Python int. experts int [L, N, k]."""
    if int(experts.max(initial=0)) < 64:
        bits = np.left_shift(np.uint64(1), experts.astype(np.uint64))
        return np.bitwise_or.reduce(bits, axis=2).tolist()
    return [[sum(1 << int(e) for e in tok) for tok in layer.tolist()] for layer in experts]
