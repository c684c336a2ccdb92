"""Readers of the public formats, on small hand-made files; and the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch

from prism_moe.stats import UnsafeFileError, restricted_pickle_load
from prism_moe.stats.readers import (
    read_esft_domain,
    read_esft_prompts,
    read_fiddler,
    read_mixtral_decode,
    read_moe_lens,
    read_olmoe_counts,
    read_olmoe_crosslayer,
)

# --- ESFT ----------------------------------------------------------------------------------------

# Two sequences: 1 token and 2 tokens; top-2 of 64 experts (top_k passed explicitly).
LAYER1 = [([5, 9], [0.5, 0.25]), ([1, 2, 63, 0], [0.1, 0.2, 0.3, 0.4])]
LAYER2 = [([7, 5], [0.6, 0.1]), ([3, 4, 8, 9], [0.5, 0.5, 0.25, 0.75])]


def test_esft_domain_hand_made(tmp_path, write_esft):
    d = tmp_path / "dom"
    write_esft(d / "expert_weights_1.txt.gz", LAYER1)
    write_esft(d / "expert_weights_2.txt", LAYER2, gz=False)  # plain text is read too
    t = read_esft_domain(d, top_k=2)
    # token-major: [token, MoE layer (file L -> L-1), k]
    np.testing.assert_array_equal(t.experts, [[[5, 9], [7, 5]],
                                              [[1, 2], [3, 4]],
                                              [[63, 0], [8, 9]]])
    np.testing.assert_allclose(t.weights[2], [[0.3, 0.4], [0.25, 0.75]])
    np.testing.assert_array_equal(t.seq_starts, [0, 1, 3])
    assert t.num_experts == 64 and t.source == "esft:dom" and t.model == "deepseek-v2-lite"
    np.testing.assert_array_equal(t.counts()[0, [0, 1, 2, 5, 9, 63]], [1, 1, 1, 1, 1, 1])


def test_esft_reader_caches_and_sees_changes(tmp_path, write_esft):
    d = tmp_path / "dom"
    write_esft(d / "expert_weights_1.txt.gz", LAYER1)
    a = read_esft_domain(d, top_k=2)
    assert read_esft_domain(d, top_k=2) is a  # parsed once per process
    p = write_esft(d / "expert_weights_1.txt.gz", LAYER1[:1])
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert read_esft_domain(d, top_k=2).num_tokens == 1


@pytest.mark.parametrize("layer2, message", [
    (LAYER2[:1], "does not match"),  # fewer lines
    ([LAYER2[0], ([3, 4], [0.5, 0.5])], "does not match"),  # fewer tokens on line 2
    ([([7, 5, 1], [0.6, 0.1, 0.1])], "same multiple of top-k=2"),
    ([([7, 5], [0.6]), LAYER2[1]], "same multiple"),
    ([([7, "x"], [0.6, 0.1]), LAYER2[1]], "malformed number|unreadable number"),
    ([([7, 70], [0.6, 0.1]), LAYER2[1]], "outside 0..63"),
])
def test_esft_refuses_inconsistent_files(tmp_path, write_esft, layer2, message):
    d = tmp_path / "dom"
    write_esft(d / "expert_weights_1.txt.gz", LAYER1)
    write_esft(d / "expert_weights_2.txt.gz", layer2)
    with pytest.raises(ValueError, match=message):
        read_esft_domain(d, top_k=2)


def test_esft_refuses_layer_gaps(tmp_path, write_esft):
    d = tmp_path / "dom"
    write_esft(d / "expert_weights_1.txt.gz", LAYER1)
    write_esft(d / "expert_weights_3.txt.gz", LAYER1)
    with pytest.raises(ValueError, match="without gaps"):
        read_esft_domain(d, top_k=2)
    with pytest.raises(FileNotFoundError):
        read_esft_domain(tmp_path / "empty-or-missing", top_k=2)


def test_esft_prompts(tmp_path):
    p = tmp_path / "law.jsonl"
    p.write_text(json.dumps({"idx": 0, "prompt": "User: 你好", "answers": []}) + "\n\n"
                 + json.dumps({"idx": 1, "prompt": "b"}) + "\n")
    assert read_esft_prompts(p) == ["User: 你好", "b"]
    p.write_text(json.dumps({"idx": 0}) + "\n")
    with pytest.raises(ValueError, match="no string 'prompt'"):
        read_esft_prompts(p)


# --- MoE-Lens ------------------------------------------------------------------------------------

def test_moe_lens_keys_are_one_based(tmp_path):
    p = tmp_path / "x_expert_data_base.pt"
    torch.save({2: torch.tensor([0.0, 4.0, 1.0]), 1: torch.tensor([3.0, 2.0, 0.0])}, p)
    np.testing.assert_array_equal(read_moe_lens(p), [[3, 2, 0], [0, 4, 1]])  # key 1 -> MoE layer 0
    torch.save({0: torch.zeros(3), 1: torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="1..n"):
        read_moe_lens(p)
    torch.save({1: torch.zeros(3), 2: torch.zeros(4)}, p)
    with pytest.raises(ValueError, match="different expert counts"):
        read_moe_lens(p)


class _Payload:
    """Anything torch.load(weights_only=True) must refuse to rebuild."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_moe_lens_refuses_code_in_pt(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.pt"
    torch.save({1: _Payload(str(marker))}, p)
    with pytest.raises(ValueError, match="weights_only"):
        read_moe_lens(p)
    assert not marker.exists()


# --- restricted pickles --------------------------------------------------------------------------

def test_olmoe_counts_hand_made(tmp_path):
    p = tmp_path / "c.pkl"
    # numpy int64 keys, as the OLMoE script writes them (Counter(np.ndarray.flatten()))
    layers = [Counter({np.int64(0): 5, np.int64(3): 2}), Counter({np.int64(1): 7}), Counter()]
    p.write_bytes(pickle.dumps(layers))
    counts, measured = read_olmoe_counts(p, num_layers=16, num_experts=4)
    assert counts.shape == (16, 4)
    np.testing.assert_array_equal(counts[0], [5, 0, 0, 2])
    np.testing.assert_array_equal(counts[7], [0, 7, 0, 0])
    assert counts[15].sum() == 0 and counts[[1, 2, 8, 14]].sum() == 0
    np.testing.assert_array_equal(np.flatnonzero(measured), [0, 7, 15])
    p.write_bytes(pickle.dumps(layers[:2]))
    with pytest.raises(ValueError, match="list of 3 Counters"):
        read_olmoe_counts(p, num_layers=16, num_experts=4)
    p.write_bytes(pickle.dumps([Counter({9: 1}), Counter(), Counter()]))
    with pytest.raises(ValueError, match="not in 0..3"):
        read_olmoe_counts(p, num_layers=16, num_experts=4)


def test_olmoe_crosslayer_hand_made(tmp_path):
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps([Counter({(np.int64(0), np.int64(1)): 3}), Counter({(1, 1): 2, (0, 0): 1})]))
    x = read_olmoe_crosslayer(p, num_experts=2)
    np.testing.assert_array_equal(x, [[[0, 3], [0, 0]], [[1, 0], [0, 2]]])


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("make, refused", [
    (lambda m: _Evil(os.system, f"touch {m}"), "system"),
    (lambda m: _Evil(eval, f"open({str(m)!r}, 'w')"), "builtins.eval"),
    (lambda m: _Evil(subprocess.call, ["touch", str(m)]), "subprocess.call"),
    (lambda m: [Counter({_Evil(os.system, f"touch {m}"): 1})], "system"),  # hidden inside a Counter key
    (lambda m: np.zeros(2), "numpy"),  # a whole array is not a plain counts pickle either
    (lambda m: np.str_("x"), "only integer dtypes"),  # a non-integer numpy scalar
])
def test_malicious_pickles_are_refused_without_running(tmp_path, make, refused):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(make(marker)))
    with pytest.raises(UnsafeFileError, match=refused) as info:
        restricted_pickle_load(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError):  # the same through the public reader
        read_olmoe_counts(p, num_layers=16, num_experts=4)
    assert not marker.exists()


def test_refused_dtype_kinds(tmp_path):
    p = tmp_path / "f.pkl"
    p.write_bytes(pickle.dumps([Counter({np.float64(1.5): 1})]))
    with pytest.raises(UnsafeFileError, match="only integer dtypes"):
        restricted_pickle_load(p)


def test_garbage_pickle_is_a_value_error(tmp_path):
    p = tmp_path / "g.pkl"
    p.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable pickle"):
        restricted_pickle_load(p)


# --- Fiddler -------------------------------------------------------------------------------------

def test_fiddler_hand_made(tmp_path):
    p = tmp_path / "expert_popularity_x.json"
    p.write_text(json.dumps({"total_input_tokens": 3, "expert_popularity": [[1, 2, 3], [3, 2, 1]]}))
    np.testing.assert_array_equal(read_fiddler(p), [[1, 2, 3], [3, 2, 1]])
    p.write_text(json.dumps({"expert_popularity": [[1, 2], [3]]}))
    with pytest.raises(ValueError, match="different numbers"):
        read_fiddler(p)
    p.write_text(json.dumps({"popularity": []}))
    with pytest.raises(ValueError, match="expert_popularity"):
        read_fiddler(p)


# --- Mixtral decode ------------------------------------------------------------------------------

def _rec(problem, layer, tok, experts, probs):
    return json.dumps({"dataset": "d", "problem_id": problem, "layer": layer, "experts": experts,
                       "gating_probs": probs, "token_idx": tok})


def test_mixtral_decode_hand_made(tmp_path):
    p = tmp_path / "d_2_routing.jsonl"
    lines = [
        _rec(0, 0, 0, [1, 0], [0.75, 0.25]), _rec(0, 0, 1, [2, 3], [0.5, 0.5]),
        _rec(0, 0, 2, [4, 5], [0.5, 0.5]),  # layer 0 of problem 0 has one step more: cut
        _rec(0, 1, 0, [7, 6], [0.5, 0.5]), _rec(0, 1, 1, [0, 1], [0.5, 0.5]),
        _rec(1, 0, 0, [3, 2], [0.5, 0.5]), _rec(1, 1, 0, [5, 4], [0.625, 0.375]),
    ]
    p.write_text("\n".join(lines) + "\n")
    notes: list[str] = []
    t = read_mixtral_decode(p, num_layers=2, notes=notes)
    np.testing.assert_array_equal(t.experts, [[[1, 0], [7, 6]], [[2, 3], [0, 1]], [[3, 2], [5, 4]]])
    np.testing.assert_allclose(t.weights[0, 0], [0.75, 0.25])
    np.testing.assert_array_equal(t.seq_starts, [0, 2, 3])
    assert len(notes) == 1 and "dropping 1 of 7 records" in notes[0]


@pytest.mark.parametrize("lines, message", [
    ([_rec(0, 0, 0, [1, 0], [0.5, 0.5])], r"no records for layer\(s\) \[1\]"),
    ([_rec(0, 0, 0, [1, 0], [0.5, 0.5]), _rec(0, 1, 1, [1, 0], [0.5, 0.5])], "run 0..n-1"),
    ([_rec(0, 5, 0, [1, 0], [0.5, 0.5])], "outside 0..1"),
    ([_rec(0, 0, 0, [1, 0], [0.5])], "gating probs"),
    (['{"problem_id": 0}'], "not a routing record"),
])
def test_mixtral_decode_refuses_bad_records(tmp_path, lines, message):
    p = tmp_path / "d_2_routing.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_mixtral_decode(p, num_layers=2)
