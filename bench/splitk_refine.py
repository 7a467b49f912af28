"""Time the int8 split-K kernel's tiles per shape and small-M bucket against the shipped dispatch (whichever kernel
the table runs there), then write a copy of the shipped table where a tile beat the dispatch by 3 % (GPU; the same
outputs as bench/w4a8_refine.py):

    python bench/splitk_refine.py 6144x4096,4096x4096,28672x4096,4096x14336 OUT_DIR 16,32 [--tiles full] [--stream]

--tiles long-k (default): the long-K tiles (few weight rows by a K step of 512-2048, tune.splitk_candidates).
Session 17's full search held no such tiles at M >= 16, while at M = 1 the long-K tiles are the GEMV's winners.
Session 21 ran this with 16-64 rows by 512-2048 (78 tiles at M = 16; timings in
bench/tune_state_h200_splitk_long_k_s21.jsonl.gz): they tied with the shipped tiles, so the tuner keeps the one
that won (32 x 512). The same loop with TMA operand loads (commit aa34a79, reverted; 64 tiles per bucket at M = 1,
16 and 32: bench/tune_state_h200_splitk_tma_s21.jsonl.gz) tied too. --tiles full: every split-K and tiled-GEMM
candidate of the tuner. --stream: time back to back over weight copies past the L2 (tune.stream_time_us), as
decode streams its layers, instead of the tuner's graph replay after an L2 flush. Buckets where CUTLASS may run (64
and up) need vLLM on the machine, or the dispatch timed is not the shipped one."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_outliertune.kernels import configs, tune
from vllm_outliertune.kernels.shapes import parse_shapes
from w4a8_refine import refine

LONG_K = 512  # the K step from which a tile counts as new


def long_k_tiles(m: int) -> list[dict]:
    return [c for c in tune.splitk_candidates(m) if c["BLOCK_M"] >= 16 and c["BLOCK_K"] >= LONG_K]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", help="comma-separated NxK weight shapes")
    parser.add_argument("out", type=Path, help="directory for the state, summary and refined table")
    parser.add_argument("buckets", help="comma-separated M buckets")
    parser.add_argument("--tiles", choices=("long-k", "full"), default="long-k")
    parser.add_argument("--stream", action="store_true", help="time back to back over weight copies past the L2")
    args = parser.parse_args()
    kernels = ("splitk_gemm", "int8_gemm") if args.tiles == "full" else ("splitk_gemm",)
    tiles = {"long-k": lambda kernel, m: long_k_tiles(m), "full": tune.full_candidates}[args.tiles]
    refine([(kernel, n, k, m, tiles(kernel, m))
            for n, k in parse_shapes(args.shapes)
            for m in (int(b) for b in args.buckets.split(",")) for kernel in kernels],
           args.out, configs.table_keys(torch.device("cuda"))[0], args.stream)


if __name__ == "__main__":
    main()
