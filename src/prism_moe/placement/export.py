"""A placement in the formats the expert-parallel engines read: SGLang's `--init-expert-location` file and
DeepSeek EPLB's tables. Pure functions: arrays in, arrays out.

Both engines number physical expert slots globally: slot p lives on GPU (EP rank) p // slots_per_gpu, every
GPU has the same number of slots in every MoE layer, and the physical slots of a layer are
`num_experts + redundant` in all. Servers map to GPUs in cluster-file order, a server's GPUs consecutive.

- SGLang (`python/sglang/srt/eplb/expert_location.py`, `init_by_mapping`): a JSON file
  `{"physical_to_logical_map": [[...]]}`, int `[num_hidden_layers, physical]` (SGLang's layer axis is the
  decoder layer; dense layers get its trivial map `p % num_experts`). Start SGLang with
  `--ep-size <gpus> --ep-num-redundant-experts <physical - experts> --init-expert-location <file>`.
- DeepSeek EPLB (github.com/deepseek-ai/EPLB, `rebalance_experts`): `phy2log [moe_layers, physical]`,
  `log2phy [moe_layers, experts, max_replicas]` (-1 pads) and `logcnt [moe_layers, experts]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ExportError(ValueError):
    """The placement cannot be written in the engine's format; the message says why and what to change."""


@dataclass(frozen=True)
class PhysicalLayout:
    """Physical slots of every MoE layer.

    phy2log:       int64 `[moe_layers, gpus * slots_per_gpu]`, the logical expert of each slot.
    slots_per_gpu: slots of one GPU in one layer.
    padding:       slots filled beyond the placement (extra replicas) so every GPU has as many.
    """

    phy2log: np.ndarray
    slots_per_gpu: int
    padding: int

    @property
    def num_gpus(self) -> int:
        return self.phy2log.shape[1] // self.slots_per_gpu


def physical_layout(hosts: np.ndarray, gpus: np.ndarray, load: np.ndarray) -> PhysicalLayout:
    """Lay each server's experts on its GPUs, equal slots per GPU.

    hosts: bool `[S, L, E]`; gpus: int `[S]` GPUs per server; load: float `[L, E]` (cluster-wide demand).
    In each layer a server's experts, heaviest first, go to its GPU with the least load that has room
    (EPLB's balanced packing within the server). Every GPU gets `slots_per_gpu` = the most any GPU needs
    in any layer; the free slots are filled with extra replicas of the heaviest experts that GPU lacks.
    """
    hosts = np.asarray(hosts, dtype=bool)
    gpus = np.asarray(gpus, dtype=np.int64)
    s_n, layers, e = hosts.shape
    if gpus.shape != (s_n,) or (gpus < 1).any():
        raise ExportError(f"gpus must give each of the {s_n} servers at least one GPU, got {gpus.tolist()}")
    held = hosts.sum(axis=2)  # [S, L]
    spg = int(np.max(-(-held // gpus[:, None])))
    g_total = int(gpus.sum())
    first = np.concatenate([[0], np.cumsum(gpus)[:-1]])
    phy2log = np.empty((layers, g_total * spg), dtype=np.int64)
    padding = 0
    for l in range(layers):
        order = np.argsort(-load[l], kind="stable")  # heaviest first
        for s in range(s_n):
            g = int(gpus[s])
            items = [[] for _ in range(g)]
            gpu_load = np.zeros(g)
            for x in order[hosts[s, l, order]]:
                room = np.array([len(it) < spg for it in items])
                k = int(np.argmin(np.where(room, gpu_load, np.inf)))
                items[k].append(int(x))
                gpu_load[k] += load[l, x]
            for k in range(g):
                fill = [int(x) for x in order if x not in items[k]][: spg - len(items[k])]
                padding += len(fill)
                row = items[k] + fill
                start = (first[s] + k) * spg
                phy2log[l, start:start + spg] = row
    return PhysicalLayout(phy2log, spg, padding)


def sglang_physical_to_logical(layout: PhysicalLayout, moe_layer_ids: tuple[int, ...], num_hidden_layers: int,
                               num_experts: int) -> np.ndarray:
    """SGLang's physical_to_logical_map, int64 `[num_hidden_layers, physical]`: MoE layer i is decoder layer
    `moe_layer_ids[i]`; other (dense) layers get SGLang's trivial map `p % num_experts`."""
    layers, p = layout.phy2log.shape
    if len(moe_layer_ids) != layers or max(moe_layer_ids) >= num_hidden_layers:
        raise ExportError(f"{layers} MoE layers in the placement, but the model has MoE layers {moe_layer_ids} of "
                          f"{num_hidden_layers}")
    out = np.tile(np.arange(p, dtype=np.int64) % num_experts, (num_hidden_layers, 1))
    out[list(moe_layer_ids)] = layout.phy2log
    return out


def eplb_tables(layout: PhysicalLayout, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB's (phy2log `[L, P]`, log2phy `[L, E, max_replicas]` with -1 pads, logcnt `[L, E]`);
    an expert's physical slots are listed in increasing order."""
    phy2log = layout.phy2log
    layers, p = phy2log.shape
    logcnt = np.zeros((layers, num_experts), dtype=np.int64)
    for l in range(layers):
        logcnt[l] = np.bincount(phy2log[l], minlength=num_experts)
    if (logcnt == 0).any():
        l, x = np.argwhere(logcnt == 0)[0]
        raise ExportError(f"layer {l} expert {x} has no physical slot")
    log2phy = np.full((layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for l in range(layers):
        order = np.argsort(phy2log[l], kind="stable")  # slots grouped by expert, increasing within
        rank = np.arange(p) - np.repeat(np.concatenate([[0], np.cumsum(logcnt[l])[:-1]]), logcnt[l])
        log2phy[l, phy2log[l][order], rank] = order
    return phy2log, log2phy, logcnt


def check_sglang_map(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> None:
    """SGLang's own rules for an `--init-expert-location` map: int `[layers, physical]`, physical a multiple
    of the EP size (equal slots per GPU), at least num_experts slots, every logical expert present in every
    layer, ids in range."""
    m = np.asarray(phy2log)
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.integer):
        raise ExportError(f"physical_to_logical_map must be an int [layers, physical] array, got {m.dtype} {m.shape}")
    layers, p = m.shape
    if p % num_gpus or p < num_experts:
        raise ExportError(f"{p} physical slots: must be a multiple of {num_gpus} GPUs and at least {num_experts}")
    if m.min() < 0 or m.max() >= num_experts:
        raise ExportError(f"logical ids must be in 0..{num_experts - 1}")
    for l in range(layers):
        missing = np.setdiff1d(np.arange(num_experts), m[l])
        if missing.size:
            raise ExportError(f"layer {l}: logical experts {missing[:5].tolist()} have no physical slot")
