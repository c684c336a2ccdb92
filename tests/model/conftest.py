"""Shared fixtures of the model tests: one tiny checkpoint per architecture, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prism_moe.model.tiny import make_tiny_model

torch.set_num_threads(1)  # the test machine's cores are shared; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """arch -> checkpoint folder (built lazily, once)."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, root / arch, seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def eager_model(tiny_dir):
    """arch -> the checkpoint loaded by plain transformers with the eager experts path (the reference)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(tiny_dir(arch), experts_implementation="eager").eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def prompt_ids(tiny_dir):
    """A chat prompt [1, S] tokenized with the tiny tokenizer's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir("mixtral"))
    enc = tok.apply_chat_template([{"role": "user", "content": "Hello, how are the edge servers today?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]

