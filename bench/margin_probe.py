"""Range-margin probe (issue 14): `outliertune diagnose --quick --keep-top 0` for several --range-margin settings
and texts, planning once per setting (the plan does not depend on the test text) and scoring the fp model once per
text. Prints one JSON line per (setting, text): fp and fully quantized perplexity and KL, as diagnose's "fp" and
"all" rows.

    python bench/margin_probe.py /tmp/qwen --calib-cache /tmp/accq/cache-qwen --text /tmp/js/test.txt \\
        --text /tmp/brown/test.txt --max-windows 4 --margin 1 --margin 1.5 --margin 1.5,down=2

A setting is what `outliertune quantize --range-margin` takes: F (every input group's calibrated ranges widened by
F), then GROUP=G,... for groups widened by G instead (qkv, o, gate_up, down; e.g. 1.5,down=2). Before session 11
the probe had its own syntax: 1.5:down is now 1,down=1.5 and 1.5/down=2 is 1.5,down=2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from vllm_outliertune.cli import range_margin
from vllm_outliertune.offline.architectures import architecture_of
from vllm_outliertune.offline.assets import DEFAULT_CALIB, calibration_file
from vllm_outliertune.offline.diagnose import _score
from vllm_outliertune.offline.fakequant import StaticPlanLinear, replace_linears
from vllm_outliertune.offline.model_io import load_model, load_tokenizer
from vllm_outliertune.offline.quantize import QuantizeOptions, QuantizeRecord, quantize_loaded
from vllm_outliertune.offline.text import read_text, token_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--calib", default=DEFAULT_CALIB)
    parser.add_argument("--calib-cache", required=True)
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--max-windows", type=int, default=2)
    parser.add_argument("--margin", action="append", type=range_margin, required=True, metavar="F[,GROUP=G,...]")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--token-guard", action=argparse.BooleanOptionalAction, default=False,
                        help="plan (search) and emulate with the per-token overflow guard (quantize --token-guard)")
    args = parser.parse_args()

    model_dir = Path(args.model_dir)
    base = QuantizeOptions(w_bits=args.w_bits, a_bits=args.a_bits, calib_cache=Path(args.calib_cache), progress=False,
                           token_guard=args.token_guard)
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
    for margin in args.margin:
        start = time.time()
        options = dataclasses.replace(base, range_margin=margin)
        planned, _ = load_model(model_dir)
        record = QuantizeRecord(weights={})
        quantize_loaded(planned, calib, options, record)
        del planned
        emulated = {(index, name): StaticPlanLinear(linear, record.plans[index][group_of[name]],
                                                    record.weights[f"{index}.{name}"], options.a_bits,
                                                    record.row_divisors.get(f"{index}.{name}"), options.guard)
                    for (index, name), linear in original.items()}
        replace_linears(model, lambda index, name, linear: emulated[(index, name)])
        for text, windows in tests.items():
            result, _ = _score(model, windows, fp[text][1])
            print(json.dumps({"margin": str(margin), "token_guard": options.guard, "text": text,
                              "windows": windows.shape[0], "fp": fp[text][0]["perplexity"],
                              "all": result["perplexity"], "kl": result["kl"],
                              "delta_pct": 100 * (result["perplexity"] / fp[text][0]["perplexity"] - 1),
                              "seconds": round(time.time() - start)}), flush=True)
        replace_linears(model, lambda index, name, linear: original[(index, name)])
        del emulated, record


if __name__ == "__main__":
    main()
