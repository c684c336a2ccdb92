"""The order of a live migration: loads, placement switches and drops that never exceed a server's slots.

Protocol (mechanism in `executor.py`): copy before switch, switch before drop.
  1. receivers load their new experts (from a live holder, or their own checkpoint when none is live);
  2. every live server switches to the next placement version, which routes only to loaded copies, and
     waits for calls made under the old version to finish;
  3. only then are the copies that version no longer uses dropped.
A server whose slots are full cannot load before it drops. It may drop early only copies whose expert has
another live copy at that moment; such a drop needs its own intermediate switch first (so nobody is routed
to the copy it drops), hence rounds. Moves that no order can make within the slots (e.g. two full servers
swapping their only copies) are skipped: the plan reaches a valid placement as close to the target as
possible and says how many moves it skipped.

Shapes: S servers, L MoE layers, E experts; hosts bool [S, L, E]; capacity int [S]; live bool [S].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Load:
    server: int
    layer: int
    expert: int
    source: int | None  # a live server that holds it when the round starts; None: the receiver's checkpoint


@dataclass(frozen=True)
class Round:
    loads: tuple[Load, ...] = ()
    switch: np.ndarray | None = None  # hosts bool [S, L, E] of the placement every live server switches to
    drops: tuple[tuple[int, int, int], ...] = ()  # (server, layer, expert), after the switch

    @property
    def early(self) -> bool:
        """Drops made before the target is reached (to free slots)."""
        return bool(self.drops) and self.switch is not None


@dataclass(frozen=True)
class MigrationPlan:
    rounds: tuple[Round, ...]
    reached: np.ndarray  # hosts bool [S, L, E] serving at the end (the target unless moves were skipped)
    skipped: int = 0  # target copies no order could load within the slots
    notes: list[str] = field(default_factory=list)

    @property
    def loads(self) -> list[Load]:
        return [x for r in self.rounds for x in r.loads]

    @property
    def num_drops(self) -> int:
        return sum(len(r.drops) for r in self.rounds)


def _best_source(holders: np.ndarray, receiver: int, bandwidth: np.ndarray | None) -> int | None:
    cands = np.flatnonzero(holders)
    if len(cands) == 0:
        return None
    if bandwidth is None:
        return int(cands[0])
    return int(cands[np.argmax(np.asarray(bandwidth)[cands, receiver])])


def plan_migration(old: np.ndarray, new: np.ndarray, capacity: np.ndarray, live: np.ndarray | None = None,
                   bandwidth: np.ndarray | None = None, priority: np.ndarray | None = None) -> MigrationPlan:
    """Rounds taking the live servers from `old` hosts to `new` hosts within `capacity` slots.

    Down servers (live False) are neither sources nor receivers; their rows are ignored. `bandwidth`
    bits/s [S, S] picks the fastest live source; `priority` float [S, L, E] (e.g. demand) orders loads
    (highest first, so the most useful experts arrive first) and early drops (lowest first).
    Every switch keeps each expert that has a live copy covered; an expert with no live copy at all (a
    repair) is covered from the round that loads it.
    """
    old, new = np.asarray(old, bool), np.asarray(new, bool)
    s_n = old.shape[0]
    live = np.ones(s_n, dtype=bool) if live is None else np.asarray(live, bool)
    cap = np.asarray(capacity, np.int64)
    prio = np.zeros(old.shape) if priority is None else np.asarray(priority, float)
    lv = live[:, None, None]
    held = old & lv
    target = new & lv
    adds = target & ~held
    removes = held & ~target
    rounds: list[Round] = []
    notes: list[str] = []
    over = np.flatnonzero(held.sum(axis=(1, 2)) > cap)
    if len(over):
        notes.append(f"servers {over.tolist()} start above their slots; they only drop until they fit")

    while adds.any():
        start = held.copy()  # sources are what is held when the round starts
        orphan = ~(start & lv).any(axis=0)  # [L, E] no live copy (repair): load these first
        loads: list[Load] = []
        for s in np.flatnonzero(live).tolist():
            free = int(cap[s] - held[s].sum())
            if free <= 0 or not adds[s].any():
                continue
            cand = np.argwhere(adds[s])
            key = np.lexsort((-prio[s][cand[:, 0], cand[:, 1]], ~orphan[cand[:, 0], cand[:, 1]]))
            cand = cand[key][:free]
            for l, e in cand.tolist():
                loads.append(Load(s, l, e, _best_source(start[:, l, e] & live, s, bandwidth)))
                held[s, l, e] = True
                adds[s, l, e] = False
        if not adds.any():
            rounds.append(Round(tuple(loads)))
            break
        # Servers still waiting are full: free slots by dropping copies that have another live copy.
        early: list[tuple[int, int, int]] = []
        for s in np.flatnonzero(adds.any(axis=(1, 2))).tolist():
            need = int(adds[s].sum()) - int(cap[s] - held[s].sum())
            cand = np.argwhere(removes[s])
            cand = cand[np.argsort(prio[s][cand[:, 0], cand[:, 1]], kind="stable")]
            for l, e in cand.tolist():
                if need <= 0:
                    break
                if (held[:, l, e] & live).sum() >= 2:
                    held[s, l, e] = False
                    removes[s, l, e] = False
                    early.append((s, l, e))
                    need -= 1
        if not early and not loads:
            notes.append(f"{int(adds.sum())} target copies cannot be loaded within the slots in any order; "
                         f"skipped")
            break
        rounds.append(Round(tuple(loads), held.copy() if early else None, tuple(early)))

    skipped = int(adds.sum())
    final = held & ~removes
    lost = ~final.any(axis=0) & held.any(axis=0)  # experts whose only copies were meant to go (skipped moves)
    final |= held & lost[None]
    drops = tuple((int(s), int(l), int(e)) for s, l, e in np.argwhere(held & ~final))
    rounds.append(Round((), final.copy(), drops))
    return MigrationPlan(tuple(rounds), final, skipped, notes)


def minimal_move_bytes(old: np.ndarray, new: np.ndarray, expert_bytes: int, live: np.ndarray | None = None) -> int:
    """Bytes of the minimal move set from `old` to `new` hosts: every expert `new` puts on a (live) server
    that `old` lacks there, loaded once (= placement/cost.py's migration_bytes). A plan's loads can only
    exceed it (temporary copies, moves through a third server)."""
    added = np.asarray(new, bool) & ~np.asarray(old, bool)
    if live is not None:
        added = added[np.asarray(live, bool)]
    return int(added.sum()) * int(expert_bytes)
