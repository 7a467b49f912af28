"""The entry point the plugin calls: quantized_linear, plus int8_gemm and quantize_activation, registered as torch
custom ops (namespace "outliertune_kernels") with fake implementations so torch.compile and CUDA graphs capture
them. Importable without CUDA; on CPU tensors the ops run the Triton kernels under TRITON_INTERPRET=1 and the
exact torch reference otherwise."""

from __future__ import annotations

import math
import os

import torch

from vllm_outliertune.kernels import torch_ref
from vllm_outliertune.kernels.act_quant import quantize_activation as _quantize_activation_triton
from vllm_outliertune.kernels.configs import covers
from vllm_outliertune.kernels.fused_quant_gemm import fused_quant_gemm
from vllm_outliertune.kernels.int8_gemm import int8_gemm as _int8_gemm_triton

# Read once, like triton.jit does when it decorates the kernels at import.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _runs_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (_TRITON_INTERPRET and t.device.type == "cpu")


@torch.library.custom_op("outliertune_kernels::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                        bits: int) -> torch.Tensor:
    """x float [M, K] -> int8 [M, K]: clamp(round(x * inv_scale - shift)) in the signed range of `bits`."""
    if _runs_triton(x):
        return _quantize_activation_triton(x, inv_scale, shift, bits)
    return torch_ref.quantize_activation_ref(x, inv_scale, shift, bits)


@quantize_activation.register_fake
def _(x, inv_scale, shift, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("outliertune_kernels::int8_gemm", mutates_args=())
def int8_gemm(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """a_q int8 [M, K] @ w_q int8 [N, K]^T (int32) * w_scale[n] (+ bias[n]) -> out_dtype [M, N]; with
    out_dtype=torch.int32 and w_scale=None, the raw int32 accumulator."""
    if _runs_triton(a_q):
        return _int8_gemm_triton(a_q, w_q, w_scale, bias, out_dtype)
    if w_scale is None:
        return torch_ref.int_mm_exact(a_q, w_q)
    return torch_ref.int8_gemm_ref(a_q, w_q, w_scale, bias, out_dtype)


@int8_gemm.register_fake
def _(a_q, w_q, w_scale, bias, out_dtype):
    return a_q.new_empty((a_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("outliertune_kernels::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     inv_scale: torch.Tensor | None, shift: torch.Tensor | None, act_bits: int,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """y = w_scale * (quantize(x) @ w_q^T) + bias for x float [..., K], w_q int8 [N, K] -> out_dtype [..., N].
    Small M (where the tile table lists the fused kernel) runs quantization inside the GEMM in one launch;
    larger M quantizes once, then runs the int8 GEMM."""
    k = x.shape[-1]
    n = w_q.shape[0]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    m = x2.shape[0]
    if not _runs_triton(x):
        out = torch_ref.int8_gemm_ref(torch_ref.quantize_activation_ref(x2, inv_scale, shift, act_bits), w_q,
                                      w_scale, bias, out_dtype)
    elif covers("fused_quant_gemm", m, n, k, x.device):
        out = fused_quant_gemm(x2, w_q, w_scale, bias, inv_scale, shift, act_bits, out_dtype)
    else:
        out = _int8_gemm_triton(_quantize_activation_triton(x2, inv_scale, shift, act_bits), w_q, w_scale, bias,
                                out_dtype)
    return out.view(*x.shape[:-1], n)


@quantized_linear.register_fake
def _(x, w_q, w_scale, bias, inv_scale, shift, act_bits, out_dtype):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=out_dtype)
