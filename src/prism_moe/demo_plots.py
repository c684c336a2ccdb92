"""The demo report's plots: latency per placement, local vs remote invocations, placement heat maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_latency(rows: list[dict[str, Any]], path: Path) -> None:
    names = [r["algorithm"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, (key, label) in enumerate((("mean_latency_s", "mean latency"), ("p95_latency_s", "p95 latency"),
                                      ("mean_ttft_s", "mean time to first token"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names)
    ax.set_xlabel("placement algorithm")
    ax.set_ylabel("seconds per request")
    ax.set_title("Request latency per placement (same workload)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_invocations(runs: list[Any], path: Path) -> None:
    servers = sorted({s for r in runs for s in r.server_stats})
    fig, axes = plt.subplots(1, len(servers), figsize=(4 * len(servers), 3.6), sharey=True, squeeze=False)
    for ax, server in zip(axes[0], servers, strict=True):
        names = [r.algorithm for r in runs]
        local = np.array([r.server_stats[server]["local_invocations"] for r in runs], dtype=float)
        total = np.array([r.server_stats[server]["invocations"] for r in runs], dtype=float)
        ax.bar(names, local, label="local")
        ax.bar(names, total - local, bottom=local, label="remote")
        ax.set_title(server)
        ax.set_xlabel("placement")
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].set_ylabel("expert invocations (token x expert)")
    axes[0][-1].legend()
    fig.suptitle("Local vs remote expert invocations per server")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_placements(placements: dict[str, Any], path: Path) -> None:
    algs = list(placements)
    servers = list(next(iter(placements.values())).server_names)
    fig, axes = plt.subplots(len(algs), len(servers), figsize=(3.2 * len(servers), 2.2 * len(algs)),
                             squeeze=False)
    for i, alg in enumerate(algs):
        p = placements[alg]
        for j, server in enumerate(servers):
            ax = axes[i][j]
            ax.imshow(p.hosts[j].astype(float), aspect="auto", cmap="Greens", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(f"{alg}: {server} ({int(p.hosts[j].sum())} experts)", fontsize=8)
            ax.set_xlabel("expert id", fontsize=7)
            ax.set_ylabel("MoE layer", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle("Experts held (green) per MoE layer and server, per placement")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
