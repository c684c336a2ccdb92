"""Readers for the expert-load files that serving engines record, so placements can be computed from them.

- SGLang's expert-distribution recorder (`--expert-distribution-recorder-mode stat`, then
  `/dump_expert_distribution_record`) writes `expert_distribution_recorder_<time>.pt`, a `torch.save` of
  `{"rank": int, "logical_count": Tensor[buffer, layers, experts], ...}`. Its layer axis is the decoder
  layer (`num_hidden_layers`), so DeepSeek's leading dense layers are rows of zeros.
- vLLM's EPLB (`--eplb-config '{"save_load_window": true, "save_dir": DIR}'`) writes
  `global_expert_load_window_i<N>.safetensors`: the load per logical expert, `[moe_layers, experts]` (or
  `[window, moe_layers, experts]`).

Both are loaded without running code: `torch.load(weights_only=True)` for the `.pt`, safetensors for vLLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# what else SGLang's dump holds besides logical_count (plain values, checked only for their types)
_SGLANG_KEYS = {"logical_count", "rank", "average_utilization_rate_over_window", "physical_count"}


def _check_counts(path: Path, counts: np.ndarray, what: str) -> np.ndarray:
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"{path}: {what} must be [layers, experts] or [steps, layers, experts], got shape "
                         f"{counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{path}: {what} holds negative or non-finite counts")
    if not counts.any():
        raise ValueError(f"{path}: {what} is all zeros: the engine recorded no token (record while serving "
                         f"traffic, then dump)")
    return counts


def _strip_dense_layers(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Drop leading all-zero rows (the dense decoder layers before the first MoE layer)."""
    first = int(np.argmax(counts.any(axis=1)))
    return counts[first:], first


def read_sglang_dump(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """An SGLang expert-distribution dump -> (counts float64 `[moe_layers, experts]`, notes).

    `logical_count [buffer, layers, experts]` is summed over the buffer; leading layers without any count
    are taken as the model's dense layers and dropped (noted)."""
    import torch  # heavy; only this reader needs it

    path = Path(path)
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path}: not a loadable SGLang expert-distribution dump with weights_only=True ({e})") \
            from None
    if not isinstance(data, dict) or "logical_count" not in data:
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: expected SGLang's dump {{'logical_count': Tensor[buffer, layers, experts], ...}}, "
                         f"got {keys}; dump it with --expert-distribution-recorder-mode stat")
    lc = data["logical_count"]
    if not isinstance(lc, torch.Tensor):
        raise ValueError(f"{path}: logical_count is a {type(lc).__name__}, expected a tensor")
    counts = _check_counts(path, lc.detach().to(torch.float64).numpy(), "logical_count")
    counts, dense = _strip_dense_layers(counts)
    notes = []
    if dense:
        notes.append(f"{path.name}: decoder layers 0-{dense - 1} have no routed-expert counts (dense layers); "
                     f"MoE layer 0 is decoder layer {dense}")
    return counts, notes


def read_vllm_load(path: str | Path) -> np.ndarray:
    """A vLLM EPLB load file (safetensors with one tensor `[moe_layers, experts]` or `[window, moe_layers,
    experts]`) -> counts float64 `[moe_layers, experts]`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="np") as f:
        names = list(f.keys())
        if len(names) != 1:
            raise ValueError(f"{path}: a vLLM expert-load file holds one load tensor, found {names or 'none'}")
        t = f.get_tensor(names[0])
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"{path}: tensor {names[0]!r} has dtype {t.dtype}, expected token counts")
    return _check_counts(path, t.astype(np.float64), f"tensor {names[0]!r}")
