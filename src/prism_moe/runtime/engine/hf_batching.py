"""`HFBatchingRunner`: transformers' continuous batching (`ContinuousBatchingManager`) as a `Runner`.

The only module that touches transformers' continuous-batching internals; `check_transformers()` refuses versions
it was not checked against. The manager brings a paged KV cache, chunked prefill and one background thread that
runs each step's forward over every active request. Greedy tokens equal `model.generate(do_sample=False)` per
request, also when requests of different lengths share steps (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, on CPU).

What we change inside it, and why:
* Sampling. The manager decides greedy vs sampling once for all requests and has no per-request seed,
  penalties or logprobs. We run it greedy (argmax) and replace `manager.logit_processor` (an attribute, not a
  documented hook) by one per-request processor, `_Sample`: it runs `sampling.sample` over the step's rows and
  turns each row into a one-hot at the pick, so the manager's argmax takes it. A step where every request is plain
  greedy is left alone (the manager's argmax is the answer).
  The processor learns which request each row belongs to in `prepare_tensor_args`, called just before the
  forward on the same thread; that holds because async batching is off (`use_async_batching=False`).
* Outputs: `get_results` turns the manager's `GenerationOutput` into our `RunnerOutput`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from prism_moe.runtime.engine.runners import RunnerOutput, RunnerRequest, score_prompt
from prism_moe.runtime.engine.sampling import SequenceSampler, TokenLogprobs, sample

# Checked against these versions' ContinuousBatchingManager (attributes, logits-processor API, outputs).
TESTED_TRANSFORMERS = ("5.24", "6")  # >= first, < second


def check_transformers(version: str | None = None) -> None:
    """Raise `RuntimeError` unless transformers' version is one this module was checked against."""
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    low, high = TESTED_TRANSFORMERS
    if not Version(low) <= Version(version) < Version(high):
        raise RuntimeError(
            f"prism's continuous-batching runner uses internals of transformers' ContinuousBatchingManager and was "
            f"checked with transformers >={low},<{high}; this environment has {version}. Install a checked version "
            f"(pip install 'transformers>={low},<{high}') or use batching='slots' (the default).")


class HFBatchingRunner:
    """transformers' continuous batching behind the `Runner` protocol. Sizes as `ContinuousBatchingConfig`:
    `kv_cache_tokens` tokens of paged cache (pages of `page_size`), at most `max_running` requests and
    `max_batch_tokens` tokens per forward."""

    def __init__(self, model: Any, eos_token_ids: Sequence[int], pad_token_id: int, *, max_running: int,
                 max_batch_tokens: int, kv_cache_tokens: int, page_size: int, use_cuda_graph: bool = False) -> None:
        check_transformers()
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gen_config = GenerationConfig(do_sample=False, eos_token_id=list(eos_token_ids) or -1,
                                      pad_token_id=pad_token_id)
        cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=max(1, math.ceil(kv_cache_tokens / page_size)),
            max_batch_tokens=max_batch_tokens, max_requests_per_batch=max_running, use_cuda_graph=use_cuda_graph,
            use_async_batching=False, max_queue_size=0)
        self._model = model
        self._manager = model.init_continuous_batching(generation_config=gen_config,
                                                       continuous_batching_config=cb_config)
        if not hasattr(self._manager, "logit_processor") or self._manager.is_running():
            raise RuntimeError("transformers' ContinuousBatchingManager changed: no `logit_processor` to replace "
                               "before start(); check prism_moe.runtime.engine.hf_batching against this version")
        self._manager.logit_processor = _sampling_processors()

    def start(self) -> None:
        self._manager.start()

    def stop(self, timeout: float | None = None) -> None:
        try:
            self._manager.stop(block=True, timeout=timeout, hard_stop=True)
        finally:
            self._manager.destroy()

    def is_running(self) -> bool:
        return self._manager.is_running()

    def add_request(self, request: RunnerRequest) -> bool:
        rid = self._manager.add_request(request.prompt, request_id=request.id,
                                        max_new_tokens=request.max_new_tokens, streaming=True,
                                        eos_token_id=list(request.eos) or [-1], sampler=request.sampler)
        return rid is not None

    def cancel_request(self, request_id: str) -> None:
        self._manager.cancel_request(request_id)

    def get_results(self, timeout: float | None = None) -> list[RunnerOutput]:
        outs = []
        while (out := self._manager.get_result(timeout=timeout if not outs else 0)) is not None:
            outs.append(RunnerOutput(out.request_id, list(out.generated_tokens), out.is_finished(), out.error))
        return outs

    def prompt_logprobs(self, prompt: list[int], top: int) -> list[TokenLogprobs | None]:
        return score_prompt(self, prompt, top)

    @contextmanager
    def pause(self) -> Iterator[None]:
        with self._manager.pause():
            yield

    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        # While running, the manager may have switched the model to a paged attention implementation; a plain
        # forward needs the model's own one back for its duration.
        original = getattr(self._manager, "_original_attn_impl", None)
        current = self._model.config._attn_implementation
        if original is not None:
            self._model.set_attn_implementation(original)
        try:
            with torch.no_grad():
                ids = torch.tensor([prompt], device=self._model.device)
                return self._model(input_ids=ids, use_cache=False).logits[0]
        finally:
            if original is not None:
                self._model.set_attn_implementation(current)


def _sampling_processors() -> Any:
    """`sampling.sample` as the manager's one per-request logits processor."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor,
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    class _Sample(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"sampler": SequenceSampler}
        ignored_kwargs = ()

        def __init__(self) -> None:
            self._rows: list[SequenceSampler] = []

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.zero_()

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            # The rows of the coming forward's logits, in order (see the module docstring).
            self._rows = [r.state.logit_processor_kwargs["sampler"] for r in requests_with_new_token]
            return torch.zeros(0, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            rows = self._rows
            if all(s.params.plain_greedy for s in rows):
                for s, tok in zip(rows, scores[:len(rows)].argmax(dim=-1).tolist(), strict=True):
                    s.record(int(tok), None)
                return scores
            picks = sample(scores[:len(rows)], rows)  # [n]
            out = scores.clone()
            out[:len(rows)] = torch.full_like(out[:len(rows)], -math.inf).scatter_(-1, picks.unsqueeze(-1), 0.0)
            return out

    procs = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([_Sample()]))
    # The list counts argument rows only for processors it converts itself; ours is already per-request.
    procs.tensors_required = 1
    return procs
