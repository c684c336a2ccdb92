"""Trace replay: the experts that run are exactly the trace's, per sequence and layer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prism_moe.model.experts import LocalDispatcher, attach
from prism_moe.model.replay import ReplayDispatcher, ReplayRouting


class Recorder(LocalDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def moe_forward(self, layer, hidden, top_k_index, top_k_weights, experts):
        self.calls.append((layer, top_k_index.clone(), top_k_weights.clone()))
        return super().moe_forward(layer, hidden, top_k_index, top_k_weights, experts)


def _trace(tokens: int, layers: int, k: int, experts: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens * layers)]).view(
        tokens, layers, k)


def test_generate_uses_exactly_the_trace(tiny_dir, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("deepseek_v2")).eval()  # 2 MoE layers, 8 experts
    new = 6
    total = prompt_ids.shape[1] + new - 1  # the last generated token is never fed back
    trace = _trace(total, 2, 2, 8)
    rec = Recorder()
    attach(model, ReplayDispatcher(rec, ReplayRouting(trace.numpy())))
    model.generate(prompt_ids, max_new_tokens=new, do_sample=False)

    for layer in (0, 1):
        used = torch.cat([idx for lay, idx, _ in rec.calls if lay == layer])
        assert torch.equal(used, trace[:, layer])
    weights = torch.cat([w for _, _, w in rec.calls])
    assert torch.all(weights == 0.5)  # no weights in the trace: uniform 1/k


def test_weights_cursors_and_layouts():
    trace = _trace(10, 2, 2, 4)
    weights = torch.rand(10, 2, 2)
    r = ReplayRouting(trace, weights)
    idx, w = r.take(0, 3)
    assert torch.equal(idx, trace[:3, 0]) and torch.equal(w, weights[:3, 0])
    assert r.cursor(0, 0) == 3 and r.cursor(0, 1) == 0  # per-layer cursors
    assert torch.equal(r.take(1, 3)[0], trace[:3, 1])

    r = ReplayRouting(trace)  # two sequences, equal split (generate with a batch of equal prompts)
    r.open("a", start=0)
    r.open("b", start=5)
    idx, _ = r.take(0, 4)
    assert torch.equal(idx, torch.cat([trace[0:2, 0], trace[5:7, 0]]))
    r.set_batch([("b", 1), ("a", 3)])  # explicit layout (a continuous-batching step)
    idx, _ = r.take(0, 4)
    assert torch.equal(idx, torch.cat([trace[7:8, 0], trace[2:5, 0]]))
    with pytest.raises(ValueError, match="covers 4 rows"):
        r.take(0, 5)
    r.set_batch([("a", 6)])
    with pytest.raises(IndexError, match="wrap=True"):
        r.take(0, 6)

    r = ReplayRouting(trace, wrap=True)
    r.take(0, 8)
    assert torch.equal(r.take(0, 4)[0], trace[[8, 9, 0, 1], 0])
    with pytest.raises(ValueError, match="weights shape"):
        ReplayRouting(trace, torch.rand(10, 2, 3))
