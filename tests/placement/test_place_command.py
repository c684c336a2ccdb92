"""`prism place` end to end through prism_moe.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_moe import cli
from prism_moe.placement.placement import Placement
from prism_moe.placement.registry import ALGORITHMS, DEFAULT_ALGORITHM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def data_dir():
    from prism_moe.stats.workload import resolve_data_dir

    try:
        return resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("real routing data not found (set PRISM_DATA_DIR or put it at ../shared/data)")


def write_cluster(tmp_path, memory=(12, 24), workloads=(None, None)) -> Path:
    lines = ["model: deepseek-v2-lite", "servers:"]
    for i, (m, w) in enumerate(zip(memory, workloads, strict=True)):
        lines.append(f"  - name: s{i}\n    memory_gib: {m}" + (f"\n    workload: {w}" if w else ""))
    path = tmp_path / "cluster.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_json(capsys, *args) -> dict:
    assert cli.main(["place", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_paper_example_json(capsys, data_dir):
    result = run_json(capsys, "--cluster", EXAMPLES / "paper-deepseek.yaml", "--data-dir", data_dir)
    assert result["algorithm"] == DEFAULT_ALGORITHM
    assert 0.2 < result["remote_fraction"] < 0.3  # the exact optimum: 27.3% remote (uniform: 67%)
    assert result["solve_seconds"] >= 0
    assert set(result["memory_used_gib"]) == {"edge-1", "edge-2", "edge-3"}
    assert result["memory_used_gib"]["edge-1"] <= 12
    assert result["expert_slots"]["edge-3"] == {"used": 1337, "capacity": 1337}
    for layer in range(26):
        union = set().union(*(set(result["placement"][s][str(layer)]) for s in result["placement"]))
        assert union == set(range(64))
    assert isinstance(result["notes"], list)


def test_edge_example_runs_every_algorithm(capsys, data_dir):
    result = run_json(capsys, "--cluster", EXAMPLES / "edge-hetero.yaml", "--data-dir", data_dir,
                      "--algorithm", "prism")
    assert result["algorithm"] == "prism" and 0 < result["remote_fraction"] < 1


def test_compare_and_out_without_workloads(capsys, tmp_path):
    out = tmp_path / "p.json"
    result = run_json(capsys, "--cluster", write_cluster(tmp_path), "--compare", "--out", out)
    assert any("has no workload: uniform expert counts" in n for n in result["notes"])
    rows = {r["algorithm"]: r for r in result["compare"]}
    assert set(rows) == set(ALGORITHMS)
    assert rows["optimal"]["gap_to_optimal"] == 0
    assert rows["flow"]["gap_to_optimal"] == pytest.approx(0, abs=1e-9)
    assert rows["uniform"]["replicas"] == 0
    saved = Placement.load(out)
    assert saved.server_names == ("s0", "s1") and saved.algorithm == DEFAULT_ALGORITHM


def test_table_output(capsys, tmp_path):
    assert cli.main(["place", "--cluster", str(write_cluster(tmp_path)), "--algorithm", "uniform"]) == 0
    out = capsys.readouterr().out
    assert "uniform placement of deepseek-v2-lite" in out and "remote" in out and "s1" in out


def test_infeasible_cluster_gives_the_numbers(capsys, tmp_path):
    rc = cli.main(["place", "--cluster", str(write_cluster(tmp_path, memory=(8, 8))), "--json"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot hold one copy of every expert" in err and "1664 experts" in err and "s0: " in err
    assert "Traceback" not in err


def test_unknown_algorithm_lists_choices(capsys, tmp_path):
    rc = cli.main(["place", "--cluster", str(write_cluster(tmp_path, memory=(8, 8))), "--algorithm", "nope"])
    assert rc == 2
    assert "choose one of uniform, redundance" in capsys.readouterr().err
