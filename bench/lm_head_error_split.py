"""Where a quantized lm_head's perplexity cost comes from (docs/accuracy.md, "Quantized lm_head"): the torch
reference of an `outliertune quantize --lm-head int8` checkpoint, scored as written, with its int8 weights but float
activations, and with its int8 activation codes but float (folded) weights.

    python bench/lm_head_error_split.py CHECKPOINT FP_MODEL_DIR --text test.txt [--max-windows 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from vllm_outliertune.kernels.torch_ref import quantize_activation_ref
    from vllm_outliertune.offline.perplexity import perplexity, torch_window_nll
    from vllm_outliertune.offline.reference import load_reference_model
    from vllm_outliertune.offline.text import read_text, token_windows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("fp_model", type=Path, help="the unquantized model the checkpoint was made from")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--max-windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    windows = token_windows(AutoTokenizer.from_pretrained(args.checkpoint), read_text(args.text), args.seq_len,
                            args.max_windows)
    model = load_reference_model(args.checkpoint)
    head = model.lm_head
    norm = model.model.norm  # Llama-style final norm (the step was folded there)
    fp = {}
    for path in sorted(args.fp_model.glob("*.safetensors")):
        with safe_open(str(path), "pt") as file:
            fp |= {name: file.get_tensor(name) for name in file.keys()
                   if name in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight")}
    step = fp["model.norm.weight"].float() / norm.weight.float()
    folded = fp.get("lm_head.weight", fp["model.embed_tokens.weight"]).float() * step  # tied: the embedding
    dequantized = head.weight.float() * head.weight_scale[:, None]

    class Variant(torch.nn.Module):
        def __init__(self, mode: str):
            super().__init__()
            self.mode = mode

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.mode == "int8 weights, float activations":
                return (x.float() @ dequantized.t() + head.epilogue_bias).to(x.dtype)
            x2d = x.reshape(-1, x.shape[-1])
            codes = quantize_activation_ref(x2d, head.input_inv_scale, head.input_shift, head.activation_bits).float()
            if head.input_shift is not None:
                codes = codes + head.input_shift
            if head.input_inv_scale is not None:
                codes = codes / head.input_inv_scale
            return (codes @ folded.t()).reshape(*x.shape[:-1], -1).to(x.dtype)

    results = {}
    for mode in ("as written", "int8 weights, float activations", "int8 activations, float weights"):
        model.lm_head = head if mode == "as written" else Variant(mode)
        nll, tokens = torch_window_nll(model, windows)
        results[mode] = perplexity(nll, tokens)
        print(f"{mode}: {results[mode]:.3f} ({tokens} tokens)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
