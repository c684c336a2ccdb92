"""Worked migration cases shared by the scheduler tests (pure arrays)."""

from __future__ import annotations

import numpy as np


def full_swap_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 servers, 2 layers x 8 experts, 8 slots each: (old hosts, new hosts, capacity).

    Server 0 gains experts 2 and 5 and gives expert 6 to server 1 — the worked case of the multi-process
    migration test.
    """
    old = np.zeros((3, 2, 8), dtype=bool)
    for e in range(8):
        old[e % 3, :, e] = True
    new = old.copy()
    new[0, :, [2, 5]] = True
    new[0, :, 6] = False
    new[1, :, 6] = True
    return old, new, np.array([8, 8, 8])
