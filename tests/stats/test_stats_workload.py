"""Workload, fit_to, load_workload and the data folder, on a small hand-made data folder."""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prism_moe.model.spec import load_model_spec
from prism_moe.stats import (
    RoutingTrace,
    Workload,
    list_workloads,
    load_prompts,
    load_workload,
    resolve_data_dir,
    save_counts,
    save_trace,
    stack_counts,
)


def wl(counts, measured=None, trace=None, **kw) -> Workload:
    counts = np.asarray(counts, dtype=float)
    measured = np.ones(len(counts), bool) if measured is None else np.asarray(measured)
    args = dict(source="w", counts=counts, trace=trace, measured_layers=measured, model_hint="", top_k=1)
    args.update(kw)
    return Workload(**args)


# --- Workload --------------------------------------------------------------------------------------

def test_frequencies_normalise_rows_and_zero_rows_are_uniform():
    f = wl([[1, 3], [0, 0], [2, 2]]).frequencies()
    np.testing.assert_allclose(f, [[0.25, 0.75], [0.5, 0.5], [0.5, 0.5]])


def test_num_tokens():
    assert wl([[4, 2], [3, 3]], top_k=2).num_tokens == 3
    assert wl([[4, 2], [0, 0]], measured=[True, False], top_k=2).num_tokens == 3
    assert wl([[4, 2]], top_k=0).num_tokens == 0


def test_fit_to_fills_unmeasured_layers_from_nearest_and_says_so():
    counts = np.array([[1, 0], [0, 0], [0, 0], [0, 0], [0, 5], [0, 0]], float)
    w = wl(counts, measured=[True, False, False, False, True, False], notes=["earlier"])
    f = w.fit_to(6, 2)
    # nearest measured layer of 1..3 is 0 (1, 2 away; layer 2 is a tie: the shallower wins), of 5 it is 4
    np.testing.assert_array_equal(f.counts, counts[[0, 0, 0, 4, 4, 4]])
    np.testing.assert_array_equal(f.measured_layers, [True, False, False, False, True, False])
    assert f.notes[0] == "earlier" and "1-3, 5 were not measured" in f.notes[1] and "(0, 4)" in f.notes[1]
    assert w.notes == ["earlier"]  # the original is unchanged
    assert w.counts[1].sum() == 0


def test_fit_to_same_shape_is_identity():
    w = wl([[1, 2], [3, 4]])
    f = w.fit_to(2, 2)
    np.testing.assert_array_equal(f.counts, w.counts)
    assert f.notes == []


def test_fit_to_other_layer_count_maps_by_relative_depth():
    w = wl([[1, 0], [0, 1], [1, 1]])  # 3 layers -> 5: depths 0, .5, 1, 1.5, 2 -> 0, 0, 1, 1, 2 (ties: shallower)
    f = w.fit_to(5, 2)
    np.testing.assert_array_equal(f.counts, np.asarray(w.counts)[[0, 0, 1, 1, 2]])
    assert not f.measured_layers.any()
    assert "measured on 3 MoE layers, fitted to 5" in f.notes[0]
    g = w.fit_to(2, 2)  # 3 -> 2: depths 0, 2
    np.testing.assert_array_equal(g.counts, np.asarray(w.counts)[[0, 2]])


def test_fit_to_remaps_the_trace():
    experts = np.array([[[0], [1], [2]]])  # 1 token, 3 layers, top-1 of 3
    t = RoutingTrace(experts=experts, weights=None, seq_starts=np.array([0, 1]), num_experts=3)
    w = Workload(source="t", counts=t.counts(), trace=t, measured_layers=np.ones(3, bool), model_hint="", top_k=1)
    f = w.fit_to(5, 3)
    np.testing.assert_array_equal(f.trace.experts[0, :, 0], [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(f.trace.counts(), f.counts)


def test_fit_to_errors():
    with pytest.raises(ValueError, match="has 2 experts per layer .* but the model has 3"):
        wl([[1, 2]]).fit_to(1, 3)
    with pytest.raises(ValueError, match="no measured layer"):
        wl([[1, 2]], measured=[False]).fit_to(1, 2)


def test_fit_to_model_notes_another_model():
    spec = load_model_spec("olmoe-1b-7b")
    w = wl(np.ones((16, 64)), model_hint="deepseek-v2-lite").fit_to_model(spec)
    assert w.counts.shape == (16, 64)
    assert any("measured on deepseek-v2-lite, used for olmoe-1b-7b" in n for n in w.notes)


def test_workload_validation_and_read_only():
    with pytest.raises(ValueError, match="measured_layers"):
        wl([[1, 2]], measured=[True, True])
    with pytest.raises(ValueError, match="non-negative"):
        wl([[1, -2]])
    w = wl([[1, 2]])
    with pytest.raises(ValueError):
        w.counts[0, 0] = 5


def test_stack_counts():
    a, b = wl([[1, 3]]), wl([[2, 2]])
    np.testing.assert_array_equal(stack_counts([a, b]), [[[1, 3]], [[2, 2]]])
    np.testing.assert_allclose(stack_counts([a, b], normalize=True), [[[0.25, 0.75]], [[0.5, 0.5]]])
    with pytest.raises(ValueError, match="different shapes"):
        stack_counts([a, wl([[1, 2], [3, 4]])])


# --- data folder -----------------------------------------------------------------------------------

def test_resolve_data_dir(tmp_path, monkeypatch):
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="PRISM_DATA_DIR"):
        resolve_data_dir()


@pytest.fixture
def fake_data(tmp_path, write_esft) -> Path:
    """A data folder in the real layout, each set with a tiny hand-made file."""
    root = tmp_path / "data"
    ids, w = list(range(6)) + list(range(6, 12)), [0.1] * 12  # 2 tokens, top-6
    for layer in (1, 2):
        write_esft(root / "esft" / "expert_scores" / "law" / f"expert_weights_{layer}.txt.gz", [(ids, w)])
    (root / "esft" / "prompts").mkdir(parents=True)
    (root / "esft" / "prompts" / "law.jsonl").write_text(json.dumps({"idx": 0, "prompt": "p0"}) + "\n")
    (root / "moe-lens").mkdir()
    import torch

    torch.save({k: torch.full((60,), float(k)) for k in range(1, 25)}, root / "moe-lens" / "code_expert_data_qwen.pt")
    torch.save({1: torch.zeros(3)}, root / "moe-lens" / "code_expert_data_other.pt")  # unknown model: skipped
    for sub in ("expert_counts", "expert_counts_top1"):
        d = root / "olmoe-routing" / "mistral" / sub
        d.mkdir(parents=True)
        (d / "web.pkl").write_bytes(pickle.dumps([Counter({0: 4, 7: 4}), Counter({1: 8}), Counter({2: 8})]))
    (root / "olmoe-routing" / "text").mkdir()
    (root / "olmoe-routing" / "text" / "web_texts.txt").write_text("line one\n\nline two\n")
    d = root / "fiddler-mixtral" / "original"
    d.mkdir(parents=True)
    (d / "expert_popularity_law.json").write_text(json.dumps({"expert_popularity": [[1] * 8] * 32}))
    d = root / "mixtral-decode"
    d.mkdir()
    recs = [{"problem_id": 0, "layer": layer, "token_idx": 0, "experts": [layer % 8, (layer + 1) % 8],
             "gating_probs": [0.5, 0.5]} for layer in range(32)]
    (d / "math_2_routing.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    return root


def test_list_workloads_on_fake_folder(fake_data):
    assert list_workloads(fake_data) == [
        "embedded:esft:intent", "embedded:esft:law", "embedded:esft:summary", "embedded:esft:translation",
        "esft:law", "fiddler:original:law", "mixtral-decode:math", "moe-lens:qwen:code",
        "olmoe-routing:mistral:web", "olmoe-routing:mistral:web:top1"]


def test_every_fake_workload_loads_with_its_model_shape(fake_data):
    for name in list_workloads(fake_data):
        if name.startswith("embedded:"):
            continue  # tests/stats/test_embedded.py
        w = load_workload(name, fake_data)
        assert w.source == name
        if name != "esft:law":  # the fake ESFT domain has 2 layers, not 26
            spec = load_model_spec(w.model_hint)
            assert w.counts.shape == (spec.num_moe_layers, spec.num_experts), name
    esft = load_workload("esft:law", fake_data)
    assert esft.model_hint == "deepseek-v2-lite" and esft.top_k == 6 and esft.trace.num_tokens == 2
    np.testing.assert_array_equal(esft.counts[0, :12], [1] * 12)
    q = load_workload("moe-lens:qwen:code", fake_data)
    assert q.counts[0, 0] == 1 and q.counts[23, 0] == 24 and q.top_k == 4  # key k -> MoE layer k-1
    m = load_workload("olmoe-routing:mistral:web", fake_data)
    np.testing.assert_array_equal(np.flatnonzero(m.measured_layers), [0, 7, 15])
    assert m.counts[7, 1] == 8 and m.top_k == 2 and "0, 7, 15" in m.notes[0]
    assert load_workload("olmoe-routing:mistral:web:top1", fake_data).top_k == 1
    filled = m.fit_to(32, 8)
    np.testing.assert_array_equal(filled.counts[31], m.counts[15])
    assert filled.notes[-1].startswith("olmoe-routing:mistral:web: MoE layers 1-6, 8-14, 16-31 were not measured")


def test_unknown_names_list_the_choices(fake_data):
    cases = {
        "esft:tax": "choose one of: law",
        "esft": "use esft:<domain>",
        "moe-lens:base:code": "choose one of: none",
        "moe-lens:gpt:code": "choose one of: base, chat, olmoe, qwen",
        "olmoe-routing:mistral:book": "choose one of: web",
        "olmoe-routing:mistral:web:top2": r"\[:top1\]",
        "fiddler:original:art": "choose one of: law",
        "fiddler:tuned:law": "instruct, original",
        "mixtral-decode:code": "choose one of: math",
        "sharegpt:x": "use one of the families",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_workload(name, fake_data)


def test_load_workload_caches_but_notes_are_per_call(fake_data):
    a = load_workload("olmoe-routing:mistral:web", fake_data)
    b = load_workload("olmoe-routing:mistral:web", fake_data)
    assert a.counts.base is b.counts.base or np.shares_memory(a.counts, b.counts)  # parsed once
    a.notes.append("mine")
    assert "mine" not in b.notes
    assert "mine" not in load_workload("olmoe-routing:mistral:web", fake_data).notes


def test_load_prompts(fake_data):
    assert load_prompts("esft:law", fake_data) == ["p0"]
    assert load_prompts("olmoe-routing:mistral:web:top1", fake_data) == ["line one", "line two"]
    assert load_prompts("fiddler:original:law", fake_data) is None
    with pytest.raises(ValueError, match="choose one of: law"):
        load_prompts("esft:tax", fake_data)
    with pytest.raises(ValueError, match="choose one of: code"):
        load_prompts("moe-lens:qwen:text", fake_data)
    assert load_prompts(str(fake_data / "any.safetensors"), fake_data) is None


def test_workloads_from_project_files(tmp_path):
    t = RoutingTrace(experts=np.array([[[0, 1]], [[1, 2]]]), weights=None, seq_starts=np.array([0, 2]),
                     num_experts=3, source="server-1", model="olmoe-1b-7b")
    w = load_workload(str(save_trace(t, tmp_path / "s1.safetensors")))
    assert (w.source, w.model_hint, w.top_k, w.num_tokens) == ("server-1", "olmoe-1b-7b", 2, 2)
    np.testing.assert_array_equal(w.counts, [[1, 2, 1]])
    p = save_counts(np.array([[1, 1], [0, 0]]), tmp_path / "c.json", top_k=1,
                    measured_layers=np.array([True, False]))
    c = load_workload(str(p))
    assert c.source == str(p.resolve()) and c.top_k == 1 and c.trace is None
    np.testing.assert_array_equal(c.measured_layers, [True, False])
    # a rewritten file is read again
    save_counts(np.array([[2, 2], [0, 0]]), p, top_k=1)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert load_workload(str(p)).counts[0, 0] == 2
    # top_k taken from the model preset when the file has none
    q = load_workload(str(save_counts(np.ones((16, 64)), tmp_path / "o.json", model="olmoe-1b-7b")))
    assert q.top_k == 8 and "took top-8" in q.notes[0]
    with pytest.raises(FileNotFoundError):
        load_workload(str(tmp_path / "none.safetensors"))
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_workload(str(tmp_path / "x.npy"))
