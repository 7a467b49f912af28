"""Range-margin probe (issue 14): `outliertune diagnose --quick --keep-top 0` for several --range-margin settings
and texts, planning once per setting (the plan does not depend on the test text) and scoring the fp model once per
text. Prints one JSON line per (setting, text): fp and fully quantized perplexity and KL, as diagnose's "fp" and
"all" rows.

    python bench/margin_probe.py /tmp/qwen --calib-cache /tmp/accq/cache-qwen --text /tmp/js/test.txt \\
        --text /tmp/brown/test.txt --max-windows 4 --margin 1 --margin 1.5 --margin 1.5:down

A setting is F (every input group's calibrated ranges widened by F) or F:GROUP,... (only those groups: qkv, o,
gate_up, down), optionally followed by /GROUP=G,... to widen those groups by G instead (e.g. 1.5/down=2: down_proj
x2, the others x1.5; no such option in quantize).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from vllm_outliertune.offline.architectures import INPUT_GROUPS, architecture_of
from vllm_outliertune.offline.assets import DEFAULT_CALIB, calibration_file
from vllm_outliertune.offline.diagnose import _score
from vllm_outliertune.offline.fakequant import StaticPlanLinear, replace_linears
from vllm_outliertune.offline.model_io import load_model, load_tokenizer
from vllm_outliertune.offline import quantize as quantize_mod
from vllm_outliertune.offline.quantize import QuantizeOptions, QuantizeRecord, quantize_loaded
from vllm_outliertune.offline.text import read_text, token_windows


def margin_setting(spec: str) -> tuple[float, tuple[str, ...], dict[str, float]]:
    spec, _, overrides = spec.partition("/")
    factor, _, groups = spec.partition(":")
    chosen = tuple(groups.split(",")) if groups else INPUT_GROUPS
    apart = {group: float(value) for group, _, value in (item.partition("=") for item in overrides.split(",") if item)}
    if not set(chosen) | set(apart) <= set(INPUT_GROUPS):
        raise argparse.ArgumentTypeError(f"{spec!r}: groups must be among {INPUT_GROUPS}")
    return float(factor), chosen, apart


def planned_apart(apart: dict[str, float], factor: float, groups: tuple[str, ...]):
    """quantize.plan_layer with the groups of ``apart`` widened by their own factor (plan_layer then widens the
    setting's ``groups`` by ``factor``, so theirs is divided by it)."""
    plan_layer = quantize_mod.plan_layer

    def plan(layer, stats, *args, **kw):
        stats = {group: quantize_mod.widened(value, apart[group] / (factor if group in groups else 1.0))
                 if group in apart else value for group, value in stats.items()}
        return plan_layer(layer, stats, *args, **kw)
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--calib", default=DEFAULT_CALIB)
    parser.add_argument("--calib-cache", required=True)
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--margin", action="append", type=margin_setting, required=True, metavar="F[:GROUP,...]")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    base = QuantizeOptions(w_bits=args.w_bits, a_bits=args.a_bits, calib_cache=Path(args.calib_cache), progress=False)
    tokenizer = load_tokenizer(model_dir)
    calib = token_windows(tokenizer, read_text(calibration_file(args.calib), "--calib"), base.seq_len, base.samples)
    tests = {text: token_windows(tokenizer, read_text(Path(text)), base.seq_len, args.max_windows)
             for text in args.text}
    model, _ = load_model(model_dir, dtype=torch.float32)
    arch = architecture_of(model)
    group_of = {name: group for group, names in arch.groups.items() for name in names}
    original = {(index, name): layer.get_submodule(name)
                for index, layer in enumerate(model.get_submodule(arch.layers)) for name in arch.linears}
    replace_linears(model, lambda index, name, linear: original[(index, name)])
    fp = {text: _score(model, windows, None) for text, windows in tests.items()}
    plan_layer = quantize_mod.plan_layer
    for factor, groups, apart in args.margin:
        start = time.time()
        options = dataclasses.replace(base, range_margin=factor, range_margin_groups=groups)
        planned, _ = load_model(model_dir)
        record = QuantizeRecord(weights={})
        quantize_mod.plan_layer = planned_apart(apart, factor, groups) if apart else plan_layer
        quantize_loaded(planned, calib, options, record)
        quantize_mod.plan_layer = plan_layer
        del planned
        emulated = {(index, name): StaticPlanLinear(linear, record.plans[index][group_of[name]],
                                                    record.weights[f"{index}.{name}"], options.a_bits,
                                                    record.row_divisors.get(f"{index}.{name}"))
                    for (index, name), linear in original.items()}
        replace_linears(model, lambda index, name, linear: emulated[(index, name)])
        for text, windows in tests.items():
            result, _ = _score(model, windows, fp[text][1])
            print(json.dumps({"margin": factor, "groups": ",".join(groups), "apart": apart, "text": text,
                              "windows": windows.shape[0], "fp": fp[text][0]["perplexity"],
                              "all": result["perplexity"], "kl": result["kl"],
                              "delta_pct": 100 * (result["perplexity"] / fp[text][0]["perplexity"] - 1),
                              "seconds": round(time.time() - start)}), flush=True)
        replace_linears(model, lambda index, name, linear: original[(index, name)])
        del emulated, record


if __name__ == "__main__":
    main()
