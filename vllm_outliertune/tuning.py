"""`outliertune tune MODEL_DIR [--tp 1,2,4,8] [--out FILE]`: tune the GEMM tiles of a model's own per-rank linear
shapes on this GPU (kernels/tune.py does the work) and write a table the plugin prefers over the shipped one."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_outliertune.offline.model_io import UserError


def add_parser(commands) -> None:
    from vllm_outliertune.kernels.tune import add_arguments

    tune = commands.add_parser(
        "tune", help="tune the GEMM tiles of a model's shapes on this GPU",
        description="Tune the Triton GEMM tiles (and pick CUTLASS where vLLM's CUDA build has it and it is faster) "
        "for MODEL_DIR's per-rank linear shapes at each --tp size, every M bucket, on this GPU. Only config.json "
        "is read (no weights needed). Resumable: timings are kept in OUT.state.jsonl.")
    tune.add_argument("model_dir", metavar="MODEL_DIR", nargs="?",
                      help="model directory with a config.json (or the config.json file); optional with --shapes")
    add_arguments(tune)
    tune.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from vllm_outliertune.kernels.shapes import ShapeError
    from vllm_outliertune.kernels.tune import options_from_args, run_tune

    try:
        options = options_from_args(args, args.model_dir and Path(args.model_dir), print)
    except ShapeError as error:
        raise UserError(str(error)) from None
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: tiles are tuned on, and the table is keyed by, the GPU that will run the "
                        "model; run `outliertune tune` on that machine")
    from vllm_outliertune import cutlass

    if not cutlass.register():
        print("tune: vLLM's CUTLASS GEMM is not available here; tuning the Triton kernels only")
    from vllm_outliertune.kernels.configs import USER_TABLE_ENV, user_table_path

    out = run_tune(options)
    print(f"wrote {out}: " + ("the plugin reads it from there" if out.resolve() == user_table_path().resolve() else
                              f"set {USER_TABLE_ENV}={out} for the plugin to read it"))
