"""Make the compact routing sample shipped inside the package (src/prism_moe/data/).

From the full ESFT expert scores (github deepseek-ai/ESFT `results/expert_scores` @579a771, MIT), it keeps
the first sequences of each domain until at least TOKENS tokens, all 26 MoE layers, the top-6 expert ids
(not the gate weights: they would triple the size and placement does not use them), and writes them as
prism-moe trace files; and the first PROMPTS evaluation prompts of each domain (`datasets/eval`, MIT).
The output is byte-for-byte reproducible:

    .venv/bin/python scripts/make_embedded_sample.py --data-dir ../shared/data --out src/prism_moe/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prism_moe.stats.readers import ESFT_MODEL, read_esft_domain, read_esft_prompts
from prism_moe.stats.trace import RoutingTrace, save_trace

DOMAINS = ("intent", "law", "summary", "translation")
TOKENS = 2048
PROMPTS = 16


def sample_trace(full: RoutingTrace, domain: str, tokens: int) -> RoutingTrace:
    """The first whole sequences of `full` holding at least `tokens` tokens, without gate weights."""
    n = int(np.searchsorted(full.seq_starts, tokens)) if tokens < full.num_tokens else full.num_sequences
    end = int(full.seq_starts[n])
    return RoutingTrace(experts=full.experts[:end], weights=None, seq_starts=full.seq_starts[: n + 1],
                        num_experts=full.num_experts, source=f"embedded:esft:{domain}", model=ESFT_MODEL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="folder holding esft/expert_scores and esft/prompts")
    ap.add_argument("--out", default="src/prism_moe/data")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens kept per domain (whole sequences)")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="evaluation prompts kept per domain")
    args = ap.parse_args()
    root, out = Path(args.data_dir), Path(args.out)
    prompts: dict[str, list[str]] = {}
    for d in DOMAINS:
        t = sample_trace(read_esft_domain(root / "esft" / "expert_scores" / d), d, args.tokens)
        p = save_trace(t, out / f"esft-{d}.safetensors")
        prompts[d] = read_esft_prompts(root / "esft" / "prompts" / f"{d}.jsonl")[: args.prompts]
        print(f"{p}: {t.num_tokens} tokens in {t.num_sequences} sequences, {p.stat().st_size / 1e6:.2f} MB")
    p = out / "esft-prompts.json"
    p.write_text(json.dumps(prompts, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{p}: {sum(map(len, prompts.values()))} prompts, {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
