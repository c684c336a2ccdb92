"""The routing sample shipped in the package: its content, the `embedded:` names, and `esft:<domain>`
falling back to it when no data folder holds the ESFT set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from prism_moe.stats import (
    embedded_workloads,
    list_workloads,
    load_prompts,
    load_trace,
    load_workload,
    user_data_dir,
)
from prism_moe.stats.readers import read_esft_domain
from prism_moe.stats.workload import EMBEDDED_DIR

DOMAINS = ("intent", "law", "summary", "translation")
ROOT = Path(__file__).resolve().parents[2]


def test_embedded_sample_is_a_real_deepseek_v2_lite_trace():
    assert embedded_workloads() == [f"embedded:esft:{d}" for d in DOMAINS]
    total = 0
    for d in DOMAINS:
        w = load_workload(f"embedded:esft:{d}")
        assert w.source == f"embedded:esft:{d}" and w.model_hint == "deepseek-v2-lite" and w.top_k == 6
        assert w.counts.shape == (26, 64) and w.measured_layers.all()
        assert w.trace.num_tokens >= 2048 and w.trace.weights is None
        np.testing.assert_array_equal(w.counts.sum(axis=1), w.trace.num_tokens * 6)
        assert len(load_prompts(f"embedded:esft:{d}")) == 16
        total += (EMBEDDED_DIR / f"esft-{d}.safetensors").stat().st_size
    assert total < 4e6  # a few MB at most
    # domains differ: the most used experts of intent and translation are not the same
    a, b = (load_workload(f"embedded:esft:{d}").frequencies() for d in ("intent", "translation"))
    assert np.abs(a - b).sum(axis=1).mean() > 0.5


def test_esft_falls_back_to_the_sample_without_the_esft_set(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path))  # a data folder without ESFT
    w = load_workload("esft:law")
    assert w.source == "embedded:esft:law"
    np.testing.assert_array_equal(w.counts, load_workload("embedded:esft:law").counts)
    assert "using the embedded sample embedded:esft:law" in w.notes[-1] and "prism data fetch esft" in w.notes[-1]
    assert load_prompts("esft:law") == load_prompts("embedded:esft:law")
    assert "embedded:esft:law" in list_workloads()
    with pytest.raises(ValueError, match="choose one of: embedded:esft:intent"):
        load_workload("embedded:esft:tax")
    with pytest.raises(ValueError, match="prism data fetch esft"):
        load_workload("esft:tax")
    with pytest.raises(ValueError, match="prism data fetch"):  # an empty folder names the fix
        load_workload("moe-lens:qwen:github")
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path / "missing"))  # a named folder must exist
    with pytest.raises(FileNotFoundError, match="PRISM_DATA_DIR"):
        load_workload("esft:law")


def test_a_folder_with_the_esft_set_wins(tmp_path, write_esft):
    ids, w = list(range(6)), [0.1] * 6
    for layer in (1, 2):
        write_esft(tmp_path / "esft" / "expert_scores" / "law" / f"expert_weights_{layer}.txt.gz", [(ids, w)])
    got = load_workload("esft:law", tmp_path)
    assert got.source == "esft:law" and got.trace.num_tokens == 1 and not got.notes


def test_user_data_dir_honours_prism_data_dir_and_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("PRISM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_data_dir() == tmp_path / "xdg" / "prism-moe" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_data_dir() == Path.home() / ".cache" / "prism-moe" / "data"
    monkeypatch.setenv("PRISM_DATA_DIR", str(tmp_path / "mine"))
    assert user_data_dir() == tmp_path / "mine"


def test_sample_is_what_the_script_makes_from_the_full_set(real_data, tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "scripts" / "make_embedded_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for d in DOMAINS:
        full = read_esft_domain(real_data / "esft" / "expert_scores" / d)
        made = mod.sample_trace(full, d, mod.TOKENS)
        shipped = load_trace(EMBEDDED_DIR / f"esft-{d}.safetensors")
        np.testing.assert_array_equal(made.experts, shipped.experts)
        np.testing.assert_array_equal(made.seq_starts, shipped.seq_starts)
        assert (made.source, made.model, made.num_experts) == (shipped.source, shipped.model, shipped.num_experts)
        # whole sequences: the sample ends where a sequence of the full set ends
        assert shipped.num_tokens in set(full.seq_starts.tolist())
        np.testing.assert_array_equal(shipped.experts, full.experts[: shipped.num_tokens])
