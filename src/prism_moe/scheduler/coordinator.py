"""The coordinator (global scheduler) of one cluster: live statistics, re-placement, migration, failures.

Design: the coordinator polls every server's `/prism/stats` (default every second) instead of servers
pushing heartbeats. One request gives both liveness and the activation counts; servers need no
coordinator address and keep working without one; counts are cumulative on the server, so a lost poll or
a coordinator restart loses nothing (the next difference covers it) and a server restart shows up as
counts going down. A server that has not answered for `down_after` seconds is down.

Every poll: decayed history + shift detection (history.py). Every `period` seconds, on `POST /replan`,
and after a detected shift: a candidate placement (candidate.py), the decision rule (decision.py), and
if it says so, a live migration (migration.py plan, executor.py). A server going down: peers are told at
once (they route to surviving replicas), then experts left with no live copy are re-hosted on the
survivors (repair). A server coming back gets a placement version that includes what it holds.

Fencing and restarts: the coordinator holds a control lease on every server (renewed by a thread of its
own, also during migrations) and acts only while it holds the lease on every live server, so a second
coordinator waits. On taking the leases it rebuilds its state from the servers (`reconcile`): the newest
placement version any of them serves, what each holds; every live server is switched to that placement
restricted to what it holds, and copies no placement routes to are dropped. A migration a killed
coordinator left half-done is thereby finished (switched, then dropped) or rolled back (loaded copies
dropped), and every expert keeps at least one copy throughout.

Execution plans (placement/plan.py, runtime/engine/plans.py): the coordinator knows the plan the servers execute
(`self.plan`; a placement is the plan with every layer at home). `switch_plan` moves to another plan like a
placement migration (copies first, version fenced, the last switch a `POST /prism/plan` to every live server,
drops after, a rollback restores the serving plan); with a plan algorithm (`--algorithm hybrid`) the periodic
re-plan computes a plan and moves only when C(new) + T_mig < C(current) x (1 - margin) (placement/hybrid.py
`plan_decision`). A server that executes blocks for others going down: the homes already rebuilt their requests
on a surviving path (their runners avoid it once suspected, at once once told it is down); the coordinator then
pushes the plan without it (placement/failover.py `replan_without`, which also re-hosts orphaned experts).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prism_moe.config import ClusterSpec
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.placement.problem import ClusterStats
from prism_moe.placement.registry import is_plan_algorithm
from prism_moe.scheduler.candidate import (
    ClusterCapacityError,
    candidate_placement,
    candidate_plan,
    link_cost_matrix,
    plan_without,
    repair_hosts,
)
from prism_moe.scheduler.client import ControlFailed, ServerClient
from prism_moe.scheduler.decision import Decision, decide, transfer_seconds
from prism_moe.scheduler.executor import Executor, MigrationReport
from prism_moe.scheduler.history import ActivationHistory, PendingShifts, detect_shift, shift_distance
from prism_moe.scheduler.migration import MigrationPlan, minimal_move_bytes, plan_migration

log = logging.getLogger(__name__)


@dataclass
class CoordinatorConfig:
    period: float = 180.0  # seconds between periodic re-placements (and the horizon of the cost C)
    poll_interval: float = 1.0
    poll_timeout: float = 2.0
    down_after: float = 3.0  # seconds without an answer before a server is down
    half_life: float = 300.0  # of the decayed activation counts
    window: float = 30.0  # recent window compared with the history for shift detection
    shift_threshold: float = 0.3  # mean TV distance over layers (within-domain drift reaches ~0.25)
    min_shift_invocations: float = 1000.0  # per layer, in the window and in the history
    replan_on_shift: bool = True
    settle: float = 5.0  # after a shift, wait this long without another before the one re-plan (0: at once)
    settle_max: float | None = None  # re-plan at most this long after the first shift (None: 3 x settle)
    margin: float = 0.1
    reserve: float = 0.02  # fraction of each server's slots re-placements leave free, so swaps can proceed
    algorithm: str | None = None  # None: the registry's default
    transfer: str = "auto"  # how receivers get experts: auto | checkpoint | peer
    drain_timeout: float = 10.0
    admin_key: str | None = None  # the servers' control credential (runtime/auth.py)
    lease_seconds: float = 6.0  # control lease on each server; renewed every lease_seconds / 3

    def __post_init__(self) -> None:
        """Refuse values the loop cannot run with (a zero poll spins; a lease over the servers' 300 s limit is
        refused by every server, so the coordinator would never act)."""
        from prism_moe.placement.registry import ALGORITHMS, PLAN_ALGORITHMS

        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"coordinator: {what}")

        need(self.algorithm is None or self.algorithm in ALGORITHMS or self.algorithm in PLAN_ALGORITHMS,
             f"unknown algorithm {self.algorithm!r}; choose one of {', '.join([*ALGORITHMS, *PLAN_ALGORITHMS])}")

        for name in ("period", "poll_interval", "poll_timeout", "half_life", "window"):
            v = getattr(self, name)
            need(math.isfinite(v) and v > 0, f"{name} must be a positive number of seconds, got {v}")
        for name in ("down_after", "settle", "drain_timeout", "shift_threshold", "min_shift_invocations"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
        need(self.settle_max is None or (math.isfinite(self.settle_max) and self.settle_max >= 0),
             f"settle_max must be None or >= 0, got {self.settle_max}")
        need(math.isfinite(self.margin) and 0 <= self.margin < 1, f"margin must be in [0, 1), got {self.margin}")
        need(math.isfinite(self.reserve) and 0 <= self.reserve < 1, f"reserve must be in [0, 1), got {self.reserve}")
        need(math.isfinite(self.lease_seconds) and 0 < self.lease_seconds <= 300,
             f"lease_seconds (--lease) must be in (0, 300] (what servers grant), got {self.lease_seconds}")


@dataclass
class ServerState:
    name: str
    live: bool = False
    seen: bool = False
    last_ok: float | None = None
    started_at: float | None = None
    cum: np.ndarray | None = None  # last cumulative counts [L, E]
    stats: dict[str, Any] = field(default_factory=dict)
    samples: deque = field(default_factory=lambda: deque(maxlen=512))  # (t, local, remote, peer bytes)

    def window_rates(self, window: float) -> dict[str, float | None]:
        pts = [x for x in self.samples if x[0] >= self.samples[-1][0] - window] if self.samples else []
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return {"local_hit_rate": None, "remote_invocations_per_s": None, "peer_bytes_per_s": None}
        dt = pts[-1][0] - pts[0][0]
        loc, rem, nb = (pts[-1][i] - pts[0][i] for i in (1, 2, 3))
        return {"local_hit_rate": loc / (loc + rem) if loc + rem > 0 else None,
                "remote_invocations_per_s": rem / dt, "peer_bytes_per_s": nb / dt}


class Coordinator:
    def __init__(self, cluster: ClusterSpec, config: CoordinatorConfig | None = None,
                 placement: Placement | None = None, model: ModelSpec | None = None,
                 client: ServerClient | None = None, plan: ExecutionPlan | None = None) -> None:
        from prism_moe.placement.registry import DEFAULT_ALGORITHM

        self.cluster = cluster
        self.config = config or CoordinatorConfig()
        self.algorithm = self.config.algorithm or DEFAULT_ALGORITHM
        self.model = model or cluster.model_spec()
        self.names = list(cluster.server_names)
        self.capacity = cluster.expert_slots(self.model)
        self.link_cost = link_cost_matrix(cluster, self.model)
        self.bandwidth = cluster.link_matrices()[0]
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client = client or ServerClient(cluster, self.config.admin_key, self.holder)
        self.leased: set[str] = set()  # servers whose control lease this coordinator holds now
        self.lease_error: str | None = None  # why it does not hold them all (another coordinator?)
        self.reconciled = False
        if plan is not None:
            if placement is not None and placement is not plan.placement:
                raise ValueError("Coordinator: give a plan or a placement, not both")
            placement = plan.placement
        self.placement = placement
        # the plan the servers execute; always over `self.placement` (see `_set_serving`)
        self.plan = plan if plan is not None else (None if placement is None else ExecutionPlan.from_placement(placement))
        self.version = placement.version if placement is not None else 0
        shape = (len(self.names), self.model.num_moe_layers, self.model.num_experts)
        self.history = ActivationHistory(shape, self.config.half_life, self.config.window)
        self.servers = {n: ServerState(n) for n in self.names}
        self.error: str | None = None  # a cluster-level problem (e.g. survivors cannot hold every expert)
        self.last_decision: Decision | None = None
        self.migrations: deque[MigrationReport] = deque(maxlen=50)
        self.events: deque[dict[str, Any]] = deque(maxlen=200)
        self.migrating = False
        self._lock = threading.RLock()  # state
        self._migrate_lock = threading.Lock()  # one migration at a time
        self._stop = threading.Event()
        self._replan_now = threading.Event()
        self._last_plan = time.monotonic()
        self.pending_shifts = PendingShifts(self.config.settle, self.config.settle_max)
        self._thread: threading.Thread | None = None
        self._lease_thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max(2, len(self.names)), thread_name_prefix="coord-poll")
        self._lease_pool = ThreadPoolExecutor(max(2, len(self.names)), thread_name_prefix="coord-lease")

    # --- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Poll once (so liveness is known before any decision), take the leases and rebuild the state from the
        servers, then keep polling in a thread (and renewing the leases in another)."""
        self.poll()
        self.renew_leases()
        self._lease_thread = threading.Thread(target=self._lease_loop, name="prism-coordinator-lease", daemon=True)
        self._lease_thread.start()
        if self.holds_control():
            self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="prism-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._replan_now.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lease_thread is not None:
            self._lease_thread.join(timeout=10)
        for n in list(self.leased):  # hand over at once instead of making a successor wait for the lapse
            try:
                self.client.release(n)
            except ControlFailed:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._lease_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # --- the control lease ----------------------------------------------------------------------------------
    def renew_leases(self) -> None:
        """Take or renew the lease on every server that answers; remember which ones it holds."""
        ttl = self.config.lease_seconds
        futs = {n: self._lease_pool.submit(self.client.lease, n, ttl, min(2.0, ttl / 3)) for n in self.names}
        held, refused = set(), []
        for n, f in futs.items():
            try:
                f.result()
                held.add(n)
            except ControlFailed as err:
                if err.status is not None:  # an answer that refuses (409: another coordinator; 401/403)
                    refused.append(str(err))
            except Exception:  # no answer: a down server; liveness is the poll's business
                pass
        with self._lock:
            lost = self.leased - held
            self.leased = held
            self.lease_error = "; ".join(refused) or None
            if refused and self.reconciled:
                self.reconciled = False  # someone else may have changed the servers: rebuild when back
                self._event("lease", None, f"lost the control lease: {self.lease_error}")
            if lost:
                log.info("no longer holds the control lease on %s", sorted(lost))

    def _lease_loop(self) -> None:
        while not self._stop.wait(self.config.lease_seconds / 3):
            try:
                self.renew_leases()
            except Exception:
                log.exception("renewing the control leases failed")

    def holds_control(self) -> bool:
        """Whether this coordinator holds the lease on every live server (only then it acts)."""
        with self._lock:
            live = {n for n in self.names if self.servers[n].live}
            return bool(live) and live <= self.leased and self.lease_error is None

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.step()
            except Exception:  # the loop must survive anything one step does
                log.exception("coordinator step failed")
            self._replan_now.wait(max(0.0, self.config.poll_interval - (time.monotonic() - t0)))

    def step(self) -> None:
        """One poll of every server, then whatever it calls for: repair, rejoin, re-placement. Nothing but the
        poll while another coordinator holds a lease."""
        went_down, came_back, shifted = self.poll()
        if self._stop.is_set():  # stop() wakes the loop through _replan_now: that is no re-plan request
            return
        if not self.holds_control():
            self.renew_leases()  # e.g. a server that just came back has no lease yet
        if not self.holds_control():
            if went_down or came_back:  # seen again, and handled, once this coordinator has the leases
                self.reconciled = False
            return
        if not self.reconciled:
            self.reconcile()
            return
        if went_down:
            self.handle_down(went_down)
        for name in came_back:
            self.handle_rejoin(name)
        now = time.monotonic()
        if self.config.replan_on_shift:
            self.pending_shifts.add(shifted, now)
        on_shift = self.pending_shifts.due(now)
        due = now - self._last_plan >= self.config.period
        if self._replan_now.is_set() or due or on_shift:
            self._replan_now.clear()
            # whatever triggers it, the re-plan sees every shifted server's reset history: pending ones too
            names = self.pending_shifts.take()
            reason = (f"workload shift on {', '.join(names)}" if on_shift
                      else "period" if due else "requested")
            self.replan(reason)

    # --- statistics and liveness ----------------------------------------------------------------------------
    def poll(self) -> tuple[list[str], list[str], list[str]]:
        """Poll every server once; returns (went down, came back, shifted) server names."""
        now = time.monotonic()
        futs = {n: self._pool.submit(self.client.stats, n, self.config.poll_timeout) for n in self.names}
        deltas = np.zeros(self.history.shape)
        went_down, came_back = [], []
        with self._lock:
            for i, n in enumerate(self.names):
                st = self.servers[n]
                try:
                    s = futs[n].result()
                except Exception as err:  # any failure (ControlFailed, timeout, bad JSON) means no answer
                    if st.live and (st.last_ok is None or now - st.last_ok >= self.config.down_after):
                        st.live = False
                        went_down.append(n)
                        self._event("down", n, str(err))
                    elif not st.seen and st.last_ok is None:
                        st.stats = {"error": str(err)}
                    continue
                if st.seen and not st.live:
                    came_back.append(n)
                restarted = st.started_at is not None and s.get("started_at") != st.started_at
                counts = np.asarray(s["counts"], dtype=np.float64)
                if st.cum is not None and not restarted and (counts >= st.cum).all():
                    deltas[i] = counts - st.cum
                # else: first sight or a restart: these counts are the baseline, not new traffic
                st.cum, st.started_at, st.stats = counts, s.get("started_at"), s
                st.live, st.seen, st.last_ok = True, True, now
                st.samples.append((now, s.get("routed_local", 0), s.get("routed_remote", 0),
                                   s.get("peer_bytes_sent", 0) + s.get("peer_bytes_received", 0)))
            self.history.observe(deltas, now)
            live = self.live_mask()
            shifted_mask = detect_shift(self.history.older(), self.history.recent(), self.config.shift_threshold,
                                        self.config.min_shift_invocations) & live
            shifted = [self.names[i] for i in np.flatnonzero(shifted_mask)]
            if shifted:
                dist = shift_distance(self.history.older(), self.history.recent())
                for n in shifted:
                    self._event("shift", n, f"TV distance {dist[self.names.index(n)]:.3f}: history reset")
                self.history.reset_to_recent(shifted_mask)
            if self.placement is None and live.any():
                self._adopt_placement()
        return went_down, came_back, shifted

    def live_mask(self) -> np.ndarray:
        return np.array([self.servers[n].live for n in self.names])

    def down_names(self) -> list[str]:
        return [n for n in self.names if not self.servers[n].live]

    def _adopt_placement(self) -> None:
        """Take the newest placement the live servers serve (at start, when none was given)."""
        best = None
        for n in self.names:
            if self.servers[n].live:
                try:
                    p = self.client.placement(n)
                except ControlFailed:
                    continue
                if best is None or p.version > best.version:
                    best = p
        if best is not None:
            self._set_serving(best, self._served_plan(best))
            self.version = max(self.version, best.version)
            self._event("placement", None, f"adopted version {best.version} from the servers")

    def _served_plan(self, placement: Placement) -> ExecutionPlan:
        """The plan a live server serving `placement`'s version executes, over `placement` (at home if none says)."""
        for n in self.names:
            if not self.servers[n].live:
                continue
            try:
                p = self.client.plan(n)
            except (ControlFailed, ValueError):
                continue
            if p.placement.version == placement.version and list(p.server_names) == self.names:
                return p.with_placement(placement)
        return ExecutionPlan.from_placement(placement)

    def _set_serving(self, placement: Placement, plan: ExecutionPlan | None = None) -> None:
        """The servers serve `placement` (and execute `plan`, else the current plan's route over it)."""
        with self._lock:
            if plan is None:
                plan = (self.plan.with_placement(placement) if self.plan is not None
                        else ExecutionPlan.from_placement(placement))
            self.placement, self.plan = placement, plan

    def _next_version(self) -> int:
        with self._lock:
            self.version += 1
            return self.version

    def _event(self, kind: str, server: str | None, detail: str) -> None:
        log.info("%s %s: %s", kind, server or "cluster", detail)
        self.events.append({"time": time.time(), "kind": kind, "server": server, "detail": detail})

    # --- decisions ------------------------------------------------------------------------------------------
    def request_replan(self) -> None:
        self._replan_now.set()

    def replan(self, reason: str = "requested", dry_run: bool = False) -> dict[str, Any]:
        """Compute the candidate, decide, and migrate if the rule says so. Returns the decision (+ report)."""
        with self._migrate_lock:
            self._last_plan = time.monotonic()
            with self._lock:
                if self.placement is None:
                    return {"migrate": False, "reason": "no placement known yet (no server answered)"}
                live, current = self.live_mask(), self.placement
                rates = self.history.rates() * live[:, None, None]
            if not live.any():
                return {"migrate": False, "reason": "no live server"}
            if is_plan_algorithm(self.algorithm):
                return self._replan_plan(reason, rates, live, dry_run)
            try:
                cand = candidate_placement(self.algorithm, rates, self.cluster, self.model, current, live,
                                           self.config.reserve)
                plan = plan_migration(current.hosts, cand.hosts, self.capacity, live, self.bandwidth, rates)
                # decide on what the migration can reach within the slots, not on the unconstrained target
                reached = Placement.from_hosts(self.names, plan.reached | (current.hosts & ~live[:, None, None]),
                                               self.link_cost, None, cand.algorithm, version=current.version)
            except Exception as err:  # a placement that cannot be computed is a cluster-level problem
                self.error = f"re-placement failed: {err}"
                log.error(self.error)
                return {"migrate": False, "reason": self.error}
            d = decide(current, reached, rates, self.link_cost, self.bandwidth, self.model.expert_bytes,
                       self.config.period, self.config.margin, live)
            self.last_decision = d
            out: dict[str, Any] = {**d.to_dict(), "trigger": reason, "skipped_moves": plan.skipped}
            self._event("decision", None, f"{reason}: migrate={d.migrate}; {d.reason}; planned "
                                          f"{d.experts_moved} experts, {d.migration_bytes} B, "
                                          f"{d.migration_seconds:.3f} s")
            if d.migrate and not dry_run:
                out["migration"] = self._migrate(cand.hosts, f"re-placement ({reason})", rates, plan).to_dict()
            return out

    def _replan_plan(self, reason: str, rates: np.ndarray, live: np.ndarray, dry_run: bool) -> dict[str, Any]:
        """`replan` under a plan algorithm: its plan for the measured rates, moved to only when
        C(new) + T_mig < C(current) x (1 - margin) (placement/hybrid.py `plan_decision`)."""
        from prism_moe.placement.hybrid import plan_decision

        current = self.plan
        assert current is not None
        try:
            cand = candidate_plan(self.algorithm, rates, self.cluster, self.model, live)
            r = np.asarray(rates, float)
            stats = ClusterStats(np.maximum(r if r.sum() > 0 else np.ones_like(r), 1e-9))
            dec = plan_decision(current, cand, stats, self.cluster, self.model, self.config.period,
                                margin=self.config.margin)
        except Exception as err:  # a plan that cannot be computed is a cluster-level problem
            self.error = f"re-planning failed: {err}"
            log.error(self.error)
            return {"migrate": False, "reason": self.error}
        moved = int((cand.placement.hosts & ~current.placement.hosts & live[:, None, None]).sum())
        rule = "<" if dec["migrate"] else ">="
        d = Decision(dec["migrate"], f"C(new)+T_mig = {dec['cost_candidate'] + dec['migration_seconds']:.4g} s "
                                     f"{rule} C(current)(1-margin) = {dec['cost_current'] * (1 - self.config.margin):.4g} s",
                     dec["cost_current"], dec["cost_candidate"], dec["migration_seconds"],
                     int(dec["migration_bytes"]), moved, self.config.margin, self.config.period)
        self.last_decision = d
        out: dict[str, Any] = {**d.to_dict(), "trigger": reason, "plan": cand.summary()}
        self._event("decision", None, f"{reason}: {self.algorithm} plan, switch={d.migrate}; {d.reason}")
        if d.migrate and not dry_run:
            out["migration"] = self._migrate(cand.placement.hosts, f"re-plan ({reason})", rates,
                                             target_plan=cand).to_dict()
        return out

    def migrate_to(self, target: Placement, reason: str = "requested") -> MigrationReport:
        """Migrate live to `target` (its hosts; versions are the coordinator's), whatever the rule says."""
        with self._migrate_lock:
            if list(target.server_names) != self.names:
                raise ValueError(f"placement for {list(target.server_names)}, the cluster has {self.names}")
            return self._migrate(target.hosts, reason, self.history.rates())

    def switch_plan(self, target: ExecutionPlan, reason: str = "requested") -> MigrationReport:
        """Move live to the execution plan `target` (its placement's experts loaded first, then every live server
        switched to the plan, then drops), whatever the rule says; versions are the coordinator's."""
        with self._migrate_lock:
            if list(target.server_names) != self.names:
                raise ValueError(f"plan for {list(target.server_names)}, the cluster has {self.names}")
            return self._migrate(target.placement.hosts, reason, self.history.rates(), target_plan=target)

    def _migrate(self, target_hosts: np.ndarray, reason: str, rates: np.ndarray,
                 plan: MigrationPlan | None = None, target_plan: ExecutionPlan | None = None) -> MigrationReport:
        with self._lock:
            current, live, down, serving_plan = self.placement, self.live_mask(), self.down_names(), self.plan
            ckpt_ok = {n: bool(self.servers[n].stats.get("checkpoint_experts")) for n in self.names}
        assert current is not None
        if not live.any():
            report = MigrationReport(reason, current.version, error="no live server: nothing can migrate")
            self.migrations.append(report)
            return report
        if plan is None:
            plan = plan_migration(current.hosts, target_hosts, self.capacity, live, self.bandwidth, rates)
        minimal = minimal_move_bytes(current.hosts, target_hosts, self.model.expert_bytes, live)
        report = MigrationReport(reason, current.version, planned_bytes=len(plan.loads) * self.model.expert_bytes,
                                 minimal_bytes=minimal,
                                 planned_seconds=transfer_seconds(current.hosts, plan.reached, self.bandwidth,
                                                                  self.model.expert_bytes, live))
        self._event("migration", None, f"{reason}: from version {current.version}, {len(plan.loads)} loads, "
                                       f"{plan.num_drops} drops in {len(plan.rounds)} rounds, planned "
                                       f"{report.planned_bytes} B (minimal {minimal} B) / "
                                       f"{report.planned_seconds:.3f} s"
                                       + (f"; {plan.skipped} moves skipped" if plan.skipped else ""))
        ex = Executor(self.client, self.names, self.link_cost, self.capacity, self.model.expert_bytes,
                      self._next_version, self.config.transfer, ckpt_ok, self.config.drain_timeout)
        self.migrating = True
        try:
            # under a plan (or toward one) every switch carries the route: POST /prism/plan
            plans = target_plan is not None or (serving_plan is not None and not serving_plan.at_home)
            serving = ex.run(plan, current, live, down, report, self.algorithm, target_plan,
                             serving_plan if plans else None)
        finally:
            self.migrating = False
        self._set_serving(serving, ex.plan)
        with self._lock:
            self.migrations.append(report)
        self._event("migrated" if report.ok else "rolled back", None,
                    f"version {report.to_version} in {report.seconds:.3f} s"
                    + (f": {report.error}" if report.error else ""))
        return report

    # --- restarts -------------------------------------------------------------------------------------------
    def reconcile(self) -> bool:
        """Rebuild the state from the live servers and make them consistent (after this coordinator starts or
        gets the leases back): adopt the newest placement version any of them serves, restricted to what each
        holds (plus any held copy of an expert it would leave without one), switch every live server to it
        under a new version if they differ, then drop the copies it does not route to. Returns whether done."""
        with self._migrate_lock:
            with self._lock:
                live = self.live_mask()
                live_names = [n for n in self.names if self.servers[n].live]
                # staged copies (loaded for a migration, not yet switched to) take slots just like held ones
                held_lists = {n: [self.servers[n].stats.get(k) or {} for k in ("held", "staged")]
                              for n in live_names}
            if not live_names:
                return False
            try:
                served = {n: self.client.placement(n) for n in live_names}
            except ControlFailed as err:
                log.warning("reconcile: %s (trying again at the next poll)", err)
                return False
            newest = max(served.values(), key=lambda p: p.version)
            if list(newest.server_names) != self.names:
                self.error = f"the servers serve a placement for {list(newest.server_names)}, not {self.names}"
                return False
            with self._lock:
                self.version = max(self.version, newest.version)
            held = np.zeros_like(newest.hosts)
            for n in live_names:
                for lists in held_lists[n]:
                    for layer, ids in lists.items():
                        held[self.names.index(n), int(layer), ids] = True
            hosts = newest.hosts.copy()
            hosts[live] &= held[live]  # a live server routes only to copies it really holds
            hosts |= held & ~hosts.any(axis=0)[None]  # an expert listed nowhere keeps any copy that exists
            consistent = all(p.version == newest.version for p in served.values()) and (hosts == newest.hosts).all()
            target = newest if consistent else Placement.from_hosts(
                self.names, hosts, self.link_cost, None, newest.algorithm, version=self._next_version())
            down = self.down_names()
            plan = self._served_plan(newest).with_placement(target)  # the newest version's route
            if not consistent:
                futs = {n: self._pool.submit(self._switch_one, n, target, plan, down) for n in live_names}
                failed = [str(e) for f in futs.values() if (e := f.exception()) is not None]
                if failed:
                    self._event("error", None, f"reconcile: switch to version {target.version} failed: {failed[0]}")
                    return False
            extras = held & ~target.hosts
            dropped = 0
            for i in np.flatnonzero(extras.any(axis=(1, 2))).tolist():
                try:
                    out = self.client.drop(self.names[i], [(int(l), int(e)) for l, e in np.argwhere(extras[i])])
                    dropped += int(out.get("dropped", 0))
                except ControlFailed as err:
                    log.warning("reconcile: %s", err)
            self._set_serving(target, plan)
            with self._lock:
                self.reconciled = True
            self._event("reconcile", None, f"servers served versions {sorted({p.version for p in served.values()})}; "
                                           f"now all on version {target.version}, {dropped} unrouted copies dropped")
        uncovered = ~(target.hosts & live[:, None, None]).any(axis=0)
        if uncovered.any() and down:  # a server that was already down when this coordinator started
            self.handle_down(down)
        return True

    def _switch_one(self, server: str, placement: Placement, plan: ExecutionPlan | None, down: list[str]) -> Any:
        """Switch one server to `placement`, with `plan`'s route when layers run away from home."""
        if plan is None or plan.at_home:
            return self.client.switch(server, placement, down, self.config.drain_timeout)
        return self.client.switch_plan(server, plan.with_placement(placement), down, self.config.drain_timeout)

    # --- failures -------------------------------------------------------------------------------------------
    def handle_down(self, names: list[str]) -> None:
        """Tell the survivors at once (their runners and dispatchers avoid the down servers from then on), then
        re-host experts left with no live copy; under a plan whose layers the down servers executed (or backed up)
        for live homes, move to the plan without them."""
        with self._lock:
            live, down, current, plan = self.live_mask(), self.down_names(), self.placement, self.plan
        for n in self.names:
            if self.servers[n].live:
                try:
                    self.client.set_down(n, down)
                except ControlFailed as err:
                    log.warning("telling %s that %s are down: %s", n, down, err)
        if current is None or not live.any():
            return
        if plan is not None and not plan.at_home and self._plan_uses(plan, ~live):
            self._repair_plan(plan, live, names)
            return
        if (current.hosts & live[:, None, None]).any(axis=0).all():
            return  # every expert still has a live copy: failover alone serves every request
        try:
            repaired = repair_hosts(current.hosts, live, self.capacity, self.history.rates())
        except ClusterCapacityError as err:
            self.error = str(err)
            self._event("error", None, self.error)
            return
        with self._migrate_lock:
            report = self._migrate(repaired, f"repair after {', '.join(names)} went down", self.history.rates())
        if report.ok:
            self.error = None

    @staticmethod
    def _plan_uses(plan: ExecutionPlan, dead: np.ndarray) -> bool:
        """Whether a live home's layers run on (or fall back to) a dead server."""
        rows = plan.executor[~dead]
        uses = dead[rows].any()
        if plan.backup is not None:
            bk = plan.backup[~dead]
            uses = uses or bool((dead[np.where(bk >= 0, bk, 0)] & (bk >= 0)).any())
        return bool(uses)

    def _repair_plan(self, plan: ExecutionPlan, live: np.ndarray, names: list[str]) -> None:
        """Move to `plan` without the down servers (`candidate.plan_without`)."""
        try:
            new = plan_without(plan, live, self.model, self.capacity, self.link_cost)
        except ClusterCapacityError as err:
            self.error = f"no plan without {', '.join(names)}: {err}"
            self._event("error", None, self.error)
            return
        with self._migrate_lock:
            report = self._migrate(new.placement.hosts, f"plan repair after {', '.join(names)} went down",
                                   self.history.rates(), target_plan=new)
        moved = int((new.executor != plan.executor)[live].sum())
        self._event("plan", None, f"{'now executing' if report.ok else 'could not switch to'} the plan without "
                                  f"{', '.join(names)}: {moved} (home, layer) pairs moved")
        if report.ok:
            self.error = None

    def handle_rejoin(self, name: str) -> None:
        """A server answers again: give every live server a placement that includes what it holds."""
        with self._migrate_lock:
            with self._lock:
                st, current, down = self.servers[name], self.placement, self.down_names()
                live_names = [n for n in self.names if self.servers[n].live]
            if current is None:
                return
            held = np.zeros(current.hosts.shape[1:], dtype=bool)
            for layer, ids in (st.stats.get("held") or {}).items():
                held[int(layer), ids] = True
            hosts = current.hosts.copy()
            hosts[self.names.index(name)] = held
            p = Placement.from_hosts(self.names, hosts, self.link_cost, None, current.algorithm,
                                     version=self._next_version())
            failed = []
            plan = None if self.plan is None else self.plan.with_placement(p)  # the rejoining server takes the route
            for n in live_names:
                try:
                    self._switch_one(n, p, plan, down)
                except ControlFailed as err:
                    failed.append(str(err))
            if not failed:
                self._set_serving(p, plan)
                self.error = None
            self._event("rejoin", name, f"placement version {p.version} includes its {int(held.sum())} experts"
                        + (f"; not taken by all: {failed}" if failed else ""))

    # --- state and HTTP -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            p = self.placement
            servers = {}
            for i, n in enumerate(self.names):
                st, s = self.servers[n], self.servers[n].stats
                servers[n] = {
                    "live": st.live, "seen": st.seen,
                    "last_seen_s": None if st.last_ok is None else now - st.last_ok,
                    "placement_version": s.get("placement_version"), "experts_held": s.get("experts_held"),
                    "expert_slots": int(self.capacity[i]), "resident_weight_bytes": s.get("resident_weight_bytes"),
                    "expert_bytes_held": (s.get("experts_held") or 0) * self.model.expert_bytes,
                    "failovers": s.get("failovers"), "down_seen": s.get("down"), "replay": s.get("replay"),
                    **st.window_rates(self.config.window)}
            return {"placement_version": None if p is None else p.version,
                    "plan": None if self.plan is None else {"algorithm": self.plan.algorithm,
                                                            "at_home": self.plan.at_home,
                                                            "blocks": self.plan.summary()["blocks"]},
                    "algorithm": self.algorithm, "error": self.error, "migrating": self.migrating,
                    "servers": servers,
                    "last_decision": None if self.last_decision is None else self.last_decision.to_dict(),
                    "migrations": [m.to_dict() for m in self.migrations],
                    "events": list(self.events)[-50:], "config": {**asdict(self.config), "admin_key": None},
                    "control": {"holder": self.holder, "leased": sorted(self.leased),
                                "lease_error": self.lease_error, "reconciled": self.reconciled}}

    def app(self) -> Any:
        """FastAPI app: GET / (live cluster page), /health, /state, /placement, /plan; POST /replan[?dry_run=true],
        /migrate, /plan (a plan, or an algorithm's plan for the measured rates)."""
        from fastapi import Depends, FastAPI, HTTPException
        from fastapi.responses import HTMLResponse
        from pydantic import BaseModel

        from prism_moe.runtime.auth import ControlGuard
        from prism_moe.scheduler.cluster_page import PAGE

        control = [Depends(ControlGuard(self.config.admin_key))]  # the admin key, or loopback when none

        class MigrateBody(BaseModel):
            placement: dict[str, Any]

        class PlanBody(BaseModel):
            plan: dict[str, Any] | None = None  # an execution plan (prism place --algorithm hybrid --out)
            algorithm: str | None = None  # or: this algorithm's plan for the measured rates, e.g. hybrid

        app = FastAPI(title="prism-moe coordinator")

        @app.get("/", response_class=HTMLResponse)
        def page() -> str:  # the live cluster page: reads /state and /placement (scheduler/cluster_page.py)
            return PAGE

        @app.get("/health")
        def health() -> dict[str, Any]:
            return {"status": "ok" if self.error is None else "error", "error": self.error,
                    "live": [n for n in self.names if self.servers[n].live]}

        @app.get("/state")
        def state() -> dict[str, Any]:
            return self.state()

        @app.get("/placement")
        def placement() -> dict[str, Any]:
            if self.placement is None:
                raise HTTPException(503, "no placement known yet")
            return self.placement.to_dict()

        def require_control() -> None:
            # an ordered migration acts only where the loop would: every live server's lease held, state rebuilt
            if self.placement is None:
                raise HTTPException(503, "no placement known yet (no server answered)")
            if not self.holds_control() or not self.reconciled:
                why = self.lease_error or "it does not hold the control lease on every live server yet"
                raise HTTPException(409, f"this coordinator does not drive the cluster now ({why}); retry when GET "
                                         f"/state shows control.reconciled")

        @app.post("/replan", dependencies=control)
        def replan(dry_run: bool = False) -> dict[str, Any]:
            if not dry_run:
                require_control()
            return self.replan("requested", dry_run=dry_run)

        def migrate(body: MigrateBody) -> dict[str, Any]:
            try:
                target = Placement.from_dict(body.placement)
                require_control()
                return self.migrate_to(target, "operator").to_dict()
            except ValueError as err:
                raise HTTPException(400, str(err)) from err

        # the class itself, not the string of `from __future__ import annotations`: FastAPI cannot resolve a
        # local class by name and would read `body` as a required query parameter (every call a 422)
        migrate.__annotations__ = {"body": MigrateBody, "return": dict[str, Any]}
        app.add_api_route("/migrate", migrate, methods=["POST"], dependencies=control)

        @app.get("/plan")
        def get_plan() -> dict[str, Any]:
            if self.plan is None:
                raise HTTPException(503, "no plan known yet")
            return self.plan.to_dict()

        def switch_plan(body: PlanBody) -> dict[str, Any]:
            if (body.plan is None) == (body.algorithm is None):
                raise HTTPException(400, "give either a plan or an algorithm")
            try:
                if body.plan is not None:
                    target = ExecutionPlan.from_dict(body.plan, "plan")
                else:
                    CoordinatorConfig(algorithm=body.algorithm)  # refuses an unknown name with the list
                    assert body.algorithm is not None
                    target = candidate_plan(body.algorithm, self.history.rates() * self.live_mask()[:, None, None],
                                            self.cluster, self.model, self.live_mask())
                require_control()
                return self.switch_plan(target, "operator").to_dict()
            except (ValueError, ClusterCapacityError) as err:
                raise HTTPException(400, str(err)) from err

        switch_plan.__annotations__ = {"body": PlanBody, "return": dict[str, Any]}
        app.add_api_route("/plan", switch_plan, methods=["POST"], dependencies=control)

        return app
