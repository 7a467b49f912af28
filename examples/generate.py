"""Offline batch generation with an OutlierTune checkpoint: python examples/generate.py CHECKPOINT_DIR

The checkpoint's config.json names quant_method "outliertune", so vLLM picks the plugin by itself."""

import sys

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me three tips for learning to cook.",
]


def main(checkpoint: str) -> None:
    from vllm import LLM, SamplingParams

    from vllm_outliertune.engine import engine_kwargs, shutdown

    # KV cache for these prompts' sequences only (a fraction of the machine's memory fails on small machines).
    llm = LLM(model=checkpoint, **engine_kwargs(checkpoint, "auto", max_model_len=2048, sequences=len(PROMPTS)))
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    outputs = llm.chat(conversations, SamplingParams(max_tokens=48, temperature=0.0), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        print(f"\n>>> {prompt}\n{output.outputs[0].text.strip()}")
    shutdown(llm)  # stop vLLM's processes before the interpreter exits


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this file
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/generate.py CHECKPOINT_DIR")
    main(sys.argv[1])
