"""Which tokens carry the massive activations of a model's early layers, and which down_proj input channels create
them: per decoder layer, the median and the largest per-token absmax of the residual stream (layer output) and of
down_proj's input, with the token (position in the window, text) and channel. fp32, first window of each text.

    python bench/massive_activations.py MODEL_DIR --layers 6 --text brown=/tmp/brown/test.txt --text code=/tmp/code/test.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_outliertune.offline.model_io import load_model, load_tokenizer
from vllm_outliertune.offline.text import read_text, token_windows


def _absmax_per_token(output) -> torch.Tensor:
    return (output[0] if isinstance(output, (tuple, list)) else output)[0].abs().amax(-1)


@torch.no_grad()
def layer_rows(model, tokenizer, window: torch.Tensor) -> list[str]:
    residual, down_in = [], []
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(lambda _m, _a, out: residual.append(_absmax_per_token(out))))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: down_in.append(args[0][0])))
    try:
        model(input_ids=window, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()

    def token(position: int) -> str:
        return f"{position}:{tokenizer.decode([int(window[0, position])])!r}"

    rows = []
    for index, (res, down) in enumerate(zip(residual, down_in)):
        per_token = down.abs().amax(-1)
        top, channel = int(per_token.argmax()), int(down.abs().amax(0).argmax())
        rows.append(f"| {index} | {float(res.median()):.1f} | {float(res.max()):.1f} at {token(int(res.argmax()))} | "
                    f"{float(per_token.median()):.1f} | {float(per_token.max()):.1f} at {token(top)}, channel "
                    f"{channel} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--layers", type=int, default=6, help="run only the first N decoder layers")
    parser.add_argument("--text", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model_dir)
    model, _ = load_model(args.model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:args.layers]
    for item in args.text:
        name, _, path = item.partition("=")
        window = token_windows(tokenizer, read_text(Path(path)), args.seq_len, 1)
        print(f"\n{name}: first window of {path}\n")
        print("| layer | residual median | residual max | down_proj input median | down_proj input max |")
        print("|---|---|---|---|---|")
        print("\n".join(layer_rows(model, tokenizer, window)))


if __name__ == "__main__":
    main()
