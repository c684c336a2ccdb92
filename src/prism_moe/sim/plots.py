"""PNG plots of the experiments (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prism_moe.sim.experiments import Experiment, rolling


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot(exp: Experiment, path: Path) -> None:
    plt = _plt()
    rows = exp.rows
    if exp.name in ("paper-table", "heterogeneity"):
        key = "model" if exp.name == "paper-table" else "scenario"
        panels = list(dict.fromkeys(r[key] for r in rows))
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            mine = [r for r in rows if r[key] == panel]
            algos = [r["algorithm"] for r in mine]
            _bars(ax, algos, {"mean": [r["mean_latency_s"] for r in mine],
                              "p95": [r["p95_latency_s"] for r in mine],
                              "TTFT (mean)": [r["mean_ttft_s"] for r in mine]}, "latency (s)")
            ax.set_xlabel("placement algorithm")
            ax.set_title(panel if exp.name == "paper-table" else f"heterogeneous {panel}")
            ax.tick_params(axis="x", rotation=30)
            ax.legend()
    elif exp.name == "scale":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
        for ax, (x, fixed, val, label) in zip(axes[0], (("gpus", "bandwidth_mbps", 500.0, "GPUs (1 A100-40GB per server), 500 Mbps"),
                                                     ("bandwidth_mbps", "gpus", 16, "link bandwidth (Mbps), 16 GPUs")), strict=True):
            for a in dict.fromkeys(r["algorithm"] for r in rows):
                pts = sorted((r[x], r["mean_latency_s"]) for r in rows if r["algorithm"] == a and r[fixed] == val)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=a)
            ax.set_xscale("log", base=2 if x == "gpus" else 10)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("mean request latency (s)")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
    elif exp.name == "migration":
        fig, ax = plt.subplots(figsize=(9, 4.5))
        colours = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["algorithm"] for r in rows))}
        styles = {"static": "-", "replace": "--", "replace-free": ":"}
        for r in rows:
            x, y = rolling(np.array(r["series"]["arrival"]), np.array(r["series"]["latency"]), 20)
            c = colours[r["algorithm"]]
            ax.plot(x, y, label=f"{r['algorithm']} {r['variant']}", lw=1.3, color=c, ls=styles.get(r["variant"], "-"))
            if r["variant"] == "replace" and r.get("migrations"):
                ax.axvline(r["migrations"][0]["end"], ls="-.", lw=0.8, color=c)
        sw = rows[0]["series"]["arrival"]
        ax.axvline(exp.meta.get("switch_s", 0.0), color="k", ls="--", lw=1, label="workload switch")
        ax.set_xlim(0, max(sw) if sw else 1)
        ax.set_xlabel("request arrival time (s)")
        ax.set_ylabel("latency, mean of last 20 requests (s)")
        ax.set_title("workload switch: static vs re-placement (dash-dot: migration done)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    elif exp.name == "crossover":
        panels = list(dict.fromkeys((r["locality"], r["rate"]) for r in rows))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
        for ax, (loc, rate) in zip(axes[0], panels, strict=True):
            mine = [r for r in rows if r["locality"] == loc and r["rate"] == rate and r["algorithm"] == "hybrid"]
            lats = sorted({r["latency_ms"] for r in mine})
            bws = sorted({r["bandwidth_mbps"] for r in mine})
            grid = np.full((len(lats), len(bws)), np.nan)
            for r in mine:
                grid[lats.index(r["latency_ms"]), bws.index(r["bandwidth_mbps"])] = r.get("hybrid_vs_best_rival", np.nan)
            im = ax.imshow(grid * 100, cmap="RdYlGn", vmin=-30, vmax=30, origin="lower", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                best = next((r["best_rival"] for r in mine if r["latency_ms"] == lats[i]
                             and r["bandwidth_mbps"] == bws[j]), "")
                ax.text(j, i, f"{v:+.0%}\n{best}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(bws)), [f"{b:g}" for b in bws])
            ax.set_yticks(range(len(lats)), [f"{x:g}" for x in lats])
            ax.set_xlabel("bandwidth (Mbps)")
            ax.set_ylabel("one-way latency (ms)")
            ax.set_title(f"{loc}, {rate:g} req/s per server: hybrid vs best rival")
        fig.colorbar(im, ax=axes[0].tolist(), label="latency reduction (%)")
    elif exp.name == "failures":
        cases = list(dict.fromkeys(r["scenario"] for r in rows))
        fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 4.2), squeeze=False)
        for ax, case in zip(axes[0], cases, strict=True):
            for i, r in enumerate(r for r in rows if r["scenario"] == case):
                x, y = np.array(r["series"]["arrival"]), np.array(r["series"]["latency"])
                ok = np.isfinite(y)  # failed requests have no latency
                x, y = rolling(x[ok], y[ok], 10)
                ax.plot(x, y, lw=1.2, color=f"C{i}", label=f"{r['algorithm']} ({r['failed']} failed)")
            t_fail = next(r.get("switch_s") for r in rows if r["scenario"] == case)
            if t_fail:
                ax.axvline(t_fail, color="k", ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_xlabel("request arrival time (s)")
            ax.set_ylabel("latency, mean of last 10 completed (s)")
            ax.set_title(case)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    else:
        raise ValueError(f"no plot for {exp.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

