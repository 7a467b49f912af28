"""Static per-channel activation quantization: q = clamp(round(x * inv_scale - shift), qmin, qmax) as int8.

Matches kernels/torch_ref.quantize_activation_ref bit for bit: float32 math with no fused multiply-add (the
kernels are launched with enable_fp_fusion=False) and round half to even like torch.round."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import qrange

SUPPORTED_ACT_BITS = (4, 6, 8)
FLOAT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Adding and subtracting 1.5 * 2^23 rounds a float32 |v| < 2^22 to an integer, half to even (the hardware's
# default rounding); libdevice.rint would do the same but the Triton interpreter (CPU CI) lacks it.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def quantize_tile(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, QMIN: tl.constexpr, QMAX: tl.constexpr,
                  HAS_INV_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """x [BLOCK_M, BLOCK_K] float -> int8 codes; the per-channel vectors are read at offs_k (masked by mask_k)."""
    v = x.to(tl.float32)
    if HAS_INV_SCALE:
        v = v * tl.load(inv_scale_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    if HAS_SHIFT:
        v = v - tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)[None, :]
    # Clamping to integer bounds before rounding equals clamping after (rounding is monotone), and keeps
    # |v| small enough for the magic-number rounding.
    v = tl.minimum(tl.maximum(v, QMIN), QMAX)
    v = (v + _ROUND_MAGIC) - _ROUND_MAGIC
    return v.to(tl.int8)


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


def quantize_activation(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                        bits: int) -> torch.Tensor:
    """x float [M, K] (rows may be strided, channels contiguous) -> int8 [M, K]."""
    check_activation_args(x, inv_scale, shift, bits)
    if x.dim() != 2:
        raise ValueError(f"quantize_activation: x must be 2-D [M, K], got shape {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
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
