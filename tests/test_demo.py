"""`prism demo` picks real routing data: the full ESFT set when a data folder holds it, else the sample
shipped in the package, and says which."""

from __future__ import annotations

from prism_moe.demo import DOMAINS, demo_cluster, demo_workloads
from prism_moe.stats import load_prompts, load_workload


def test_without_a_data_folder_the_demo_replays_the_embedded_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path))  # a fresh clone: the folder holds no ESFT set
    workloads, data_dir, words = demo_workloads(None)
    assert workloads == {n: f"embedded:esft:{d}" for n, d in DOMAINS.items()} and data_dir is None
    assert "embedded in the package" in words and "prism data fetch esft" in words
    for source in workloads.values():  # each server's replay has a real per-token trace and real prompts
        assert load_workload(source).trace.num_tokens >= 2048 and load_prompts(source)


def test_with_the_esft_set_the_demo_uses_it(tmp_path):
    for d in DOMAINS.values():  # one ESFT layer file per domain: one token, top-6
        f = tmp_path / "esft" / "expert_scores" / d / "expert_weights_1.txt"
        f.parent.mkdir(parents=True)
        f.write_text("0\t1\t2\t3\t4\t5\t\t" + "\t".join(["0.1"] * 6) + "\n")
    workloads, data_dir, words = demo_workloads(str(tmp_path))
    assert workloads == {n: f"esft:{d}" for n, d in DOMAINS.items()} and data_dir == str(tmp_path.resolve())
    assert str(tmp_path.resolve()) in words


def test_demo_cluster_gives_every_server_its_workload(tmp_path):
    from prism_moe.model.tiny import make_tiny_model

    ckpt = make_tiny_model("deepseek_v2", tmp_path / "m", seed=0, num_hidden_layers=3, n_routed_experts=8,
                           num_experts_per_tok=2, n_shared_experts=1)
    d = demo_cluster(ckpt, {"edge-a": "x", "edge-b": "y", "edge-c": "z"})
    assert [s["workload"] for s in d["servers"]] == ["x", "y", "z"]
