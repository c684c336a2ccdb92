"""The generation engine of one edge server, split as vLLM splits its engine.

* `frontend.py`: `Engine`: admission (bounded waiting queue), one token stream per request, detokenisation,
  stop strings, prompt logprobs; it drives one runner.
* `sampling.py`: pure functions on logits (temperature, top-k/top-p, penalties, logit bias, logprobs) and the
  per-request sampling state; no model, no threads.
* `runners.py`: the `Runner` protocol; `slots.py` (a preallocated per-slot cache for every family, latent attention
  included: the default) and `hf_batching.py` (transformers' continuous batching, the only module that touches its
  internals) implement it.
* `remote.py`: the runner in the model's process (`RunnerHost`) driven from `prism serve`'s API process
  (`RemoteRunner`), as vLLM v1 splits its API server from its engine core.
"""

from prism_moe.runtime.engine.frontend import (
    Engine,
    EngineError,
    EngineOverloaded,
    FinishReason,
    GenerationResult,
    RequestStats,
    TokenEvent,
    TokenStream,
    resolve_device,
)
from prism_moe.runtime.engine.runners import Runner, RunnerOutput, RunnerRequest, caches_latents
from prism_moe.runtime.engine.sampling import SamplingParams, SequenceSampler, TokenLogprobs

__all__ = ["Engine", "EngineError", "EngineOverloaded", "FinishReason", "GenerationResult", "RequestStats",
           "Runner", "RunnerOutput", "RunnerRequest", "SamplingParams", "SequenceSampler", "TokenEvent",
           "TokenLogprobs", "TokenStream", "caches_latents", "resolve_device"]
