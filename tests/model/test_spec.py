"""ModelSpec against an independent reference: the parameters of the real transformers model."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prism_moe.model.spec import PRESETS, ModelSpec, load_model_spec
from prism_moe.model.tiny import ARCHS, tiny_config

TINY = {
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, vocab_size=300),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                      shared_expert_intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2,
                      mlp_only_layers=[], vocab_size=300),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0], vocab_size=300),
    "olmoe": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=300),
    "deepseek_v2": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=300),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
                        vocab_size=300),
}


def _check_counts(cfg) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = sorted({int(n.split(".")[2]) for n, _ in model.named_parameters() if ".experts." in n})

    spec = ModelSpec.from_hf_config(cfg.to_dict())
    assert list(spec.moe_layer_ids) == moe_layers
    assert spec.total_experts * spec.expert_params == expert_params
    assert spec.dense_params == total - expert_params


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_param_counts_match_transformers(model_type):
    _check_counts(AutoConfig.for_model(model_type, **TINY[model_type]))


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_of_every_tiny_family(arch):
    """Each family's own field names (ERNIE's moe_num_experts / moe_k / moe_layer_*), biases, norms, sinks."""
    _check_counts(tiny_config(arch))


# Published totals (model cards / papers), in billions of parameters.
PUBLISHED_TOTAL_B = {"mixtral-8x7b": 46.7, "deepseek-v2-lite": 15.7, "deepseek-moe-16b": 16.4,
                     "qwen1.5-moe-a2.7b": 14.3, "olmoe-1b-7b": 6.9, "deepseek-v3": 671}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_published_sizes(name):
    spec = load_model_spec(name)
    assert spec.total_params / 1e9 == pytest.approx(PUBLISHED_TOTAL_B[name], rel=0.01)


def test_preset_shapes():
    v2 = load_model_spec("deepseek-v2-lite")
    assert (v2.num_moe_layers, v2.num_experts, v2.top_k, v2.moe_layer_ids[0]) == (26, 64, 6, 1)
    assert v2.expert_bytes == 3 * 2048 * 1408 * 2
    v3 = load_model_spec("deepseek-v3")
    assert (v3.num_moe_layers, v3.num_experts, v3.top_k) == (58, 256, 8)


def test_from_pretrained_folder(tmp_path):
    cfg = AutoConfig.for_model("mixtral", **TINY["mixtral"])
    cfg.save_pretrained(tmp_path)
    spec = load_model_spec(str(tmp_path), dtype="float32")
    assert spec.num_experts == 6 and spec.bytes_per_param == 4


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        load_model_spec("nope")
    with pytest.raises(ValueError, match="missing"):
        ModelSpec.from_hf_config({"hidden_size": 8, "num_hidden_layers": 2})
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_spec(str(tmp_path))
