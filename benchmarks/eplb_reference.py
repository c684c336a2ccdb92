"""Our `eplb` placement against DeepSeek's own `rebalance_experts` on equal GPUs: the load of every GPU.

DeepSeek's reference (github.com/deepseek-ai/EPLB `eplb.py`, MIT, commit d52c72d) is not copied into this
repository: the benchmark reads it from `--eplb-py PATH` (a checkout) or downloads it from GitHub at that
commit, checks its sha256 and imports it. For S servers of one GPU each with `slots` expert slots per MoE
layer, both place the cluster-wide load of real ESFT routing (DeepSeek-V2-Lite, 26 x 64): the reference
with `rebalance_experts(weight, S * slots, num_groups=1, num_nodes=1, num_gpus=S)` (its global policy),
ours with `eplb` on a cluster whose memory is exactly `slots` experts per layer per server. The load of a
GPU is the sum over its slots of load(expert) / replicas(expert).

    python benchmarks/eplb_reference.py [--eplb-py path/to/eplb.py] [--data-dir D]

Prints JSON: per (servers, slots) the largest relative difference between the sorted per-GPU loads of
the two (0 = the same loads per GPU), the layers where they are identical, the layers where both give
every expert the same number of replicas, how often the reference puts two replicas of one expert on one
GPU (ours never does: on a server that would waste memory), and the ratio of the most loaded GPU (ours /
reference, mean over layers). Nothing passes or fails on the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from prism_moe.config import cluster_from_dict
from prism_moe.model.spec import GIB, load_model_spec
from prism_moe.placement.eplb import eplb
from prism_moe.placement.problem import ClusterStats
from prism_moe.stats.workload import load_workload

EPLB_COMMIT = "d52c72d5b2f2fb4c41afbf8eb21366820239913d"
EPLB_SHA256 = "25b37ccd83aef2369c68f2b4bb596608a4f289956d97d9a3504bfd3159459e29"
EPLB_URL = f"https://raw.githubusercontent.com/deepseek-ai/EPLB/{EPLB_COMMIT}/eplb.py"
SHAPES = [(2, 40), (4, 20), (4, 32), (8, 10), (8, 16), (16, 8)]  # (GPUs, slots per GPU and layer)
DOMAINS = ("intent", "law", "summary", "translation")


def reference_module(path: str | None):
    if path:
        src = Path(path).read_bytes()
    else:
        import httpx

        src = httpx.get(EPLB_URL, follow_redirects=True, timeout=60).raise_for_status().content
    if hashlib.sha256(src).hexdigest() != EPLB_SHA256:
        raise SystemExit(f"eplb.py sha256 differs from commit {EPLB_COMMIT[:7]}'s; give that version")
    tmp = Path(tempfile.mkdtemp()) / "deepseek_eplb.py"
    tmp.write_bytes(src)
    spec = importlib.util.spec_from_file_location("deepseek_eplb", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eplb-py", default=None, help="DeepSeek's eplb.py (default: download at the pinned commit)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    import torch

    ref = reference_module(args.eplb_py)
    model = load_model_spec("deepseek-v2-lite")
    # the load of a whole cluster: the four ESFT domains together (the embedded sample without a data folder)
    load = sum(load_workload(f"esft:{d}", args.data_dir).counts for d in DOMAINS)  # [L, E]
    layers, e = load.shape
    rows = []
    for gpus, slots in SHAPES:
        phy2log, _, logcnt = ref.rebalance_experts(torch.tensor(load), gpus * slots, 1, 1, gpus)
        per_slot = (torch.tensor(load) / logcnt).gather(1, phy2log).numpy()  # [L, P]
        ref_gpu = per_slot.reshape(layers, gpus, slots).sum(axis=2)  # [L, G]

        mem = (model.dense_bytes + slots * layers * model.expert_bytes) / GIB
        cluster = cluster_from_dict({"model": "deepseek-v2-lite", "servers": [
            {"name": f"g{i}", "memory_gib": mem * (1 + 1e-9)} for i in range(gpus)]})
        stats = ClusterStats(np.broadcast_to(load / gpus, (gpus, layers, e)).copy())
        hosts = eplb(stats, cluster, model).hosts  # [S, L, E]
        count = hosts.sum(axis=0)
        ours_gpu = (hosts * (load / np.maximum(count, 1))[None]).sum(axis=2).T  # [L, G]
        assert (hosts.sum(axis=2) == slots).all(), "the cluster was meant to hold exactly `slots` per layer"

        a, b = np.sort(ours_gpu, axis=1), np.sort(ref_gpu, axis=1)
        rel = np.abs(a - b).max(axis=1) / b.max(axis=1)
        rows.append({"gpus": gpus, "slots_per_gpu": slots, "max_rel_diff_sorted_gpu_loads": float(rel.max()),
                     "layers_identical": int((rel < 1e-9).sum()), "layers": layers,
                     "max_gpu_load_ratio_ours_over_ref": float((a.max(axis=1) / b.max(axis=1)).mean()),
                     "layers_same_replica_counts": int((count == logcnt.numpy()).all(axis=1).sum()),
                     "ref_replicas_same_gpu_twice": int(sum(
                         len(set(r[g * slots:(g + 1) * slots].tolist())) < slots
                         for r in phy2log.numpy() for g in range(gpus)))})
    json.dump({"reference": f"deepseek-ai/EPLB@{EPLB_COMMIT[:7]} eplb.py", "load": "ESFT, 4 domains",
               "results": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
