"""A real 3-process cluster per MoE family gives the tokens of single-process transformers, or refuses it.

The placement gives server i only the experts e with e % 3 == i, so every MoE layer of every step needs
remote calls. Reference: plain transformers `generate` (eager experts) in this process. A family the expert
store cannot compute must fail at start-up with a message that names it and what is missing (`REFUSED`).
One short prompt per family keeps the test affordable on CI's two cores; the remaining tiny families (`ARCHS`)
run the same placement in one process (tests/model/test_loading.py), without the network in between.
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest
import torch

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.placement.placement import Placement
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
    prompt_ids, want = _reference(ckpt, PROMPT, max_tokens)
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
