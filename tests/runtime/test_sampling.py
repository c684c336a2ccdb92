"""Sampling functions without a model: hand-computed cases and transformers' own logits processors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prism_moe.runtime.engine.sampling import (
    SamplingParams,
    SequenceSampler,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw,
    sample,
    token_logprobs,
)

V = 50


def col(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32).unsqueeze(-1)


@pytest.fixture
def scores() -> torch.Tensor:
    return torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3


def test_repetition_penalty_equals_transformers(scores: torch.Tensor) -> None:
    seqs = [[1, 2, 3, 3], [7, 40, 49], [0]]
    seen = torch.zeros(3, V, dtype=torch.bool)
    for i, s in enumerate(seqs):
        seen[i, s] = True
    ours = apply_penalties(scores, seen, torch.zeros(3, V), col([0] * 3), col([0] * 3), col([1.3] * 3))
    for i, s in enumerate(seqs):
        ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([s]), scores[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], ref)
    # Per-row values; a row with 1.0 is untouched.
    mixed = apply_penalties(scores, seen, torch.zeros(3, V), col([0] * 3), col([0] * 3), col([1.0, 2.0, 0.5]))
    torch.testing.assert_close(mixed[0], scores[0])
    torch.testing.assert_close(mixed[2:], RepetitionPenaltyLogitsProcessor(0.5)(torch.tensor([[0]]), scores[2:].clone()))


def test_frequency_and_presence_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    out = apply_penalties(logits, counts > 0, counts, col([0.5]), col([0.25]), col([1.0]))
    # token 1: 2 - 0.25*3 - 0.5 = 0.75; token 2: -1 - 0.25 - 0.5 = -1.75; others untouched
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.75, -1.75, 0.5]]))
    # repetition first, then the others: token 1: 2/2 - 0.75 - 0.5 = -0.25; token 2: -1*2 - 0.75 = -2.75
    out = apply_penalties(logits, counts > 0, counts, col([0.5]), col([0.25]), col([2.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -0.25, -2.75, 0.5]]))


def test_logit_bias_equals_transformers_sequence_bias(scores: torch.Tensor) -> None:
    bias = {4: 5.0, 9: -100.0, 10: 0.5}
    ours = apply_logit_bias(scores, [bias, {}, {4: 1.0}])
    ref = SequenceBiasLogitsProcessor({(k,): v for k, v in bias.items()})(torch.tensor([[1]]), scores[:1].clone())
    torch.testing.assert_close(ours[:1], ref)
    torch.testing.assert_close(ours[1], scores[1])
    assert ours[2, 4] == scores[2, 4] + 1.0


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7])
def test_temperature_equals_transformers(scores: torch.Tensor, t: float) -> None:
    torch.testing.assert_close(apply_temperature(scores, col([t] * 3)), TemperatureLogitsWarper(t)(None, scores))
    torch.testing.assert_close(apply_temperature(scores, col([0.0] * 3)), scores)  # greedy rows untouched


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_equals_transformers(scores: torch.Tensor, k: int) -> None:
    ref = TopKLogitsWarper(k, filter_value=-math.inf)(None, scores)
    torch.testing.assert_close(apply_top_k(scores, col([k] * 3)), ref)
    torch.testing.assert_close(apply_top_k(scores, col([0, V, -1])), scores)  # 0, V, -1: every token


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_equals_transformers(scores: torch.Tensor, p: float) -> None:
    ref = TopPLogitsWarper(p, filter_value=-math.inf)(None, scores)
    torch.testing.assert_close(apply_top_p(scores, col([p] * 3)), ref)


def test_draw_inverse_cdf_by_hand() -> None:
    # probabilities 0.1, 0.2, 0.3, 0.4: CDF 0.1, 0.3, 0.6, 1.0
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().repeat(5, 1)
    picks = draw(scores, col([0.05, 0.15, 0.59, 0.61, -1.0]))
    assert picks.tolist() == [0, 1, 2, 3, 3]  # u < 0: greedy (argmax)


def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])  # probabilities 1/6, 1/2, 1/6, 1/6
    (lp,) = token_logprobs(logits.log_softmax(-1), torch.tensor([2]), 2)
    assert lp.token_id == 2 and lp.logprob == pytest.approx(math.log(1 / 6))
    assert lp.top[0] == (1, pytest.approx(math.log(0.5))) and lp.top[1][1] == pytest.approx(math.log(1 / 6))


def test_sample_greedy_with_penalties_and_raw_logprobs() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0], [1.0, 3.0, 2.9, 0.0]])
    plain = SequenceSampler(SamplingParams(logprobs=1), prompt_ids=[1])
    penalised = SequenceSampler(SamplingParams(repetition_penalty=1.2, logprobs=0), prompt_ids=[1])
    picks = sample(logits, [plain, penalised])
    assert picks.tolist() == [1, 2]  # 3.0 / 1.2 = 2.5 < 2.9
    raw = logits[0].log_softmax(-1)
    # Logprobs of the raw distribution (vLLM's default), whatever the penalties did.
    assert plain.logprobs[0].logprob == pytest.approx(raw[1].item()) and plain.logprobs[0].top == ((1, pytest.approx(raw[1].item())),)
    assert penalised.logprobs[0].logprob == pytest.approx(raw[2].item()) and penalised.logprobs[0].top == ()
    # The picked token now counts as seen: frequency penalty acts on output tokens only.
    freq = SequenceSampler(SamplingParams(frequency_penalty=2.0), prompt_ids=[2])
    assert sample(logits[:1], [freq]).tolist() == [1]  # the prompt's token 2 is not penalised by frequency
    assert sample(logits[:1], [freq]).tolist() == [2]  # token 1 came out once: 3.0 - 2.0 < 2.9
    assert freq.output_ids == [1, 2]
    biased = SequenceSampler(SamplingParams(logit_bias={3: 10.0}), prompt_ids=[0])
    assert sample(logits[:1], [biased]).tolist() == [3]


def test_seeded_sampling_reproducible_and_batch_independent(scores: torch.Tensor) -> None:
    def run(seed: int, company: int) -> list[int]:
        s = SequenceSampler(SamplingParams(temperature=1.0, top_k=20, seed=seed), prompt_ids=[0])
        others = [SequenceSampler(SamplingParams(temperature=0.5, seed=99), prompt_ids=[0]) for _ in range(company)]
        return [sample(scores[:1 + company], [s, *others])[0].item() for _ in range(30)]

    assert run(7, 0) == run(7, 2)
    assert run(7, 0) != run(8, 0)


@pytest.mark.parametrize(("params", "words"), [
    (SamplingParams(temperature=-1), "temperature"),
    (SamplingParams(top_p=0), "top_p"),
    (SamplingParams(top_k=-2), "top_k"),
    (SamplingParams(presence_penalty=3), "presence_penalty"),
    (SamplingParams(repetition_penalty=0), "repetition_penalty"),
    (SamplingParams(logit_bias={V: 1.0}), "outside the vocabulary"),
    (SamplingParams(logit_bias={1: 101.0}), "[-100, 100]"),
    (SamplingParams(logprobs=21), "logprobs"),
])
def test_bad_params_say_what_is_wrong(params: SamplingParams, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        params.check(V)
