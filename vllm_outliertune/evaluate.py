"""Perplexity through vLLM: the negative log-likelihood of fixed token windows from prompt logprobs."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from vllm_outliertune.engine import engine_kwargs, shutdown

# Windows scored at once: enough to keep 2 CPU cores or a GPU busy; the KV cache is sized for this many.
EVAL_SEQUENCES = 8
# vLLM's engine gives up on a model step after VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (default 300) and dies with
# "RPC call to execute_model timed out". One step here scores up to EVAL_SEQUENCES whole windows, which a CPU can take
# longer than that for (Qwen2.5-Coder-0.5B, 8 x 512 tokens in float16 on 2 shared cores: over 300 s), so a
# perplexity run gets this much per step unless the user set the variable.
EXECUTE_MODEL_TIMEOUT_S = 3600


def vllm_window_nll(model_dir: str, windows: Sequence[Sequence[int]], dtype: str, **engine_overrides: Any,
                    ) -> tuple[float, int]:
    """Sum of -log p(token | previous tokens of its window) over every window position but the first, and the count
    of such tokens, from vLLM prompt logprobs. The engine's KV cache holds EVAL_SEQUENCES windows at a time;
    `engine_overrides` go to `vllm.LLM` (e.g. quantization, trust_remote_code)."""
    from vllm import LLM

    # Set before the engine starts: its processes inherit the environment and read it there.
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", str(EXECUTE_MODEL_TIMEOUT_S))
    longest = max(len(window) for window in windows)
    kwargs = engine_kwargs(model_dir, dtype, max_model_len=longest + 1, sequences=EVAL_SEQUENCES,
                           enable_prefix_caching=False,  # every prompt logprob must be computed, not cached
                           **engine_overrides)
    llm = LLM(model=model_dir, **kwargs)
    try:
        logprobs = window_logprobs(llm, windows)
    finally:
        shutdown(llm)
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
