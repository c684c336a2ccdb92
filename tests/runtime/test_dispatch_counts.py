"""The dispatcher counts its own tokens' expert activations on the device, split by where they ran."""

import numpy as np
import torch

from prism_moe.model.slots import ExpertSlots, Gate, SlotPool
from prism_moe.placement.placement import Placement
from prism_moe.runtime.dispatch import ActivationCounter, ClusterDispatcher
from prism_moe.runtime.metrics import ServerMetrics


def _store(layer: int, held: list[int], hidden: int = 4, inter: int = 2) -> ExpertSlots:
    g = torch.Generator().manual_seed(layer)
    store = ExpertSlots(layer, 4, SlotPool(len(held), hidden, inter), Gate.activation("silu"))
    for e in held:
        store.add(e, torch.randn(2 * inter, hidden, generator=g), torch.randn(hidden, inter, generator=g))
    return store


def test_forward_counts_activations_local_and_remote_skipping_padding():
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, :, :2] = True  # "a" holds experts 0, 1 of both layers
    hosts[1] = True
    placement = Placement.from_hosts(["a", "b"], hosts, np.array([[0.0, 1.0], [1.0, 0.0]]))
    metrics = ServerMetrics("a")
    d = ClusterDispatcher("a", placement, None, metrics, path="loop")
    here = {layer: _store(layer, [0, 1]) for layer in (0, 1)}
    d.remote = lambda layer, batches: {s: torch.zeros(x.shape) for s, (_, x) in batches.items()}  # peer "b"
    hidden = torch.randn(3, 4)
    d.moe_forward(1, hidden, torch.tensor([[0, 3], [1, -1], [3, 2]]), torch.ones(3, 2), here[1])  # -1: padding
    d.moe_forward(0, hidden[:1], torch.tensor([[1, 1]]), torch.ones(1, 2), here[0])
    want = np.zeros((2, 4), dtype=np.int64)
    want[1] = [1, 1, 1, 2]
    want[0, 1] = 2
    assert (d.counter.snapshot() == want).all()
    assert (d.local_invocations, d.remote_invocations) == (4, 3)
    split = d.counter.split()
    assert split[1, :, 1].tolist() == [0, 0, 1, 2] and split[0, 1].tolist() == [2, 0]
    text = metrics.render().decode()  # the device counts reach Prometheus when metrics are read
    assert 'prism_expert_invocations_total{kind="remote",layer="1"} 3.0' in text
    assert 'prism_expert_invocations_total{kind="local",layer="0"} 2.0' in text
    metrics.render()
    assert 'prism_expert_invocations_total{kind="local",layer="0"} 2.0' in metrics.render().decode()  # not twice


def test_activation_counter_add_and_reset():
    c = ActivationCounter(1, 3)
    c.add(0, torch.tensor([[2, 0], [2, -1]]))
    assert c.snapshot(reset=True).tolist() == [[1, 0, 2]]
    assert c.snapshot().tolist() == [[0, 0, 0]]
    c.add_codes(0, torch.tensor([2 * 1 + 1, 2 * 2, 2 * 3]))  # 1 remote, 2 local, padding
    assert c.split().tolist() == [[[0, 0], [0, 1], [1, 0]]]


def test_a_forward_that_read_its_slots_before_a_switch_never_calls_itself():
    """A migration switch maps an expert here and routes it here at once; a forward that took its slot view
    before that still sees the expert as remote. It must go to the copy the expert moves from, or, with no
    other copy, be computed here (it used to be sent to a peer named like this server: "unknown peer")."""
    link = np.array([[0.0, 1.0], [1.0, 0.0]])
    before = np.zeros((2, 1, 4), dtype=bool)
    before[0, 0, 0] = before[1, 0, :] = True  # "a" holds expert 0; "b" holds all
    after = before.copy()
    after[0, 0, 1] = True  # expert 1 moved to "a" as well
    d = ClusterDispatcher("a", Placement.from_hosts(["a", "b"], before, link), None, path="loop",
                          stores={0: _store(0, [0, 1])})
    d.set_placement(Placement.from_hosts(["a", "b"], after, link, version=1))
    assert d.placement.route[0, 0, 1] == 0  # the new placement routes expert 1 to "a" itself
    assert d.locate(0, 1) == "b"  # the copy it moves from still serves it
    only_here = np.zeros((2, 1, 4), dtype=bool)
    only_here[0, 0, :2] = True
    only_here[1, 0, 2:] = True
    d.set_placement(Placement.from_hosts(["a", "b"], only_here, link, version=2))
    assert d.locate(0, 1) == "a"  # no other copy left: computed here, never sent (there is no pool at all)
    ids, x = torch.tensor([1, 1]), torch.randn(2, 4)
    out = d.remote(0, {"a": (ids, x)})["a"]
    gate_up, down, _, _ = d.stores[0].get(1)  # expert 1 by hand: down(silu(gate) * up)
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    assert torch.allclose(out, (torch.nn.functional.silu(g) * u) @ down.T, atol=1e-6)
