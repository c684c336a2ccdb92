"""Shared runtime fixtures: one tiny Mixtral checkpoint, a reference model and a started Engine per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from prism_moe.model.tiny import make_tiny_model
from prism_moe.runtime.engine import Engine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("tiny_mixtral"), seed=0)


@pytest.fixture(scope="session")
def greedy_ref(tiny_dir: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy ids from plain `model.generate` on a separate copy of the model (never shared with the engine)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()

    def ref(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(prompt_ids):].tolist()

    return ref


@pytest.fixture(scope="session")
def engine(tiny_dir: Path) -> Iterator[Engine]:
    with Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", kv_cache_tokens=4096) as eng:
        yield eng
