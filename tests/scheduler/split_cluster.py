"""The 3-process cluster the live migration and live plan tests run on, with a coordinator.

Tiny Mixtral (2 MoE layers x 8 experts, top-2), 8 expert slots per server. P0 gives server i the experts e with
e % 3 == i. P1 replicates edge-c's experts (2, 5) on edge-a and moves expert 6 from edge-a to edge-b: edge-a has
2 free slots for 4 new experts, so it must drop expert 6 early, after edge-b has it. The cluster starts on P0
with `--timeout 2`; `refs` holds each prompt's single-process transformers greedy tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import GIB, ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.placement.placement import Placement
from prism_moe.runtime.launcher import start_local_cluster
from prism_moe.scheduler.coordinator import Coordinator, CoordinatorConfig

NAMES = ["edge-a", "edge-b", "edge-c"]
PROMPTS = ["The edge server", "Experts live on several machines and", "Hello, how are you"]


def hosts(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """(P0, P1) hosts [3, L, E]."""
    p0 = np.zeros((3, spec.num_moe_layers, spec.num_experts), dtype=bool)
    for e in range(spec.num_experts):
        p0[e % 3, :, e] = True
    p1 = p0.copy()
    p1[0, :, [2, 5]] = True
    p1[0, :, 6] = False
    p1[1, :, 6] = True
    return p0, p1


def greedy_refs(ckpt: Path, prompts: list[str], max_new_tokens: int) -> dict[str, tuple[list[int], list[int]]]:
    """{prompt: (prompt ids, single-process transformers' greedy tokens)}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    refs = {}
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        refs[prompt] = (ids[0].tolist(), out[0, ids.shape[1]:].tolist())
    return refs


def stats(url: str) -> dict:
    return httpx.get(f"{url}/prism/stats", timeout=10).json()


def restart(lc: Any, name: str, args: list[str]) -> None:
    """Start server `name` of the local cluster again (after it was killed), with the arguments it started with."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "prism_moe.cli", "serve", "--cluster", str(lc.run_dir / "cluster.yaml"),
           "--server", name, *args]
    with open(lc.run_dir / f"{name}.restart.log", "w") as logf:
        lc.procs[name] = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)


@contextmanager
def split_cluster(tmp: Path, max_new_tokens: int) -> Iterator[tuple]:
    """(local cluster, started coordinator, refs {prompt: (prompt ids, greedy tokens)}, spec, serve args)."""
    ckpt = make_tiny_model("mixtral", tmp / "ckpt", seed=1)
    spec = ModelSpec.from_pretrained(ckpt)
    p0, _ = hosts(spec)
    placement = Placement.from_hosts(NAMES, p0, np.ones((3, 3)), algorithm="split-by-id")
    placement.save(tmp / "p0.json")
    memory_gib = (spec.dense_bytes + 8.5 * spec.expert_bytes) / GIB  # 8 expert slots
    cluster = cluster_from_dict({"model": str(ckpt), "device": "cpu",
                                 "servers": [{"name": n, "memory_gib": memory_gib} for n in NAMES]})
    refs = greedy_refs(ckpt, PROMPTS, max_new_tokens)
    args = ["--placement", str(tmp / "p0.json"), "--timeout", "2"]
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # three servers on a small box: no busy-waiting thread pools
    try:
        lc = start_local_cluster(cluster, tmp / "run", args, health_timeout=120, log=lambda *_: None)
    finally:
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    config = CoordinatorConfig(period=1e9, poll_interval=0.3, down_after=1.0, transfer="peer",
                               replan_on_shift=False)
    coord = Coordinator(lc.cluster, config, placement=placement, model=spec)
    coord.start()
    try:
        yield lc, coord, refs, spec, args
    finally:
        coord.stop()
        lc.stop()
