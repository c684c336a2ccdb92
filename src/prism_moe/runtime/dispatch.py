"""The edge server's experts dispatcher: local experts here, the rest on the peer the placement names.

`ClusterDispatcher` is the model layer's `RemoteDispatcher` wired to this cluster: `locate` reads the
routing table of the current `Placement` (swapped atomically by `set_placement`, so a step sees one
version), `remote` hands each target server's batch to the ZeroMQ peer pool without blocking, and the
observer counts every routing decision (local vs remote per layer) for metrics and for the scheduler.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from concurrent.futures import Future

import numpy as np
import torch
from torch import Tensor

from prism_moe.model.experts import RemoteDispatcher
from prism_moe.placement.placement import Placement
from prism_moe.runtime.metrics import ServerMetrics
from prism_moe.runtime.transport import SyncPeerPool


class ActivationCounter:
    """Expert activation counts of this server's own tokens: int [layers, experts], thread-safe."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self._counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._lock = threading.Lock()

    def add(self, layer: int, top_k_index: Tensor) -> None:
        ids = top_k_index.reshape(-1)
        ids = ids[ids >= 0].cpu().numpy()
        with self._lock:
            np.add.at(self._counts[layer], ids, 1)

    def snapshot(self, reset: bool = False) -> np.ndarray:
        with self._lock:
            out = self._counts.copy()
            if reset:
                self._counts[:] = 0
        return out


class ClusterDispatcher(RemoteDispatcher):
    """Route missing experts to peers by the placement's routing table; count what goes where."""

    def __init__(self, me: str, placement: Placement, pool: SyncPeerPool | None,
                 metrics: ServerMetrics | None = None, timeout: float | None = 30.0) -> None:
        super().__init__(timeout=timeout, observer=self._observe)
        self.me = me
        self.pool = pool
        self.metrics = metrics
        self._placement = placement
        self._me = placement.server_names.index(me)
        self.counter = ActivationCounter(placement.num_layers, placement.num_experts)

    @property
    def placement(self) -> Placement:
        return self._placement

    def set_placement(self, placement: Placement) -> None:
        """Switch the routing table (one attribute store: a forward step reads one version per layer)."""
        if placement.server_names != self._placement.server_names:
            raise ValueError("a new placement must name the same servers in the same order")
        self._placement = placement

    def locate(self, layer: int, expert_id: int) -> Hashable:
        p = self._placement
        return p.server_names[int(p.route[self._me, layer, expert_id])]

    def remote(self, layer: int, batches: dict[Hashable, tuple[Tensor, Tensor]]
               ) -> Mapping[Hashable, Future[Tensor] | Tensor]:
        if self.pool is None:
            raise RuntimeError(f"server {self.me} has no peers but layer {layer} needs experts it does not hold")
        # The wire carries CPU tensors; the reply is moved back to the model's device in `combine`.
        return {server: self.pool.submit(str(server), layer, ids.cpu(), x.detach().cpu())
                for server, (ids, x) in batches.items()}

    def _observe(self, layer: int, top_k_index: Tensor) -> None:
        self.counter.add(layer, top_k_index)
        if self.metrics is not None:
            ids = top_k_index.reshape(-1)
            ids = ids[ids >= 0]
            local = int(torch.as_tensor(self._placement.hosts[self._me, layer])[ids.cpu()].sum())
            self.metrics.count_experts(layer, local, int(ids.numel()) - local)
