"""How close the int8 GEMMs come to a plain read of their weights (GPU): Triton kernels that only sum the weight
(512 programs reading contiguous chunks, or the GEMV's pattern of a few rows by a long K step) against the shipped
dispatch at M = 1 and 16, all timed as decode streams weights (tune.stream_time_us over copies past the L2):

    python bench/read_ceiling.py [4096x14336,28672x4096,4096x4096]

Session 21 (H200): the GEMVs took 1.10-1.19x the best read at one row and 1.16-1.43x at 16 (docs/benchmarks.md)."""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels import linear, tune
from vllm_outliertune.kernels.shapes import parse_shapes

PROGRAMS = 512


@triton.jit
def _read_chunks(w_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program p sums its own contiguous CHUNK int32 words, BLOCK words a step."""
    p = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        acc += tl.load(w_ptr + p * CHUNK + i + offs, eviction_policy="evict_first")
    tl.store(out_ptr + p, tl.sum(acc))


@triton.jit
def _read_rows(w_ptr, out_ptr, row_words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program p sums rows [ROWS p, ROWS p + ROWS) over the whole row, BLOCK_K words of each a step."""
    p = tl.program_id(0).to(tl.int64)
    rows = p * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for k in range(0, row_words, BLOCK_K):
        acc += tl.load(w_ptr + rows[:, None] * row_words + k + offs[None, :], eviction_policy="evict_first")
    tl.store(out_ptr + p, tl.sum(acc))


def ceilings(n: int, k: int) -> dict[str, float]:
    """µs per launch of each reader and of the shipped dispatch on an N x K int8 weight."""
    args = tune.gemm_args(1, n, k)
    copies = tune.weight_copies(args)
    words = [c[1].view(torch.int32) for c in copies]
    out = torch.empty(max(PROGRAMS, n), device="cuda", dtype=torch.int32)
    chunk = n * k // 4 // PROGRAMS
    times = {}
    for warps in (4, 8):
        for block in (1024, 2048, 4096):
            if chunk % block == 0:
                times[f"read: {PROGRAMS} contiguous chunks, {block * 4 // 1024} KB steps, {warps} warps"] = \
                    tune.stream_time_us([lambda w=w: _read_chunks[(PROGRAMS,)](
                        w, out, CHUNK=chunk, BLOCK=block, num_warps=warps) for w in words])
        for rows, step in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512)):
            if n % rows == 0 and (k // 4) % step == 0:
                times[f"read: {rows} rows x {step * 4} B steps, {warps} warps"] = tune.stream_time_us(
                    [lambda w=w: _read_rows[(n // rows,)](w, out, k // 4, ROWS=rows, BLOCK_K=step, num_warps=warps)
                     for w in words])
    for m in (1, 16):
        codes = tune.gemm_args(m, n, k)[0]
        times[f"shipped dispatch, M = {m}"] = tune.stream_time_us(
            [lambda c=c: linear.int8_gemm(codes, c[1], c[2], c[3], torch.bfloat16) for c in copies])
    return times


def main(shapes: str = "4096x14336,28672x4096,4096x4096") -> None:
    for n, k in parse_shapes(shapes):
        mb = n * k / 1e6
        print(f"\n{n}x{k} ({mb:.1f} MB)")
        for name, us in sorted(ceilings(n, k).items(), key=lambda item: item[1]):
            print(f"  {us:7.2f} us  {mb / us:5.2f} TB/s  {name}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
