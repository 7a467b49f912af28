"""Tune the GEMM tiles for this GPU and write them into a tile table (`outliertune tune` calls run_tune).

    python -m vllm_outliertune.kernels.tune --model MODEL_DIR --tp 1,2   # that model's per-rank shapes
    python -m vllm_outliertune.kernels.tune --shapes 6144x4096 --out /tmp/table.json
    python -m vllm_outliertune.kernels.tune --only splitk_gemm --buckets 1,4   # one kernel, some M buckets

For every shape (N x K) and M bucket it times the candidate tiles of the tiled int8_gemm, of the split-K small-M
kernel, (Hopper) of the persistent TMA GEMM and of every registered external GEMM (vLLM's CUTLASS
`cutlass_scaled_mm` when `outliertune tune` runs where vLLM's CUDA build is installed) and, with --w4a8, of the two
W4A8 kernels (packed 4-bit weights, group size 128), all on int8 activation codes (what the compiled plugin runs),
replayed from CUDA graphs (as vLLM runs decode): up to STREAM_TIMED_UP_TO_M rows back to back over copies of the
weight that together exceed the L2, as decode streams its layers (timing_method); larger M one launch per replay
with a cold L2 (triton's do_bench flushes it), median of repeats; a state timed the other way is re-timed. The
table then lists int8_gemm (w4a8_gemm for packed weights) at every bucket, the fallback, and every other kernel at
the buckets where it is the fastest of its weight format's kernels (linear.py runs the kernel listed at M's bucket).
A per-device "default" shape entry serves untuned shapes: the same choice made on each candidate's geometric-mean
time over the shapes tuned with the full search.

Every timing goes to a state file (JSON lines) as soon as it is measured: a second run with the same state skips
what is there, so an interrupted tune resumes. `--search quick` times only the tiles the table already lists for
this chip family at that bucket plus the best of the full searches in the state (minutes for a model); `full`
times every candidate (the default where the table has nothing for this GPU)."""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vllm_outliertune.format import group_count
from vllm_outliertune.kernels import configs, linear
from vllm_outliertune.kernels.configs import (DISPATCH_ORDER, EXTERNAL_KERNELS, KERNELS, W4A8_KERNELS, get_config,
                                              shape_key, table_keys)

LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down
GEMM_M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SPLITK_M_BUCKETS = (1, 4, 16, 32, 64)
TMA_M_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)
EXTERNAL_M_BUCKETS = (64, 128) + TMA_M_BUCKETS
KERNEL_BUCKETS = {"int8_gemm": (1, 4) + GEMM_M_BUCKETS, "splitk_gemm": SPLITK_M_BUCKETS, "int8_gemm_tma": TMA_M_BUCKETS,
                  **{name: EXTERNAL_M_BUCKETS for name in EXTERNAL_KERNELS},
                  # W4A8 split-K reads each 4-bit weight once for up to 128 rows, where the tiled kernel re-reads
                  # it per M tile and the unpack path writes and reads an int8 copy
                  "w4a8_splitk": SPLITK_M_BUCKETS + (128,), "w4a8_gemm": (1, 4) + GEMM_M_BUCKETS,
                  "w4a8_unpack": EXTERNAL_M_BUCKETS}
TRITON_KERNELS = KERNELS + W4A8_KERNELS
# Each kernel's fallback: the kernel of its weight format that the table lists at every bucket.
FALLBACK = {kernel: fallback for fallback, order in DISPATCH_ORDER.items() for kernel in (fallback, *order)}
W4A8_GROUP_SIZE = 128  # W4A8 tiles are tuned at `outliertune quantize`'s default group size
W4A8_TILE_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M", "num_warps", "num_stages", "FACTORED",
                  "ACC_K", "PREFETCH", "WORD_LEVELS", "SCALED_LEVELS", "GEMV", "COLUMNS", "K_WARPS", "WGMMA",
                  "LEVEL_BUFS", "SWAP_AB", "NATURAL_K"}
# Load-time choice on shapes no table tuned (generic_alternates): up to this M the best kernel depends on the shape
# most, and timing a few tiles there takes milliseconds.
ALTERNATES_UP_TO_M = 256
ALTERNATES_PER_BUCKET = 3
QUICK_TOP = 3  # quick search: the best few of the full searches in the state, besides the table's tiles


def _gemm(bm, bn, bk, warps, stages, group=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


def gemm_candidates(m: int) -> list[dict]:
    if m <= 128:
        return [_gemm(*c) for c in ((16, 32, 256, 4, 5), (16, 64, 256, 4, 4), (16, 64, 512, 4, 3),
                                    (16, 128, 256, 4, 4), (32, 64, 256, 4, 4), (32, 128, 256, 4, 4),
                                    (64, 64, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3),
                                    (64, 256, 128, 4, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4))
                if c[0] <= max(16, m)]
    return [_gemm(*c) for c in ((64, 128, 128, 4, 4), (64, 256, 128, 4, 3), (128, 128, 128, 4, 4),
                                (128, 128, 128, 8, 4), (128, 128, 64, 4, 5), (128, 256, 64, 8, 4),
                                (128, 256, 128, 8, 3), (256, 128, 64, 8, 4), (256, 128, 128, 8, 3))]


def tma_candidates(m: int) -> list[dict]:
    """Tiles whose operand stages fit in shared memory. (Triton 3.6's warp specialisation on Hopper passed the
    small interpreter-sized GPU test but hung the tuner at these tiles: not offered.)"""
    return [_gemm(*c) for c in ((128, 128, 128, 4, 4), (128, 128, 128, 8, 4), (128, 128, 128, 8, 5),
                                (128, 128, 256, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 3),
                                (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (256, 128, 128, 8, 4))]


def splitk_candidates(m: int) -> list[dict]:
    """Tensor-core tiles (BLOCK_M >= 16, also with the weights as the MMA's M side: SWAP_AB) and, for a few rows,
    CUDA-core tiles (BLOCK_M = M rounded up): plain multiply-reduce, with the K accumulator (ACC_K) and with packed
    dp4a words (PACKED)."""
    import triton

    candidates = []
    for bm in sorted({max(16, triton.next_power_of_2(m)), triton.next_power_of_2(m)}):
        if bm >= 16:
            tiles = [(bn, bk, {}) for bn, bk in ((64, 128), (64, 256), (128, 128), (128, 256)) if bn * bk <= 16384
                     or bm == 16]
            # Weights as the MMA's M side (SWAP_AB), also with deeper pipelines where they fit (H200, Llama-3-8B
            # shapes at TP 1 / 2, M = 16 / 32: 4 and 6 stages came within 3.5 % of a wider sweep of tiles, warps
            # and up to 12 stages, which picked 8 stages on four of the 16 points).
            tiles += [(bn, bk, {"SWAP_AB": 1, "num_warps": warps, "num_stages": stages})
                      for bn, bk, warps in ((64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8),
                                            (256, 128, 8))
                      for stages in (4, 6, 8) if (bn + bm) * bk * stages <= 160 * 1024]
            # 32 weight rows by a K step of 512 (warp-level MMA): the one-row GEMV's winners read each row in long
            # runs. H200, session 21 (bench/splitk_refine.py, 16 and 32 rows, 8 Llama-3-8B shapes at TP 1 / 2): 16
            # to 64 rows by 512 to 2048 came within -5 % / +10 % of the tiles above; this one won TP 2 qkv, and o and
            # down at 16 rows when timed as decode streams weights (stream_time_us).
            tiles += [(32, 512, {"SWAP_AB": swap, "num_warps": 4, "num_stages": stages})
                      for swap in (0, 1) for stages in (3, 4) if (32 + bm) * 512 * stages <= 160 * 1024]
        else:  # accumulators of BLOCK_M x BLOCK_K x BLOCK_N int32 (/4 when packed) must fit in registers
            tiles = [(bn, bk, {}) for bn, bk in ((32, 256), (64, 128), (64, 256), (128, 128))]
            tiles += [(bn, bk, {"ACC_K": 1}) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 128))
                      if bm * bn * bk <= 8192]
            tiles += [(bn, bk, {"PACKED": 1}) for bn, bk in ((16, 512), (32, 256), (32, 512), (64, 256), (64, 512),
                                                             (128, 256)) if bm * bn * bk <= 32768]
            # A few rows by (nearly) all of K per program: every load of a program in flight at once (at most
            # 128 accumulator words per thread).
            tiles += [(bn, bk, {"PACKED": 1, "num_warps": warps}) for bn, bk in (
                (2, 4096), (4, 4096), (8, 2048), (8, 4096), (16, 1024), (16, 2048), (16, 4096), (32, 1024))
                for warps in (4, 8, 16) if bm * bn * bk <= 128 * 128 * warps]
            # Persistent grids: a few programs per SM walk the tiles.
            tiles += [(bn, bk, {"PACKED": 1, "PROGRAMS_PER_SM": per_sm, "num_warps": warps})
                      for bn, bk, warps in ((16, 512, 4), (32, 512, 4), (8, 2048, 8), (8, 4096, 8))
                      for per_sm in (2, 4, 8) if bm * bn * bk <= 128 * 128 * warps]
        candidates += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                        "num_stages": 3 if bk * (bn + bm) > 48 * 1024 else 4, **variant}
                       for bn, bk, variant in tiles for split in (1, 2, 4, 8)
                       # split K at most 8 ways at BLOCK_K 256, 4 at 512, 2 from 1024 up; persistent grids not at all
                       if split == 1 or ("PROGRAMS_PER_SM" not in variant and split <= 2 * 1024 // min(bk, 1024))]
    return candidates


def w4a8_splitk_candidates(m: int) -> list[dict]:
    """Small-M W4A8 tiles: tensor-core tiles (BLOCK_M 16) and CUDA-core tiles (BLOCK_M = M rounded up) over a wider
    spread of N x K tiles, warps and K splits than the int8 split-K kernel's (its packed-word variants do not apply
    to 4-bit weights); for CUDA-core tiles also wide ones for the dp4a loop (FACTORED), whose [BLOCK_M, BLOCK_K / 8,
    BLOCK_N] products fit in registers where the per-weight tile's would not."""
    import triton

    def tile(bm: int, bn: int, bk: int, warps: int, split: int, **variant) -> dict:
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps,
                "num_stages": 3 if bk * (bn + bm) > 48 * 1024 else 4, **variant}

    candidates = []
    rows = triton.next_power_of_2(m)
    for bm in sorted({max(16, rows), rows} | ({rows // 2} if rows >= 64 else set())):  # M >= 64: also two M tiles
        for bn, bk in ((32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128), (128, 256), (256, 128)):
            if bm < 16 and bm * bn * bk > 64 * 256:  # the CUDA-core product tile must fit in registers
                continue
            candidates += [tile(bm, bn, bk, warps, split) for warps in ((4, 8) if bn >= 128 else (4,))
                           for split in (1, 2, 4, 8, 16)]
        if bm < 16:
            candidates += [tile(bm, bn, bk, warps, split, FACTORED=1) for bn, bk in ((256, 64), (256, 128), (512, 64))
                           if bm * bn * bk <= 64 * 512 * 8 for warps in (4, 8) for split in (2, 4, 8, 16)]
    return candidates


def w4a8_gemv_tiles() -> list[dict]:
    """One-row GEMV tiles of several whole groups (BLOCK_K 256-4096 at the default group size), for M = 1: a long K
    step puts more of a program's weight bytes in flight at once, as the int8 GEMV's long-K tiles do. Their group
    terms come a step ahead (PREFETCH), the variant whose sm90 loop needs no barrier; 4-32 words a thread, K split
    only below BLOCK_K 2048 (H200, session 12: BLOCK_K 512-1024 won gate_up and qkv at TP 1 and 2)."""
    return [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": 4,
             "FACTORED": 1, "GEMV": 1, "PREFETCH": 1}
            for bn in (8, 16, 32, 64, 128) for bk in (256, 512, 1024, 2048, 4096) for warps in (4, 8)
            for split in (1, 2, 4, 8) if 4 <= bk // 8 * bn // (32 * warps) <= 32 and (split == 1 or bk <= 1024)]


def w4a8_column_tiles() -> list[dict]:
    """One-row tiles of the column GEMV (kernels/w4a8_gemv.py): BLOCK_N columns by K_WARPS chunks of K per program
    (1-4 warps: their product over 128), one or two groups a step, K split 1-16 ways. H200, M = 1, Llama-3-8B and
    Qwen2.5-7B shapes: 64 columns by 2 chunks, one group a step, won 7 of 8 (session 27)."""
    return [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "K_WARPS": chunks, "SPLIT_K": split, "num_stages": 2,
             "COLUMNS": 1}
            for bn, chunks in ((32, 4), (32, 8), (64, 2), (64, 4), (64, 8), (128, 1), (128, 2), (128, 4), (256, 1),
                               (256, 2))
            for bk in (128, 256) if bk == 128 or bn * chunks <= 256 for split in (1, 2, 4, 8, 16)]


# SWAP_AB tiles of kernels/w4a8_wgmma.py as (BLOCK_N, warps), each with the activations gathered and in channel
# order (NATURAL_K)
SWAP_TILES = ((64, 4), (128, 4), (128, 8))


def w4a8_wgmma_tiles(m: int, splits: tuple[int, ...]) -> list[dict]:
    """Tiles of kernels/w4a8_wgmma.py (Hopper; elsewhere they run kernels/w4a8_gemm.py's loop), K split ``splits``
    ways. Weights widened into shared memory: 64 rows per warpgroup (128-row tiles from M = 128), BLOCK_N 32-128,
    three stages with one level buffer or four with two (H200, session 31: each pair won somewhere). SWAP_AB: the
    weights from registers, 64 or 128 of their rows against up to 128 tokens, the activations gathered into the
    wgmma's channel order or copied in theirs (NATURAL_K: fewer registers, shuffled weight words)."""
    tiles = [(64, bn, stages, bufs) for bn in (32, 64, 128) for stages, bufs in ((3, 1), (4, 2))]
    if m >= 128:
        tiles += [(128, bn, 4, 2) for bn in (64, 128)]
    return [levels_tile(*tile, split) for tile in tiles for split in splits] + [
        swap_tile(bm, bn, warps, split, natural) for bm in {min(m, 128), min(m, 64)} for bn, warps in SWAP_TILES
        for natural in (False, True) for split in splits]


def levels_tile(block_m: int, block_n: int, stages: int, level_bufs: int, split: int) -> dict:
    """A tile of kernels/w4a8_wgmma.py that widens the weights into shared memory: 16 rows per warp."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": block_m // 16,
            "num_stages": stages, "LEVEL_BUFS": level_bufs, "WGMMA": 1}


def swap_tile(block_m: int, block_n: int, warps: int, split: int, natural: bool = False) -> dict:
    """A SWAP_AB tile of kernels/w4a8_wgmma.py: four stages up to 64 tokens, three above (registers, shared memory);
    natural: the activations copied in channel order (NATURAL_K)."""
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": split, "num_warps": warps,
            "num_stages": 4 if block_m <= 64 else 3, "SWAP_AB": 1, "WGMMA": 1} | ({"NATURAL_K": 1} if natural else {})


def w4a8_loop_variants(tiles: list[dict]) -> list[dict]:
    """`tiles` (duplicates dropped) plus their FACTORED loops' variants: tensor-core word tiles (kernels/w4a8_gemm.py)
    also with the zero points in the weight operand, the group terms loaded a step ahead, and both (which wins
    depends on the tile; H200: PREFETCH loses at BLOCK_M 128); dp4a tiles also with their loads a step ahead, and
    one-row ones also as the GEMV loop (kernels/w4a8_gemm.py _gemv_step), with and without."""
    variants = []
    for config in tiles:  # from the plain loop of each, so that a tile listed with a variant is also tried without
        plain = {key: value for key, value in config.items()
                 if key not in ("PREFETCH", "WORD_LEVELS", "SCALED_LEVELS", "GEMV")}
        if config.get("FACTORED") and config["BLOCK_M"] >= 16 and config["BLOCK_K"] >= 64:
            variants += [dict(plain, **variant, **levels) for variant in ({}, {"PREFETCH": 1})
                         for levels in ({}, {"WORD_LEVELS": 1}, {"SCALED_LEVELS": 1})]
        elif config.get("FACTORED") and config["BLOCK_M"] < 16:
            variants += [plain, dict(plain, PREFETCH=1)]
            if config["BLOCK_M"] == 1:  # (ACC_K does not apply to it)
                row = {key: value for key, value in plain.items() if key != "ACC_K"}
                variants += [dict(row, GEMV=1), dict(row, GEMV=1, PREFETCH=1)]
    unique = {tuple(sorted(config.items())): config for config in tiles + variants}
    return list(unique.values())


def full_candidates(kernel: str, m: int) -> list[dict]:
    if kernel in EXTERNAL_KERNELS:
        return [{}]  # a library GEMM picks its own tiles
    if kernel == "w4a8_unpack":  # the widening pass's tiles (the int8 GEMM after it runs the int8 table's tiles)
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps} for bn, bk, warps in (
            (32, 128, 4), (64, 128, 4), (64, 256, 4), (128, 128, 8), (128, 256, 8))]
    if kernel in W4A8_KERNELS:
        tiles = w4a8_splitk_candidates(m) if kernel == "w4a8_splitk" else gemm_candidates(m)
        # and each tile inside one group again with the FACTORED loops (dp4a on words below BLOCK_M 16, group terms
        # per output), CUDA-core ones also with ACC_K where its [BLOCK_M, BLOCK_K / 8, BLOCK_N] accumulator fits
        # (64 words a thread)
        factored = [dict(config, FACTORED=1) for config in tiles if W4A8_GROUP_SIZE % config["BLOCK_K"] == 0]
        acc_k = [dict(config, ACC_K=1) for config in factored if config["BLOCK_M"] < 16 and
                 config["BLOCK_M"] * config["BLOCK_K"] // 8 * config["BLOCK_N"] <= 64 * 32 * config["num_warps"]]
        gemv = w4a8_gemv_tiles() + w4a8_column_tiles() if kernel == "w4a8_splitk" and m == 1 else []
        wgmma = w4a8_wgmma_tiles(m, (1, 2, 4, 8) if kernel == "w4a8_splitk" else (1,)) if m >= 16 else []
        return w4a8_loop_variants(tiles + factored + acc_k) + gemv + wgmma
    return {"int8_gemm": gemm_candidates, "splitk_gemm": splitk_candidates, "int8_gemm_tma": tma_candidates}[kernel](m)


def time_us(fn, rep_ms: float = 25.0) -> float:
    """Median time of fn() in µs with a cold L2 (do_bench flushes it before each call)."""
    import triton

    return triton.testing.do_bench(fn, warmup=max(1.0, rep_ms / 5), rep=rep_ms, return_mode="median") * 1e3


def graph_time_us(fn, rep_ms: float = 25.0) -> float:
    """time_us of fn captured in a CUDA graph, as vLLM runs decode. Plain launches disagree with graph replays by up
    to ~10 % on 12-24 µs GEMMs (H200: the tuner put our tiled GEMM 1-4 % ahead of CUTLASS where replays put it 5-12 %
    behind), so kernels are compared the way they run. The first call (compiles, one-time casts) runs outside."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, rep_ms)


STREAM_REPS = 20  # replays of a stream of weight copies per timing (stream_time_us)


def stream_time_us(launches: list[Callable[[], object]], reps: int = STREAM_REPS) -> float:
    """Mean µs per launch of ``launches`` (one per weight copy, together well past the L2: weight_copies) captured in
    one CUDA graph and replayed: GEMMs back to back on weights that come from memory each time, as a decode step
    streams its layers. graph_time_us replays one launch after do_bench's L2 flush instead: on the H200 that read
    4-6 µs longer per small GEMM (session 21; the flush's dirty lines, written back during the kernel, are a likely
    cause) and ranked some tiles at 16 rows differently."""
    launches[0]()  # compiles and one-time casts outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(launches))


# M buckets up to this many rows are timed as decode runs them, weights streamed from memory layer after layer
# (stream_time_us); larger ones as one CUDA-graph replay after an L2 flush (graph_time_us), where the work per
# weight byte makes the L2's state matter less. H200, session 21: at 16 rows the two timings ranked tiles
# differently, and the tiles stream timing chose took 4.3 % less per Llama-3-8B layer.
STREAM_TIMED_UP_TO_M = 64


def timing_method(m: int) -> str:
    """How the tuner times candidates of an M bucket: "stream" (stream_time_us) or "graph" (graph_time_us)."""
    return "stream" if m <= STREAM_TIMED_UP_TO_M else "graph"


def record_timing(record: dict) -> str:
    return record.get("timing", "graph")


def candidate_time_us(runs: list[Callable[[dict], torch.Tensor]], config: dict, timing: str, rep_ms: float) -> float:
    """µs of one tile: with "stream", back to back over the runners of weight copies (weight_copies); with "graph",
    the first runner's graph replay after an L2 flush."""
    if timing == "stream":
        return stream_time_us([functools.partial(run, config) for run in runs])
    return graph_time_us(lambda: runs[0](config), rep_ms)


STREAM_BYTES = 1.2e9  # weight bytes a stream timing reads per replay, all copies together: well past the L2


def weight_copies(args: tuple, total_bytes: float = STREAM_BYTES, most: int = 64) -> list[tuple]:
    """``args`` (gemm_args of an int8 or a W4A8 kernel) and copies of it with other random weights (int8 levels, or
    packed words of 4-bit codes whose group scales and zeros stay those of ``args``): together past the L2."""
    weight = args[1]
    count = min(most, max(8, math.ceil(total_bytes / (weight.numel() * weight.element_size()))))
    low, high = (-127, 128) if weight.dtype == torch.int8 else (-(1 << 31), (1 << 31) - 1)
    return [args] + [(args[0], torch.randint_like(weight, low, high), *args[2:]) for _ in range(count - 1)]


def make_inputs(m: int, n: int, k: int, device: str = "cuda") -> dict:
    """Random (never zero) operands of one linear: bf16 activations, int8 weights, float32 per-channel vectors (also
    where the default dtype is another, as while vLLM loads a model)."""
    vector = dict(device=device, dtype=torch.float32)
    return dict(x=torch.randn(m, k, device=device, dtype=torch.bfloat16) * 3,
                inv_scale=torch.rand(k, **vector) + 0.5, shift=torch.randint(-3, 4, (k,), **vector),
                w_q=torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8),
                w_scale=torch.rand(n, **vector) * 0.01, bias=torch.randn(n, **vector))


def packed_weight(n: int, k: int, group_size: int, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """Random packed 4-bit weight in the plugin's GPU layout (int32 words of 8 channels, N-major), with group
    scales and zeros whose int8 levels stay in range."""
    groups = group_count(k, group_size)
    packed = torch.randint(0, 256, (n, (k + 1) // 2), device=device, dtype=torch.uint8)
    return (linear.w4a8_gpu_words(packed, k), *(linear.w4a8_gpu_layout(t) for t in (
        torch.randint(1, 9, (n, groups), device=device, dtype=torch.uint8),
        torch.randint(0, 16, (n, groups), device=device, dtype=torch.uint8))))


def gemm_args(m: int, n: int, k: int, kernel: str = "int8_gemm") -> tuple:
    """Operands of one random linear on the GPU for `kernel`: (int8 codes, int8 weights, scale, bias), for the W4A8
    kernels (int8 codes, packed weight, group scales, group zeros, group size, scale, bias)."""
    from vllm_outliertune.kernels.act_quant import quantize_activation

    p = make_inputs(m, n, k)
    codes = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
    if kernel in W4A8_KERNELS:
        return codes, *packed_weight(n, k, W4A8_GROUP_SIZE), W4A8_GROUP_SIZE, p["w_scale"], p["bias"]
    return codes, p["w_q"], p["w_scale"], p["bias"]


def runner(kernel: str, args: tuple) -> Callable[[dict], torch.Tensor]:
    """config -> one launch of `kernel` on args (gemm_args for that kernel), bf16 out."""
    from vllm_outliertune.kernels.int8_gemm import int8_gemm
    from vllm_outliertune.kernels.int8_gemm_tma import int8_gemm_tma
    from vllm_outliertune.kernels.splitk_gemm import splitk_gemm
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm
    from vllm_outliertune.kernels.w4a8_unpack import unpack_levels

    if kernel == "w4a8_unpack":  # widen with tile c, then the int8 GEMM the table picks for these rows
        w_packed, group_scale, group_zero, group_size = args[1:5]
        return lambda c: linear.int8_gemm(args[0], unpack_levels(w_packed, group_scale, group_zero, group_size,
                                                                  args[0].shape[1], c), *args[5:], torch.bfloat16)
    if kernel in W4A8_KERNELS:
        return lambda c: w4a8_gemm(*args, torch.bfloat16, kernel, c)
    if kernel == "int8_gemm":
        return lambda c: int8_gemm(*args, torch.bfloat16, c)
    if kernel == "splitk_gemm":
        return lambda c: splitk_gemm(*args, None, None, 8, torch.bfloat16, c)
    if kernel == "int8_gemm_tma":
        return lambda c: int8_gemm_tma(*args, torch.bfloat16, c)
    backend = linear.external_gemms()[kernel]
    return lambda c: backend.run(*args, torch.bfloat16)


def kernel_applies(kernel: str, args: tuple) -> bool:
    """Whether `kernel` can run these operands on this GPU (TMA: Hopper and aligned rows; externals: registered
    and supported)."""
    from vllm_outliertune.kernels.int8_gemm_tma import supports_tma

    if kernel == "int8_gemm_tma":
        return supports_tma(args[0], args[1])
    if kernel in EXTERNAL_KERNELS:
        backend = linear.external_gemms().get(kernel)
        return backend is not None and backend.supports(args[0], args[1], torch.bfloat16)
    return True


# ---- state: every timing, one JSON line each -------------------------------------------------------------------

@dataclass
class TuneState:
    """Timings per (device, kernel, N, K, M): {key: {"search": "full" | "quick" | "table", "timing": "stream" |
    "graph" (timing_method; absent in states written before it: "graph"), "timings": [[µs, config]]}}."""
    path: Path | None
    records: dict[tuple, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> "TuneState":
        state = cls(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    state.records[(r["device"], r["kernel"], r["n"], r["k"], r["m"])] = r
        return state

    def has(self, key: tuple, search: str, timing: str = "graph") -> bool:
        """Whether the state holds timings of ``key`` from this search (or a wider one) and timing method."""
        record = self.records.get(key)
        return (record is not None and record_timing(record) == timing
                and (record["search"] in (search, "full") or search == "table"))

    def add(self, key: tuple, search: str, timings: list[tuple[float, dict]], failed: list[dict] = (),
            timing: str = "graph") -> None:
        device, kernel, n, k, m = key
        record = {"device": device, "kernel": kernel, "n": n, "k": k, "m": m, "search": search, "timing": timing,
                  "timings": [[round(t, 3), c] for t, c in sorted(timings, key=lambda t: t[0])]}
        if failed:  # tiles that could not run here (e.g. out of shared memory): not retried on resume
            record["failed"] = list(failed)
        self.records[key] = record
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def results(self, device: str, n: int, k: int) -> dict[str, dict[int, list[tuple[float, dict]]]]:
        """{kernel: {M: [(µs, config)]}} of one shape on `device` (kernels / buckets not timed are absent)."""
        out: dict[str, dict] = {}
        for (dev, kernel, rn, rk, m), record in sorted(self.records.items(), key=lambda item: item[0][4]):
            if (dev, rn, rk) == (device, n, k) and record["timings"]:
                out.setdefault(kernel, {})[m] = [(t, c) for t, c in record["timings"]]
        return out

    def shapes(self, device: str, search: str | None = None) -> list[tuple[int, int]]:
        found = {(n, k) for (dev, _, n, k, _), r in self.records.items()
                 if dev == device and (search is None or r["search"] == search)}
        return sorted(found)


# ---- choosing winners -----------------------------------------------------------------------------------------

def _best(timings: list[tuple[float, dict]]) -> tuple[float, dict]:
    return min(timings, key=lambda t: t[0])


def table_entries(results: dict) -> dict[str, dict[str, dict]]:
    """Best configs of one shape, per weight format: its fallback kernel (int8_gemm, w4a8_gemm) at every bucket it was
    timed (where a bucket's winner cannot run), every other kernel of the format at the buckets where it is the
    fastest of the format's kernels timed there (the dispatch runs the kernel that lists M's bucket), and where that
    is another library's GEMM, also the Triton kernel that runs the bucket without it (triton_runner_up). A kernel
    timed but never listed gets an empty entry; one not timed, none."""
    entries: dict[str, dict[str, dict]] = {}
    for fallback, order in DISPATCH_ORDER.items():
        timed = {kernel: per_m for kernel, per_m in results.items() if kernel in order}
        if fallback not in results and not timed:
            continue
        entries[fallback] = {str(m): _best(t)[1] for m, t in results.get(fallback, {}).items()}
        entries |= {kernel: {} for kernel in timed}
        timed[fallback] = results.get(fallback, {})
        for m in sorted({m for per_m in timed.values() for m in per_m}):
            best = {kernel: _best(per_m[m]) for kernel, per_m in timed.items() if per_m.get(m)}
            winner = min(best, key=lambda kernel: best[kernel][0])
            if winner != fallback:
                entries[winner][str(m)] = best[winner][1]
            runner_up = triton_runner_up(best, winner, fallback)
            if runner_up:
                entries[runner_up][str(m)] = best[runner_up][1]
    return entries


def triton_runner_up(best: dict[str, tuple[float, dict]], winner: str, fallback: str) -> str | None:
    """Where another library's GEMM (``winner``) wins a bucket: the fastest of the Triton kernels that the dispatch
    tries after it (DISPATCH_ORDER), if it beats the fallback; they run where that library is missing (a vLLM
    built without it). ``best``: {kernel: (µs, config)} at the bucket. (H200, large M: the TMA GEMM where CUTLASS
    wins, mostly; docs/benchmarks.md, session 26.)"""
    if winner not in EXTERNAL_KERNELS:
        return None
    order = DISPATCH_ORDER[fallback]
    later = [kernel for kernel in order[order.index(winner) + 1:] if kernel in best and kernel not in EXTERNAL_KERNELS]
    if not later:
        return None
    runner_up = min(later, key=lambda kernel: best[kernel][0])
    return runner_up if fallback not in best or best[runner_up][0] < best[fallback][0] else None


def ranked_config(spread: list[dict], kernel: str, m: int, rank: int = 0) -> dict | None:
    """The config with the rank-th best geometric-mean time at bucket m over the shapes' results in `spread`
    (only configs timed on every one of them)."""
    ordered = sorted(spread_results(spread).get(kernel, {}).get(m, []), key=lambda t: t[0])
    return ordered[rank][1] if rank < len(ordered) else None


def spread_results(spread: list[dict]) -> dict[str, dict[int, list[tuple[float, dict]]]]:
    """The results of several shapes as one: per kernel and bucket, each config timed on every shape with its
    geometric-mean time over them."""
    combined: dict[str, dict] = {}
    for kernel in sorted({kernel for r in spread for kernel in r}):
        for m in sorted({m for r in spread for m in r.get(kernel, {})}):
            log_sums: dict[str, list] = {}
            for r in spread:
                for t, config in r.get(kernel, {}).get(m, []):
                    entry = log_sums.setdefault(json.dumps(config, sort_keys=True), [0.0, 0])
                    entry[0] += math.log(t)
                    entry[1] += 1
            timings = [(math.exp(total / count), json.loads(key)) for key, (total, count) in log_sums.items()
                       if count == len(spread)]
            if timings:
                combined.setdefault(kernel, {})[m] = timings
    return combined


def generic_alternates(spread: list[dict], count: int = ALTERNATES_PER_BUCKET,
                       fallback: str = "int8_gemm") -> dict[str, list]:
    """{bucket: [[kernel, config], ...]}: per small-M bucket, `count` (kernel, tile) choices of one weight format
    (named by its fallback kernel: int8_gemm, w4a8_gemm) timed on every shape of the spread, picked greedily so that
    the best of them comes as close as possible to each shape's own best (the first is the geometric-mean winner).
    On a shape no table tuned, the plugin times these at load and runs the fastest (kernels/load_pick.py): the best
    small-M kernel depends on the shape, and one generic choice missed the shape's own time by up to 2.2x (int8)
    and 1.6x (W4A8)."""
    order = DISPATCH_ORDER[fallback]
    alternates: dict[str, list] = {}
    for m in sorted({m for r in spread for m in r.get(fallback, {}) if m <= ALTERNATES_UP_TO_M}):
        per_shape = [{(kernel, json.dumps(c, sort_keys=True)): t for kernel in (fallback, *order)
                      for t, c in r.get(kernel, {}).get(m, [])} for r in spread]
        common = sorted(set.intersection(*(set(times) for times in per_shape)))
        best = [min(times.values()) for times in per_shape]
        chosen: list[tuple[str, str]] = []

        def slowdown(extra: tuple[str, str]) -> float:  # sum over shapes of log(best of chosen + extra / own best)
            return sum(math.log(min(times[c] for c in (*chosen, extra)) / own)
                       for times, own in zip(per_shape, best))

        for _ in range(min(count, len(common))):
            chosen.append(min((c for c in common if c not in chosen), key=slowdown))
        if chosen:
            alternates[str(m)] = [[kernel, json.loads(config)] for kernel, config in chosen]
    return alternates


def device_alternates(state: TuneState, device: str) -> dict[str, list]:
    """generic_alternates of both weight formats over the shapes of `device` searched in full, in one list per
    bucket (the plugin times those of the layer's format)."""
    spread = [state.results(device, n, k) for n, k in state.shapes(device, "full")]
    alternates: dict[str, list] = {}
    for fallback in DISPATCH_ORDER:
        timed = [r for r in spread if fallback in r]
        for bucket, options in (generic_alternates(timed, fallback=fallback) if timed else {}).items():
            alternates.setdefault(bucket, []).extend(options)
    return configs.by_bucket(alternates)


def device_entries(state: TuneState, device: str) -> dict[str, dict[str, dict]]:
    """{kernel: {shape key: {bucket: config}}} for every shape of `device` in the state, plus the "default" shape
    entry: the same choice (table_entries) made on the geometric-mean times over the shapes searched in full."""
    per_kernel: dict[str, dict] = {}
    for n, k in state.shapes(device):
        for kernel, per_m in table_entries(state.results(device, n, k)).items():
            per_kernel.setdefault(kernel, {})[shape_key(n, k)] = per_m
    spread = [state.results(device, n, k) for n, k in state.shapes(device, "full")]
    if spread:
        for kernel, per_m in table_entries(spread_results(spread)).items():
            per_kernel.setdefault(kernel, {})["default"] = per_m
    return per_kernel


def _table_device(path: Path, device_key: str) -> dict[str, dict]:
    """The entries of one device in the table at `path` ({} where the file or the device is absent)."""
    return json.loads(path.read_text())["devices"].get(device_key, {}) if path.exists() else {}


def keep_untuned_buckets(path: Path, device_key: str, kernel: str, entries: dict[str, dict],
                         tuned: list[int], tuned_shapes: set[str]) -> dict[str, dict]:
    """This device's existing entries of `kernel` in the table at `path`, with the tuned buckets of the shapes this
    run tuned (`tuned_shapes`, and any shape `entries` holds) replaced by `entries` (a tuned bucket the kernel lost
    is dropped); the table's other shapes keep every bucket."""
    old = _table_device(path, device_key).get(kernel, {})
    merged = {}
    for shape in old.keys() | entries.keys():
        retuned = shape in tuned_shapes or shape in entries
        per_m = {m: c for m, c in old.get(shape, {}).items() if not (retuned and int(m) in tuned)}
        merged[shape] = configs.by_bucket(per_m | entries.get(shape, {}))
    return merged


def keep_untimed_owners(path: Path, device_key: str, per_kernel: dict[str, dict[str, dict]],
                        timed: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """per_kernel (entries about to be written) with each bucket that an external GEMM this run did not time (not
    registered here: `python -m vllm_outliertune.kernels.tune`, or a GPU without vLLM's CUTLASS build) lists in the
    table at `path` left as the table has it for every kernel of the shape: the dispatch prefers split-K to an
    external GEMM at a shared bucket, so a Triton tile written there would shadow a kernel this run never raced."""
    old = _table_device(path, device_key)
    written = set().union(*(entries.keys() for entries in per_kernel.values()))
    for external in set(EXTERNAL_KERNELS) - set(timed):
        for shape, owned in old.get(external, {}).items():
            if shape not in written:
                continue
            for kernel, entries in per_kernel.items():
                kept = {m: c for m, c in old.get(kernel, {}).get(shape, {}).items() if m in owned}
                per_m = {m: c for m, c in entries.get(shape, {}).items() if m not in owned} | kept
                if per_m or shape in entries:
                    entries[shape] = configs.by_bucket(per_m)
    return per_kernel


def complete_entries(per_kernel: dict[str, dict[str, dict]], keys: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """per_kernel ({kernel: {shape: {bucket: config}}}, entries of device keys[0] about to be written) with every
    shape's entry of a weight format that --only or --buckets left partial (not listing every bucket the tuner
    times for the format) completed from what the shape runs without this device's entries (another GPU of the
    family, else the shape-generic tiles): the dispatch uses no kernel that a shape's entry does not list, so a
    shape tuned for split-K alone would run split-K tiles at every M, prefill included."""
    devices = configs.effective_table()["devices"]
    for fallback, order in DISPATCH_ORDER.items():
        format_kernels = (fallback, *order)
        timed_buckets = {m for kernel in format_kernels for m in KERNEL_BUCKETS[kernel]}
        for shape in {shape for kernel in format_kernels for shape in per_kernel.get(kernel, {})}:
            listed = {int(b) for kernel in format_kernels for b in per_kernel.get(kernel, {}).get(shape, {})}
            if listed >= timed_buckets:
                continue
            for kernel in format_kernels:
                entry = configs.find_entry(kernel, keys, *configs.shape_of(shape), skip=keys[0])
                base = devices[entry[0]][kernel][entry[1]] if entry else {}
                missing = {b: c for b, c in base.items() if int(b) not in listed}
                if missing:
                    per_m = per_kernel.setdefault(kernel, {}).get(shape, {}) | missing
                    per_kernel[kernel][shape] = configs.by_bucket(per_m)
    return per_kernel


def write_table(path: Path, device_key: str, per_kernel: dict, family: str | None = None,
                alternates: dict[str, list] | None = None) -> None:
    """Replace this device's entries for the (kernel, shape) pairs in per_kernel (and its small-M alternates, if
    given); other shapes, kernels and devices are kept. Written to a temporary file, then renamed."""
    table = json.loads(path.read_text()) if path.exists() else {"version": 1, "devices": {}}
    device = table["devices"].setdefault(device_key, {})
    for kernel, per_shape in per_kernel.items():
        device.setdefault(kernel, {}).update(per_shape)
    if family:
        table.setdefault("families", {})[device_key] = family
    if alternates:
        table.setdefault("alternates", {})[device_key] = alternates
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ---- candidates and timing ------------------------------------------------------------------------------------

def quick_candidates(kernel: str, m: int, n: int, k: int, keys: tuple[str, ...], state: TuneState,
                     device: str) -> list[dict]:
    """The tiles the table lists for this chip family at bucket m (any shape), this shape's current tile, and the
    best few of the full searches in the state; the full list where that leaves nothing to choose from."""
    if kernel in EXTERNAL_KERNELS:
        return [{}]
    seen: dict[str, dict] = {}
    devices = configs.effective_table()["devices"]
    for key in configs.lookup_order(keys)[:-1]:  # not the portable "default" tiles
        for per_m in devices.get(key, {}).get(kernel, {}).values():
            if str(m) in per_m:
                seen.setdefault(json.dumps(per_m[str(m)], sort_keys=True), per_m[str(m)])
    spread = [state.results(device, sn, sk) for sn, sk in state.shapes(device, "full")]
    for rank in range(QUICK_TOP if spread else 0):  # the best few by geometric mean over the full searches
        config = ranked_config(spread, kernel, m, rank)
        if config is not None:
            seen.setdefault(json.dumps(config, sort_keys=True), config)
    if len(seen) < 2:
        return full_candidates(kernel, m)
    # the loop variants cost a compile each and win or lose by tile, so the quick search tries them on its tiles
    return w4a8_loop_variants(list(seen.values())) if kernel in W4A8_KERNELS else list(seen.values())


_WORKER_ARGS: dict[tuple, tuple] = {}


def _compile_job(job: tuple) -> str | None:
    """Pool worker: run one (kernel, m, n, k, config) once so Triton compiles it into its on-disk cache."""
    kernel, m, n, k, config = job
    try:
        key = (m, n, k, FALLBACK[kernel])
        if key not in _WORKER_ARGS:
            _WORKER_ARGS.clear()
            _WORKER_ARGS[key] = gemm_args(m, n, k, kernel)
        runner(kernel, _WORKER_ARGS[key])(config)
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - reported by the timing pass, which skips the tile
        return f"{type(error).__name__}: {error}"[:200]
    return None


def precompile(pool: concurrent.futures.Executor | None, jobs: list[tuple], workers: int, log) -> bool:
    """Compile the Triton tiles of `jobs` in the pool's processes (one compile takes ~1 s of CPU; the timing loop
    would run them one after the other). External kernels need no compile. False when the pool broke (a worker
    died): the timing loop then compiles what is left itself."""
    jobs = sorted((j for j in jobs if j[0] in TRITON_KERNELS), key=lambda j: (j[1], j[0]))
    if pool is None or len(jobs) < 2:
        return True
    try:
        list(pool.map(_compile_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    except concurrent.futures.process.BrokenProcessPool as error:
        log(f"tune: parallel compile stopped ({error}); compiling in the timing loop instead")
        return False
    return True


def warm_gpu(seconds: float = 0.3) -> None:
    """Keep the GPU busy for a moment before timing: while the tiles compile it idles and lowers its clocks, and the
    first timings after that came out up to 4x slow on the H200 (small-M buckets of the first shapes after a long
    compile), which made the tuner pick the wrong kernel there."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ a
        torch.cuda.synchronize()


@dataclass
class TuneOptions:
    shapes: list[tuple[int, int]]
    kernels: tuple[str, ...] = KERNELS + EXTERNAL_KERNELS
    buckets: list[int] | None = None  # None: every bucket of each kernel
    search: str = "auto"  # full | quick | auto (quick where the table has tiles of this chip family, else full)
    out: Path = field(default_factory=configs.user_table_path)
    state: Path | None = None  # default: OUT with ".state.jsonl" appended
    rep_ms: float = 25.0
    workers: int = field(default_factory=lambda: min(16, os.cpu_count() or 1))


def _tasks(options: TuneOptions) -> list[tuple[int, int, int, str]]:
    tasks = []
    fallbacks = {FALLBACK[kernel] for kernel in options.kernels}
    for n, k in options.shapes:
        for m in sorted(set().union(*(KERNEL_BUCKETS[kernel] for kernel in options.kernels))):
            if options.buckets is not None and m not in options.buckets:
                continue
            for kernel in KERNELS + EXTERNAL_KERNELS + W4A8_KERNELS:  # a tuned kernel is timed against its fallback
                if m in KERNEL_BUCKETS[kernel] and (kernel in options.kernels or kernel in fallbacks):
                    tasks.append((n, k, m, kernel))
    return tasks


def run_tune(options: TuneOptions, log: Callable[[str], None] = print) -> Path:
    """Time every (shape, M bucket, kernel) of `options` not yet in the state file and write the table."""
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU: tiles are tuned on, and the table is keyed by, the GPU it runs on")
    from tqdm import tqdm

    device_key, family, _ = table_keys(torch.device("cuda"))
    keys = (device_key, family, "default")
    state = TuneState.load(options.state or options.out.with_name(options.out.name + ".state.jsonl"))
    search = options.search
    if search == "auto":  # quick where the table holds tiles of this GPU or its chip family
        known = set(configs.lookup_order(keys)) & set(configs.effective_table()["devices"]) - {"default"}
        search = "quick" if known else "full"
    registered = linear.external_gemms()
    options.kernels = tuple(kernel for kernel in options.kernels if kernel in TRITON_KERNELS or kernel in registered)
    tasks = _tasks(options)
    log(f"tune: {len(options.shapes)} shapes, {len(tasks)} (shape, M, kernel) timings on {device_key!r} "
        f"({search} search; {', '.join(options.kernels)}; state {state.path}; table {options.out})")
    started = time.time()
    bar = tqdm(total=len(tasks), unit="timing", mininterval=5, file=sys.stderr)
    pool = (concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("spawn"))
            if options.workers > 1 else None)
    try:
        for n, k in options.shapes:
            _tune_shape(n, k, [t for t in tasks if t[:2] == (n, k)], options, search, keys, state,
                        pool if options.workers > 1 else None, bar)
            _write(options, state, device_key, family)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    log(f"tune: wrote {options.out} for {device_key!r} in {time.time() - started:.0f} s")
    return options.out


def _tune_shape(n: int, k: int, shape_tasks: list[tuple], options: TuneOptions, search: str, keys: tuple[str, ...],
                state: TuneState, pool, bar) -> None:
    """Time the tasks of one shape that the state does not hold yet (compiling their tiles in the pool first)."""
    device_key = keys[0]
    plans = []
    for _, _, m, kernel in shape_tasks:
        key = (device_key, kernel, n, k, m)
        task_search = search if kernel in options.kernels else "table"
        record = state.records.get(key)
        if (task_search == "full" and record is not None and record["search"] == "full"
                and record_timing(record) == timing_method(m)):
            kept, candidates = _full_search_increment(record, full_candidates(kernel, m))
            if candidates:
                plans.append((key, task_search, kept, candidates))
                continue
        if state.has(key, task_search, timing_method(m)):
            bar.update(1)
            continue
        candidates = ([get_config(kernel, m, n, k, keys)] if task_search == "table" else
                      full_candidates(kernel, m) if task_search == "full" else
                      quick_candidates(kernel, m, n, k, keys, state, device_key))
        plans.append((key, task_search, [], candidates))
    if not precompile(pool, [(key[1], key[4], n, k, c) for key, _, _, cands in plans for c in cands],
                      options.workers, bar.write):
        pool.shutdown(cancel_futures=True)
        options.workers = 0
    if plans:
        warm_gpu()
    args_key = None
    for key, task_search, kept, candidates in plans:
        _, kernel, _, _, m = key
        timing = timing_method(m)
        if args_key != (m, FALLBACK[kernel]):
            copies = None  # the previous operands' weight copies go before the next ones are made
            args, args_key = gemm_args(m, n, k, kernel), (m, FALLBACK[kernel])
            copies = weight_copies(args) if timing == "stream" else [args]
        bar.update(1)
        if not kernel_applies(kernel, args):
            continue  # e.g. TMA off Hopper: nothing to record, the dispatch never picks it here
        timings, failed = list(kept), []
        runs = [runner(kernel, a) for a in copies]
        for config in candidates:
            try:
                timings.append((candidate_time_us(runs, config, timing, options.rep_ms), config))
            except Exception as error:  # e.g. out of shared memory or registers: skip this tile
                failed.append(config)
                bar.write(f"skip {kernel} N={n} K={k} M={m} {config}: {type(error).__name__}: {error}"[:300])
        state.add(key, task_search, timings, failed, timing)
        if timings:
            ranked = sorted(timings, key=lambda t: t[0])
            bar.write(f"{kernel:17s} N={n:5d} K={k:5d} M={m:5d} best {ranked[0][0]:9.1f} us {ranked[0][1]} "
                      f"(next: {', '.join(f'{t:.1f}' for t, _ in ranked[1:4])})")


def _full_search_increment(record: dict, candidates: list[dict]) -> tuple[list[tuple[float, dict]], list[dict]]:
    """(timings to keep, tiles to time) for a full search the state holds from a shorter candidate list (a tuner
    that has since gained tiles or loop variants): only the new tiles are timed, and the record's best again, so that
    they race it in this run rather than against a time from another session; nothing to time when none is new."""
    seen = {json.dumps(c, sort_keys=True) for _, c in record["timings"]}
    seen |= {json.dumps(c, sort_keys=True) for c in record.get("failed", [])}
    new = [c for c in candidates if json.dumps(c, sort_keys=True) not in seen]
    if not new or not record["timings"]:
        return [], new
    best = record["timings"][0][1]  # records are sorted by time
    return [(t, c) for t, c in record["timings"][1:]], [best] + new


def _write(options: TuneOptions, state: TuneState, device_key: str, family: str) -> None:
    per_kernel = device_entries(state, device_key)
    if options.buckets is not None:
        tuned_shapes = {shape_key(n, k) for n, k in options.shapes}
        per_kernel = {kernel: keep_untuned_buckets(options.out, device_key, kernel, entries, options.buckets,
                                                   tuned_shapes)
                      for kernel, entries in per_kernel.items()}
    per_kernel = keep_untimed_owners(options.out, device_key, per_kernel, options.kernels)
    write_table(options.out, device_key, complete_entries(per_kernel, (device_key, family, "default")), family)
    configs.clear_caches()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tuning options shared by `outliertune tune` and `python -m vllm_outliertune.kernels.tune`."""
    parser.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes whose per-rank shapes to "
                        "tune (with MODEL_DIR), e.g. 1,2,4,8")
    parser.add_argument("--shapes", help="comma-separated NxK weight shapes (out x in features) instead of, or "
                        "besides, a model's")
    parser.add_argument("--out", type=Path, default=None, help=f"table to write (default: ${configs.USER_TABLE_ENV} "
                        f"or {configs.USER_TABLE_PATH}, which the plugin prefers over the shipped table)")
    parser.add_argument("--state", type=Path, help="timings file to resume from (default: OUT.state.jsonl)")
    parser.add_argument("--search", choices=("auto", "quick", "full"), default="auto",
                        help="quick: the tiles the table knows for this chip family plus the best of earlier full "
                        "searches; full: every candidate (auto: quick where the table knows this chip family)")
    parser.add_argument("--only", choices=KERNELS + EXTERNAL_KERNELS + W4A8_KERNELS, help="tune one kernel, timed "
                        "against the table's tiles of its fallback (int8_gemm, or w4a8_gemm for packed weights)")
    parser.add_argument("--w4a8", action="store_true", help="also tune the W4A8 kernels (packed 4-bit weights, "
                        f"at group size {W4A8_GROUP_SIZE})")
    parser.add_argument("--buckets", help="comma-separated M buckets to tune; this device's entries for the "
                        "other buckets are kept")
    parser.add_argument("--rep-ms", type=float, default=25.0, help="timing repeats per candidate, in ms (buckets "
                        f"above {STREAM_TIMED_UP_TO_M} rows; decode buckets replay their stream of weight copies "
                        f"{STREAM_REPS} times)")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling Triton tiles in parallel")


def options_from_args(args: argparse.Namespace, model_dir: Path | None, log: Callable[[str], None]) -> TuneOptions:
    """TuneOptions from add_arguments' options (ShapeError on a bad model / shape list)."""
    from vllm_outliertune.kernels.shapes import ShapeError, model_shapes, parse_shapes

    shapes: list[tuple[int, int]] = []
    if model_dir is not None:
        try:
            tp_sizes = [int(v) for v in args.tp.split(",")]
        except ValueError:
            raise ShapeError(f"--tp {args.tp!r}: expected comma-separated integers, e.g. 1,2,4,8")
        per_tp, notes = model_shapes(model_dir, tp_sizes)
        for note in notes:
            log(f"tune: {note}")
        for tp, tp_shapes in per_tp.items():
            log(f"tune: TP {tp}: " + ", ".join(f"{n}x{k}" for n, k in tp_shapes))
            shapes += tp_shapes
    if args.shapes:
        shapes += parse_shapes(args.shapes)
    if not shapes:
        raise ShapeError("nothing to tune: give MODEL_DIR (a directory with config.json) or --shapes NxK,...")
    buckets = None
    if args.buckets:
        try:
            buckets = sorted({int(b) for b in args.buckets.split(",")})
        except ValueError:
            raise ShapeError(f"--buckets {args.buckets!r}: expected comma-separated integers")
    kernels = (args.only,) if args.only else KERNELS + EXTERNAL_KERNELS + (W4A8_KERNELS if args.w4a8 else ())
    return TuneOptions(shapes=list(dict.fromkeys(shapes)), kernels=kernels, buckets=buckets, search=args.search,
                       out=args.out or configs.user_table_path(), state=args.state, rep_ms=args.rep_ms,
                       workers=args.jobs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (config.json; weights not needed)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.model is None and not args.shapes:
        args.shapes = ",".join(f"{n}x{k}" for n, k in LLAMA3_8B_SHAPES)
    try:
        run_tune(options_from_args(args, args.model, print))
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"tune: {error}")


if __name__ == "__main__":
    main()
