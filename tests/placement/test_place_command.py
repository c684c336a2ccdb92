"""`prism place` end to end through prism_moe.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def _equal_gpu_cluster(tmp_path, gpus=(1, 1, 2), memory=(12, 12, 24)) -> Path:
    path = tmp_path / "equal.yaml"
    rows = [f"  - {{name: s{i}, gpu: a100-40gb, gpus: {g}, memory_gib: {m}, workload: 'embedded:esft:{d}'}}"
            for i, (g, m, d) in enumerate(zip(gpus, memory, ("intent", "law", "translation"), strict=True))]
    path.write_text("model: deepseek-v2-lite\nservers:\n" + "\n".join(rows) + "\n")
    return path


def test_export_sglang_follows_sglangs_format_rules(capsys, tmp_path):
    out = tmp_path / "loc.json"
    res = run_json(capsys, "--cluster", _equal_gpu_cluster(tmp_path), "--algorithm", "prism",
                   "--export", "sglang", "--export-out", out)
    doc = json.loads(out.read_text())
    assert list(doc) == ["physical_to_logical_map"]  # SGLang passes the keys to init_by_mapping(**doc)
    m = doc["physical_to_logical_map"]
    gpus, spg = res["export"]["gpus"], res["export"]["slots_per_gpu"]
    assert gpus == 4 and len(m) == 27 and all(len(row) == gpus * spg for row in m)  # [num_hidden_layers, P]
    assert all(sorted(set(row)) == list(range(64)) for row in m)  # every logical expert in every layer
    # the placement's experts are on the GPUs of the server that holds them (s2 owns GPUs 2 and 3)
    placement = res["placement"]
    for i, name in enumerate(("s0", "s1")):
        for layer, ids in placement[name].items():
            assert set(ids) <= set(m[int(layer) + 1][i * spg:(i + 1) * spg])
    for layer, ids in placement["s2"].items():
        assert set(ids) <= set(m[int(layer) + 1][2 * spg:])


def test_export_eplb_tables(capsys, tmp_path):
    out = tmp_path / "eplb.json"
    res = run_json(capsys, "--cluster", _equal_gpu_cluster(tmp_path), "--algorithm", "eplb",
                   "--export", "eplb", "--export-out", out)
    doc = json.loads(out.read_text())
    phy2log, log2phy, logcnt = (np.array(doc[k]) for k in ("phy2log", "log2phy", "logcnt"))
    assert phy2log.shape == (26, res["export"]["physical_slots"]) and logcnt.shape == (26, 64)
    np.testing.assert_array_equal(logcnt.sum(axis=1), phy2log.shape[1])
    for layer in (0, 25):
        for x in range(64):
            slots = log2phy[layer, x][log2phy[layer, x] >= 0]
            assert len(slots) == logcnt[layer, x] and (phy2log[layer, slots] == x).all()


def test_export_refuses_unequal_gpus(capsys, tmp_path):
    path = _equal_gpu_cluster(tmp_path, memory=(12, 14, 24))
    assert cli.main(["place", "--cluster", str(path), "--export", "sglang"]) == 2
    assert "needs equal GPUs" in capsys.readouterr().err
