"""Small-M (decode) path: activation quantization in the GEMM prologue, one launch, optional split-K.

Each program quantizes its [BLOCK_M, BLOCK_K] slice of the float activations on the fly (same math as
act_quant.quantize_tile) and multiplies it with int8 weight tiles. At small M the weights dominate the bytes, so
the kernel must keep the whole GPU streaming weights: BLOCK_M < 16 (M of a few rows) replaces the tensor-core dot
by a multiply-reduce, and when M x N gives too few tiles, the K loop is split across
SPLIT_K programs. Their int32 partial sums meet in a zeroed workspace through integer atomics (exact, so the
result does not depend on arrival order); the last program to arrive for a tile, seen through a per-tile
counter, reads the sum back and runs the epilogue."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import qrange
from vllm_outliertune.kernels.act_quant import FLOAT_INPUT_DTYPES, check_activation_args, quantize_tile
from vllm_outliertune.kernels.configs import get_config
from vllm_outliertune.kernels.int8_gemm import check_gemm_args, epilogue_store, launch_options, prepare_output


@triton.jit
def _fused_quant_gemm_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, bias_ptr, inv_scale_ptr, shift_ptr, ws_ptr,
                             count_ptr, M, N, K, stride_xm, stride_wn, stride_om, K_PER_SPLIT,
                             QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
                             HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                             SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    rows_w = tl.where(offs_n < N, offs_n, 0)
    k_start = pid_k * K_PER_SPLIT
    offs_k = k_start + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for _ in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
        mask_k = offs_k < K
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0)  # zero weights cancel the padded codes
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = quantize_tile(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, QMIN, QMAX, HAS_INV_SCALE, HAS_SHIFT)
        if BLOCK_M >= 16:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:  # below the tensor cores' 16 rows: a broadcast multiply-reduce streams the weights with less work
            acc += tl.sum(a.to(tl.int32)[:, :, None] * w.to(tl.int32)[None, :, :], axis=1)
        offs_k += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K == 1:
        epilogue_store(acc, out_ptr, scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, True, HAS_BIAS)
    else:
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        ws_ptrs = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sum is in before this program counts itself in
        arrived = tl.atomic_add(count_ptr + pid_mn, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_xchg(ws_ptrs, 0, mask=mask, sem="relaxed")  # read at L2, past stale L1 lines
            epilogue_store(total, out_ptr, scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, True, HAS_BIAS)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _auto_split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough K splits for ~2 programs per SM, keeping at least 4 K blocks per program."""
    return max(1, min(triton.cdiv(2 * _multiprocessors(device), tiles), k_blocks // 4))


def fused_quant_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     inv_scale: torch.Tensor | None, shift: torch.Tensor | None, bits: int,
                     out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """quantize(x float [M, K]) @ w_q int8 [N, K]^T * w_scale[n] (+ bias[n]) -> out_dtype [M, N], one launch
    (plus a workspace memset when split-K is used). `config` overrides the tile table (SPLIT_K 0 = automatic)."""
    check_activation_args(x, inv_scale, shift, bits)
    check_gemm_args(x.dtype in FLOAT_INPUT_DTYPES, x, w_q, w_scale, bias, out_dtype)
    if w_scale is None or out_dtype == torch.int32:
        raise ValueError("fused_quant_gemm needs w_scale and a float out_dtype")
    x, out, done = prepare_output(x, w_q, bias, out_dtype)
    if done:
        return out
    (m, k), n = x.shape, w_q.shape[0]
    config = config or get_config("fused_quant_gemm", m, n, k, x.device)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split_k = config.get("SPLIT_K", 1) or _auto_split_k(tiles, k_blocks, x.device)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # the number of programs that really get K blocks
    if split_k > 1:
        workspace = torch.zeros(m * n + tiles, dtype=torch.int32, device=x.device)
        partial_sums, counters = workspace[:m * n], workspace[m * n:]
    else:
        partial_sums = counters = None
    qmin, qmax = qrange(bits)
    _fused_quant_gemm_kernel[(tiles, split_k)](
        x, w_q, out, w_scale, bias, inv_scale, shift, partial_sums, counters, m, n, k, x.stride(0),
        w_q.stride(0), out.stride(0), k_per_split, QMIN=qmin, QMAX=qmax, HAS_INV_SCALE=inv_scale is not None,
        HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch_options(config), enable_fp_fusion=False)
    return out
