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

from vllm_outliertune.kernels.w4a8_gemm import check_packed_args


@triton.jit
def _unpack_kernel(w_ptr, gscale_ptr, gzero_ptr, out_ptr, N, K, stride_wn, stride_wk, stride_gn, stride_gk,
                   GROUP_SIZE, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (offs_n < N)[:, None] & (offs_byte < (K + 1) // 2)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    byte_tile = tl.load(w_ptr + rows * stride_wn + offs_byte[None, :].to(tl.int64) * stride_wk, mask=mask, other=0)
    # Channels 2j and 2j + 1 share byte j and (GROUP_SIZE is even) its group.
    group_offsets = rows * stride_gn + ((2 * offs_byte) // GROUP_SIZE)[None, :].to(tl.int64) * stride_gk
    scale = tl.load(gscale_ptr + group_offsets, mask=mask, other=0).to(tl.int32)
    zero = tl.load(gzero_ptr + group_offsets, mask=mask, other=0).to(tl.int32)
    low = (((byte_tile & 15).to(tl.int32) - zero) * scale).to(tl.int8)
    high = (((byte_tile >> 4).to(tl.int32) - zero) * scale).to(tl.int8)
    levels = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # channel 2j from the low nibble, 2j + 1 high
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows * K + offs_k[None, :], levels, mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


def unpack_levels(w_packed: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor, group_size: int,
                  in_features: int, config: dict | None = None) -> torch.Tensor:
    """The int8 levels [N, in_features] (row-major, as the int8 GEMMs take them) of a packed 4-bit weight with any
    strides: (code - zero) * scale per group, format.packed_levels on the GPU. ``config``: BLOCK_N, BLOCK_K
    (even), num_warps."""
    check_packed_args(in_features, w_packed, group_scale, group_zero, group_size)
    config = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, **(config or {})}
    n = w_packed.shape[0]
    out = torch.empty((n, in_features), dtype=torch.int8, device=w_packed.device)
    if n == 0 or in_features == 0:
        return out
    block_n, block_k = config["BLOCK_N"], config["BLOCK_K"]
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _unpack_kernel[grid](w_packed, group_scale, group_zero, out, n, in_features, w_packed.stride(0),
                         w_packed.stride(1), group_scale.stride(0), group_scale.stride(1),
                         group_size or in_features + in_features % 2, BLOCK_N=block_n, BLOCK_K=block_k,
                         num_warps=config["num_warps"])
    return out
