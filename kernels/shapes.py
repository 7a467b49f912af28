"""Per-rank GEMM shapes (N = out, K = in features) of a decoder model's quantized linear layers, from its
config.json alone (no weights), as vLLM shards them for tensor parallelism: q/k/v and gate/up are merged column-
parallel layers, o_proj and down_proj row-parallel. KV heads are split across ranks, or replicated (one per rank)
when there are fewer KV heads than ranks. A checkpoint with a quantized lm_head (quantization_config.lm_head) adds
its shape: the vocabulary padded to VOCAB_PADDING, split across ranks."""

from __future__ import annotations

import json
from pathlib import Path


VOCAB_PADDING = 64  # vLLM's ParallelLMHead pads the vocabulary to a multiple of this (DEFAULT_VOCAB_PADDING_SIZE)


class ShapeError(ValueError):
    """A config.json the shapes cannot be read from, or a tensor-parallel size the model cannot be split by."""


def _field(config: dict, name: str, source: str):
    if name not in config:
        raise ShapeError(f"{source}: no '{name}'; `outliertune tune` reads Llama / Mistral / Qwen2-style configs "
                         "(or pass --shapes NxK,...)")
    return config[name]


def linear_shapes(config: dict, tp: int, source: str = "config.json") -> dict[str, tuple[int, int]]:
    """{"qkv_proj" | "o_proj" | "gate_up_proj" | "down_proj" [| "lm_head"]: (N, K)} on one of `tp` ranks."""
    quantized_head = (config.get("quantization_config") or {}).get("lm_head", "none") != "none"
    config = config.get("text_config", config)  # multimodal wrappers keep the language model's config inside
    hidden = _field(config, "hidden_size", source)
    inter = _field(config, "intermediate_size", source)
    heads = _field(config, "num_attention_heads", source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if heads % tp or inter % tp or (kv_heads % tp and tp % kv_heads):
        raise ShapeError(f"{source}: tensor-parallel size {tp} does not divide this model ({heads} attention "
                         f"heads, {kv_heads} KV heads, intermediate size {inter})")
    kv_per_rank = max(1, kv_heads // tp)
    shapes = {"qkv_proj": ((heads // tp + 2 * kv_per_rank) * head_dim, hidden),
              "o_proj": (hidden, heads * head_dim // tp),
              "gate_up_proj": (2 * inter // tp, hidden),
              "down_proj": (hidden, inter // tp)}
    if quantized_head:
        vocab = _field(config, "vocab_size", source)
        shapes["lm_head"] = (-(-vocab // VOCAB_PADDING) * VOCAB_PADDING // tp, hidden)
    return shapes


def read_config(path: Path) -> dict:
    """config.json of a model directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ShapeError(f"{file}: not found; give a model directory with a config.json (weights are not needed)")
    except json.JSONDecodeError as error:
        raise ShapeError(f"{file}: not valid JSON ({error})")


def model_shapes(path: Path, tp_sizes: list[int]) -> tuple[dict[int, list[tuple[int, int]]], list[str]]:
    """({tp: [(N, K), ...]}, notes): the per-rank shapes for every TP size the model can be split by; a note names
    each TP size it cannot."""
    config = read_config(path)
    shapes, notes = {}, []
    for tp in tp_sizes:
        try:
            shapes[tp] = list(dict.fromkeys(linear_shapes(config, tp, str(path)).values()))
        except ShapeError as error:
            if len(tp_sizes) == 1:
                raise
            notes.append(f"skipping TP {tp}: {error}")
    return shapes, notes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"6144x4096,4096x4096" -> [(6144, 4096), (4096, 4096)] (N x K: out x in features)."""
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ShapeError(f"--shapes {text!r}: expected comma-separated NxK (out x in features), e.g. 6144x4096")
    return shapes
