"""Splitting expert slots: integer shares that add up exactly (largest remainder), and a server's
slots spread over layers.

Used by the per-layer algorithms (eplb, smartmoe, prism), whose servers hold a fixed number of experts
of each layer.
"""

from __future__ import annotations

import numpy as np


def proportional(total: int, weights: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
    """Non-negative integers summing to `total`, proportional to `weights`, each <= `cap`.

    Largest remainder rounding; what a capped entry cannot take goes to the others in proportion.
    Zero weights everywhere: an even split. weights: float [K]; cap: int [K] (sum >= total).
    Returns int [K].
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    k = len(w)
    cap = np.full(k, total, dtype=np.int64) if cap is None else np.asarray(cap, dtype=np.int64)
    if int(cap.sum()) < total:
        raise ValueError(f"cannot split {total} over caps summing to {int(cap.sum())}")
    out = np.zeros(k, dtype=np.int64)
    left = int(total)
    while left > 0:
        open_ = out < cap
        ww = np.where(open_, np.clip(w, 0.0, None), 0.0)
        if ww.sum() <= 0:
            ww = open_.astype(np.float64)
        share = ww / ww.sum() * left
        add = np.minimum(np.floor(share).astype(np.int64), cap - out)
        rest = left - int(add.sum())
        if rest > 0:  # largest remainders (stable: lower index first) among entries with room
            frac = np.where(open_ & (out + add < cap), share - np.floor(share), -1.0)
            order = np.argsort(-frac, kind="stable")[:rest]
            order = order[frac[order] >= 0]
            add[order] += 1
        if add.sum() == 0:  # only fractional shares on full entries: give one to any open entry
            add[np.flatnonzero(open_)[0]] = 1
        out += add
        left = int(total - out.sum())
    return out


def spread_over_layers(quota: np.ndarray, num_layers: int, per_layer_max: int) -> np.ndarray:
    """Each server's slots spread evenly over the layers: int [S, L], row s sums to quota[s].

    Entries are floor(quota / L) or one more; the extra ones continue cyclically from where the previous
    server's ended, so layer totals differ by at most one. quota: int [S], each <= L x per_layer_max.
    """
    quota = np.asarray(quota, dtype=np.int64)
    base = quota // num_layers
    extra = quota % num_layers
    out = np.repeat(base[:, None], num_layers, axis=1)
    start = 0
    for s, n in enumerate(extra.tolist()):
        layers = (start + np.arange(n)) % num_layers
        out[s, layers] += 1
        start = (start + n) % num_layers
    if (out > per_layer_max).any():
        raise ValueError("a server was given more slots in one layer than the layer has experts")
    return out
