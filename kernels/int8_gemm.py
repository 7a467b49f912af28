"""int8 x int8 -> int32 GEMM with a per-output-channel epilogue: out = acc * w_scale[n] (+ bias[n]).

a_q int8 [M, K] (K contiguous), w_q int8 [N, K] (K contiguous, as stored in the checkpoint). Tiles come from
tile_configs.json (kernels/configs.py); programs are grouped along M so that neighbouring programs share
weight tiles in L2."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels.configs import get_config, table_keys

OUT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32,
              torch.int32: tl.int32}


@triton.jit
def round_to_bfloat16(v):
    """float32 -> the nearest bfloat16 value (ties to even, as torch's cast), still as float32. The GPU's own cast
    already does this, but the Triton interpreter (CPU CI) truncates; the bit trick is exact on both."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def epilogue_vectors(scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_SCALE: tl.constexpr,
                     HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogue's scale[n], row_scale[m] and bias[n] of a tile (float32; 1 / 0 where absent). Loaded before
    the K loop, their latency overlaps the loop instead of adding to the program's end (the split-K GEMM)."""
    mask_n = offs_n < N
    scale = tl.full((offs_n.shape[0],), 1.0, tl.float32)
    row_scale = tl.full((offs_m.shape[0],), 1.0, tl.float32)
    bias = tl.zeros((offs_n.shape[0],), tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        if HAS_ROW_SCALE:
            row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=1.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return scale, row_scale, bias


@triton.jit
def store_scaled(acc, out_ptr, scale, row_scale, bias, offs_m, offs_n, M, N, stride_om, HAS_SCALE: tl.constexpr,
                 HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, mask=None):
    """Store acc [BLOCK_M, BLOCK_N] int32 as acc * scale[n] (* row_scale[m]) + bias[n] in out's dtype (raw int32
    without scale), from epilogue_vectors' values. Multiply then add in float32, as the torch reference does
    (callers launch with enable_fp_fusion=False). row_scale: the token guard's per-row t."""
    mask_n = offs_n < N
    if HAS_SCALE:
        out = acc.to(tl.float32) * scale[None, :]
        if HAS_ROW_SCALE:
            out = out * row_scale[:, None]
        if HAS_BIAS:
            out = out + bias[None, :]
    else:
        out = acc
    out_ty = out_ptr.dtype.element_ty
    if out_ty == tl.bfloat16:
        out = round_to_bfloat16(out)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    if mask is None:
        mask = (offs_m < M)[:, None] & mask_n[None, :]
    tl.store(out_ptrs, out.to(out_ty), mask=mask)


@triton.jit
def epilogue_store(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om,
                   HAS_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """store_scaled with the vectors loaded now, after the K loop (tiles of many K steps, where the wait is small)."""
    scale, row_scale, bias = epilogue_vectors(scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_SCALE,
                                              HAS_ROW_SCALE, HAS_BIAS)
    store_scaled(acc, out_ptr, scale, row_scale, bias, offs_m, offs_n, M, N, stride_om, HAS_SCALE, HAS_ROW_SCALE,
                 HAS_BIAS)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output rows and columns of program ``pid`` in grouped order (GROUP_M row-blocks walk the N tiles together,
    reusing weight tiles from L2), and the operand rows to read: out-of-range rows/columns read row 0 instead of
    being masked (their results are never stored)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.where(offs_m < M, offs_m, 0), tl.where(offs_n < N, offs_n, 0)


@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, M, N, K, stride_am, stride_wn,
                      stride_om, HAS_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    offs_m, offs_n, rows_a, rows_w = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[None, :].to(tl.int64) * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    epilogue_store(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_SCALE,
                   HAS_ROW_SCALE, HAS_BIAS)


def check_gemm_args(a_dtype_ok: bool, a: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, scaled_only: str | None = None,
                    row_scale: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the argument when GEMM inputs are malformed (shared by the three GEMM kernels;
    `scaled_only` names a kernel that has no raw int32 output)."""
    if scaled_only and (w_scale is None or out_dtype == torch.int32):
        raise ValueError(f"{scaled_only} needs w_scale and a float out_dtype")
    if not a_dtype_ok:
        raise ValueError(f"activation has dtype {a.dtype}, which this kernel does not take")
    if a.dim() != 2 or w_q.dim() != 2 or a.shape[1] != w_q.shape[1]:
        raise ValueError(f"activation {list(a.shape)} and weight w_q {list(w_q.shape)} must be [M, K] and [N, K] "
                         "with the same K")
    if w_q.dtype != torch.int8 or w_q.stride(1) != 1:
        raise ValueError(f"weight w_q must be int8 [N, K] with contiguous K (got {w_q.dtype}, strides "
                         f"{w_q.stride()}); keep the checkpoint layout, do not transpose it")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype {out_dtype} not supported; use one of {list(OUT_DTYPES)}")
    n = w_q.shape[0]
    if w_scale is None:
        if out_dtype != torch.int32 or bias is not None:
            raise ValueError("w_scale is required unless out_dtype is torch.int32 (raw accumulator, no bias)")
    elif w_scale.dtype != torch.float32 or w_scale.shape != (n,) or not w_scale.is_contiguous():
        raise ValueError(f"w_scale is {w_scale.dtype} {list(w_scale.shape)}; expected contiguous float32 [{n}]")
    if bias is not None and (not bias.dtype.is_floating_point or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias is {bias.dtype} {list(bias.shape)}; expected a contiguous float [{n}] vector")
    if row_scale is not None and (w_scale is None or row_scale.dtype != torch.float32
                                  or row_scale.numel() != a.shape[0] or not row_scale.is_contiguous()):
        raise ValueError(f"row_scale is {row_scale.dtype} {list(row_scale.shape)}; expected contiguous float32 with "
                         f"one value per activation row ({a.shape[0]}), and a w_scale")
    for name, t in (("w_q", w_q), ("w_scale", w_scale), ("bias", bias), ("row_scale", row_scale)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but the activation is on {a.device}")


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (1 elsewhere, e.g. the interpreter): sizes split-K and persistent grids."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_options(config: dict) -> dict:
    """Split a table entry into block sizes (kernel meta-parameters) and launch options."""
    return {key: value for key, value in config.items() if key in ("num_warps", "num_stages")}


def start_gemm(kernel: str, a_dtype_ok: bool, a: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None,
               bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None,
               scaled_only: bool = False, row_scale: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """What every GEMM entry point does before its launch: check the arguments, make K contiguous, allocate the
    output [M, N] and pick the tile (`config`, else the table's for `kernel`). Returns (a, out, config), config None
    when out is already final (an empty problem: no rows/columns, or K = 0 where the result is just the bias)."""
    check_gemm_args(a_dtype_ok, a, w_q, w_scale, bias, out_dtype, kernel if scaled_only else None, row_scale)
    a = a if a.stride(1) == 1 else a.contiguous()
    (m, k), n = a.shape, w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return a, out, None
    if k == 0:
        out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
        return a, out, None
    return a, out, config or get_config(kernel, m, n, k, table_keys(a.device))


def int8_gemm(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype, config: dict | None = None, row_scale: torch.Tensor | None = None
              ) -> torch.Tensor:
    """a_q int8 [M, K] @ w_q int8 [N, K]^T in int32, then * w_scale[n] (* row_scale[m]) (+ bias[n]) -> out_dtype
    [M, N]. out_dtype=torch.int32 with w_scale=None returns the raw accumulator. `config` overrides the tile table."""
    a_q, out, config = start_gemm("int8_gemm", a_q.dtype == torch.int8, a_q, w_q, w_scale, bias, out_dtype, config,
                                  row_scale=row_scale)
    if config is None:
        return out
    (m, k), n = a_q.shape, w_q.shape[0]
    blocks = {key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        a_q, w_q, out, w_scale, row_scale, bias, m, n, k, a_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_SCALE=w_scale is not None, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % blocks["BLOCK_K"] == 0,
        **blocks, **launch_options(config), enable_fp_fusion=False)
    return out
