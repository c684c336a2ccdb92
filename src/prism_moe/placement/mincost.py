"""Exact solver of the remote-invocation objective as a min-cost flow, without an LP solver.

    maximise   sum_{s,j} value[s, j] x[s, j]          (value = demand; local invocations)
    subject to sum_j x[s, j] <= capacity[s]           (memory of server s)
               sum_s x[s, j] >= 1                     (every expert j held somewhere)
               x in {0, 1}

As a flow: servers send `capacity` units to experts (arc s -> j: cost -value[s, j], capacity 1); every
expert keeps one unit (its lower bound) and passes extra copies to a sink T. Without the cover
constraint the optimum is trivial: each server holds its `capacity` highest-value experts. That
"greedy" flow is optimal for what it covers; every expert it leaves uncovered is a unit of deficit,
and T holds the same number of units of excess (extra copies). Successive shortest paths move one unit
per uncovered expert from T to it; each step keeps the flow optimal for its coverage (the classic
invariant: no negative residual cycle), so the last step ends at the optimum of the problem above.

Every residual path alternates servers and experts, so the search runs on a graph of S + 1 nodes:
  T -> b       b drops one of its experts that has another copy        cost value[b, k]   (cheapest k)
  b -> c       b takes an expert j from c (c then has a free slot)     cost value[c, j] - value[b, j]
  b -> (j)     b takes the uncovered expert j                          cost -value[b, j]
Each arc's cheapest expert is kept in a lazily sorted set (sorted chunks of the start plus a heap of
later additions, merged when the arc is next read); Bellman-Ford over S + 1 nodes finds the path,
and is skipped when the previous shortest-path tree still gives a path of the known minimal length.

Values are first put in integer units (`common.integer_value`: 2^-36 of the largest), so every path
length is computed exactly: no rounding can make a zero-cost cycle look negative.

Cost: O(S N log N) to start, then per uncovered expert O(S^2) for the path plus O(S log N) per expert
moved. The LP in `optimal.py` solves the same problem with HiGHS; tests check they agree.
"""

from __future__ import annotations

from heapq import heappop, heappush

import numpy as np

from prism_moe.placement.common import greedy_top, integer_value

CHUNK = 32  # initial candidates of an arc sorted at a time


def max_local_value(value: np.ndarray, capacity: np.ndarray, prefer: np.ndarray | None = None) -> np.ndarray:
    """Hosts maximising the held value with every expert held at least once.

    Exact for the value in integer units (`common.integer_value`: 2^-36 of the largest value), where
    the arithmetic is exact; `prefer` (bool [S, N]) wins near-ties (see `common.KEEP_UNITS`). value: float [S, N] >= 0; capacity:
    int [S] with sum >= N. Returns bool [S, N]; every server holds exactly min(capacity, N) experts.
    """
    value = np.asarray(value, dtype=np.float64)
    s_n, n = value.shape
    cap = np.minimum(np.asarray(capacity, dtype=np.int64), n)
    if (value < 0).any() or not np.isfinite(value).all():
        raise ValueError("values must be finite and non-negative")
    if int(cap.sum()) < n:
        raise ValueError(f"{int(cap.sum())} slots cannot hold one copy of each of {n} experts")
    value = integer_value(value, prefer)
    held = greedy_top(value, cap)
    missing = np.flatnonzero(~held.any(axis=0))
    if missing.size == 0:
        return held
    return _Repair(value, held).run(missing)


class _Repair:
    """Successive shortest paths from the greedy hosts; node 0 is T, node s + 1 is server s."""

    def __init__(self, value: np.ndarray, held: np.ndarray) -> None:
        s_n, n = value.shape
        self.s_n = s_n
        self.vcol = value.T.tolist()  # vcol[j][s]: value of expert j at server s
        self.h = [bytearray(row.tobytes()) for row in held.astype(np.uint8)]
        copies = held.sum(axis=0)
        self.cp = copies.tolist()
        nodes = s_n + 1
        inf = float("inf")
        self.W = [[inf] * nodes for _ in range(nodes)]  # cheapest arc cost
        self.Wi = [[-1] * nodes for _ in range(nodes)]  # the expert that gives it
        self.dirty: set[tuple[int, int]] = set()
        # experts each server gained during the search, and how many of them each arc into it has
        # seen: "x takes j from s" candidates enter x's heap only when that arc is next read
        self.gained: list[list[int]] = [[] for _ in range(s_n)]
        self.merged = [[0] * nodes for _ in range(nodes)]
        # lazily sorted candidates per arc: [chunk (descending list), rest keys, rest items, heap]
        self.arcs: list[list[list | None]] = [[None] * nodes for _ in range(nodes)]
        dup = held & (copies >= 2)[None, :]
        for s in range(s_n):
            items = np.flatnonzero(dup[s])
            self.arcs[0][s + 1] = [[], value[s, items], items, []]
        for b in range(s_n):
            diff = value - value[b]  # [S, N]: value[c, j] - value[b, j]
            for c in range(s_n):
                if c != b:
                    items = np.flatnonzero(held[c] & ~held[b])
                    self.arcs[b + 1][c + 1] = [[], diff[c, items], items, []]
        for p in range(nodes):
            for q in range(1, nodes):
                if p != q:
                    self.W[p][q], self.Wi[p][q] = self._peek(p, q)

    # ---- lazily sorted arc candidates ---------------------------------------------------------------

    def _valid(self, p: int, q: int, j: int) -> bool:
        if p == 0:  # q - 1 drops j: it must hold j and j must have another copy
            return bool(self.h[q - 1][j]) and self.cp[j] >= 2
        return bool(self.h[q - 1][j]) and not self.h[p - 1][j]  # p - 1 takes j from q - 1

    def _refill(self, arc: list) -> bool:
        keys, items = arc[1], arc[2]
        if keys.size == 0:
            return False
        if keys.size > CHUNK:
            cut = np.partition(keys, CHUNK - 1)[CHUNK - 1]
            take = keys <= cut
        else:
            take = np.ones(keys.size, dtype=bool)
        k, i = keys[take], items[take]
        order = np.lexsort((i, k))[::-1]  # descending: the smallest is popped from the end
        arc[0] = list(zip(k[order].tolist(), i[order].tolist(), strict=True))
        arc[1], arc[2] = keys[~take], items[~take]
        return True

    def _peek(self, p: int, q: int) -> tuple[float, int]:
        arc = self.arcs[p][q]
        chunk, heap = arc[0], arc[3]
        if p:
            self._merge_gained(p, q, heap)
        valid = self._valid
        while True:
            while chunk and not valid(p, q, chunk[-1][1]):
                chunk.pop()
            if chunk or not self._refill(arc):
                break
            chunk = arc[0]
        while heap and not valid(p, q, heap[0][1]):
            heappop(heap)
        best = chunk[-1] if chunk else (float("inf"), -1)
        if heap and heap[0] < best:
            best = heap[0]
        return best

    def _merge_gained(self, p: int, q: int, heap: list) -> None:
        gained, start = self.gained[q - 1], self.merged[p][q]
        if start == len(gained):
            return
        hp, hq, vcol = self.h[p - 1], self.h[q - 1], self.vcol
        for j in gained[start:]:
            if hq[j] and not hp[j]:  # invalid now: if it turns valid again, _gain or _lose re-offers it
                heappush(heap, (vcol[j][q - 1] - vcol[j][p - 1], j))
        self.merged[p][q] = len(gained)

    def _offer(self, p: int, q: int, key: float, j: int) -> None:
        heappush(self.arcs[p][q][3], (key, j))
        if key < self.W[p][q]:
            self.W[p][q], self.Wi[p][q] = key, j

    # ---- state changes --------------------------------------------------------------------------------

    def _gain(self, s: int, j: int) -> None:
        h, vj, w, wi, s1 = self.h, self.vcol[j], self.W, self.Wi, s + 1
        h[s][j] = 1
        self.gained[s].append(j)
        vs = vj[s]
        for x in range(self.s_n):
            if x == s:
                continue
            x1 = x + 1
            if not h[x][j]:  # x could take j from s: only the cached minimum now, the heap later
                key = vs - vj[x]
                if key < w[x1][s1]:
                    w[x1][s1], wi[x1][s1] = key, j
            if wi[s1][x1] == j:
                self.dirty.add((s1, x1))
        if self.cp[j] >= 2:
            self._offer(0, s1, vs, j)

    def _lose(self, s: int, j: int) -> None:
        h, vj, wi, s1 = self.h, self.vcol[j], self.Wi, s + 1
        h[s][j] = 0
        for x in range(self.s_n):
            if x == s:
                continue
            if h[x][j]:
                self._offer(s1, x + 1, vj[x] - vj[s], j)  # s could take j back from x
            if wi[x + 1][s1] == j:
                self.dirty.add((x + 1, s1))
        if wi[0][s1] == j:
            self.dirty.add((0, s1))

    def _drop_copy(self, s: int, k: int) -> None:
        self._lose(s, k)
        self.cp[k] -= 1
        if self.cp[k] == 1:  # the last holder's copy is no longer a duplicate
            for x in range(self.s_n):
                if self.h[x][k] and self.Wi[0][x + 1] == k:
                    self.dirty.add((0, x + 1))

    # ---- shortest paths -------------------------------------------------------------------------------

    def _distances(self) -> tuple[list[float], list[int]]:
        """Shortest distances from T and the tree's predecessors, by Bellman-Ford (arc costs may be < 0)."""
        w = np.array(self.W)
        nodes = w.shape[0]
        dist = w[0].copy()
        dist[0] = 0.0
        pred = np.zeros(nodes, dtype=np.int64)
        cols = np.arange(nodes)
        for _ in range(nodes):
            via = dist[:, None] + w
            p = via.argmin(axis=0)
            best = via[p, cols]
            better = best < dist  # exact: integer costs, so no cycle of zero cost looks negative
            if not better.any():
                break
            dist = np.where(better, best, dist)
            pred = np.where(better, p, pred)
        return dist.tolist(), pred.tolist()

    def _path(self, pred: list[int], node: int) -> list[int]:
        path = [node]
        while node != 0:
            node = pred[node]
            path.append(node)
            if len(path) > self.s_n + 1:
                raise RuntimeError("shortest-path tree has a cycle (numerical trouble)")
        return path[::-1]

    def _tight(self, path: list[int], dist: list[float]) -> bool:
        w = self.W
        return all(w[p][q] <= dist[q] - dist[p] for p, q in zip(path, path[1:], strict=False))

    def _best_taker(self, j: int, dist: list[float]) -> int:
        vj = self.vcol[j]
        return min(range(self.s_n), key=lambda b: dist[b + 1] - vj[b])

    def run(self, missing: np.ndarray) -> np.ndarray:
        dist, pred = self._distances()
        for j in missing.tolist():
            b = self._best_taker(j, dist)
            path = self._path(pred, b + 1)
            if dist[b + 1] == float("inf") or not self._tight(path, dist):
                dist, pred = self._distances()
                b = self._best_taker(j, dist)
                path = self._path(pred, b + 1)
            if dist[b + 1] == float("inf"):
                raise RuntimeError(f"expert {j} cannot be covered (no free or duplicate slot reachable)")
            for p, q in zip(path, path[1:], strict=False):
                item = self.Wi[p][q]
                if p == 0:
                    self._drop_copy(q - 1, item)
                else:  # p - 1 takes item from q - 1
                    self._lose(q - 1, item)
                    self._gain(p - 1, item)
            self.cp[j] = 1
            self._gain(b, j)
            for p, q in self.dirty:
                self.W[p][q], self.Wi[p][q] = self._peek(p, q)
            self.dirty.clear()
        return np.array([np.frombuffer(bytes(row), dtype=np.uint8) for row in self.h], dtype=bool)
