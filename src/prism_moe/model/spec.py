"""What a MoE model is, for placement and cost: layer/expert counts and byte sizes.

`ModelSpec` is derived from a Hugging Face `config.json` (the MoE families transformers knows: Mixtral,
Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, DeepSeek-MoE, GPT-OSS, ERNIE-4.5-MoE, GLM-4-MoE, PhiMoE, dots1, MiniMax-M2,
FlexOlmo, ...) or from a preset holding the real published config of
a well-known model. Parameter counts are computed from the config, not copied from model cards, so a
custom config gets the same treatment as a preset.

MoE layers are numbered from 0 in the order they appear; `moe_layer_ids[i]` is the decoder-layer index of
MoE layer i (DeepSeek-V2-Lite's first decoder layer is dense, so its MoE layer 0 is decoder layer 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Shape and size of a MoE model.

    Byte counts are for `dtype`. `dense_bytes` is everything every server must hold: embeddings,
    attention, norms, routers, dense MLP layers, shared experts and the LM head.
    """

    name: str
    model_type: str
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    expert_params: int
    dense_params: int
    moe_layer_ids: tuple[int, ...]
    num_hidden_layers: int
    num_shared_experts: int = 0
    vocab_size: int = 0
    dtype: str = "bfloat16"
    kv_values_per_token: int = 0  # KV-cache values one token keeps per decoder layer (0: unknown)

    def __post_init__(self) -> None:
        if self.num_moe_layers <= 0 or self.num_experts <= 0:
            raise ValueError(f"model {self.name!r}: needs at least one MoE layer and one expert")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"model {self.name!r}: top_k={self.top_k} must be in 1..{self.num_experts}")
        if len(self.moe_layer_ids) != self.num_moe_layers:
            raise ValueError(f"model {self.name!r}: moe_layer_ids has {len(self.moe_layer_ids)} entries, "
                             f"expected {self.num_moe_layers}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"model {self.name!r}: unknown dtype {self.dtype!r}; use one of {sorted(DTYPE_BYTES)}")

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (gate, up and down projections)."""
        return self.expert_params * self.bytes_per_param

    @property
    def dense_bytes(self) -> int:
        return self.dense_params * self.bytes_per_param

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def total_params(self) -> int:
        return self.dense_params + self.total_experts * self.expert_params

    @property
    def total_bytes(self) -> int:
        return self.total_params * self.bytes_per_param

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """KV-cache bytes of one token in one decoder layer; 2 x hidden when the config does not say."""
        return (self.kv_values_per_token or 2 * self.hidden_size) * self.bytes_per_param

    @property
    def expert_flops_per_token(self) -> int:
        """Multiply-adds x2 of one expert for one token."""
        return 2 * self.expert_params

    def with_dtype(self, dtype: str) -> ModelSpec:
        from dataclasses import replace

        return replace(self, dtype=dtype)

    def summary(self) -> str:
        return (f"{self.name}: {self.num_moe_layers} MoE layers x {self.num_experts} experts, top-{self.top_k}, "
                f"expert {format_bytes(self.expert_bytes)}, dense {format_bytes(self.dense_bytes)}, "
                f"total {format_bytes(self.total_bytes)} ({self.dtype})")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None, dtype: str | None = None) -> ModelSpec:
        """Build from a Hugging Face config dict (the contents of `config.json`)."""
        return _spec_from_config(config, name=name, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None) -> ModelSpec:
        """Build from a folder holding `config.json` or from the path of a config file."""
        p = Path(path)
        cfg_path = p / "config.json" if p.is_dir() else p
        if not cfg_path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {cfg_path}: give a preset name "
                                    f"({', '.join(PRESETS)}) or a folder with config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
        return _spec_from_config(config, name=p.name if p.is_dir() else p.stem, dtype=dtype)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def load_model_spec(model: str, base_dir: str | Path | None = None, dtype: str | None = None) -> ModelSpec:
    """A preset name, or a path (relative to `base_dir`) to a HF config file or checkpoint folder."""
    if model in PRESETS:
        return _spec_from_config(PRESETS[model], name=model, dtype=dtype)
    p = Path(model)
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if p.exists():
        return ModelSpec.from_pretrained(p, dtype=dtype)
    raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) "
                     f"or a path to a Hugging Face config.json or checkpoint folder")


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def _moe_layer_ids(config: dict[str, Any], num_layers: int) -> list[int]:
    mt = config.get("model_type", "")
    if "first_k_dense_replace" in config:  # DeepSeek family
        first = int(config.get("first_k_dense_replace") or 0)
        freq = int(config.get("moe_layer_freq") or 1)
        return [i for i in range(num_layers) if i >= first and i % freq == 0]
    kinds = config.get("mlp_layer_types")
    if isinstance(kinds, list) and len(kinds) == num_layers:  # Laguna, MiMo-V2-Flash, MiniCPM5-MoE, HY-V3
        return [i for i, kind in enumerate(kinds) if kind != "dense"]
    if "num_dense_layers" in config:  # AFMoE: the first layers are dense
        return list(range(int(config.get("num_dense_layers") or 0), num_layers))
    if "moe_layer_start_index" in config:  # ERNIE-4.5
        start = int(config.get("moe_layer_start_index") or 0)
        end = config.get("moe_layer_end_index")
        end = num_layers - 1 if end is None or int(end) < 0 else int(end)
        every = int(config.get("moe_layer_interval") or 1)
        return [i for i in range(num_layers) if (i + 1) % every == 0 and start <= i <= end]
    if mt in ("qwen2_moe", "qwen3_moe") or "decoder_sparse_step" in config:
        step = int(config.get("decoder_sparse_step") or 1)
        mlp_only = set(config.get("mlp_only_layers") or [])
        return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
    return list(range(num_layers))


def _attention_params(config: dict[str, Any], hidden: int) -> int:
    heads = int(config["num_attention_heads"])
    if config.get("kv_lora_rank"):  # DeepSeek multi-head latent attention
        kv_rank = int(config["kv_lora_rank"])
        nope = int(config["qk_nope_head_dim"])
        rope = int(config["qk_rope_head_dim"])
        v_dim = int(config["v_head_dim"])
        q_rank = config.get("q_lora_rank")
        if q_rank:
            q = hidden * q_rank + q_rank + q_rank * heads * (nope + rope)
        else:
            q = hidden * heads * (nope + rope)
        kv = hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim)
        return q + kv + heads * v_dim * hidden
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    params = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if config.get("qkv_bias") or config.get("attention_bias") or config.get("model_type") == "qwen2_moe":
        params += heads * head_dim + 2 * kv_heads * head_dim
    mt = config.get("model_type")
    if mt in ("olmoe", "minimax_m2", "flex_olmo"):  # q/k RMSNorm over the projected width
        params += heads * head_dim + kv_heads * head_dim
    elif mt in ("qwen3_moe", "dots1") or (mt in ("glm4_moe", "sarvam_moe") and config.get("use_qk_norm")):  # per head
        params += 2 * head_dim
    elif mt == "gpt_oss":  # o_proj bias and one attention sink per head
        params += hidden + heads
    return params


def _spec_from_config(config: dict[str, Any], name: str | None, dtype: str | None) -> ModelSpec:
    if not isinstance(config, dict):
        raise ValueError("a model config must be a JSON object")
    if "text_config" in config and "hidden_size" not in config:
        config = config["text_config"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if k not in config]
    num_experts = _get(config, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
    top_k = _get(config, "num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k")
    if num_experts is None:
        missing.append("num_local_experts / n_routed_experts / num_experts / moe_num_experts")
    if top_k is None:
        missing.append("num_experts_per_tok / moe_k")
    if missing:
        raise ValueError(f"{config.get('model_type', 'model')}: model config is not a MoE config prism-moe "
                         f"understands: missing {missing}")
    hidden = int(config["hidden_size"])
    num_layers = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    dense_inter = int(_get(config, "intermediate_size", default=0))
    expert_inter = int(_get(config, "moe_intermediate_size", default=dense_inter))
    if expert_inter <= 0:
        raise ValueError("model config gives no expert width (moe_intermediate_size or intermediate_size)")
    moe_ids = _moe_layer_ids(config, num_layers)
    if not moe_ids:
        raise ValueError("model config describes no MoE layer")
    num_experts, top_k = int(num_experts), int(top_k)

    expert_params = 3 * hidden * expert_inter  # gate, up, down
    if config.get("model_type") == "gpt_oss":  # biased experts: gate_up [2I] and down [H]
        expert_params += 2 * expert_inter + hidden
    n_shared = int(_get(config, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", default=0) or 0)
    shared_inter = config.get("shared_expert_intermediate_size")  # Qwen-MoE: one wide shared expert
    if shared_inter:
        shared_params = 3 * hidden * int(shared_inter) + hidden  # + its sigmoid gate
        n_shared = max(n_shared, 1)
    else:
        shared_params = n_shared * expert_params
    router = hidden * num_experts
    if config.get("topk_method") == "noaux_tc" or config.get("model_type") in ("gpt_oss", "ernie4_5_moe"):
        router += num_experts  # DeepSeek-V3's expert bias, GPT-OSS's router bias, ERNIE's moe_statics
    norm = 2 * hidden if config.get("model_type") == "phimoe" else hidden  # PhiMoE's LayerNorms have biases

    per_layer = _attention_params(config, hidden) + 2 * norm  # attention + two norms
    dense = 0
    for i in range(num_layers):
        dense += per_layer
        dense += router + shared_params if i in moe_ids else 3 * hidden * dense_inter
    embed = vocab * hidden
    dense += embed + norm  # embeddings + final norm
    if not config.get("tie_word_embeddings", False):
        dense += embed
    resolved_dtype = dtype or {"float32": "float32", "float16": "float16"}.get(
        str(config.get("torch_dtype") or config.get("dtype") or ""), "bfloat16")
    return ModelSpec(
        name=name or config.get("_name_or_path") or config.get("model_type", "model"),
        model_type=str(config.get("model_type", "unknown")),
        num_moe_layers=len(moe_ids),
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        expert_intermediate_size=expert_inter,
        expert_params=expert_params,
        dense_params=dense,
        moe_layer_ids=tuple(moe_ids),
        num_hidden_layers=num_layers,
        num_shared_experts=n_shared,
        vocab_size=vocab,
        dtype=resolved_dtype,
        kv_values_per_token=_kv_values(config, hidden),
    )


def _kv_values(config: dict[str, Any], hidden: int) -> int:
    """Values cached per token and layer: MLA keeps its latent and rope key, others K and V per KV head."""
    if config.get("kv_lora_rank"):
        return int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim") or 0)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return 2 * int(config.get("num_key_value_heads") or heads) * head_dim


# The fields of the published config.json of each model that decide its shape.
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        vocab_size=32000, tie_word_embeddings=False),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        vocab_size=102400, tie_word_embeddings=False),
    "deepseek-moe-16b": dict(
        model_type="deepseek", hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
        vocab_size=102400, tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
        mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False),
    "olmoe-1b-7b": dict(
        model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        vocab_size=50304, tie_word_embeddings=False),
    "deepseek-v3": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, moe_layer_freq=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        topk_method="noaux_tc", vocab_size=129280, tie_word_embeddings=False),
}
