"""What the simulated users send: token pools (routing), prompt/output lengths, Poisson arrivals.

Every routing source becomes a `TokenPool`: per token, its top-k experts at every MoE layer. A pool is
either a real per-token trace replayed as is (ESFT, mixtral-decode: co-activation kept) or, where only
per-layer counts exist, tokens sampled so that each expert's inclusion probability is exactly
k x its share of the layer's selections (systematic PPS sampling; layers independent).

A request replays consecutive pool tokens from the start of a random sequence (wrapping around):
its prompt tokens in the prefill step, then one token per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prism_moe.placement.latency import sample_topk  # one sampler for the simulator and the estimate

# Token-length rule for prompt text, from DeepSeek's API docs ("Token & Token Usage"):
# 1 English character ~ 0.3 token, 1 Chinese character ~ 0.6 token.
ASCII_TOKENS_PER_CHAR = 0.3
OTHER_TOKENS_PER_CHAR = 0.6


def text_tokens(text: str) -> int:
    """Approximate token count of `text` (rule above), at least 1."""
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return max(1, round(ASCII_TOKENS_PER_CHAR * ascii_chars + OTHER_TOKENS_PER_CHAR * (len(text) - ascii_chars)))


@dataclass(frozen=True)
class TokenPool:
    """experts: int16 [L, N, k] (layer-major: one layer's tokens are contiguous for the per-layer gather);
    seq_starts: int [seqs+1]; replayed: True for a real trace, False for sampled from counts."""

    name: str
    experts: np.ndarray
    seq_starts: np.ndarray
    replayed: bool

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[1]

    def counts(self, num_experts: int) -> np.ndarray:
        """Selections per expert: float [L, E]."""
        layers = self.experts.shape[0]
        out = np.zeros((layers, num_experts))
        for l in range(layers):
            out[l] = np.bincount(self.experts[l].ravel(), minlength=num_experts)
        return out


def pool_from_trace(name: str, experts: np.ndarray, seq_starts: np.ndarray | None = None) -> TokenPool:
    """A replayed pool from a trace's experts int [tokens, L, k]."""
    ex = np.ascontiguousarray(np.asarray(experts).transpose(1, 0, 2), dtype=np.int16)
    n = ex.shape[1]
    starts = np.asarray(seq_starts if seq_starts is not None else [0, n], dtype=np.int64)
    return TokenPool(name, ex, starts, True)


def pool_from_counts(name: str, counts: np.ndarray, k: int, n_tokens: int, rng: np.random.Generator) -> TokenPool:
    """A sampled pool from per-layer counts float [L, E]."""
    counts = np.asarray(counts, dtype=np.float64)
    layers, e = counts.shape
    ex = np.empty((layers, n_tokens, k), dtype=np.int16)
    for l in range(layers):
        tot = counts[l].sum()
        freq = counts[l] / tot if tot > 0 else np.full(e, 1.0 / e)
        ex[l] = sample_topk(freq, k, n_tokens, rng)
    return TokenPool(name, ex, np.array([0, n_tokens]), False)


@dataclass(frozen=True)
class LengthModel:
    """Prompt and output lengths in tokens. Prompts: drawn from `prompt_tokens` (a real prompt set)
    when given, else log-normal around `prompt_mean`; outputs: log-normal around `output_mean`."""

    prompt_tokens: tuple[int, ...] = ()
    prompt_mean: float = 512.0
    output_mean: float = 128.0
    sigma: float = 0.6
    max_tokens: int = 4096

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.prompt_tokens:
            prompts = rng.choice(np.array(self.prompt_tokens), size=n)
        else:
            prompts = _lognormal(self.prompt_mean, self.sigma, n, rng)
        outputs = _lognormal(self.output_mean, self.sigma, n, rng)
        return (np.clip(prompts, 1, self.max_tokens).astype(np.int64),
                np.clip(outputs, 1, self.max_tokens).astype(np.int64))


def _lognormal(mean: float, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2  # so that E[x] = mean
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, n)))


@dataclass(frozen=True)
class ServerLoad:
    """One server's users: Poisson arrivals at `rate`/s; phase i, from `phases[i][0]` seconds on, draws
    routing from pool index `phases[i][1]` and lengths from `lengths[i]`."""

    rate: float
    phases: tuple[tuple[float, int], ...]
    lengths: tuple[LengthModel, ...]


@dataclass
class Requests:
    """All requests, sorted by arrival. Arrays [R]."""

    server: np.ndarray
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    pool: np.ndarray
    start: np.ndarray
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrival)


def generate_requests(loads: list[ServerLoad], pools: list[TokenPool], n_requests: int,
                      rng: np.random.Generator) -> Requests:
    """The first `n_requests` arrivals of all servers' Poisson streams merged."""
    rates = np.array([ld.rate for ld in loads])
    # The merged stream has rate sum(rates); draw enough arrivals per server to cover its horizon.
    horizon = n_requests / rates.sum()
    parts = []
    for s, ld in enumerate(loads):
        n = int(ld.rate * horizon * 1.5 + 10 * np.sqrt(ld.rate * horizon + 1) + 10)
        t = np.cumsum(rng.exponential(1.0 / ld.rate, n))
        parts.append((np.full(n, s), t))
    server = np.concatenate([p[0] for p in parts])
    arrival = np.concatenate([p[1] for p in parts])
    order = np.argsort(arrival, kind="stable")[:n_requests]
    server, arrival = server[order], arrival[order]
    prompt = np.zeros(len(arrival), dtype=np.int64)
    output = np.zeros(len(arrival), dtype=np.int64)
    pool = np.zeros(len(arrival), dtype=np.int64)
    start = np.zeros(len(arrival), dtype=np.int64)
    for s, ld in enumerate(loads):
        mine = np.flatnonzero(server == s)
        phase_starts = np.array([p[0] for p in ld.phases])
        phase = np.searchsorted(phase_starts, arrival[mine], side="right") - 1
        phase = np.maximum(phase, 0)
        for i, (_, pool_id) in enumerate(ld.phases):
            sel = mine[phase == i]
            if not len(sel):
                continue
            prompt[sel], output[sel] = ld.lengths[i].sample(len(sel), rng)
            pool[sel] = pool_id
            starts = pools[pool_id].seq_starts
            if len(starts) > 2:  # a real trace: begin at a sequence start
                start[sel] = starts[rng.integers(0, len(starts) - 1, len(sel))]
            else:
                start[sel] = rng.integers(0, pools[pool_id].num_tokens, len(sel))
    return Requests(server, arrival, prompt, output, pool, start)
