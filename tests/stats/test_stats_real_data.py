"""The readers against independent facts of the real data sets in ../shared/data (skipped without it).

Independent checks, not re-implementations: ESFT's own expert_configs (derived by ESFT from these
score files) must come out of our counts with our layer mapping; the OLMoE cross-layer pickles'
marginals must equal the per-layer counts at the layers we assign; MoE-Lens OLMoE counts must match
the OLMoE authors' layers 0, 7, 15 best at the same index.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from prism_moe.model.spec import load_model_spec
from prism_moe.stats import list_workloads, load_prompts, load_workload
from prism_moe.stats.readers import read_olmoe_crosslayer

ESFT_DOMAINS = ["intent", "law", "summary", "translation"]


@pytest.mark.parametrize("domain", ESFT_DOMAINS)
def test_esft_trace_facts(real_data, domain):
    w = load_workload(f"esft:{domain}", real_data)
    t = w.trace
    assert t.experts.shape[1:] == (26, 6) and t.num_experts == 64  # 26 MoE layers, top-6 of 64
    assert t.experts.min() >= 0 and t.experts.max() <= 63
    assert w.model_hint == "deepseek-v2-lite" and w.top_k == 6
    spec = load_model_spec(w.model_hint)
    assert w.counts.shape == (spec.num_moe_layers, spec.num_experts)
    np.testing.assert_array_equal(w.counts.sum(axis=1), np.full(26, 6.0 * t.num_tokens))
    # gate weights are softmax scores over 64 experts rounded to 4 digits (some print as 0.0);
    # DeepSeek-V2-Lite does not renormalise the top-6, so a token's 6 weights sum to at most 1
    assert (t.weights >= 0).all() and (t.weights.sum(axis=2) <= 1.0 + 1e-3).all()
    assert t.weights.sum(axis=2).mean() < 0.6
    # one sequence per line; every line has the same number of tokens in every layer file
    base = real_data / "esft" / "expert_scores" / domain
    for layer_file in (1, 14, 26):
        lines = gzip.decompress((base / f"expert_weights_{layer_file}.txt.gz").read_bytes()).decode().splitlines()
        assert len(lines) == t.num_sequences
        lens = [len(line.split("\t\t")[0].split("\t")) // 6 for line in lines]
        np.testing.assert_array_equal(lens, t.sequence_lengths())
    # file expert_weights_14 is MoE layer 13: first and last token of the first line, read naively
    first = gzip.decompress((base / "expert_weights_14.txt.gz").read_bytes()).decode().splitlines()[0]
    ids, weights = (part.split("\t") for part in first.split("\t\t"))
    assert [int(x) for x in ids[:6]] == t.experts[0, 13].tolist()
    assert [int(x) for x in ids[-6:]] == t.experts[t.seq_starts[1] - 1, 13].tolist()
    np.testing.assert_allclose([float(x) for x in weights[:6]], t.weights[0, 13], rtol=1e-6)


@pytest.mark.parametrize("domain", ESFT_DOMAINS)
def test_esft_layer_mapping_reproduces_esft_expert_configs(real_data, domain):
    """ESFT picked per layer the experts covering 20% of token scores (generate_expert_config.py,
    top_p=0.2, token score = count / total rounded to 4 digits); config key L is the decoder layer."""
    counts = load_workload(f"esft:{domain}", real_data).counts
    cfg = json.loads((real_data / "esft" / "expert_configs" / f"{domain}.json").read_text())["experts"]
    assert sorted(map(int, cfg)) == list(range(1, 27))
    for key, chosen in cfg.items():
        score = np.round(counts[int(key) - 1] / counts[int(key) - 1].sum(), 4)
        picked, total = [], 0.0
        for e in sorted(range(64), key=lambda e: -score[e]):
            if total >= 0.2:
                break
            picked.append(e)
            total += score[e]
        assert set(picked) == set(chosen), f"layer {key}"


def test_esft_prompts(real_data):
    sizes = {d: len(load_prompts(f"esft:{d}", real_data)) for d in ESFT_DOMAINS}
    assert sizes == {"intent": 500, "law": 100, "summary": 100, "translation": 100}
    assert load_prompts("esft:law", real_data)[0].startswith("User:")


def test_moe_lens_shapes_match_the_models(real_data):
    names = [n for n in list_workloads(real_data) if n.startswith("moe-lens:")]
    assert len(names) == 28  # 4 models x 7 domains
    for name in names:
        w = load_workload(name, real_data)
        spec = load_model_spec(w.model_hint)
        assert w.counts.shape == (spec.num_moe_layers, spec.num_experts), name
        assert w.top_k == spec.top_k
        sums = w.counts.sum(axis=1)
        assert (sums == sums[0]).all() and sums[0] % w.top_k == 0, name  # every layer saw every token
        assert (w.counts == np.round(w.counts)).all()  # raw counts, not normalised


@pytest.mark.parametrize("domain", ["arxiv", "github"])
def test_moe_lens_layer_keys_match_olmoe_layers(real_data, domain):
    """Same model (OLMoE), same kind of text: each of the OLMoE authors' layers 0, 7, 15 correlates best
    with the MoE-Lens layer of the same index, so MoE-Lens key k is MoE layer k-1."""
    ref = load_workload(f"olmoe-routing:olmoe:{domain}", real_data).frequencies()
    lens = load_workload(f"moe-lens:olmoe:{domain}", real_data).frequencies()
    for layer in (0, 7, 15):
        corr = [np.corrcoef(ref[layer], lens[j])[0, 1] for j in range(16)]
        assert int(np.argmax(corr)) == layer


@pytest.mark.parametrize("model, experts, k, layers", [("olmoe", 64, 8, 16), ("mistral", 8, 2, 32)])
def test_olmoe_routing_facts(real_data, model, experts, k, layers):
    for domain in ("arxiv", "book", "c4", "github", "wikipedia"):
        w = load_workload(f"olmoe-routing:{model}:{domain}", real_data)
        assert w.counts.shape == (layers, experts)
        np.testing.assert_array_equal(np.flatnonzero(w.measured_layers), [0, 7, 15])
        np.testing.assert_array_equal(w.counts[[0, 7, 15]].sum(axis=1), [208896 * k] * 3)  # 102 x 2048 tokens
        assert w.counts[~w.measured_layers].sum() == 0 and w.num_tokens == 208896
        top1 = load_workload(f"olmoe-routing:{model}:{domain}:top1", real_data)
        assert top1.top_k == 1 and top1.num_tokens == 208896
        # cross-layer pairs (0, 7) and (7, 15): marginals are the per-layer counts at our layer indices
        x = read_olmoe_crosslayer(real_data / "olmoe-routing" / model / "expert_counts_crosslayer" / f"{domain}.pkl",
                                  num_experts=experts)
        np.testing.assert_array_equal(x[0].sum(axis=1), w.counts[0])
        np.testing.assert_array_equal(x[0].sum(axis=0), w.counts[7])
        np.testing.assert_array_equal(x[1].sum(axis=0), w.counts[15])
    assert load_prompts(f"olmoe-routing:{model}:book", real_data)  # b3g_texts.txt


def test_fiddler_facts(real_data):
    names = [n for n in list_workloads(real_data) if n.startswith("fiddler:")]
    assert len(names) == 14
    for name in names:
        w = load_workload(name, real_data)
        assert w.counts.shape == (32, 8) and w.top_k == 2 and w.model_hint == "mixtral-8x7b"
        sums = w.counts.sum(axis=1)
        assert (sums == sums[0]).all() and sums[0] % 2 == 0, name
    ml = load_workload("fiddler:original:machine_learning", real_data)
    assert ml.num_tokens == 4733  # 9466 selections / top-2


@pytest.mark.parametrize("dataset", ["gsm8k", "humaneval"])
def test_mixtral_decode_facts(real_data, dataset):
    path = real_data / "mixtral-decode" / f"{dataset}_2_routing.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    w = load_workload(f"mixtral-decode:{dataset}", real_data)
    t = w.trace
    assert t.num_sequences == 2 and t.experts.shape[1:] == (32, 2) and t.num_experts == 8
    np.testing.assert_allclose(t.weights.sum(axis=2), 1.0, atol=1e-5)  # Mixtral renormalises its top-2
    for p in (0, 1):
        per_layer = [sum(1 for r in recs if r["problem_id"] == p and r["layer"] == layer) for layer in range(32)]
        assert t.sequence_lengths()[p] == min(per_layer)
    dropped = len(recs) - t.num_tokens * 32
    assert f"dropping {dropped} of {len(recs)} records" in w.notes[0]
    # layer 5 of problem 0, token 0, straight from the file
    r = next(r for r in recs if (r["problem_id"], r["layer"], r["token_idx"]) == (0, 5, 0))
    assert t.experts[0, 5].tolist() == r["experts"]


def test_every_listed_workload_loads(real_data):
    names = list_workloads(real_data)
    assert len(names) == 4 + 28 + 21 + 14 + 2 + 4  # the last 4: the embedded sample
    for name in names:
        w = load_workload(name, real_data)
        spec = load_model_spec(w.model_hint)
        assert w.counts.shape == (spec.num_moe_layers, spec.num_experts), name
        np.testing.assert_allclose(w.fit_to_model(spec).frequencies().sum(axis=1), 1.0)
