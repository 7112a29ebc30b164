"""The sampler's import path from before ``llamaforge.inference``; it lives in ``inference/sampling.py``."""

from .inference.sampling import (
    LogitsProcessor,
    SamplingBatch,
    SamplingParams,
    TokenHistory,
    processed_probs,
    sample_from_probs,
    token_logprobs,
)

__all__ = ["LogitsProcessor", "SamplingBatch", "SamplingParams", "TokenHistory", "processed_probs",
           "sample_from_probs", "token_logprobs"]  # fmt: skip
