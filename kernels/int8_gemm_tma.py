"""Persistent int8 GEMM with TMA loads (Hopper and newer): one program per SM walks the output tiles in grouped
order; operand tiles arrive through the bulk tensor copy engine (host-side tensor descriptors, zero padding past
the edges), the tensor cores accumulate in int32, and the epilogue is the same scale + bias as int8_gemm.
Needs K (bytes per row) to be a multiple of 16 (TMA stride alignment); int8_gemm covers everything else."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from vllm_outliertune.kernels.int8_gemm import epilogue_store, launch_options, multiprocessors, start_gemm


@triton.jit
def _int8_gemm_tma_kernel(a_desc, w_desc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, M, N, K, stride_om,
                          HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    pids_per_group = GROUP_M * num_pid_n
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        first_m = (tile // pids_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % pids_per_group) % group_rows
        pid_n = (tile % pids_per_group) // group_rows
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        epilogue_store(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, True,
                       HAS_ROW_SCALE, HAS_BIAS)


def supports_tma(a_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Hopper or newer, and rows whose byte strides and starts TMA can address (16-byte aligned)."""
    return (a_q.is_cuda and torch.cuda.get_device_capability(a_q.device)[0] >= 9
            and all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, w_q)))


def int8_gemm_tma(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, config: dict | None = None, row_scale: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Same contract as int8_gemm.int8_gemm with a scale (float out); the caller checks supports_tma first."""
    a_q, out, config = start_gemm("int8_gemm_tma", a_q.dtype == torch.int8, a_q, w_q, w_scale, bias, out_dtype,
                                  config, scaled_only=True, row_scale=row_scale)
    if config is None:
        return out
    (m, k), n = a_q.shape, w_q.shape[0]
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(multiprocessors(a_q.device), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    _int8_gemm_tma_kernel[(programs,)](
        TensorDescriptor.from_tensor(a_q, [bm, bk]), TensorDescriptor.from_tensor(w_q, [bn, bk]), out, w_scale,
        row_scale, bias, m, n, k, out.stride(0), HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=config["GROUP_M"], NUM_PROGRAMS=programs, **launch_options(config), enable_fp_fusion=False)
    return out
