"""Time the int8 split-K kernel's long-K tiles (few weight rows by a K step of 512-2048, tune.splitk_candidates) per
shape and small-M bucket against the shipped dispatch (whichever kernel the table runs there), then write a copy
of the shipped table where a tile beat the dispatch by 3 % (GPU; the same outputs as bench/w4a8_refine.py):

    python bench/splitk_refine.py 6144x4096,4096x4096,28672x4096,4096x14336 OUT_DIR 16,32

Session 17's full search held no such tiles at M >= 16, while at M = 1 the long-K tiles are the GEMV's winners.
Session 21 ran this with 16-64 rows by 512-2048 (78 tiles at M = 16; timings in
bench/tune_state_h200_splitk_long_k_s21.jsonl.gz): they tied with the shipped tiles, so the tuner keeps the one
that won (32 x 512). The same loop with TMA operand loads (commit aa34a79, reverted; 64 tiles per bucket at M = 1,
16 and 32: bench/tune_state_h200_splitk_tma_s21.jsonl.gz) tied too. Buckets where CUTLASS may run (64 and up) need
vLLM on the machine, or the dispatch timed is not the shipped one."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vllm_outliertune.kernels import configs, tune
from w4a8_refine import refine

LONG_K = 512  # the K step from which a tile counts as new


def long_k_tiles(m: int) -> list[dict]:
    return [c for c in tune.splitk_candidates(m) if c["BLOCK_M"] >= 16 and c["BLOCK_K"] >= LONG_K]


def main(shapes: str, out: Path, buckets: list[int]) -> None:
    refine([("splitk_gemm", n, k, m, long_k_tiles(m))
            for n, k in (tuple(map(int, s.split("x"))) for s in shapes.split(",")) for m in buckets],
           out, configs.table_keys(torch.device("cuda"))[0])


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), [int(m) for m in sys.argv[3].split(",")])
