"""`PlanRunner`: the slot runner, executing a plan's route for its home server's requests.

A `Route` is this home's row of an execution plan (placement/plan.py): per MoE layer, the server that runs the
layer for the home's requests (None: here) and the one that takes over if it fails. The runner's forwards go
through the `LayerGate`: layers routed here run as usual, a block routed to a peer is one `BlockCalls.run`
carrying the rows' hidden states, positions and request ids (runtime/blocks.py), and the peer keeps those
requests' KV cache for the block.

Changes of route are applied between steps, by rebuilding caches (the slot runner's *resume*: a prefill over the
prompt and the tokens so far that emits nothing), never by failing a request:
* a new route (`set_route`, from a plan switch): running requests built under another route are rebuilt on the
  new one at the next step; their block caches on peers are released;
* a hand-off that fails (peer unreachable, or it lost the request's cache): the peer is avoided (its blocks go to
  their backup executor, else run here: every server holds the dense part) and the forward's rows are rebuilt,
  at most `max_resumes` times each, then they fail with the error. With `health` (the server's dispatcher) the
  peer is avoided while the dispatcher suspects it (until a probe hears from it) or the coordinator says it is
  down, and rows move back to it when it answers again; without, until the next route.
A request thus keeps its route until it ends or is rebuilt on another; its tokens so far are always kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prism_moe.runtime.engine.layers import UNKNOWN_REQUEST, HandoffError, LayerGate
from prism_moe.runtime.engine.slots import SlotRunner, _Seq

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """executors[m]: the server that runs MoE layer m for this home's requests (None: here); backups[m]: who takes
    over when it fails (None: here). `version`: the plan's placement version."""

    version: int
    executors: tuple[str | None, ...]
    backups: tuple[str | None, ...]

    def __post_init__(self) -> None:
        if len(self.executors) != len(self.backups):
            raise ValueError("a route needs one executor and one backup per MoE layer")

    @classmethod
    def local(cls, num_layers: int, version: int = 0) -> Route:
        return cls(version, (None,) * num_layers, (None,) * num_layers)

    def path(self, avoid: set[str] | frozenset[str] = frozenset()) -> tuple[str | None, ...]:
        """Per MoE layer, who runs it now: the executor, else (it is avoided) its backup, else here."""
        out = []
        for ex, bk in zip(self.executors, self.backups, strict=True):
            if ex is not None and ex in avoid:
                ex = bk if bk is not None and bk not in avoid else None
            out.append(ex)
        return tuple(out)


class BlockCalls(Protocol):
    """The hand-off transport (runtime/blocks.BlockClient)."""

    def run(self, server: str, first: int, last: int, rows: list[str], starts: list[int], counts: list[int],
            hidden: torch.Tensor, release: list[str]) -> torch.Tensor: ...

    def release(self, server: str, rows: list[str]) -> None: ...


class PeerHealth(Protocol):
    """Who is down (runtime/dispatch.ClusterDispatcher: suspected after a failed call, or declared down)."""

    def is_down(self, name: str) -> bool: ...

    def suspect(self, name: str) -> None: ...


class PlanRunner(SlotRunner):
    def __init__(self, model: Any, max_running: int, max_len: int, max_batch_tokens: int = 512, *,
                 gate: LayerGate, client: BlockCalls, route: Route, health: PeerHealth | None = None,
                 max_resumes: int = 3) -> None:
        super().__init__(model, max_running, max_len, max_batch_tokens)
        if len(route.executors) != max(gate.moe_of) + 1:
            raise ValueError(f"the route has {len(route.executors)} MoE layers, the model {max(gate.moe_of) + 1}")
        self.gate, self.client, self.health, self.max_resumes = gate, client, health, max_resumes
        self._route = route  # written by `set_route` (any thread), read by the loop at each step
        self._seen = route
        self._avoid: set[str] = set()  # without `health`: servers whose hand-offs failed under the current route
        self._path = route.path()  # per MoE layer, who runs it for forwards from now on
        self._holders: dict[str, set[str]] = {}  # server -> request ids with a block cache there
        self._releases: dict[str, set[str]] = {}  # server -> ended request ids to tell it about
        self.resumed = 0  # requests rebuilt (a route change or a failed hand-off)
        self.handoffs = 0  # block calls made

    # --- control (any thread) ------------------------------------------------------------------------------
    def set_route(self, route: Route) -> None:
        """Execute `route` from the next step on (running requests are rebuilt on it when their path changes)."""
        if len(route.executors) != len(self._route.executors):
            raise ValueError(f"the route has {len(route.executors)} MoE layers, this model {len(self._route.executors)}")
        self._route = route

    def info(self) -> dict[str, Any]:
        path = self._path
        return {"version": self._route.version, "path": _blocks(path), "avoid": sorted(self._down()),
                "handoffs": self.handoffs, "resumed": self.resumed,
                "remote_caches": {s: len(r) for s, r in self._holders.items() if r}}

    # --- the loop ------------------------------------------------------------------------------------------
    def _step(self) -> None:
        self._sync_route()
        super()._step()
        self._flush_releases()

    def _sync_route(self) -> None:
        route = self._route
        if route is not self._seen:
            self._seen, self._avoid = route, set()
        self._path = route.path(self._down())
        stale = [s for s in self._active if s.route != self._path]
        if stale:
            log.info("route v%d: rebuilding %d running requests on %s", route.version, len(stale), _blocks(self._path))
            self._requeue(stale)
            self._compact([s for s in self._active if s.route == self._path])

    def _requeue(self, seqs: list[_Seq]) -> None:
        """Back to the front of the waiting list: resumed (cache rebuilt, tokens kept) on the current path."""
        self._forget(seqs)
        for s in seqs:
            s.slot = -1
        self._waiting = seqs + self._waiting
        self.resumed += sum(1 for s in seqs if s.out)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        path = self._path
        for s in self._batch:
            s.route = path
        if all(server is None for server in path):
            return super()._forward(ids, positions, keys)
        rows = [s.req.id for s in self._batch]
        starts, counts = list(self._starts), list(self._counts)

        def handoff(server: str, first: int, last: int, hidden: torch.Tensor) -> torch.Tensor:
            release = sorted(self._releases.pop(server, ()))
            self._holders.setdefault(server, set()).update(rows)
            self.handoffs += 1
            try:
                return self.client.run(server, first, last, rows, starts, counts, hidden, release)
            except BaseException:
                self._releases.setdefault(server, set()).update(release)
                raise

        with self.gate.route(path, handoff):
            return super()._forward(ids, positions, keys)

    def _on_forward_error(self, seqs: list[_Seq], error: Exception) -> None:
        if not isinstance(error, HandoffError):
            super()._on_forward_error(seqs, error)
            return
        if error.code != UNKNOWN_REQUEST:  # (that code: the peer restarted, lost caches, still serves: keep it)
            if self.health is not None:
                self.health.suspect(error.server)
            else:
                self._avoid.add(error.server)
            self._path = self._seen.path(self._down())
        log.warning("%s; rebuilding %d requests on %s", error, len(seqs), _blocks(self._path))
        again = [s for s in seqs if s.resumes < self.max_resumes]
        spent = [s for s in seqs if s.resumes >= self.max_resumes]
        for s in again:
            s.resumes += 1
        if spent:
            self._fail(spent, error)
        self._requeue(again)

    def _down(self) -> set[str]:
        """Servers of the route to avoid now."""
        if self.health is None:
            return set(self._avoid)
        named = {s for s in (*self._seen.executors, *self._seen.backups) if s is not None}
        return {s for s in named if self.health.is_down(s)}

    def _ended(self, seqs: list[_Seq]) -> None:
        self._forget(seqs)

    def _forget(self, seqs: list[_Seq]) -> None:
        """Their block caches on peers are no longer needed: queue releases."""
        ids = {s.req.id for s in seqs}
        for server, held in self._holders.items():
            gone = held & ids
            if gone:
                held -= gone
                self._releases.setdefault(server, set()).update(gone)

    def _flush_releases(self) -> None:
        """Send the releases no hand-off will carry soon (the server is off the path, or nothing runs)."""
        down = self._down()
        for server in list(self._releases):
            if server in down:  # unreachable: its caches expire there
                del self._releases[server]
            elif server not in self._path or not self._active:
                self.client.release(server, sorted(self._releases.pop(server)))


def _blocks(path: Sequence[str | None]) -> list[list[Any]]:
    """[[first MoE layer, last, server or "here"], ...]."""
    out: list[list[Any]] = []
    for m, server in enumerate(path):
        name = server or "here"
        if out and out[-1][2] == name:
            out[-1][1] = m
        else:
            out.append([m, m, name])
    return out
