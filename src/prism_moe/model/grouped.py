"""Expert math over a `SlotPool`'s slabs: the per-expert loop (exact reference) and the grouped path.

* `expert_forward` is one expert on its rows, transformers' eager math (`linear -> gate -> linear`): on
  the same rows in the same order it is bit-identical to the eager experts loop. With `onednn=True` its two
  GEMMs are oneDNN's instead of the BLAS that `nn.functional.linear` calls (MKL): measured 1.2x (8 rows, a
  decode step's share of an expert) to 2x (120 rows, a prefill's) faster for float32 on this project's CPU
  (an AMD EPYC, where MKL does not take its fastest code path), equal within float32 rounding (not bit for
  bit). oneDNN is what vLLM's CPU backend computes its linear layers with. A packed pool (`SlotPool(packed=True)`,
  what a CPU server holds) keeps weights only oneDNN reads, so its experts always take oneDNN (model/onednn.py).
* `grouped_pairs` computes every (token, top-k) pair mapped to a local slot with one fixed kernel sequence
  (sort by slot, two `grouped_mm` over the whole slabs, the gate, the routing weights, one scatter back
  to pair order), whatever the number of active experts, and with no host sync: transformers'
  `grouped_mm` experts kernel (`transformers.integrations.moe._grouped_mm`, which falls back to a loop
  where the device has no grouped GEMM), applied to slots instead of expert ids. On the layout where slot
  order is expert order it reproduces transformers' own `grouped_mm` path bit for bit.
* `rows_forward` / `compute_rows` compute rows for given slots / experts in their given order (what a peer
  runs for a request).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from . import onednn as dnn
from .slots import ExpertSlots, Gate, MissingExpertError, SlotPool


@functools.lru_cache(maxsize=16)
def grouped_mm_usable(device: torch.device) -> bool:
    """Whether the device has a grouped GEMM kernel (else transformers' helper loops with one host sync)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0) and (
            hasattr(nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    return hasattr(nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, use_onednn: bool) -> Tensor:
    if use_onednn or weight.is_mkldnn:  # a packed pool's weights: only oneDNN reads them
        return dnn.linear(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def _grouped_mm(x: Tensor, weight_t: Tensor, offsets: Tensor) -> Tensor:
    from transformers.integrations.moe import _grouped_mm as mm

    return mm(x, weight_t, offsets)


def expert_forward(pool: SlotPool, gate: Gate, slot: int, x: Tensor, onednn: bool = False) -> Tensor:
    """One expert on its rows: x [n, H] -> [n, H], no routing weight (`onednn`: see the module docstring)."""
    b1 = pool.gate_up_bias[slot] if pool.gate_up_bias is not None else None
    b2 = pool.down_bias[slot] if pool.down_bias is not None else None
    h = _linear(x, pool.gate_up[slot], b1, onednn)
    return _linear(gate(h), pool.down[slot], b2, onednn)


def _grouped_sorted(pool: SlotPool, gate: Gate, key_sorted: Tensor, x_sorted: Tensor) -> Tensor:
    """Rows sorted by slot (key C = not local, at the end): x_sorted [n, H] -> [n, H]; rows with key C hold
    garbage (the kernel skips them)."""
    if pool.packed:
        raise ValueError("the grouped experts path reads whole slabs, and this slot pool keeps oneDNN-packed "
                         "weights (a CPU server's default): use the 'auto', 'onednn' or 'loop' path")
    c = pool.capacity
    counts = torch.histc(key_sorted.float() if key_sorted.device.type in ("cpu", "mps") else key_sorted.int(),
                         bins=c, min=0, max=c - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = _grouped_mm(x_sorted, pool.gate_up.transpose(-2, -1), offsets)
    if pool.gate_up_bias is not None:
        safe = key_sorted.clamp(max=c - 1)
        h = h + pool.gate_up_bias[safe]
    y = _grouped_mm(gate(h), pool.down.transpose(-2, -1), offsets)
    if pool.down_bias is not None:
        y = y + pool.down_bias[safe]
    return y


def grouped_pairs(pool: SlotPool, gate: Gate, key: Tensor, hidden: Tensor, weights: Tensor, top_k: int) -> Tensor:
    """Weighted outputs of the local pairs, in pair order: key [S] (pair p = token p // k, choice p % k; its
    slot, or C = capacity where not local), hidden [T, H], weights [S] -> [S, H] (zeros where not local; a sum
    over the k choices of each token combines them). No host sync."""
    dtype = torch.promote_types(pool.dtype, weights.dtype)  # transformers' weighted_out dtype
    out = torch.zeros(key.shape[0], hidden.shape[1], dtype=dtype, device=hidden.device)
    if pool.capacity == 0:
        return out
    key_sorted, perm = torch.sort(key)
    y = _grouped_sorted(pool, gate, key_sorted, hidden[perm // top_k])
    y = torch.where((key_sorted < pool.capacity).unsqueeze(-1), y * weights[perm].unsqueeze(-1), 0.0)
    return out.index_copy_(0, perm, y.to(dtype))


def rows_forward(pool: SlotPool, gate: Gate, slots: np.ndarray, x: Tensor, grouped: bool,
                 onednn: bool = False) -> Tensor:
    """Rows of given slots in their order: slots int [m] (all >= 0, host), x [m, H] on the pool's device ->
    [m, H]. The loop computes each slot's rows together in their order (as `expert_forward`)."""
    out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    if grouped:
        key = torch.as_tensor(slots, device=x.device)
        key_sorted, perm = torch.sort(key)
        return out.index_copy_(0, perm, _grouped_sorted(pool, gate, key_sorted, x[perm]).to(out.dtype))
    order = np.argsort(slots, kind="stable")
    uniq, starts = np.unique(slots[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    index = torch.as_tensor(order, device=x.device)
    for i, s in enumerate(uniq.tolist()):
        rows = index[bounds[i]:bounds[i + 1]]
        out[rows] = expert_forward(pool, gate, s, x[rows], onednn).to(out.dtype)
    return out


def compute_rows(store: ExpertSlots, expert_ids: Tensor, x: Tensor, grouped: bool | None = None,
                 onednn: bool = False) -> Tensor:
    """What a peer runs for a request: expert_ids [m] (host), x [m, H] (any device) -> [m, H] on x's device
    and dtype. Experts held or staged here count (`MissingExpertError` names the others); `grouped` None picks
    the grouped path where the slabs' device has a grouped GEMM other than the CPU's; `onednn`: the loop's
    GEMMs are oneDNN's (`expert_forward`), where `onednn.usable`."""
    pool = store.pool
    ids = expert_ids.detach().cpu().numpy().astype(np.int64, copy=False)
    with store.reading() as view:
        bad = (ids < 0) | (ids >= store.num_experts)
        slots = view.serving[np.where(bad, 0, ids)]
        missing = np.unique(ids[bad | (slots < 0)])
        if len(missing):
            raise MissingExpertError(f"MoE layer {store.layer}: experts {missing.tolist()} are not held here")
        if grouped is None:
            grouped = pool.device.type != "cpu" and grouped_mm_usable(pool.device)
        onednn = onednn and not grouped and dnn.usable(pool.device, pool.dtype)
        y = rows_forward(pool, store.gate, slots, x.to(pool.device, pool.dtype), grouped, onednn)
    return y.to(x.device, x.dtype)
