"""Every MoE family: keys mapped with transformers' own conversion mapping, MTP layers ignored, clear refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import WeightConverter

from prism_moe.model.families import ExpertsLayout, UnsupportedModelError, check_servable
from prism_moe.model.loading import Checkpoint, load_partial


def test_dense_converters_run(tiny_dir, prompt_ids):
    """Sarvam-MoE checkpoints fuse q/k/v (`attention.query_key_value`): transformers' Split converter rebuilds them."""
    path = tiny_dir("sarvam_moe")
    ckpt = Checkpoint.open(path)
    src = ckpt.dense["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(src.converter, WeightConverter) and src.keys == {
        "query_key_value": ["model.layers.0.attention.query_key_value.weight"]}
    assert ckpt.dense["model.layers.0.self_attn.v_proj.weight"] is src  # one read feeds q, k and v
    ref = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
    model, _ = load_partial(path, {0: range(8), 1: range(8)})
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight",
                 "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert torch.equal(model.state_dict()[name], ref.state_dict()[name]), name
    assert torch.equal(model.generate(prompt_ids, max_new_tokens=6, do_sample=False),
                       ref.generate(prompt_ids, max_new_tokens=6, do_sample=False))


def test_expert_keys_come_from_transformers_mapping(tiny_dir):
    """Mixtral's `block_sparse_moe.experts.<e>.w1/w3/w2` go through transformers' renaming and expert converters."""
    ckpt = Checkpoint.open(tiny_dir("mixtral"))
    gate_up = ckpt.expert_params[1]["gate_up_proj"]
    assert gate_up.converter.source_patterns == [".experts.*.w1.weight", ".experts.*.w3.weight"]
    assert gate_up.by_expert[".experts.*.w3.weight"][5] == "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    assert ckpt.holds_all_experts() and not ckpt.unexpected


def test_mtp_layers_are_ignored_as_transformers_does(tiny_dir):
    """DeepSeek-V3's `model.layers.<num_hidden_layers>.*` (MTP) is not part of the model: skipped, not an error."""
    ckpt = Checkpoint.open(tiny_dir("deepseek_v3"))
    assert ckpt.ignored and all(k.startswith("model.layers.3.") for k in ckpt.ignored)
    assert "model.layers.3.mlp.experts.0.gate_proj.weight" in ckpt.ignored
    assert not ckpt.unexpected and sorted(ckpt.expert_params) == [0, 1]


def test_ernie_fields(tiny_dir):
    ckpt = Checkpoint.open(tiny_dir("ernie4_5_moe"))
    assert (ckpt.spec.num_experts, ckpt.spec.top_k, ckpt.spec.moe_layer_ids) == (8, 2, (1, 2))
    assert "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias" in ckpt.dense  # transformers' renaming


def test_gpt_oss_layout_is_canonicalised():
    """Transposed [H, 2I] with interleaved gate/up rows -> [2I, H], gate rows first; biases likewise."""
    layout = ExpertsLayout("gpt_oss", "GptOssExperts", has_gate=True, has_bias=True, is_transposed=True,
                           is_concatenated=False, has_post_expert_norm=False, custom_gate=True)
    gate_up = torch.arange(4 * 6.0).reshape(4, 6)  # [H=4, 2I=6]: columns g0 u0 g1 u1 g2 u2
    got = layout.canonical("gate_up_proj", gate_up)
    assert torch.equal(got, torch.cat([gate_up.t()[0::2], gate_up.t()[1::2]]))
    assert torch.equal(layout.canonical("gate_up_proj_bias", torch.arange(6.0)), torch.tensor([0, 2, 4, 1, 3, 5.0]))
    assert torch.equal(layout.canonical("down_proj", gate_up[:, :3]), gate_up[:, :3].t())


def test_misread_expert_width_is_refused(tmp_path):
    """A config whose expert width spec.py would misread (memory plan off) is refused, not served."""
    torch.manual_seed(0)
    fields = {**_GENERIC, "intermediate_size": 96, "moe_intermediate_size": 32}  # granitemoe ignores the latter
    AutoModelForCausalLM.from_config(AutoConfig.for_model("granitemoe", **fields)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'granitemoe': transformers builds 8 experts of width 96 but "
                                                    r"prism-moe reads 8 of width 32"):
        load_partial(tmp_path, {0: [0]})


def test_unservable_family_is_refused_by_name():
    """Nemotron-H's experts have no gate projection: refused at start-up, naming the family and the feature."""
    cfg = AutoConfig.for_model("nemotron_h", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                               hybrid_override_pattern="*E", n_routed_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match=r"model family 'nemotron_h' \(NemotronHExperts\) cannot be "
                                                    r"served yet: .*experts without a gate projection"):
        check_servable(model, "nemotron_h")


# More text MoE families transformers has (no tiny builder: a generic tiny config, every alias of the expert
# fields set alike); each must load through its own conversion mapping and match eager transformers.
MORE_FAMILIES = ("granitemoe", "granitemoeshared", "hunyuan_v1_moe", "exaone_moe", "solar_open", "mellum",
                 "cohere2_moe", "minimax", "afmoe", "laguna", "mimo_v2_flash", "minicpm5_moe", "hy_v3", "glm4_moe_lite",
                 "deepseek_v32", "glm_moe_dsa")
_GENERIC = dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False, rms_norm_eps=1e-6,
                intermediate_size=32, head_dim=16, num_local_experts=8, num_experts=8, n_routed_experts=8,
                num_experts_per_tok=2, moe_topk=2, n_shared_experts=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# families whose experts are moe_intermediate_size wide (the others use intermediate_size)
_MOE_WIDTH = {"exaone_moe", "solar_open", "mellum", "afmoe", "laguna", "mimo_v2_flash", "minicpm5_moe", "hy_v3"}
# latent-attention families (DeepSeek-style MLA fields; DeepSeek-V3.2 / GLM-MoE-DSA add a sparse indexer)
_MLA = {f: dict(num_hidden_layers=2, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
                n_group=1, topk_group=1, first_k_dense_replace=1, index_n_heads=2, index_head_dim=16, index_topk=4)
        for f in ("glm4_moe_lite", "deepseek_v32", "glm_moe_dsa")}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_families_load_like_transformers(family, tmp_path):
    torch.manual_seed(0)
    fields = {**_GENERIC, **(dict(intermediate_size=96, moe_intermediate_size=32) if family in _MOE_WIDTH else {}),
              **_MLA.get(family, {})}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields)).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.holds_all_experts() and not ckpt.unexpected
    model, _ = load_partial(tmp_path, {i: range(8) for i in range(ckpt.spec.num_moe_layers)})
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))
