"""Perplexity with torch: the fp model (Hugging Face) or our integer reference of a quantized checkpoint, on the
same fixed token windows (text.token_windows) that `--engine vllm` scores through vLLM."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_outliertune.offline.model_io import UserError, is_outliertune_checkpoint, read_config

# dtypes both engines accept (`outliertune eval --dtype`); "auto" is the checkpoint's own.
EVAL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Model types whose residual stream outgrows float16 (Gemma 3 270M: absmax 97,762 in layer 13 on Brown text, inf
# from layer 8 in float16); vLLM refuses float16 for the same types ("Numerical instability").
FLOAT16_OVERFLOWS = ("gemma2", "gemma3", "gemma3_text", "glm4")


def eval_dtype(config: dict, requested: str, model_dir: Path) -> str:
    """The dtype name both engines run in: ``requested``, or for "auto" the one config.json names (dtype, or
    torch_dtype in older files; float32 when it names none, as transformers assumes), except bfloat16 for a model
    type whose activations overflow float16. Resolved here rather than by each engine because vLLM's own "auto"
    turns a float32 model into bfloat16 on the CPU."""
    model_type = config.get("model_type")
    if requested != "auto":
        if requested == "float16" and model_type in FLOAT16_OVERFLOWS:
            raise UserError(f"--dtype float16: {model_dir}/config.json is model type {model_type!r}, whose "
                            f"activations overflow float16 (vLLM refuses it too); use --dtype bfloat16 or float32")
        return requested
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if not isinstance(name, str) or name not in EVAL_DTYPES:
        raise UserError(f"{model_dir}/config.json names dtype {name!r}, which eval does not run; pass --dtype "
                        f"with one of {', '.join(EVAL_DTYPES)}")
    return "bfloat16" if name == "float16" and model_type in FLOAT16_OVERFLOWS else name


def load_torch_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     trust_remote_code: bool = False):
    """Our reference model for an OutlierTune checkpoint, else the Hugging Face model, in ``dtype``; the model
    directory's custom code (auto_map) runs only with ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM

    from vllm_outliertune.offline.reference import load_reference_model

    config = read_config(model_dir)
    if is_outliertune_checkpoint(config):
        return load_reference_model(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if config.get("quantization_config") is not None:
        raise UserError(f"{model_dir}/config.json: quantization {config['quantization_config'].get('quant_method')!r}"
                        f" is not supported by --engine torch; use --engine vllm")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


@torch.no_grad()
def torch_window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False,
                     ) -> tuple[float, int]:
    """Sum of -log p(token | previous tokens of its window) over every window position but the first, and the
    count of such tokens (the same quantity as vllm_outliertune.evaluate.vllm_window_nll)."""
    device = next(iter(model.buffers()), next(model.parameters())).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="scoring windows", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch[:, 1:, None]).squeeze(-1)
        if not torch.isfinite(logprobs).all():
            raise FloatingPointError("the model produced non-finite log-probabilities")
        nll -= float(logprobs.double().sum())
        count += logprobs.numel()
    return nll, count


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)
