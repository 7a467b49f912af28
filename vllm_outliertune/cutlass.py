"""vLLM's CUTLASS int8 GEMM (`cutlass_scaled_mm`, in vLLM's CUDA build) as a backend of our GEMM dispatch: the
tile table lists it for the (shape, M bucket) pairs where `outliertune tune` measured it faster than our Triton
GEMMs (large M on Hopper). Our epilogue maps onto it exactly except the bias: activation scale 1 (per tensor),
weight scale per output channel, bias rounded to the output dtype (CUTLASS adds a bias of the output dtype).
Set OUTLIERTUNE_NO_CUTLASS=1 to keep every GEMM on Triton."""

from __future__ import annotations

import functools
import os

import torch

from vllm_outliertune.kernels.linear import ExternalGemm, register_external_gemm

NAME = "cutlass_scaled_mm"


@functools.cache
def _vllm_ops():
    """vllm._custom_ops where vLLM's CUDA build provides cutlass_scaled_mm, else None."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    return ops if hasattr(ops, "cutlass_scaled_mm") and hasattr(torch.ops._C, "cutlass_scaled_mm") else None


@functools.cache
def _unit_scale(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def supports(a_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """CUDA, bf16 / fp16 out, N and K multiples of 16 (CUTLASS's alignment), rows of the activation contiguous."""
    return (a_q.is_cuda and out_dtype in (torch.bfloat16, torch.float16) and a_q.stride(1) == 1
            and w_q.shape[0] % 16 == 0 and w_q.shape[1] % 16 == 0)


# (bias data pointer, dtype) -> (the bias, its version counter when cast, the cast). The entry holds the bias, so
# its memory cannot be reused by another tensor while cached; an in-place change bumps its version.
_CAST_BIASES: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, torch.Tensor]] = {}
_MAX_CAST_BIASES = 4096  # more linears than any model has per GPU; beyond it (tests, the tuner) start over


def _bias_as(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bias in `dtype`, cast once per bias rather than on every call: the cast is a kernel of its own (~1.5 µs on
    the H200, 5 % of an o_proj GEMM at M = 1024) and the bias of a loaded model never changes."""
    key = (bias.data_ptr(), dtype)
    cached = _CAST_BIASES.get(key)
    if cached is None or cached[0].shape != bias.shape or cached[1] != bias._version:
        if len(_CAST_BIASES) >= _MAX_CAST_BIASES:
            _CAST_BIASES.clear()
        cached = _CAST_BIASES[key] = (bias, bias._version, bias.to(dtype))
    return cached[2]


def cutlass_gemm(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as kernels.int8_gemm.int8_gemm with a scale (float out); row_scale (the token guard's t) is
    CUTLASS's per-token activation scale."""
    a_scale = _unit_scale(a_q.device) if row_scale is None else row_scale.reshape(-1, 1)
    return _vllm_ops().cutlass_scaled_mm(a_q, w_q.t(), a_scale, w_scale.view(-1, 1), out_dtype,
                                         None if bias is None else _bias_as(bias, out_dtype))


def register() -> bool:
    """Register the backend where vLLM's CUDA build has it (idempotent); False where it is not available."""
    if os.environ.get("OUTLIERTUNE_NO_CUTLASS") == "1" or _vllm_ops() is None:
        return False
    register_external_gemm(NAME, ExternalGemm(cutlass_gemm, supports))
    return True
