"""Where a packed 4-bit checkpoint's output error comes from, per input group of the first decoder layers, on the
calibration sample the plan search scores (relative output error, docs/accuracy.md "Evened plans"):

- the search's plan with the default grid, and with balanced plans only (no evened ones, the grid before them);
- that plan's error split: its folded weights rounded to 4 bits with float activations, and its activations
  quantized with float weights;
- weight-only 4 bits of the unfolded weight: in the checkpoint's packed format, and asymmetric RTN with float scale
  and zero per group (bench/weight_only_baseline.py, the usual W4A16 baseline).

    python bench/plan_error_breakdown.py MODEL_DIR [--layers 6] [--samples 32]

Groups that keep int8 weights (--int8-weights auto) are left out. Calibration as `outliertune quantize` does it
(default mixed text), with --samples windows of 512 tokens; no cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_outliertune.offline import quantize as quantize_mod
from vllm_outliertune.offline.architectures import architecture_of
from vllm_outliertune.offline.assets import calibration_file
from vllm_outliertune.offline.calibrate import calibrate_layers
from vllm_outliertune.offline.model_io import load_model, load_tokenizer
from vllm_outliertune.offline.quantize import QuantizeOptions, int8_weight_groups, plan_layer
from vllm_outliertune.offline.search import SearchGrid, relative_error
from vllm_outliertune.offline.text import read_text, token_windows
from vllm_outliertune.offline.weights import fake_quantize
from weight_only_baseline import rtn_weight_only


def _describe(choice: dict) -> str:
    steps = f"e {choice['evenness']}" if "evenness" in choice else f"s {choice['strength']}"
    return f"{steps}, c {choice['clip']}"


def _balanced_only_plans(layer, stats, model_config, arch, options, int8_groups):
    """plan_layer with the grid as it was before evened plans."""
    evenness = quantize_mod.LOW_BIT_EVENNESS
    quantize_mod.LOW_BIT_EVENNESS = ()
    try:
        return plan_layer(layer, stats, model_config, arch, options, int8_groups)
    finally:
        quantize_mod.LOW_BIT_EVENNESS = evenness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--layers", type=int, default=6, help="the first N decoder layers")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    args = parser.parse_args()
    model, _ = load_model(args.model_dir)
    arch = architecture_of(model)
    options = QuantizeOptions(w_bits=4, a_bits=8, samples=args.samples).for_architecture(arch)
    windows = token_windows(load_tokenizer(args.model_dir), read_text(calibration_file("mixed"), "--calib"),
                            options.seq_len, options.samples)
    num_layers = len(model.get_submodule(arch.layers))
    print("| layer | group | search (default grid) | balanced only | its weights alone | its activations alone | "
          "unfolded W4, packed | unfolded W4, float RTN |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for index, layer, stats in calibrate_layers(model, windows, sample_tokens=SearchGrid.tokens, progress=False):
        if index >= args.layers:
            break
        int8_groups = int8_weight_groups(index, num_layers, arch.groups, options)
        plans, info = plan_layer(layer, stats, model.config, arch, options, int8_groups)
        _, before = _balanced_only_plans(layer, stats, model.config, arch, options, int8_groups)
        for group, names in arch.groups.items():
            if group in int8_groups:
                continue
            weight = torch.cat([layer.get_submodule(name).weight.detach().float() for name in names])
            sample = stats[group].sample[:SearchGrid.tokens].float()
            reference = sample @ weight.t()
            step = plans[group].step
            folded = fake_quantize(weight * step, options.weight_format, (sample / step).pow(2).mean(0)) / step
            unfolded = fake_quantize(weight, options.weight_format, sample.pow(2).mean(0))
            activations = plans[group].fake_quantize(sample, options.a_bits, options.guard, options.floor)
            outputs = (sample @ folded.t(), activations @ weight.t(), sample @ unfolded.t(),
                       sample @ rtn_weight_only(weight, options.group_size).t())
            errors = [relative_error(output, reference) for output in outputs]
            ratios.append(info[group]["error"] / before[group]["error"])
            print(f"| {index} | {group} | {info[group]['error']:.3e} ({_describe(info[group])}) | "
                  f"{before[group]['error']:.3e} ({_describe(before[group])}) | "
                  + " | ".join(f"{error:.3e}" for error in errors) + " |", flush=True)
    geomean = float(torch.tensor(ratios).log().mean().exp())
    print(f"\ndefault grid / balanced only, geometric mean over {len(ratios)} groups: {geomean:.3f} "
          f"(best {min(ratios):.3f}, worst {max(ratios):.3f})")


if __name__ == "__main__":
    main()
