"""Tiny random-weight checkpoints of real transformers MoE architectures, built offline.

`make_tiny_model("mixtral", out_dir)` writes a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load like a hub checkpoint: `config.json`, `generation_config.json`,
`model.safetensors` (transformers' original per-expert layout, as `save_pretrained` writes it) and a
byte-level BPE tokenizer trained on a built-in paragraph, with bos/eos/pad tokens and a chat template.
Everything is a function of `seed`: two calls with the same arguments write identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                          "ernie4_5_moe", "glm4_moe", "phimoe", "dots1", "minimax_m2", "flex_olmo", "sarvam_moe")

# The config field that holds the number of routed experts per MoE layer, per architecture.
EXPERTS_FIELD = {"mixtral": "num_local_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
                 "gpt_oss": "num_local_experts", "ernie4_5_moe": "moe_num_experts", "glm4_moe": "n_routed_experts",
                 "phimoe": "num_local_experts", "dots1": "n_routed_experts", "minimax_m2": "num_local_experts",
                 "sarvam_moe": "n_routed_experts"}

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Roles are special tokens so a chat prompt tokenizes the same way whatever the BPE merges are.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CORPUS = """\
Edge servers sit close to their users. Each one has a modest accelerator, a fixed amount of memory and a
network link to its neighbours. A mixture of experts model is too large for any single one of them, but the
dense part of the model is small: the embeddings, the attention blocks, the norms and the routers fit
everywhere. The experts are what make the model big, and each token only visits a few of them. So every
server keeps the dense part and a share of the experts, and when a token needs an expert that lives on a
peer, the hidden state travels over the network, the peer computes the expert and sends the result back.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick
daft zebras jump! The five boxing wizards jump quickly. Sphinx of black quartz, judge my vow.
Hello, how are you today? I am fine, thank you. What is the weather like? It is sunny and warm, with a
light wind from the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { }.
Which experts are popular changes over time, so a coordinator counts how often each expert is used on
each server and moves experts to where they are needed, one at a time, copying before switching.
"""

# Per-architecture config fields; shared sizes come from `_BASE` and the caller's overrides.
_BASE: dict[str, Any] = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False, rms_norm_eps=1e-6,
)
_ARCH: dict[str, dict[str, Any]] = {
    "mixtral": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      decoder_sparse_step=1, norm_topk_prob=True, head_dim=16),
    "olmoe": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    # First decoder layer dense, so MoE layer i is decoder layer i + 1; one shared expert per MoE layer.
    "deepseek_v2": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0),
    # DeepSeek-V3: grouped routing with the expert bias, q LoRA; the hub checkpoint also ships one MTP layer
    # (`model.layers.<num_hidden_layers>.*`) that transformers ignores on load; `make_tiny_model` writes one too.
    "deepseek_v3": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, num_key_value_heads=4,
                        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_group=2, topk_group=1, routed_scaling_factor=1.0, num_nextn_predict_layers=1),
    # GPT-OSS: biased experts with its clamped SwiGLU and interleaved gate/up, attention sinks, sliding layers.
    "gpt_oss": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                         original_max_position_embeddings=128, rope_theta=150000.0)),
    # ERNIE-4.5: its own field names (moe_num_experts, moe_k); decoder layer 0 dense.
    "ernie4_5_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8,
                         moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2,
                         moe_layer_interval=1, head_dim=16),
    "glm4_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                     num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=16, n_group=1,
                     topk_group=1, use_qk_norm=True, num_nextn_predict_layers=0),
    "phimoe": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "dots1": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=16),
    "minimax_m2": dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "flex_olmo": dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    # Sarvam-MoE: its checkpoints fuse q/k/v into `query_key_value`, which transformers' converter splits on load.
    "sarvam_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                       num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, head_dim=16),
}


def tiny_config(arch: str, **overrides: Any):
    """The transformers config of a tiny `arch` model (token ids match `build_tokenizer`)."""
    from transformers import AutoConfig

    if arch not in _ARCH:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHS)}")
    fields = {**_BASE, **_ARCH[arch], **overrides}
    fields.setdefault("pad_token_id", 0)
    fields.setdefault("bos_token_id", 1)
    fields.setdefault("eos_token_id", 2)
    return AutoConfig.for_model(arch, **fields)


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `CORPUS` (ids 0/1/2 are pad/bos/eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(arch: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                    **overrides: Any) -> Path:
    """Write a random-weight `arch` checkpoint plus tokenizer to `out_dir`; return the folder.

    `overrides` replace config fields (e.g. `hidden_size=32, num_hidden_layers=4, num_experts=4`; the
    expert-count field name is the architecture's own). The weights are drawn from a private generator
    seeded with `seed`, so the global torch RNG is left alone.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = tiny_config(arch, **overrides)
    tokenizer = build_tokenizer(config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={config.vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    finally:
        torch.random.set_rng_state(rng_state)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if arch in MTP_ARCHS and getattr(config, "num_nextn_predict_layers", 0):
        _append_mtp_layers(out, config, int(config.num_nextn_predict_layers), seed)
    return out


# Architectures whose hub checkpoints carry multi-token-prediction layers that transformers does not build.
MTP_ARCHS = ("deepseek_v3",)


def _append_mtp_layers(out: Path, config: Any, count: int, seed: int) -> None:
    """Add DeepSeek-V3-style MTP layers `model.layers.<L + i>.*` (random values) to the saved checkpoint.

    Each is a decoder layer like the last one plus the MTP extras (`enorm`, `hnorm`, `eh_proj`, `shared_head`,
    `embed_tokens`), as the hub checkpoint ships them; transformers skips them on load.
    """
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    last = f"model.layers.{config.num_hidden_layers - 1}."
    gen = torch.Generator().manual_seed(seed + 1)
    h, v = config.hidden_size, config.vocab_size
    for i in range(count):
        prefix = f"model.layers.{config.num_hidden_layers + i}."
        shapes = {prefix + k[len(last):]: t.shape for k, t in tensors.items() if k.startswith(last)}
        shapes.update({prefix + "enorm.weight": (h,), prefix + "hnorm.weight": (h,), prefix + "eh_proj.weight": (h, 2 * h),
                       prefix + "shared_head.norm.weight": (h,), prefix + "shared_head.head.weight": (v, h),
                       prefix + "embed_tokens.weight": (v, h)})
        for key, shape in sorted(shapes.items()):
            tensors[key] = (torch.randn(shape, generator=gen) * 0.02).to(next(iter(tensors.values())).dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
