"""`prism make-tiny-model`: a small random-weight checkpoint of a real MoE architecture, built locally."""

from __future__ import annotations

import argparse

# The architectures model/tiny.py builds (kept literal so `prism --help` does not import torch).
ARCH_CHOICES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "ernie4_5_moe",
                "glm4_moe", "phimoe", "dots1", "minimax_m2", "flex_olmo", "sarvam_moe"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a tiny random-weight MoE checkpoint (no model hub needed)",
                       description="Write a small random-weight checkpoint of a real transformers MoE "
                                   "architecture, with a tokenizer built locally, for trying prism-moe "
                                   "without a model hub.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="deepseek_v2")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the arch's tiny default)")
    p.add_argument("--experts", type=int, default=None, help="routed experts per MoE layer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prism_moe.model.spec import ModelSpec
    from prism_moe.model.tiny import EXPERTS_FIELD, make_tiny_model

    overrides = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.experts is not None:
        overrides[EXPERTS_FIELD.get(args.arch, "num_experts")] = args.experts
    path = make_tiny_model(args.arch, args.out, seed=args.seed, **overrides)
    print(f"wrote {path}: {ModelSpec.from_pretrained(path).summary()}")
    return 0
