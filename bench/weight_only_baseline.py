"""Weight-only 4-bit round-to-nearest baseline for docs/accuracy.md: every decoder linear's weight replaced by its
asymmetric 4-bit RTN copy with one float scale and zero point per group of --group-size input channels (the usual
W4A16 "RTN g128" baseline of GPTQ/AWQ papers), written back as a plain fp checkpoint, so `outliertune eval` (either
engine) scores exactly what a W4A16 kernel computes, up to fp16 rounding of the dequantized weights.

    python bench/weight_only_baseline.py MODEL_DIR OUT_DIR [--group-size 128]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from vllm_outliertune.offline.checkpoint import TOKENIZER_FILES, atomic_directory, check_output_dir
from vllm_outliertune.offline.architectures import architecture_of, decoder_layers
from vllm_outliertune.offline.model_io import load_model


def rtn_weight_only(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Asymmetric 4-bit RTN with float scale and zero point per group (0: per row; the last group may be short, as
    in the W4A8 checkpoints), dequantized."""
    return torch.cat([_rtn_group(group) for group in weight.float().split(group_size or weight.shape[1], dim=1)],
                     dim=1).to(weight.dtype)


def _rtn_group(group: torch.Tensor) -> torch.Tensor:
    lo, hi = group.amin(1, keepdim=True).clamp(max=0), group.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    codes = (torch.round(group / scale) + zero).clamp(0, 15)
    return (codes - zero) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    check_output_dir(args.out_dir, args.model_dir, overwrite=False)
    model, _ = load_model(args.model_dir)
    linears = architecture_of(model).linears
    with torch.no_grad():
        for layer in decoder_layers(model):
            for name in linears:
                linear = layer.get_submodule(name)
                linear.weight.copy_(rtn_weight_only(linear.weight, args.group_size))
    with atomic_directory(args.out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (args.model_dir / name).is_file():
                shutil.copyfile(args.model_dir / name, tmp / name)
    print(f"wrote {args.out_dir} (weight-only 4-bit RTN, group size {args.group_size})")


if __name__ == "__main__":
    main()
