"""The dispatcher counts its own tokens' expert activations, and how many went local or remote."""

import numpy as np
import torch

from prism_moe.placement.placement import Placement
from prism_moe.runtime.dispatch import ActivationCounter, ClusterDispatcher


def test_observe_counts_activations_and_local_remote_pairs_skipping_padding():
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, :, :2] = True  # "a" holds experts 0, 1 of both layers
    hosts[1] = True
    placement = Placement.from_hosts(["a", "b"], hosts, np.array([[0.0, 1.0], [1.0, 0.0]]))
    d = ClusterDispatcher("a", placement, None)
    d._observe(1, torch.tensor([[0, 3], [1, -1], [3, 2]]))  # -1: padding, not an activation
    d._observe(0, torch.tensor([[1, 1]]))
    want = np.zeros((2, 4), dtype=np.int64)
    want[1] = [1, 1, 1, 2]
    want[0, 1] = 2
    assert (d.counter.snapshot() == want).all()
    assert (d.local_invocations, d.remote_invocations) == (4, 3)


def test_activation_counter_add_and_reset():
    c = ActivationCounter(1, 3)
    c.add(0, torch.tensor([[2, 0], [2, -1]]))
    assert c.snapshot(reset=True).tolist() == [[1, 0, 2]]
    assert c.snapshot().tolist() == [[0, 0, 0]]
