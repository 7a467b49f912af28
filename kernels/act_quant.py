"""Static per-channel activation quantization: q = clamp(round(x * inv_scale - shift), qmin, qmax) as int8, and
its per-token overflow guarded form (quantization_config.token_guard): q = clamp(round(u / t)) with t per row.

Match kernels/torch_ref's quantize_activation_ref and quantize_activation_guarded_ref bit for bit: float32 math
with no fused multiply-add (the kernels are launched with enable_fp_fusion=False), IEEE division (div_rn) and
round half to even like torch.round."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import guard_limits, qrange

SUPPORTED_ACT_BITS = (4, 6, 8)
FLOAT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Adding and subtracting 1.5 * 2^23 rounds a float32 |v| < 2^22 to an integer, half to even (the hardware's
# default rounding); libdevice.rint would do the same but the Triton interpreter (CPU CI) lacks it.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def activation_units(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, HAS_INV_SCALE: tl.constexpr,
                     HAS_SHIFT: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] float -> x * inv_scale - shift in float32, the codes before rounding; the per-channel
    vectors are read at offs_k (masked by mask_k)."""
    v = x.to(tl.float32)
    if HAS_INV_SCALE:
        v = v * tl.load(inv_scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    if HAS_SHIFT:
        v = v - tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    return v


@triton.jit
def round_units(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """float32 units -> int8 codes. Clamping to integer bounds before rounding equals clamping after (rounding is
    monotone), and keeps |v| small enough for the magic-number rounding."""
    v = tl.minimum(tl.maximum(v, QMIN), QMAX)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return v.to(tl.int8)


@triton.jit
def quantize_tile(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, QMIN: tl.constexpr, QMAX: tl.constexpr,
                  HAS_INV_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] float -> int8 codes; the per-channel vectors are read at offs_k (masked by mask_k)."""
    return round_units(activation_units(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, HAS_INV_SCALE, HAS_SHIFT),
                       QMIN, QMAX)


@triton.jit
def _quantize_activation_kernel(x_ptr, q_ptr, inv_scale_ptr, shift_ptr, M, K, stride_xm, stride_qm,
                                QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
                                HAS_SHIFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask = (offs_m < M)[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    q = quantize_tile(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, QMIN, QMAX, HAS_INV_SCALE, HAS_SHIFT)
    tl.store(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :], q, mask=mask)


@triton.jit
def _row_units(x_row, inv_scale_ptr, shift_ptr, k0, offs, K, HAS_INV_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Channels k0 + offs of one row: (units [1, BLOCK_K], mask of the channels < K)."""
    mask = k0 + offs < K
    units = activation_units(tl.load(x_row + k0 + offs, mask=mask, other=0.0)[None, :], inv_scale_ptr, shift_ptr,
                             k0 + offs, mask, HAS_INV_SCALE, HAS_SHIFT)
    return units, mask


@triton.jit
def guard_t(highest, lowest, floor, LOW: tl.constexpr, HIGH: tl.constexpr):
    """format.guard_scale of a row from its largest and most negative unit: max(floor, highest / HIGH, lowest / LOW)
    with IEEE division."""
    return tl.maximum(tl.maximum(tl.math.div_rn(highest, HIGH), tl.math.div_rn(lowest, LOW)), floor)


@triton.jit
def _quantize_activation_guarded_kernel(x_ptr, q_ptr, t_ptr, inv_scale_ptr, shift_ptr, K, stride_xm, stride_qm,
                                        floor, LOW: tl.constexpr, HIGH: tl.constexpr, QMIN: tl.constexpr,
                                        QMAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                                        BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """One program per row: t = max(floor, max u / HIGH, min u / LOW) (format.guard_scale), codes round(u / t).
    ONE_BLOCK (K <= BLOCK_K): the row stays in registers between the two, x is read once; otherwise two passes."""
    x_row = x_ptr + tl.program_id(0).to(tl.int64) * stride_xm
    q_row = q_ptr + tl.program_id(0).to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        u, mask = _row_units(x_row, inv_scale_ptr, shift_ptr, 0, offs, K, HAS_INV_SCALE, HAS_SHIFT)
        highest = tl.max(tl.where(mask[None, :], u, -float("inf")))
        lowest = tl.min(tl.where(mask[None, :], u, float("inf")))
    else:
        highest = -float("inf")
        lowest = float("inf")
        for k0 in range(0, K, BLOCK_K):
            u, mask = _row_units(x_row, inv_scale_ptr, shift_ptr, k0, offs, K, HAS_INV_SCALE, HAS_SHIFT)
            highest = tl.maximum(highest, tl.max(tl.where(mask[None, :], u, -float("inf"))))
            lowest = tl.minimum(lowest, tl.min(tl.where(mask[None, :], u, float("inf"))))
    t = guard_t(highest, lowest, floor, LOW, HIGH)
    tl.store(t_ptr + tl.program_id(0), t)
    if ONE_BLOCK:
        tl.store(q_row + offs[None, :], round_units(tl.math.div_rn(u, t), QMIN, QMAX), mask=mask[None, :])
    else:
        for k0 in range(0, K, BLOCK_K):
            u, mask = _row_units(x_row, inv_scale_ptr, shift_ptr, k0, offs, K, HAS_INV_SCALE, HAS_SHIFT)
            tl.store(q_row + k0 + offs[None, :], round_units(tl.math.div_rn(u, t), QMIN, QMAX), mask=mask[None, :])


@triton.jit
def _guard_fixup_kernel(x_ptr, q_ptr, t_ptr, part_scale_ptr, inv_scale_ptr, shift_ptr, K, parts, stride_xm,
                        stride_qm, stride_qk, QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_INV_SCALE: tl.constexpr,
                        HAS_SHIFT: tl.constexpr, BLOCK_PARTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row, K block): t of the row, max(1, its parts' largest guard quotients) (format.guard_scale); the
    row's codes were rounded at t = 1, so only a row with t > 1 re-reads its x and rewrites its codes at u / t."""
    row = tl.program_id(0).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_PARTS)
    t = tl.maximum(tl.max(tl.load(part_scale_ptr + row * parts + offs_p, mask=offs_p < parts, other=1.0)), 1.0)
    if tl.program_id(1) == 0:
        tl.store(t_ptr + row, t)
    if t > 1.0:
        offs = tl.arange(0, BLOCK_K)
        k0 = tl.program_id(1) * BLOCK_K
        u, mask = _row_units(x_ptr + row * stride_xm, inv_scale_ptr, shift_ptr, k0, offs, K, HAS_INV_SCALE,
                             HAS_SHIFT)
        tl.store(q_ptr + row * stride_qm + (k0 + offs[None, :]) * stride_qk,
                 round_units(tl.math.div_rn(u, t), QMIN, QMAX), mask=mask[None, :])


def check_activation_args(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                          bits: int) -> None:
    """Raise ValueError naming the argument when the activation-quant inputs are malformed."""
    if x.dtype not in FLOAT_INPUT_DTYPES:
        raise ValueError(f"activation x has dtype {x.dtype}; expected one of {FLOAT_INPUT_DTYPES}")
    if bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"activation bits={bits} not supported; use one of {SUPPORTED_ACT_BITS}")
    k = x.shape[-1]
    for name, vec in (("inv_scale", inv_scale), ("shift", shift)):
        if vec is None:
            continue
        if vec.dtype != torch.float32 or vec.shape != (k,) or vec.device != x.device or not vec.is_contiguous():
            raise ValueError(f"activation {name} is {vec.dtype} {list(vec.shape)} on {vec.device}; expected a "
                             f"contiguous float32 [{k}] vector on {x.device} (one entry per input channel)")


def _checked_rows(op: str, x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's checked arguments: x [M, K] with contiguous channels, and its empty int8 codes."""
    check_activation_args(x, inv_scale, shift, bits)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    return x, torch.empty(x.shape, dtype=torch.int8, device=x.device)


def quantize_activation(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                        bits: int) -> torch.Tensor:
    """x float [M, K] (rows may be strided, channels contiguous) -> int8 [M, K]."""
    x, q = _checked_rows("quantize_activation", x, inv_scale, shift, bits)
    m, k = x.shape
    if m == 0 or k == 0:
        return q
    qmin, qmax = qrange(bits)
    block_k = min(triton.next_power_of_2(k), 1024)
    block_m = max(1, 4096 // block_k)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _quantize_activation_kernel[grid](
        x, q, inv_scale, shift, m, k, x.stride(0), q.stride(0), QMIN=qmin, QMAX=qmax,
        HAS_INV_SCALE=inv_scale is not None, HAS_SHIFT=shift is not None, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=4, enable_fp_fusion=False)
    return q


# Rows up to this many channels stay in registers (one read of x); longer rows take two passes over K in blocks
# of GUARDED_PASS_BLOCK_K.
GUARDED_ONE_BLOCK_K = 16384
GUARDED_PASS_BLOCK_K = 4096


def quantize_activation_guarded(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                                bits: int, floor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (int8 codes [M, K], t float32 [M, 1]): torch_ref.quantize_activation_guarded_ref in one
    kernel, one program per row (the row's maximum and minimum decide its codes)."""
    x, q = _checked_rows("quantize_activation_guarded", x, inv_scale, shift, bits)
    m, k = x.shape
    t = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, t.fill_(floor)
    qmin, qmax = qrange(bits)
    low, high = guard_limits(bits)
    one_block = k <= GUARDED_ONE_BLOCK_K
    block_k = triton.next_power_of_2(k) if one_block else GUARDED_PASS_BLOCK_K
    _quantize_activation_guarded_kernel[(m,)](
        x, q, t, inv_scale, shift, k, x.stride(0), q.stride(0), floor, LOW=low, HIGH=high, QMIN=qmin, QMAX=qmax,
        HAS_INV_SCALE=inv_scale is not None, HAS_SHIFT=shift is not None, BLOCK_K=block_k, ONE_BLOCK=one_block,
        num_warps=min(16, max(4, block_k // 1024)), enable_fp_fusion=False)
    return q, t


GUARD_FIXUP_BLOCK_K = 2048  # channels per guard_fixup program (its own row's t; only rows with t > 1 re-quantize)


def guard_fixup(x: torch.Tensor, codes: torch.Tensor, part_scales: torch.Tensor, inv_scale: torch.Tensor | None,
                shift: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The token guard (floor 1) finished from codes rounded at t = 1 and the largest guard quotient of each row part
    (float32 [M, P], torch_ref.row_part_scales): returns t float32 [M, 1] and rewrites, in place, the codes of the
    rows with t > 1 from x (torch_ref.guard_fixup_ref). A row inside the plan's range costs one read of its P
    values."""
    check_activation_args(x, inv_scale, shift, bits)
    if x.dim() != 2 or codes.shape != x.shape or codes.dtype != torch.int8:
        raise ValueError(f"guard_fixup: codes {codes.dtype} {list(codes.shape)} must be int8 codes of x "
                         f"{list(x.shape)} [M, K]")
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    if part_scales.dim() != 2 or part_scales.shape[0] != m or part_scales.dtype != torch.float32:
        raise ValueError(f"guard_fixup: part_scales is {part_scales.dtype} {list(part_scales.shape)}; expected "
                         f"float32 [{m}, parts]")
    parts = part_scales.shape[1]
    part_scales = part_scales.contiguous()
    t = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return t.fill_(1.0)
    qmin, qmax = qrange(bits)
    block_k = min(triton.next_power_of_2(k), GUARD_FIXUP_BLOCK_K)
    _guard_fixup_kernel[(m, triton.cdiv(k, block_k))](
        x, codes, t, part_scales, inv_scale, shift, k, parts, x.stride(0), codes.stride(0), codes.stride(1),
        QMIN=qmin, QMAX=qmax, HAS_INV_SCALE=inv_scale is not None, HAS_SHIFT=shift is not None,
        BLOCK_PARTS=triton.next_power_of_2(parts), BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return t
