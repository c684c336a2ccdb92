"""`prism serve --record-trace`: the dispatcher's recorder keeps each forward's routing as one trace sequence."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from prism_moe.model.experts import attach
from prism_moe.model.spec import ModelSpec
from prism_moe.placement.placement import Placement
from prism_moe.runtime.dispatch import ClusterDispatcher
from prism_moe.runtime.recording import ForwardRecorder
from prism_moe.stats.trace import load_trace
from prism_moe.stats.workload import load_workload


def _solo_placement(spec: ModelSpec, name: str = "solo") -> Placement:
    hosts = np.ones((1, spec.num_moe_layers, spec.num_experts), dtype=bool)
    return Placement.from_hosts([name], hosts, np.zeros((1, 1)), algorithm="all")


@pytest.fixture(scope="module")
def recorded(tiny_dir: Path):
    """A model whose ClusterDispatcher records, plus an independent capture of the routers' outputs."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    dispatcher = ClusterDispatcher("solo", _solo_placement(spec), None)
    attach(model, dispatcher, spec)
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(spec.num_moe_layers)}
    hooks = []
    for i, layer in enumerate(model.model.layers):  # the tiny Mixtral: every decoder layer is a MoE layer
        def hook(_m, _inp, out, i=i):
            _, scores, index = out
            captured[i].append((index.detach().clone(), scores.detach().clone()))
        hooks.append(layer.mlp.gate.register_forward_hook(hook))

    def run(rec: ForwardRecorder, *batches: torch.Tensor) -> None:
        for c in captured.values():
            c.clear()
        dispatcher.recorder = rec
        with torch.no_grad():
            for ids in batches:
                model(ids)
        dispatcher.recorder = None

    yield spec, run, captured
    for h in hooks:
        h.remove()


def _batches(spec: ModelSpec) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    vocab = 200
    return [torch.randint(0, vocab, (2, 5), generator=g), torch.randint(0, vocab, (1, 3), generator=g),
            torch.randint(0, vocab, (3, 1), generator=g)]  # 10, 3 and 3 rows (prefill, prefill, decode-like)


def test_recorded_ids_and_weights_equal_the_routers(recorded) -> None:
    spec, run, captured = recorded
    rec = ForwardRecorder(spec.num_moe_layers, spec.top_k, spec.num_experts, source="test", model=spec.name)
    run(rec, *_batches(spec))
    t = rec.snapshot()
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (16, spec.num_moe_layers, spec.top_k,
                                                                      spec.num_experts)
    assert t.seq_starts.tolist() == [0, 10, 13, 16]  # one sequence per forward
    assert t.experts.dtype == np.int16 and t.weights is not None
    want_e = torch.stack([torch.cat([ix for ix, _ in captured[i]]) for i in range(spec.num_moe_layers)], dim=1)
    want_w = torch.stack([torch.cat([w for _, w in captured[i]]) for i in range(spec.num_moe_layers)], dim=1)
    np.testing.assert_array_equal(t.experts, want_e.numpy())
    np.testing.assert_allclose(t.weights, want_w.float().numpy(), rtol=1e-6)
    assert rec.num_tokens == 16 and rec.num_sequences == 3 and not rec.stopped and rec.dropped_forwards == 0
    assert (t.source, t.model) == ("test", spec.name)


def test_max_tokens_stops_recording_with_one_log_line(recorded, caplog) -> None:
    spec, run, _ = recorded
    rec = ForwardRecorder(spec.num_moe_layers, spec.top_k, spec.num_experts, max_tokens=12)
    with caplog.at_level(logging.WARNING, logger="prism_moe.runtime.recording"):
        run(rec, *_batches(spec))
    t = rec.snapshot()
    assert t.num_tokens == 10 and t.num_sequences == 1 and rec.stopped
    assert sum("stopped at 10 tokens" in r.getMessage() for r in caplog.records) == 1


def test_save_load_round_trip_and_workload(recorded, tmp_path: Path) -> None:
    spec, run, _ = recorded
    rec = ForwardRecorder(spec.num_moe_layers, spec.top_k, spec.num_experts, source="srv", model=spec.name)
    run(rec, *_batches(spec))
    out = rec.save(tmp_path / "traces" / "solo.safetensors")
    assert out["tokens"] == 16 and out["sequences"] == 3
    assert [p.name for p in (tmp_path / "traces").iterdir()] == ["solo.safetensors"]  # no temporary left
    t, back = rec.snapshot(), load_trace(tmp_path / "traces" / "solo.safetensors")
    np.testing.assert_array_equal(back.experts, t.experts)
    np.testing.assert_array_equal(back.weights, t.weights)
    np.testing.assert_array_equal(back.seq_starts, t.seq_starts)
    assert (back.num_experts, back.source, back.model) == (spec.num_experts, "srv", spec.name)
    wl = load_workload(str(tmp_path / "traces" / "solo.safetensors"))
    assert wl.trace is not None and wl.top_k == spec.top_k
    np.testing.assert_array_equal(wl.counts, t.counts())
    # an empty recording saves and loads too
    empty = ForwardRecorder(spec.num_moe_layers, spec.top_k, spec.num_experts).save(tmp_path / "empty.safetensors")
    assert empty["tokens"] == 0 and load_trace(tmp_path / "empty.safetensors").num_tokens == 0


def test_incomplete_or_inconsistent_forwards_are_skipped() -> None:
    rec = ForwardRecorder(2, 2, 4)
    ids = torch.tensor([[0, 1], [2, 3]])
    w = torch.full((2, 2), 0.5)
    rec.observe(0, ids, w)  # a forward that never reaches layer 1
    rec.observe(0, ids, w)
    rec.observe(1, ids, w)  # this one is complete
    rec.observe(0, ids, w)
    rec.observe(1, ids[:1], w[:1])  # rows differ between layers
    rec.observe(0, torch.tensor([[0, -1]]), w[:1])  # padding id
    rec.observe(1, torch.tensor([[0, 1]]), w[:1])
    rec.observe(1, ids, w)  # a layer out of order
    t = rec.snapshot()
    assert t.num_tokens == 2 and t.num_sequences == 1 and rec.dropped_forwards == 4
    np.testing.assert_array_equal(t.experts, [[[0, 1], [0, 1]], [[2, 3], [2, 3]]])


def test_serve_flags_and_cluster_up_forwarding(tmp_path: Path, monkeypatch) -> None:
    from prism_moe.cli import build_parser
    from prism_moe.commands.serve import forwarded_server_args

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["cluster", "up", "--cluster", "c.yaml", "--record-trace",
                                      "traces/{server}.safetensors", "--record-max-tokens", "500"])
    fwd = forwarded_server_args(args)
    i = fwd.index("--record-trace")
    assert fwd[i + 1] == str(tmp_path / "traces" / "{server}.safetensors")
    assert fwd[fwd.index("--record-max-tokens") + 1] == "500"
    serve = build_parser().parse_args(["serve", "--cluster", "c.yaml", "--server", "a", *fwd])
    assert serve.record_trace == fwd[i + 1] and serve.record_max_tokens == 500
    plain = build_parser().parse_args(["serve", "--cluster", "c.yaml", "--server", "a"])
    assert plain.record_trace is None and plain.record_max_tokens == 1_000_000
    assert "--record-trace" not in forwarded_server_args(
        build_parser().parse_args(["cluster", "up", "--cluster", "c.yaml"]))
    # folders travel absolute (Ray actors run elsewhere), as the coordinator's --keys does
    fwd = forwarded_server_args(build_parser().parse_args(["cluster", "up", "--cluster", "c.yaml", "--keys", "keys",
                                                            "--data-dir", "data"]))
    assert fwd[fwd.index("--keys") + 1] == str(tmp_path / "keys")
    assert fwd[fwd.index("--data-dir") + 1] == str(tmp_path / "data")
    # --max-running reaches every server; a bad value is refused before anything loads
    fwd = forwarded_server_args(build_parser().parse_args(["cluster", "up", "--cluster", "c.yaml",
                                                            "--max-running", "64"]))
    assert fwd[fwd.index("--max-running") + 1] == "64"
    assert build_parser().parse_args(["serve", "--cluster", "c.yaml", "--server", "a", *fwd]).max_running == 64
    from prism_moe.commands.serve import run_serve

    with pytest.raises(ValueError, match="--max-running must be at least 1"):
        run_serve(build_parser().parse_args(["serve", "--cluster", "c.yaml", "--server", "a", "--max-running", "0"]))


def test_edge_server_records_saves_on_request_and_on_close(tiny_dir: Path, tmp_path: Path) -> None:
    """One in-process server: requests through the engine's generation thread, POST /prism/trace/save
    (admin-key protected: the users' API key is refused), and the final save in close()."""
    from fastapi.testclient import TestClient

    from prism_moe.config import cluster_from_dict
    from prism_moe.runtime.launcher import free_port
    from prism_moe.runtime.server import EdgeServer, ServeOptions

    spec = ModelSpec.from_pretrained(tiny_dir)
    cluster = cluster_from_dict({"model": str(tiny_dir), "device": "cpu", "servers": [
        {"name": "solo", "memory_gib": 1, "host": "127.0.0.1", "expert_port": free_port(), "http_port": 1}]})
    path = tmp_path / "t" / "{server}.safetensors"
    server = EdgeServer(cluster, "solo", ServeOptions(placement=_solo_placement(spec), device="cpu", api_key="k",
                                                      admin_key="admin-0123456789abcdef", record_trace=str(path)))
    want = tmp_path / "t" / "solo.safetensors"
    try:
        server.start()
        auth = {"Authorization": "Bearer k"}
        with TestClient(server.app()) as client:
            r = client.post("/v1/completions", headers=auth,
                            json={"model": server.model_name, "prompt": "The edge", "max_tokens": 4})
            assert r.status_code == 200, r.text
            assert client.post("/prism/trace/save").status_code == 401
            assert client.post("/prism/trace/save", headers=auth).status_code == 403
            r = client.post("/prism/trace/save", headers={"Authorization": "Bearer admin-0123456789abcdef"})
            assert r.status_code == 200, r.text
            saved = r.json()
            assert saved["tokens"] > 0 and saved["path"] == str(want)
            assert client.get("/prism/stats", headers=auth).json()["trace_recording"]["tokens"] == saved["tokens"]
        t = load_trace(want)
        assert t.num_tokens == saved["tokens"] and t.num_layers == spec.num_moe_layers
        # every recorded activation is one the server counted
        np.testing.assert_array_equal(t.counts(), server.dispatcher.counter.snapshot())
    finally:
        server.close()
    assert load_trace(want).num_tokens >= saved["tokens"]
