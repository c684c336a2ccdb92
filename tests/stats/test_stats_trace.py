"""RoutingTrace, the trace and counts file formats, and TraceRecorder, on small hand-made data."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from prism_moe.stats import (
    RoutingTrace,
    TraceRecorder,
    load_counts,
    load_trace,
    save_counts,
    save_trace,
)

# 2 sequences (3 + 2 tokens), 2 layers, top-2 of 4 experts.
EXPERTS = np.array([[[0, 1], [2, 3]],
                    [[1, 2], [0, 3]],
                    [[3, 0], [1, 2]],
                    [[0, 2], [2, 1]],
                    [[1, 3], [3, 0]]], dtype=np.int16)
WEIGHTS = np.arange(20, dtype=np.float32).reshape(5, 2, 2) / 20


def small_trace(**kw) -> RoutingTrace:
    args = dict(experts=EXPERTS, weights=WEIGHTS, seq_starts=np.array([0, 3, 5]), num_experts=4,
                source="hand", model="m")
    args.update(kw)
    return RoutingTrace(**args)


# --- RoutingTrace --------------------------------------------------------------------------------

def test_counts_match_hand_count():
    # layer 0 picks: 0,1 | 1,2 | 3,0 | 0,2 | 1,3 -> e0:3 e1:3 e2:2 e3:2
    # layer 1 picks: 2,3 | 0,3 | 1,2 | 2,1 | 3,0 -> e0:2 e1:2 e2:3 e3:3
    t = small_trace()
    np.testing.assert_array_equal(t.counts(), [[3, 3, 2, 2], [2, 2, 3, 3]])
    assert t.counts().dtype == np.float64
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_sequences) == (5, 2, 2, 2)
    np.testing.assert_array_equal(t.sequence_lengths(), [3, 2])


def test_sequences_are_views_in_order():
    seqs = list(small_trace().sequences())
    assert [s.index for s in seqs] == [0, 1]
    np.testing.assert_array_equal(seqs[0].experts, EXPERTS[:3])
    np.testing.assert_array_equal(seqs[1].weights, WEIGHTS[3:])


def test_subset_reorders_and_repeats():
    t = small_trace().subset([1, 0, 1])
    np.testing.assert_array_equal(t.seq_starts, [0, 2, 5, 7])
    np.testing.assert_array_equal(t.experts, np.concatenate([EXPERTS[3:], EXPERTS[:3], EXPERTS[3:]]))
    np.testing.assert_array_equal(t.weights, np.concatenate([WEIGHTS[3:], WEIGHTS[:3], WEIGHTS[3:]]))
    empty = small_trace().subset([])
    assert empty.num_tokens == 0 and empty.num_sequences == 0
    with pytest.raises(ValueError, match="sequence indices"):
        small_trace().subset([2])


def test_concat_and_empty():
    t = RoutingTrace.concat([small_trace(), small_trace().subset([1])])
    np.testing.assert_array_equal(t.seq_starts, [0, 3, 5, 7])
    no_w = RoutingTrace.concat([small_trace(), small_trace(weights=None)])
    assert no_w.weights is None
    e = RoutingTrace.empty(2, 2, 4)
    assert e.num_tokens == 0 and e.counts().shape == (2, 4) and e.counts().sum() == 0


def test_arrays_are_read_only_and_callers_array_untouched():
    mine = EXPERTS.copy()
    t = small_trace(experts=mine)
    with pytest.raises(ValueError):
        t.experts[0, 0, 0] = 1
    mine[0, 0, 0] = 3  # the caller's array stays writable
    assert mine.flags.writeable


def test_other_integer_dtypes_are_narrowed():
    t = small_trace(experts=EXPERTS.astype(np.int64), weights=WEIGHTS.astype(np.float64))
    assert t.experts.dtype == np.int16 and t.weights.dtype == np.float32
    assert small_trace(experts=EXPERTS.astype(np.int32)).experts.dtype == np.int32


@pytest.mark.parametrize("kw, message", [
    (dict(experts=EXPERTS[0]), r"shape \[tokens, layers, k\]"),
    (dict(experts=EXPERTS.astype(np.float32)), "integer expert ids"),
    (dict(num_experts=3), r"expert ids must be in 0..2"),
    (dict(num_experts=0), "positive"),
    (dict(experts=np.where(EXPERTS == 1, 0, EXPERTS)), "twice"),
    (dict(weights=WEIGHTS[:, :1]), "weights shape"),
    (dict(weights=np.full(WEIGHTS.shape, np.nan, np.float32)), "NaN"),
    (dict(seq_starts=np.array([0, 3])), "end at the token count 5"),
    (dict(seq_starts=np.array([0, 3, 3, 5])), "strictly increasing"),
    (dict(seq_starts=np.array([0.0, 5.0])), "integers"),
])
def test_invalid_traces_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        small_trace(**kw)


# --- trace files ---------------------------------------------------------------------------------

def test_trace_round_trip(tmp_path):
    t = small_trace()
    p = save_trace(t, tmp_path / "sub" / "t.safetensors")
    back = load_trace(p)
    np.testing.assert_array_equal(back.experts, t.experts)
    np.testing.assert_array_equal(back.weights, t.weights)
    np.testing.assert_array_equal(back.seq_starts, t.seq_starts)
    assert (back.num_experts, back.source, back.model) == (4, "hand", "m")
    assert back.experts.dtype == np.int16
    no_w = load_trace(save_trace(small_trace(weights=None), tmp_path / "n.safetensors"))
    assert no_w.weights is None


def _raw(tmp_path, tensors=None, **meta):
    tensors = tensors if tensors is not None else {"experts": EXPERTS, "seq_starts": np.array([0, 3, 5])}
    metadata = {"format": "prism-moe-trace", "version": "1", "num_experts": "4", "source": "", "model": ""}
    metadata.update(meta)
    p = tmp_path / "raw.safetensors"
    save_file(tensors, str(p), metadata={k: v for k, v in metadata.items() if v is not None})
    return p


@pytest.mark.parametrize("tensors, meta, message", [
    (None, dict(format="something-else"), "not a prism-moe trace"),
    (None, dict(format=None), "not a prism-moe trace"),
    (None, dict(version="2"), "version '2' is not supported"),
    (None, dict(num_experts="many"), "num_experts='many' is not an integer"),
    (None, dict(num_experts="3"), r"expert ids must be in 0..2"),
    ({"experts": EXPERTS}, {}, r"missing tensor\(s\) \['seq_starts'\]"),
    ({"experts": EXPERTS, "seq_starts": np.array([0, 5]), "extra": np.zeros(1)}, {}, "unexpected tensor"),
    ({"experts": EXPERTS.astype(np.int64), "seq_starts": np.array([0, 5])}, {}, "int16 or int32"),
    ({"experts": EXPERTS, "seq_starts": np.array([0, 5], np.int32)}, {}, "must be int64"),
    ({"experts": EXPERTS, "seq_starts": np.array([0, 5]), "weights": WEIGHTS.astype(np.float64)}, {},
     "must be float32"),
    ({"experts": EXPERTS, "seq_starts": np.array([0, 4])}, {}, "end at the token count"),
])
def test_load_trace_refuses_bad_files(tmp_path, tensors, meta, message):
    p = _raw(tmp_path, tensors, **meta)
    with pytest.raises(ValueError, match=message) as info:
        load_trace(p)
    assert str(p) in str(info.value)  # the error names the file


def test_load_trace_refuses_non_safetensors(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x00" * 8 + b"not a header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_trace(p)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.safetensors")


@st.composite
def traces(draw):
    num_experts = draw(st.integers(1, 40))
    k = draw(st.integers(1, min(num_experts, 4)))
    layers = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 5), max_size=4))
    tokens = sum(lengths)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # k distinct experts per (token, layer): the first k of a random permutation
    experts = np.argsort(rng.random((tokens, layers, num_experts)), axis=2)[:, :, :k]
    dtype = draw(st.sampled_from([np.int16, np.int32]))
    weights = rng.random((tokens, layers, k)).astype(np.float32) if draw(st.booleans()) else None
    return RoutingTrace(experts=experts.astype(dtype), weights=weights,
                        seq_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        num_experts=num_experts, source=draw(st.text(max_size=8)),
                        model=draw(st.sampled_from(["", "olmoe-1b-7b"])))


@settings(max_examples=40, deadline=None)
@given(traces())
def test_save_load_round_trip_property(t):
    with tempfile.TemporaryDirectory() as d:
        back = load_trace(save_trace(t, Path(d) / "t.safetensors"))
    assert back.experts.dtype == t.experts.dtype
    np.testing.assert_array_equal(back.experts, t.experts)
    np.testing.assert_array_equal(back.seq_starts, t.seq_starts)
    if t.weights is None:
        assert back.weights is None
    else:
        np.testing.assert_array_equal(back.weights, t.weights)
    assert (back.num_experts, back.source, back.model) == (t.num_experts, t.source, t.model)
    np.testing.assert_array_equal(back.counts(), t.counts())


# --- counts files --------------------------------------------------------------------------------

def test_counts_round_trip(tmp_path):
    counts = np.array([[10, 0, 5, 5], [3, 7, 0, 10]], dtype=float)
    p = save_counts(counts, tmp_path / "c.json", top_k=2, source="s", model="m",
                    measured_layers=np.array([True, False]))
    doc = json.loads(p.read_text())
    assert doc["format"] == "prism-moe-counts" and doc["version"] == 1 and doc["num_experts"] == 4
    assert doc["counts"] == [[10, 0, 5, 5], [3, 7, 0, 10]]  # integral counts stay integers
    c = load_counts(p)
    np.testing.assert_array_equal(c.counts, counts)
    assert (c.top_k, c.source, c.model, c.num_experts) == (2, "s", "m", 4)
    np.testing.assert_array_equal(c.measured_layers, [True, False])
    frac = np.array([[0.1, 0.2], [1 / 3, 0.0]])
    np.testing.assert_array_equal(load_counts(save_counts(frac, tmp_path / "f.json")).counts, frac)


def test_minimal_counts_file(tmp_path):
    p = tmp_path / "min.json"
    p.write_text('{"format": "prism-moe-counts", "version": 1, "num_experts": 2, "counts": [[1, 2]]}')
    c = load_counts(p)
    assert c.top_k == 0 and c.measured_layers is None and c.counts.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize("doc, message", [
    ("not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    (dict(format="other"), "format is 'other'"),
    (dict(version="1"), "version '1' is not supported"),
    (dict(num_experts=0), "positive integer"),
    (dict(counts=[]), "non-empty list"),
    (dict(counts=[[1, 2, 3]]), "layer 0 has 3 counts but num_experts is 2"),
    (dict(counts=[[1, -2]]), "finite non-negative"),
    (dict(counts=[[1, True]]), "finite non-negative"),
    (dict(top_k=3), "top_k"),
    (dict(measured_layers=[True, True]), "measured_layers must be a list of 1 booleans"),
])
def test_load_counts_refuses_bad_files(tmp_path, doc, message):
    p = tmp_path / "bad.json"
    if isinstance(doc, dict):
        base = {"format": "prism-moe-counts", "version": 1, "num_experts": 2, "counts": [[1, 2]]}
        base.update(doc)
        doc = base
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        load_counts(p)


# --- recorder ------------------------------------------------------------------------------------

def test_recorder_single_sequence_matches_direct_trace():
    rec = TraceRecorder(num_layers=2, top_k=2, num_experts=4, source="hand", model="m")
    rec.append(EXPERTS[:2], WEIGHTS[:2])  # prefill
    rec.append(EXPERTS[2], WEIGHTS[2])    # one decoded token as [layers, k]
    assert rec.finish_sequence() == 0
    rec.append(EXPERTS[3:], WEIGHTS[3:])
    assert rec.finish_sequence() == 1
    t = rec.to_trace()
    ref = small_trace()
    np.testing.assert_array_equal(t.experts, ref.experts)
    np.testing.assert_array_equal(t.weights, ref.weights)
    np.testing.assert_array_equal(t.seq_starts, ref.seq_starts)
    assert (t.source, t.model, rec.num_tokens, rec.num_sequences) == ("hand", "m", 5, 2)


def test_recorder_interleaved_sequences_enter_in_finish_order():
    rec = TraceRecorder(2, 2, 4)
    rec.append(EXPERTS[0], seq="a")
    rec.append(EXPERTS[3], seq="b")
    rec.append(EXPERTS[1], seq="a")
    rec.append(EXPERTS[4], seq="b")
    rec.append(EXPERTS[2], seq="c")
    assert rec.finish_sequence("b") == 0
    assert rec.finish_sequence("a") == 1
    assert rec.open_sequences == ["c"]
    t = rec.to_trace()  # the open sequence "c" is not included
    assert t.weights is None
    np.testing.assert_array_equal(t.experts, EXPERTS[[3, 4, 0, 1]])
    np.testing.assert_array_equal(t.seq_starts, [0, 2, 4])
    rec.discard_sequence("c")
    assert rec.open_sequences == []


def test_recorder_copies_inputs_and_checks_them():
    rec = TraceRecorder(2, 2, 4)
    buf = EXPERTS[:1].copy()
    rec.append(buf, WEIGHTS[:1])
    buf[:] = 0  # the runtime reuses its buffers
    rec.finish_sequence()
    np.testing.assert_array_equal(rec.to_trace().experts, EXPERTS[:1])
    with pytest.raises(ValueError, match="pass weights"):
        rec.append(EXPERTS[:1])
    with pytest.raises(ValueError, match=r"shape \[tokens, 2, 2\]"):
        rec.append(EXPERTS[:, :1], WEIGHTS[:, :1])
    with pytest.raises(ValueError, match="0..3"):
        rec.append(EXPERTS[:1] + 4, WEIGHTS[:1])
    with pytest.raises(ValueError, match="no open sequence"):
        rec.finish_sequence("nope")
    with pytest.raises(ValueError, match="top_k"):
        TraceRecorder(2, 5, 4)


def test_recorder_without_sequences_gives_empty_trace():
    t = TraceRecorder(3, 2, 8).to_trace()
    assert t.num_tokens == 0 and t.experts.shape == (0, 3, 2)
