"""The one dispatch point for a quantized linear: a torch custom op (with a fake impl, so torch.compile and CUDA
graphs capture it) that runs the Triton kernels on CUDA and the exact torch path elsewhere."""

from __future__ import annotations

import functools
import logging

import torch

from vllm_outliertune.kernels.torch_ref import int8_gemm_ref, quantize_activation_ref

logger = logging.getLogger(__name__)


@functools.cache
def _triton_quantized_linear():
    """The Triton entry point, or None when it cannot be used (then the exact torch path runs, logged once)."""
    try:
        from vllm_outliertune.kernels.linear import quantized_linear
    except Exception as exc:  # noqa: BLE001 - any import failure means: use the torch path
        logger.warning("outliertune: Triton kernels unavailable (%s); using the torch int8 path", exc)
        return None
    return quantized_linear


def quantized_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           output_bias: torch.Tensor, input_inv_scale: torch.Tensor | None,
                           input_shift: torch.Tensor | None, activation_bits: int) -> torch.Tensor:
    a_q = quantize_activation_ref(x, input_inv_scale, input_shift, activation_bits)
    return int8_gemm_ref(a_q, weight, weight_scale, output_bias, x.dtype)


@torch.library.custom_op("outliertune::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, output_bias: torch.Tensor,
                     input_inv_scale: torch.Tensor | None, input_shift: torch.Tensor | None,
                     activation_bits: int) -> torch.Tensor:
    """x [M, K] float -> [M, N] in x.dtype: static per-channel activation quant, int8 GEMM, scale + bias epilogue."""
    if x.is_cuda:
        triton_linear = _triton_quantized_linear()
        if triton_linear is not None:
            return triton_linear(x, weight, weight_scale, output_bias, input_inv_scale, input_shift,
                                 activation_bits, x.dtype)
    return quantized_linear_torch(x, weight, weight_scale, output_bias, input_inv_scale, input_shift,
                                  activation_bits)


@quantized_linear.register_fake
def _(x, weight, weight_scale, output_bias, input_inv_scale, input_shift, activation_bits):
    return x.new_empty((x.shape[0], weight.shape[0]))
