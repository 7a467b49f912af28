"""W4A8 GEMM: int8 activation codes x packed 4-bit weights with integer group scales, int32 accumulation, the
per-output-channel scale + bias epilogue of the int8 GEMMs.

w_packed uint8 [N, ceil(K/2)] (rows or columns contiguous: the plugin stores it N-major on the GPU,
linear.w4a8_gpu_layout) holds two codes per byte (channel 2j low nibble, 2j+1 high); the int8 weight level is
(code - zero[n, g]) * scale[n, g] for g = k // group_size (vllm_outliertune.format). The kernel widens the codes to
those int8 levels in registers, so the K loop is integer only (no float dequantization) and the multiply is the
same int8 x int8 -> int32 dot as in int8_gemm (tensor cores from BLOCK_M 16 and BLOCK_K 32; below that CUDA-core
multiply-adds). The weight tile is read as [BLOCK_K, BLOCK_N] with each byte at the rows of both its channels and the
nibble picked per row, so the activations load as one contiguous [BLOCK_M, BLOCK_K] tile and each K step is one dot
(the first version split even / odd channels into two dots on stride-2 activation loads: 22-37x slower than the
int8 GEMM at M = 4096 on the H200).
When a tile lies inside one group (group_size a multiple of BLOCK_K) its group scale/zero are one vector per tile,
else they are gathered per channel. Tiles with FACTORED (inside one group only) read each byte once, as
[BLOCK_K / 2, BLOCK_N], split the activation tile into even / odd channels in registers, and apply the group terms
per output: (sum a * code - zero * sum a) * scale, the same integer with two integer ops per weight instead of five
(on the H200 the per-weight path reads a GEMV's weights at ~0.46 TB/s: bound by that work, not by memory; FACTORED
1.4-1.7x faster). With ACC_K as well (CUDA-core tiles) the scaled products accumulate in a [BLOCK_M, BLOCK_K / 2,
BLOCK_N] register tile reduced once after the K loop, instead of a reduction over K per tile.
One kernel serves decode and prefill: SPLIT_K > 1 splits the K loop across programs (small M: enough programs to
stream the weights) and they meet through splitk_gemm.split_k_store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import group_count
from vllm_outliertune.kernels.int8_gemm import grouped_tile, launch_options, start_gemm
from vllm_outliertune.kernels.splitk_gemm import split_k_plan, split_k_store


@triton.jit
def _tile_group(scale_ptr, zero_ptr, rows_w, group, stride_gn, stride_gk):
    """int32 scale and zero point [BLOCK_N] of one group (a scalar) for the tile's output rows."""
    offsets = rows_w.to(tl.int64) * stride_gn + group * stride_gk
    return tl.load(scale_ptr + offsets).to(tl.int32), tl.load(zero_ptr + offsets).to(tl.int32)


@triton.jit
def _levels(byte_tile, offs_k, scale_ptr, zero_ptr, rows_w, group, stride_gn, stride_gk, GROUP_TILE: tl.constexpr):
    """uint8 bytes [BLOCK_K, BLOCK_N] (row k holds the byte of channel k: each byte twice) -> int8 levels of
    channel k's nibble (low for even k, high for odd k)."""
    codes = (byte_tile.to(tl.int32) >> ((offs_k % 2) * 4)[:, None]) & 15
    if GROUP_TILE:  # group: a scalar (the tile's group)
        scale, zero = _tile_group(scale_ptr, zero_ptr, rows_w, group, stride_gn, stride_gk)
        scale, zero = scale[None, :], zero[None, :]
    else:  # group: [BLOCK_K], one per channel
        offsets = rows_w[None, :].to(tl.int64) * stride_gn + group[:, None].to(tl.int64) * stride_gk
        scale = tl.load(scale_ptr + offsets).to(tl.int32)
        zero = tl.load(zero_ptr + offsets).to(tl.int32)
    return ((codes - zero) * scale).to(tl.int8)


@triton.jit
def _factored_group_sum(a, byte_tile, scale, zero, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k a[:, k] * level[k, :] over one tile inside one group, with each byte read once and the group's zero
    point and scale applied per output instead of per weight: (sum_k a_k * code_k - zero * sum_k a_k) * scale, the
    same integer. a: int8 [BLOCK_M, BLOCK_K]; byte_tile: uint8 [BLOCK_K // 2, BLOCK_N] (channels 2j low, 2j+1 high);
    scale, zero: int32 [BLOCK_N]."""
    a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
    low = (byte_tile & 15).to(tl.int8)
    high = (byte_tile >> 4).to(tl.int8)
    if BLOCK_M >= 16 and BLOCK_K >= 64:  # int8 tensor-core dots take M >= 16 and K >= 32 (here K is BLOCK_K / 2)
        codes_sum = tl.dot(a_odd, high, tl.dot(a_even, low, out_dtype=tl.int32), out_dtype=tl.int32)
    else:
        codes_sum = (tl.sum(a_even.to(tl.int32)[:, :, None] * low.to(tl.int32)[None, :, :], axis=1)
                     + tl.sum(a_odd.to(tl.int32)[:, :, None] * high.to(tl.int32)[None, :, :], axis=1))
    a_sum = tl.sum(a.to(tl.int32), axis=1)
    return (codes_sum - a_sum[:, None] * zero[None, :]) * scale[None, :]


@triton.jit
def _factored_products(a, byte_tile, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACC_K form of _factored_group_sum for CUDA-core tiles: the products a_k * code_k * scale of one tile as
    [BLOCK_M, BLOCK_K // 2, BLOCK_N] (even and odd channel of each byte summed), to accumulate across the K loop and
    reduce once after it; the nibbles stay int32 (no narrowing and widening per weight)."""
    a_even, a_odd = tl.split(tl.reshape(a.to(tl.int32), (BLOCK_M, BLOCK_K // 2, 2)))
    codes = byte_tile.to(tl.int32)
    return (a_even[:, :, None] * (codes & 15)[None, :, :] + a_odd[:, :, None] * (codes >> 4)[None, :, :]) \
        * scale[None, None, :]


@triton.jit
def _w4a8_gemm_kernel(a_ptr, w_ptr, gscale_ptr, gzero_ptr, out_ptr, scale_ptr, bias_ptr, ws_ptr, count_ptr,
                      M, N, K, stride_am, stride_wn, stride_wk, stride_gn, stride_gk, stride_om, K_PER_SPLIT,
                      GROUP_SIZE, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_TILE: tl.constexpr,
                      EVEN_N: tl.constexpr, FACTORED: tl.constexpr, ACC_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, rows_a, rows_w = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if EVEN_N:  # no tile reaches past N: say the columns are contiguous, so N-major loads vectorize (as gemlite)
        rows_w = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    offs_k = k_start + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    # Channels 2j and 2j+1 read the same byte (one cache line: the weight bytes still stream once). The loads
    # coalesce along N where the bytes are stored N-major (stride_wn 1, as the plugin lays them out on the GPU).
    w_ptrs = w_ptr + rows_w[None, :].to(tl.int64) * stride_wn + (offs_k // 2)[:, None].to(tl.int64) * stride_wk
    # FACTORED: each byte once ([BLOCK_K / 2, BLOCK_N], k_start is even), group terms per output (GROUP_TILE only).
    offs_byte = k_start // 2 + tl.arange(0, BLOCK_K // 2)
    byte_ptrs = w_ptr + rows_w[None, :].to(tl.int64) * stride_wn + offs_byte[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if ACC_K:
        acc3 = tl.zeros((BLOCK_M, BLOCK_K // 2, BLOCK_N), dtype=tl.int32)
    for i in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
        a = tl.load(a_ptrs, mask=(offs_k < K)[None, :], other=0)
        if FACTORED:
            byte_tile = tl.load(byte_ptrs, mask=(offs_byte < (K + 1) // 2)[:, None], other=0,
                                eviction_policy="evict_first")
            scale, zero = _tile_group(gscale_ptr, gzero_ptr, rows_w, (k_start + i * BLOCK_K) // GROUP_SIZE,
                                      stride_gn, stride_gk)
            if ACC_K:  # the zero-point term per output now, the products summed over K after the loop
                acc3 += _factored_products(a, byte_tile, scale, BLOCK_M, BLOCK_K)
                acc -= tl.sum(a.to(tl.int32), axis=1)[:, None] * (zero * scale)[None, :]
            else:
                acc += _factored_group_sum(a, byte_tile, scale, zero, BLOCK_M, BLOCK_K)
        else:
            # Channels past K read code 0, whose level need not be 0: the zeroed activations cancel them.
            w = tl.load(w_ptrs, mask=(offs_k < K)[:, None], other=0, eviction_policy="evict_first")
            if GROUP_TILE:
                group = (k_start + i * BLOCK_K) // GROUP_SIZE
            else:
                group = tl.minimum(offs_k, K - 1) // GROUP_SIZE
            levels = _levels(w, offs_k, gscale_ptr, gzero_ptr, rows_w, group, stride_gn, stride_gk, GROUP_TILE)
            if BLOCK_M >= 16 and BLOCK_K >= 32:  # int8 tensor-core dots take M >= 16 and K >= 32
                acc = tl.dot(a, levels, acc, out_dtype=tl.int32)
            else:
                acc += tl.sum(a.to(tl.int32)[:, :, None] * levels.to(tl.int32)[None, :, :], axis=1)
        offs_k += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += (BLOCK_K // 2) * stride_wk
        offs_byte += BLOCK_K // 2
        byte_ptrs += (BLOCK_K // 2) * stride_wk
    if ACC_K:
        acc += tl.sum(acc3, axis=1)
    split_k_store(acc, out_ptr, scale_ptr, bias_ptr, ws_ptr, count_ptr, pid, offs_m, offs_n, M, N, stride_om,
                  SPLIT_K, HAS_BIAS)


def check_packed_args(k: int, w_packed: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
                      group_size: int) -> None:
    """Raise ValueError naming the argument when the packed weight and its group tensors do not fit K."""
    n = w_packed.shape[0]
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != (k + 1) // 2 \
            or 1 not in w_packed.stride():
        raise ValueError(f"w_packed is {w_packed.dtype} {list(w_packed.shape)}; expected uint8 [N, {(k + 1) // 2}] "
                         f"(two 4-bit codes per byte for K = {k}) with contiguous rows or columns")
    if group_size < 0 or group_size % 2:
        raise ValueError(f"group_size {group_size} must be 0 (one group per row) or a positive even number")
    groups = group_count(k, group_size)
    for name, t in (("group_scale", group_scale), ("group_zero", group_zero)):
        if t.dtype != torch.uint8 or tuple(t.shape) != (n, groups) or 1 not in t.stride() \
                or t.device != w_packed.device:
            raise ValueError(f"{name} is {t.dtype} {list(t.shape)} on {t.device}; expected uint8 [{n}, {groups}] on "
                             f"{w_packed.device}, with contiguous rows or columns")
    if group_scale.stride() != group_zero.stride():
        raise ValueError("group_scale and group_zero must have the same strides")


def w4a8_gemm(a_q: torch.Tensor, w_packed: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
              group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
              kernel: str = "w4a8_gemm", config: dict | None = None) -> torch.Tensor:
    """a_q int8 [M, K] @ levels(w_packed)^T in int32, * w_scale[n] (+ bias[n]) -> out_dtype [M, N]. ``kernel``
    names the tile table entry ("w4a8_gemm": tiled, or "w4a8_splitk": small M, SPLIT_K 0 = automatic);
    ``config`` overrides it."""
    k = a_q.shape[1] if a_q.dim() == 2 else -1
    check_packed_args(k, w_packed, group_scale, group_zero, group_size)
    # start_gemm checks a_q, w_scale, bias and the output against an int8 [N, K] weight: a K-byte stand-in.
    shape_probe = torch.empty(max(k, 1), dtype=torch.int8, device=w_packed.device).as_strided(
        (w_packed.shape[0], max(k, 0)), (0, 1))
    a_q, out, config = start_gemm(kernel, a_q.dtype == torch.int8, a_q, shape_probe, w_scale, bias, out_dtype,
                                  config, scaled_only=True)
    if config is None:
        return out
    (m, k), n = a_q.shape, w_packed.shape[0]
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if block_k % 2:
        raise ValueError(f"BLOCK_K {block_k} must be even (two channels per packed byte)")
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, k_per_split, partial_sums, counters = split_k_plan(m, n, k, tiles, block_k, config, a_q.device)
    group = group_size or block_k * triton.cdiv(k, block_k)  # 0: one group spans the row (and every tile)
    factored = bool(config.get("FACTORED")) and group % block_k == 0
    _w4a8_gemm_kernel[(tiles, split_k)](
        a_q, w_packed, group_scale, group_zero, out, w_scale, bias, partial_sums, counters,
        m, n, k, a_q.stride(0), w_packed.stride(0), w_packed.stride(1), group_scale.stride(0), group_scale.stride(1),
        out.stride(0), k_per_split, group,
        HAS_BIAS=bias is not None, SPLIT_K=split_k, GROUP_TILE=group % block_k == 0, EVEN_N=n % block_n == 0,
        FACTORED=factored, ACC_K=factored and bool(config.get("ACC_K")) and block_m < 16, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config.get("GROUP_M", 1), **launch_options(config),
        enable_fp_fusion=False)
    return out
