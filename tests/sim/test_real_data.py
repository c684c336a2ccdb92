"""Runs on the real routing data (skipped when shared/data is absent)."""

from __future__ import annotations

import numpy as np
import pytest

from prism_moe.sim import scenarios as sc
from prism_moe.sim.run import build_scenario, make_placement, mean_lengths, simulate


@pytest.fixture(scope="module")
def esft():
    try:
        from prism_moe.stats.workload import resolve_data_dir

        resolve_data_dir()
    except (ImportError, FileNotFoundError):
        pytest.skip("routing data not found (shared/data or $PRISM_DATA_DIR)")
    return build_scenario(sc.paper_cluster("deepseek-v2-lite"), seed=0)


def test_esft_scenario_replays_traces_with_real_prompt_lengths(esft):
    assert all(src.pool.replayed for src in esft.sources)
    prompt, _ = mean_lengths(esft)
    assert 700 < prompt < 1400  # ESFT prompts are ~1,000 tokens by the DeepSeek rule
    counts = esft.sources[0].pool.counts(64)
    np.testing.assert_allclose(counts, esft.sources[0].counts)  # the pool is the trace itself


def test_latency_placement_beats_its_start_on_esft(esft):
    pl = make_placement(esft, "latency")
    assert pl.meta["estimate_s"] < 0.9 * pl.meta["start_estimate_s"]
    s = simulate(esft, pl, n_requests=12, seed=0).summary()
    assert s["mean_latency_s"] > 0 and 0 < s["remote_fraction"] < 1


def test_experiment_command_writes_table_plot_and_numbers(esft, tmp_path, capsys):
    import argparse

    from prism_moe.commands import experiment as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["experiment", "heterogeneity", "--out", str(tmp_path), "--requests", "6",
                              "--jobs", "1", "--algorithms", "uniform,latency"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "heterogeneity" in out and "latency" in out
    for ext in ("png", "csv", "json"):
        assert (tmp_path / f"heterogeneity.{ext}").stat().st_size > 0
    import json

    rows = json.loads((tmp_path / "heterogeneity.json").read_text())["rows"]
    assert {r["algorithm"] for r in rows} == {"uniform", "latency"} and len(rows) == 4


def test_failures_experiment_reports_lost_requests_and_backups(esft):
    from prism_moe.sim.experiments import failures

    exp = failures(requests=6, jobs=1, algorithms=["pipeline-opt-rep"])
    by = {r["scenario"]: r for r in exp.rows}
    assert len(by) == 3 and all(r["requests"] == 6 and 0 <= r["failed"] <= 6 for r in exp.rows)
    assert by["60%, edge-3 dies"]["from_backup"] > 0 and by["60%, edge-3 dies"]["loaded_gb"] == 0.0
    assert by["60%, edge-3 dies"]["replanned"] == "+1.0 s"  # detection only: the backups hold the blocks
