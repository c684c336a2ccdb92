"""A real 3-process cluster per MoE family gives the tokens of single-process transformers, or refuses it.

The placement gives server i only the experts e with e % 3 == i, so every MoE layer of every step needs
remote calls. Then the same cluster executes plans (issue 14): a pure pipeline (each server runs a block of
layers with all of its experts; the others hand their hidden states to it), and a hybrid (homes differ: blocks
on peers, layers at home, remote experts) switched to live while a request streams. Reference: plain
transformers `generate` (eager experts) in this process. A family the expert store cannot compute must fail at
start-up with a message that names it and what is missing (`REFUSED`).
One short prompt per family keeps the test affordable on CI's two cores; the remaining tiny families (`ARCHS`)
run the same placement in one process (tests/model/test_loading.py), without the network in between.
"""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest
import torch

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.placement.placement import Placement
from prism_moe.placement.plan import ExecutionPlan
from prism_moe.runtime.launcher import LaunchError, start_local_cluster

pytestmark = pytest.mark.slow

# the families issue 12 names, plus Sarvam-MoE (dense tensors that need transformers' converters)
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "ernie4_5_moe",
            "glm4_moe", "sarvam_moe")
PROMPT = "The edge server"
NAMES = ["edge-a", "edge-b", "edge-c"]
# family -> what the start-up refusal must say (none now: the slot store computes GPT-OSS's biased,
# clamped-SwiGLU, interleaved experts, so gpt_oss runs the token test like the others)
REFUSED: dict[str, str] = {}


def _split_placement(spec: ModelSpec) -> Placement:
    hosts = np.zeros((3, spec.num_moe_layers, spec.num_experts), dtype=bool)
    for e in range(spec.num_experts):
        hosts[e % 3, :, e] = True
    return Placement.from_hosts(NAMES, hosts, np.ones((3, 3)), algorithm="split-by-id")


def _pipeline_plan(spec: ModelSpec, split: Placement) -> ExecutionPlan:
    """Layer blocks in server order, the same for every home; each executor holds its block's experts."""
    layers, experts = spec.num_moe_layers, spec.num_experts
    owner = np.array([min(2, l * 3 // layers) for l in range(layers)])
    hosts = np.zeros((3, layers, experts), dtype=bool)
    hosts[owner, np.arange(layers)] = True
    placement = Placement.from_hosts(NAMES, hosts | split.hosts, np.ones((3, 3)), algorithm="blocks", version=1)
    return ExecutionPlan(placement, np.repeat(owner[None], 3, axis=0), np.ones((3, layers), bool), "pipeline")


def _hybrid_plan(spec: ModelSpec, split: Placement) -> ExecutionPlan:
    """Homes differ: edge-a runs its last layer on edge-c, edge-b its first on edge-a, edge-c everything at home;
    experts stay split by id (remote expert calls in every layer)."""
    layers = spec.num_moe_layers
    ex = np.repeat(np.arange(3)[:, None], layers, axis=1)
    ex[0, -1], ex[1, 0] = 2, 0
    placement = Placement(split.server_names, split.hosts, split.route, algorithm="split-by-id", version=2)
    return ExecutionPlan(placement, ex, np.ones((3, layers), bool), "hybrid")


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def _remote_calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'prism_expert_invocations_total{kind="remote",layer="\d+"} ([0-9.e+]+)',
                                            text))


def _complete(url: str, model: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _plans_phase(lc, spec: ModelSpec, split: Placement, model: str, prompt_ids: list[int], want: list[int],
                 long_want: list[int]) -> None:
    urls = lc.endpoints()
    pipeline, hybrid = _pipeline_plan(spec, split), _hybrid_plan(spec, split)
    # copy before switch: each executor loads the experts of its block, then every server switches
    for i, url in enumerate(urls.values()):
        missing = [[int(l), int(e)] for l, e in np.argwhere(pipeline.placement.hosts[i] & ~split.hosts[i])]
        if missing:
            _post(url, "/prism/experts/load", {"experts": missing})
    for url in urls.values():
        _post(url, "/prism/plan", {"plan": pipeline.to_dict()})
    remote_before = {n: _remote_calls(u) for n, u in urls.items()}
    for name, url in urls.items():
        assert _complete(url, model, prompt_ids, len(want)) == want, (name, "pipeline")
        plan = httpx.get(f"{url}/prism/stats", timeout=10).json()["plan"]
        assert plan["runner"]["handoffs"] > 0, (name, plan)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        handoffs = re.findall(r'prism_handoff_latency_seconds_count{peer="[^"]+"} ([0-9.e+]+)', metrics)
        assert sum(float(n) for n in handoffs) == plan["runner"]["handoffs"], (name, handoffs)
    assert {n: _remote_calls(u) for n, u in urls.items()} == remote_before, "a pure pipeline made expert calls"
    # the hybrid, switched to while edge-a's request streams; then the pipeline's extra copies are dropped
    a = urls["edge-a"]
    body = {"model": model, "prompt": prompt_ids, "max_tokens": len(long_want), "temperature": 0,
            "return_token_ids": True, "stream": True}
    got: list[int] = []
    with httpx.stream("POST", f"{a}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            got += json.loads(line[6:])["choices"][0].get("token_ids") or []
            if len(got) == 2:
                for url in urls.values():
                    _post(url, "/prism/plan", {"plan": hybrid.to_dict()})
    assert got == long_want, ("switch mid-stream", got, long_want)
    assert httpx.get(f"{a}/prism/stats", timeout=10).json()["plan"]["runner"]["resumed"] >= 1
    for i, url in enumerate(urls.values()):
        extra = [[int(l), int(e)] for l, e in np.argwhere(pipeline.placement.hosts[i] & ~split.hosts[i])]
        if extra:
            _post(url, "/prism/experts/drop", {"experts": extra})
    for name, url in urls.items():
        assert _complete(url, model, prompt_ids, len(want)) == want, (name, "hybrid")
    # version fencing: other layer blocks under the version in use are refused, the same plan again is a no-op
    stale = ExecutionPlan(hybrid.placement, pipeline.executor, hybrid.dense, "stale")
    r = httpx.post(f"{a}/prism/plan", json={"plan": stale.to_dict()}, timeout=60)
    assert r.status_code == 409 and "not newer" in r.text, r.text
    _post(a, "/prism/plan", {"plan": hybrid.to_dict()})


def _reference(ckpt, prompt: str, max_tokens: int) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", FAMILIES)
def test_distributed_tokens_equal_single_process(arch, tmp_path):
    ckpt = make_tiny_model(arch, tmp_path / "ckpt", seed=1)
    spec = ModelSpec.from_pretrained(ckpt)
    placement = _split_placement(spec)
    placement_path = tmp_path / "placement.json"
    placement.save(placement_path)
    cluster = cluster_from_dict({"model": str(ckpt), "device": "cpu",
                                 "servers": [{"name": n, "memory_gib": 1} for n in NAMES]})
    max_tokens = 6
    if arch in REFUSED:
        with pytest.raises(LaunchError, match=REFUSED[arch]):
            with start_local_cluster(cluster, tmp_path / "run", ["--placement", str(placement_path)],
                                     health_timeout=180, log=lambda *_: None):
                pass
        return
    prompt_ids, long_want = _reference(ckpt, PROMPT, 80)  # long enough to still stream when the plan switches
    want = long_want[:max_tokens]
    with start_local_cluster(cluster, tmp_path / "run", ["--placement", str(placement_path)],
                             health_timeout=180, log=lambda *_: None) as lc:
        for name, url in lc.endpoints().items():
            r = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "model": ckpt.name, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            got = r.json()["choices"][0]["token_ids"]
            assert got == want, (name, got, want)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            for layer in range(spec.num_moe_layers):
                m = re.search(rf'prism_expert_invocations_total{{kind="remote",layer="{layer}"}} ([0-9.e+]+)', metrics)
                assert m and float(m.group(1)) > 0, f"{name}: no remote expert call at MoE layer {layer}"
        _plans_phase(lc, spec, placement, ckpt.name, prompt_ids, want, long_want)
