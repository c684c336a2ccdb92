"""Tiny checkpoints: real transformers architectures that load with the Auto classes, deterministically."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import ARCHS, make_tiny_model

MODEL_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
               "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
               "gpt_oss": "GptOssForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
               "glm4_moe": "Glm4MoeForCausalLM", "phimoe": "PhimoeForCausalLM", "dots1": "Dots1ForCausalLM",
               "minimax_m2": "MiniMaxM2ForCausalLM", "flex_olmo": "FlexOlmoForCausalLM",
               "sarvam_moe": "Glm4MoeForCausalLM"}


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip(arch, tiny_dir):
    path = tiny_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == MODEL_CLASS[arch]
    assert model.dtype == torch.float32
    assert len(tok) <= model.config.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert model.generation_config.eos_token_id == tok.eos_token_id

    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|bos|><|user|>Hi<|eos|><|assistant|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_deepseek_has_dense_first_layer_and_shared_experts(tiny_dir, eager_model):
    spec = ModelSpec.from_pretrained(tiny_dir("deepseek_v2"))
    assert spec.moe_layer_ids == (1, 2) and spec.num_shared_experts == 1
    model = eager_model("deepseek_v2")
    assert not hasattr(model.model.layers[0].mlp, "experts")
    assert hasattr(model.model.layers[1].mlp, "shared_experts")


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_for_a_seed(tmp_path):
    a = make_tiny_model("olmoe", tmp_path / "a", seed=3, hidden_size=32, num_experts=4)
    b = make_tiny_model("olmoe", tmp_path / "b", seed=3, hidden_size=32, num_experts=4)
    c = make_tiny_model("olmoe", tmp_path / "c", seed=4, hidden_size=32, num_experts=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]
    assert _digest(a)["tokenizer.json"] == _digest(c)["tokenizer.json"]
    assert AutoModelForCausalLM.from_pretrained(a).config.num_experts == 4


def test_cli_offers_every_arch():
    from prism_moe.commands.tiny import ARCH_CHOICES

    assert tuple(ARCH_CHOICES) == ARCHS and sorted(MODEL_CLASS) == sorted(ARCHS)


def test_deepseek_v3_ships_an_mtp_layer(tiny_dir):
    """Like the hub checkpoint: `model.layers.<num_hidden_layers>.*`, which transformers does not build."""
    from safetensors import safe_open

    path = tiny_dir("deepseek_v3")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.mlp.experts.7.down_proj.weight"} <= keys


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model("gpt2", tmp_path)
