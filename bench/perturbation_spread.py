"""How far a quantized checkpoint's perplexity moves under perturbations the size of floating-point noise: our torch
reference scores the windows once as is, then again per seed with every input of one linear multiplied by
(1 + eps * N(0, 1)). A model whose rounding decisions amplify such noise (Gemma 3 270M: one flipped code grows to a
10 % difference of the hidden states by the last layer) scores differently in two engines that round the same
values but compute them in a different order; this spread is the size of gap to expect between them.

    python bench/perturbation_spread.py CHECKPOINT --text /tmp/brown/test.txt --windows 2 --seeds 4
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from vllm_outliertune.offline.model_io import load_tokenizer
from vllm_outliertune.offline.perplexity import perplexity, torch_window_nll
from vllm_outliertune.offline.reference import load_reference_model
from vllm_outliertune.offline.text import read_text, token_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--eps", type=float, default=1e-6, help="relative size of the perturbation")
    parser.add_argument("--module", default="model.layers.0.self_attn.o_proj",
                        help="the linear whose input is perturbed")
    args = parser.parse_args()

    windows = token_windows(load_tokenizer(args.checkpoint), read_text(args.text), args.seq_len, args.windows)
    model = load_reference_model(args.checkpoint)
    generator = torch.Generator()
    perturb = [False]

    def pre_hook(_module, inputs):
        if not perturb[0]:
            return None
        x = inputs[0]
        return (x * (1 + args.eps * torch.randn(x.shape, generator=generator).to(x)),)

    model.get_submodule(args.module).register_forward_pre_hook(pre_hook)
    with torch.no_grad():
        print(f"as is: perplexity {perplexity(*torch_window_nll(model, windows)):.3f}", flush=True)
        perturb[0] = True
        scores = []
        for seed in range(args.seeds):
            generator.manual_seed(seed)
            scores.append(perplexity(*torch_window_nll(model, windows)))
            print(f"seed {seed}: perplexity {scores[-1]:.3f}", flush=True)
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(len(scores) - 1, 1))
    print(f"perturbed ({args.module} input x (1 + {args.eps:g} N(0,1))): mean {mean:.3f}, sd {spread:.3f} "
          f"({100 * spread / mean:.2f} %) over {len(scores)} seeds, {windows.shape[0]} x {windows.shape[1]} tokens")


if __name__ == "__main__":
    main()
