"""Sampling: pure functions on logits [B, V] and the per-request state they read. No model, no threads.

The order is vLLM's (v1 `Sampler`): logprobs of the raw distribution (what vLLM returns by default,
`logprobs_mode="raw_logprobs"`) -> logit bias -> penalties (repetition, frequency, presence) -> greedy argmax for
temperature 0 -> temperature -> top-k -> top-p -> one draw. Penalties as vLLM applies them: repetition to every
token seen in the prompt or the output (positive logits divided, negative ones multiplied), frequency and
presence to output tokens only (minus `frequency * count`, minus `presence` once seen).

A sampled token is drawn by inverse CDF from one uniform of the request's own `random.Random(seed)`, so a seeded
request gives the same tokens whatever shares its batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # top logprobs per token (vLLM's default `max_logprobs`, OpenAI's chat limit)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Neutral values change nothing: temperature 0 is exact greedy.

    `top_k` 0 keeps every token; `logit_bias` maps token id -> value added to its logit; `logprobs` None returns
    none, k >= 0 returns the chosen token's logprob and the k most likely tokens'.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    seed: int | None = None

    def check(self, vocab_size: int) -> None:
        """Raise `ValueError` saying what is out of range."""
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (all tokens) or a positive count, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2 ** 20 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias token id {tok} is outside the vocabulary [0, {vocab_size})")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {tok}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to change the argmax and nothing to report: the runner's own argmax is right."""
        return self.greedy and not self.penalised and not self.logit_bias and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the `k` most likely tokens (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class SequenceSampler:
    """The sampling state of one request: its parameters, RNG, the tokens seen, and logprobs so far.

    Owned by the runner's thread once submitted; the frontend reads `logprobs[i]` after the runner has reported
    token i (the runner writes it before handing the token on).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.rng = random.Random(params.seed) if not params.greedy else None  # seed None: OS entropy
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self._seen: torch.Tensor | None = None  # [V] bool: in the prompt or the output (repetition penalty)
        self._counts: torch.Tensor | None = None  # [V] float: times in the output (frequency, presence)

    def uniform(self) -> float:
        """The next uniform for a sampled token; -1 for a greedy request (no RNG draw)."""
        return self.rng.random() if self.rng is not None else -1.0

    def seen_and_counts(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([V] bool prompt-or-output mask, [V] float output counts), built once, updated by `record`."""
        if self._seen is None:
            self._seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids = [t for t in self.prompt_ids + self.output_ids if 0 <= t < vocab]
            self._seen[torch.tensor(ids, dtype=torch.long, device=device)] = True
            for t in self.output_ids:
                self._counts[t] += 1
        return self._seen, self._counts

    def record(self, token: int, logprobs: TokenLogprobs | None) -> None:
        self.output_ids.append(token)
        if self._seen is not None and 0 <= token < self._seen.numel():
            self._seen[token] = True
            self._counts[token] += 1
        if logprobs is not None:
            self.logprobs.append(logprobs)


# --- pure steps on float32 logits [B, V], one value per row ----------------------------------------------------
def apply_logit_bias(scores: torch.Tensor, biases: Sequence[Mapping[int, float]]) -> torch.Tensor:
    """scores [B, V] plus each row's {token id: bias}."""
    rows, cols, vals = [], [], []
    for i, bias in enumerate(biases):
        for tok, v in bias.items():
            rows.append(i), cols.append(tok), vals.append(v)
    if not rows:
        return scores
    dev = scores.device
    return scores.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                            torch.tensor(vals, dtype=scores.dtype, device=dev), accumulate=True)


def apply_penalties(scores: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties. scores [B, V]; seen [B, V] bool (token in prompt or output); counts [B, V] (times in the
    output); presence, frequency, repetition [B, 1]. Repetition divides positive and multiplies negative logits of
    seen tokens (transformers' RepetitionPenaltyLogitsProcessor over prompt + output); then
    `- frequency * count - presence * (count > 0)`."""
    factor = torch.where(seen, repetition, torch.ones_like(repetition))
    scores = torch.where(scores > 0, scores / factor, scores * factor)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_temperature(scores: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """scores [B, V] / t [B, 1]; rows with t = 0 (greedy) are left alone."""
    return scores / torch.where(t > 0, t, torch.ones_like(t))


def apply_top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k [B, 1] largest scores (ties at the k-th kept, as transformers' TopKLogitsWarper); rows with
    k <= 0 or k >= V are left alone."""
    vocab = scores.size(-1)
    k = torch.where((k > 0) & (k < vocab), k, torch.full_like(k, vocab)).long()
    kth = scores.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # [B, 1]
    return scores.masked_fill(scores < kth, -math.inf)


def apply_top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter (as transformers' TopPLogitsWarper) with p [B, 1]; rows with p >= 1 are left alone."""
    # On CPU a data-dependent shortcut is free; on GPU stay branch-free (no host sync).
    if scores.device.type == "cpu" and bool((p >= 1).all()):
        return scores
    sorted_scores, order = scores.sort(dim=-1)  # ascending, [B, V]
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum <= 1 - p) & (p < 1)
    remove[:, -1] = False  # always keep the most likely token
    return scores.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def draw(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Picks [B]: argmax where u [B, 1] < 0 (greedy), else the inverse CDF of softmax(scores) at u."""
    greedy = scores.argmax(dim=-1, keepdim=True)  # [B, 1]
    if scores.device.type == "cpu" and bool((u < 0).all()):
        return greedy.squeeze(-1)
    cdf = scores.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]
    # Strictly below the total, so the pick is a token with non-zero probability.
    target = torch.minimum(u.clamp(min=0) * total, torch.nextafter(total, torch.zeros_like(total)))
    sampled = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.size(-1) - 1)
    return torch.where(u < 0, greedy, sampled).squeeze(-1)


def token_logprobs(logprobs: torch.Tensor, picks: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """logprobs [B, V] (log-softmax), picks [B] -> per row the pick's logprob and the top k (most likely first)."""
    chosen = logprobs.gather(-1, picks.unsqueeze(-1)).squeeze(-1).tolist()
    if k > 0:
        top_v, top_i = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprobs(int(t), float(c), top) for t, c, top in zip(picks.tolist(), chosen, tops, strict=True)]


# --- the batch -------------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, seqs: Sequence[SequenceSampler]) -> torch.Tensor:
    """Pick one token per row of logits [B, V] (row i belongs to seqs[i]) and record it in its sampler.

    Returns picks [B] (long). Rows whose request wants logprobs get them from the raw logits.
    """
    scores = logits.float()
    vocab, dev = scores.size(-1), scores.device
    params = [s.params for s in seqs]
    col = lambda xs: torch.tensor(xs, dtype=torch.float32, device=dev).unsqueeze(-1)  # noqa: E731
    want = [p.logprobs for p in params]
    raw = scores.log_softmax(dim=-1) if any(w is not None for w in want) else None
    if any(p.logit_bias for p in params):
        scores = apply_logit_bias(scores, [p.logit_bias for p in params])
    if any(p.penalised for p in params):
        rows = [i for i, p in enumerate(params) if p.penalised]
        seen, counts = zip(*(seqs[i].seen_and_counts(vocab, dev) for i in rows), strict=True)
        idx = torch.tensor(rows, device=dev)
        scores = scores.index_copy(0, idx, apply_penalties(
            scores[idx], torch.stack(seen), torch.stack(counts), col([params[i].presence_penalty for i in rows]),
            col([params[i].frequency_penalty for i in rows]), col([params[i].repetition_penalty for i in rows])))
    if all(p.greedy for p in params):
        picks = scores.argmax(dim=-1)
    else:
        scores = apply_temperature(scores, col([p.temperature for p in params]))
        if any(p.top_k > 0 for p in params):
            scores = apply_top_k(scores, col([p.top_k for p in params]))
        scores = apply_top_p(scores, col([p.top_p for p in params]))
        picks = draw(scores, col([s.uniform() for s in seqs]))
    picks_list = picks.tolist()
    if raw is not None:
        k = max(w or 0 for w in want)
        lps = token_logprobs(raw, picks, k)
        for s, w, lp in zip(seqs, want, lps, strict=True):
            s.record(int(lp.token_id), None if w is None else TokenLogprobs(lp.token_id, lp.logprob, lp.top[:w]))
    else:
        for s, tok in zip(seqs, picks_list, strict=True):
            s.record(int(tok), None)
    return picks
