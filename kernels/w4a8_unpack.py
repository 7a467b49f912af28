"""W4A8 at large M: widen the packed 4-bit weight to its int8 levels once per call, then run the int8 GEMM.

From a few hundred rows up a GEMM is bound by its multiply-adds, not by the weight bytes, and the int8 GEMMs
(CUTLASS where the table picks it, or our TMA / tiled kernels) run those faster than a kernel that widens nibbles in
its K loop (on the H200 the W4A8 tiled GEMM reached ~0.2x the int8 GEMM from M = 256 up). Writing the N x K levels
costs about one more pass over an int8 weight (~0.05 ms for a 28672 x 4096 weight on the H200), a few percent of
a prefill GEMM; the weight stays packed in memory, and the levels live only during the call. The result is the
same integer as the other W4A8 kernels (the levels are exactly the int8 weights the packed format stands for)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels.w4a8_gemm import check_packed_args, word_code


@triton.jit
def _level(words, shift, zero, scale):
    return ((word_code(words, shift) - zero) * scale).to(tl.int8)


@triton.jit
def _unpack_kernel(w_ptr, gscale_ptr, gzero_ptr, out_ptr, N, K, stride_wn, stride_wk, stride_gn, stride_gk,
                   GROUP_SIZE, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_word = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    mask = (offs_n < N)[:, None] & (offs_word < (K + 7) // 8)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    words = tl.load(w_ptr + rows * stride_wn + offs_word[None, :].to(tl.int64) * stride_wk, mask=mask, other=0)
    # The 8 channels of a word share its group (GROUP_SIZE is a multiple of 8).
    group_offsets = rows * stride_gn + ((8 * offs_word) // GROUP_SIZE)[None, :].to(tl.int64) * stride_gk
    scale = tl.load(gscale_ptr + group_offsets, mask=mask, other=0).to(tl.int32)
    zero = tl.load(gzero_ptr + group_offsets, mask=mask, other=0).to(tl.int32)
    # Channel 8j + c sits at bit 8 * (c % 4) + 4 * (c // 4); joined so that the flat index of the last three
    # (size-2) dimensions is c: join(P, Q)[..., x1, x2, y] is channel 4 * x1 + 2 * x2 + y.
    levels = tl.join(tl.join(tl.join(_level(words, 0, zero, scale), _level(words, 4, zero, scale)),
                             tl.join(_level(words, 16, zero, scale), _level(words, 20, zero, scale))),
                     tl.join(tl.join(_level(words, 8, zero, scale), _level(words, 12, zero, scale)),
                             tl.join(_level(words, 24, zero, scale), _level(words, 28, zero, scale))))
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows * K + offs_k[None, :], tl.reshape(levels, (BLOCK_N, BLOCK_K)),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def unpack_levels(w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor, group_size: int,
                  in_features: int, config: dict | None = None) -> torch.Tensor:
    """The int8 levels [N, in_features] (row-major, as the int8 GEMMs take them) of a packed 4-bit weight (int32
    words, w4a8_words.pack_words, any strides): (code - zero) * scale per group, format.packed_levels on the GPU.
    ``config``: BLOCK_N, BLOCK_K (a multiple of 16), num_warps."""
    check_packed_args(in_features, w_words, group_scale, group_zero, group_size)
    config = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, **(config or {})}
    n = w_words.shape[0]
    out = torch.empty((n, in_features), dtype=torch.int8, device=w_words.device)
    if n == 0 or in_features == 0:
        return out
    block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _unpack_kernel[grid](w_words, group_scale, group_zero, out, n, in_features, w_words.stride(0),
                         w_words.stride(1), group_scale.stride(0), group_scale.stride(1),
                         group_size or 8 * w_words.shape[1], BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=config["num_warps"])
    return out
