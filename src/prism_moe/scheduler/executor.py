"""Run a migration plan against the servers: loads, switches to new placement versions, drops.

Receivers load in parallel (each its own experts one after another, as the cost model assumes). A
switch goes to every live server and succeeds only when all of them answered (each has drained the calls
it made under the old version). If anything fails before the last drop, the migration stops and rolls
back: every live server gets the last placement all of them served (under a new version number) and the
copies loaded for this migration are dropped, so the old placement keeps serving with no extra memory.

Plans (placement/plan.py): with `target_plan`, the migration moves to that plan's placement the same way
(copies first, through the same rounds) and its switch to the target placement is a plan switch
(`POST /prism/plan`: placement version fenced, then every server's requests take the plan's route); when no
round switches to exactly that placement (nothing to move, or moves skipped for lack of slots) the plan is
switched at the end over the placement reached. Intermediate switches keep the route the servers execute.
With `serving_plan` (the plan the servers execute), a rollback restores it, route included.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.scheduler.client import ControlFailed, ServerClient
from prism_moe.scheduler.migration import Load, MigrationPlan

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    reason: str
    from_version: int
    to_version: int = -1
    ok: bool = False
    rolled_back: bool = False
    error: str | None = None
    planned_bytes: int = 0
    planned_seconds: float = 0.0
    minimal_bytes: int = 0  # bytes of the minimal move set: target experts each server lacks, x expert bytes
    experts_loaded: int = 0
    experts_dropped: int = 0
    bytes_moved: int = 0
    rounds: int = 0
    skipped: int = 0
    switch_ms: list[float] = field(default_factory=list)  # per switch: the slowest server's answer
    started_at: float = 0.0  # wall clock (time.time())
    finished_at: float = 0.0
    # (step, start, end) wall clock of every load / switch / drop, to tell what a slow token overlapped
    phases: list[tuple[str, float, float]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds}


@contextmanager
def _phase(report: MigrationReport, name: str) -> Iterator[None]:
    t0 = time.time()
    try:
        yield
    finally:
        report.phases.append((name, t0, time.time()))


@dataclass
class Executor:
    client: ServerClient
    names: list[str]
    link_cost: np.ndarray  # [S, S] for routes of the intermediate placements
    capacity: np.ndarray  # [S]
    expert_bytes: int
    next_version: Callable[[], int]
    transfer: str = "auto"  # "auto" (checkpoint when the receiver has it), "checkpoint" or "peer"
    checkpoint_ok: dict[str, bool] = field(default_factory=dict)
    drain_timeout: float = 10.0
    plan: ExecutionPlan | None = None  # the plan the servers execute (set by `run`; None: placements only)

    def run(self, plan: MigrationPlan, serving: Placement, live: np.ndarray, down: list[str],
            report: MigrationReport, algorithm: str = "", target_plan: ExecutionPlan | None = None,
            serving_plan: ExecutionPlan | None = None) -> Placement:
        """Execute `plan` from `serving`; returns the placement serving at the end (rolled back on failure). With
        `target_plan`, end on that plan; `self.plan` is then the plan the servers execute (None without plans)."""
        report.started_at = time.time()
        report.skipped = plan.skipped
        attempted = np.zeros_like(serving.hosts)
        live_names = [n for n, ok in zip(self.names, live, strict=True) if ok]
        self.plan = None if serving_plan is None else serving_plan.with_placement(serving)
        pending = target_plan  # the plan switch not done yet
        try:
            for rnd in plan.rounds:
                report.rounds += 1
                with _phase(report, "load"):
                    self._loads(rnd.loads, attempted, report)
                final = pending is not None and rnd.switch is not None and (
                    rnd.switch == pending.placement.hosts).all()
                if final or (rnd.switch is not None and (rnd.drops or rnd.loads
                                                         or not (rnd.switch == serving.hosts).all())):
                    with _phase(report, "switch"):
                        serving = self._switch(self._placement(rnd.switch, serving, algorithm), live_names, down,
                                               report, pending if final else None)
                    pending = None if final else pending
                with _phase(report, "drop"):
                    self._drops(rnd.drops, report)
            if pending is not None:
                with _phase(report, "switch"):
                    serving = self._switch(self._placement(serving.hosts, serving, algorithm), live_names, down,
                                           report, pending)
            report.ok = True
            report.to_version = serving.version
        except ControlFailed as err:
            report.error = str(err)
            log.error("migration failed, rolling back to placement version %d: %s", serving.version, err)
            serving = self._rollback(serving, attempted, live_names, down, report)
        report.finished_at = time.time()
        return serving

    # --- steps ----------------------------------------------------------------------------------------------
    def _placement(self, hosts: np.ndarray, serving: Placement, algorithm: str) -> Placement:
        hosts = hosts.copy()
        # an expert with no live copy yet (repair) stays routed to its old, down holder until it is loaded
        uncovered = ~hosts.any(axis=0)
        hosts |= serving.hosts & uncovered[None]
        return Placement.from_hosts(self.names, hosts, self.link_cost, None, algorithm or serving.algorithm,
                                    version=self.next_version())

    def _loads(self, loads: tuple[Load, ...], attempted: np.ndarray, report: MigrationReport) -> None:
        if not loads:
            return
        jobs: dict[str, list[tuple[str | None, list[tuple[int, int]]]]] = defaultdict(list)
        by_pair: dict[tuple[int, int | None], list[tuple[int, int]]] = defaultdict(list)
        for ld in loads:
            src = self._source(ld)
            by_pair[(ld.server, src)].append((ld.layer, ld.expert))
            attempted[ld.server, ld.layer, ld.expert] = True
        for (r, src), experts in by_pair.items():
            jobs[self.names[r]].append((None if src is None else self.names[src], experts))

        def receive(receiver: str) -> int:
            n = 0
            for source, experts in jobs[receiver]:
                if source is None:
                    self.client.load(receiver, experts)
                else:
                    self.client.send(source, experts, receiver)
                    report.bytes_moved += len(experts) * self.expert_bytes
                n += len(experts)
            return n

        with ThreadPoolExecutor(max(1, len(jobs))) as pool:
            report.experts_loaded += sum(pool.map(receive, list(jobs)))

    def _source(self, ld: Load) -> int | None:
        if ld.source is None or self.transfer == "checkpoint":
            return None
        if self.transfer == "auto" and self.checkpoint_ok.get(self.names[ld.server], False):
            return None
        return ld.source

    def _switch(self, placement: Placement, live_names: list[str], down: list[str], report: MigrationReport,
                new_plan: ExecutionPlan | None = None) -> Placement:
        """Switch every live server to `placement`: with `new_plan`, to that plan's route over it; else, under
        plans, keeping the route they execute."""
        plan = new_plan.with_placement(placement) if new_plan is not None else (
            None if self.plan is None else self.plan.with_placement(placement))
        with ThreadPoolExecutor(max(1, len(live_names))) as pool:
            if plan is None:
                futs = {n: pool.submit(self.client.switch, n, placement, down, self.drain_timeout) for n in live_names}
            else:
                futs = {n: pool.submit(self.client.switch_plan, n, plan, down, self.drain_timeout) for n in live_names}
            answers = {n: f.exception() or f.result() for n, f in futs.items()}
        failed = {n: a for n, a in answers.items() if isinstance(a, BaseException)}
        if failed:
            n, err = next(iter(failed.items()))
            raise err if isinstance(err, ControlFailed) else ControlFailed(n, "switch", str(err))
        report.switch_ms.append(max((a.get("drain_ms", 0.0) for a in answers.values()), default=0.0))
        undrained = [(n, a.get("inflight")) for n, a in answers.items() if not a.get("drained", True)]
        if undrained:
            log.warning("placement %d: %s still had calls of the old version after %.0f s", placement.version,
                        undrained, self.drain_timeout)
        self.plan = plan
        return placement

    def _drops(self, drops: tuple[tuple[int, int, int], ...], report: MigrationReport) -> None:
        per: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for s, l, e in drops:
            per[self.names[s]].append((l, e))
        with ThreadPoolExecutor(max(1, len(per))) as pool:
            for out in pool.map(lambda kv: self.client.drop(*kv), per.items()):
                report.experts_dropped += int(out.get("dropped", 0))

    def _rollback(self, serving: Placement, attempted: np.ndarray, live_names: list[str], down: list[str],
                  report: MigrationReport) -> Placement:
        report.rolled_back = True
        again = Placement.from_hosts(self.names, serving.hosts, self.link_cost, None, serving.algorithm,
                                     version=self.next_version())
        plan = None if self.plan is None else self.plan.with_placement(again)  # the route all of them took last
        for n in live_names:  # servers that took the failed version come back to the serving one
            try:
                if plan is None:
                    self.client.switch(n, again, down, self.drain_timeout)
                else:
                    self.client.switch_plan(n, plan, down, self.drain_timeout)
            except ControlFailed as err:
                log.error("rollback: %s", err)
        self.plan = plan
        extras = attempted & ~again.hosts
        for i in np.flatnonzero(extras.any(axis=(1, 2))).tolist():
            if self.names[i] not in live_names:
                continue
            try:
                self.client.drop(self.names[i], [(int(l), int(e)) for l, e in np.argwhere(extras[i])])
            except ControlFailed as err:
                log.error("rollback: %s", err)
        report.to_version = again.version
        return again
