"""Weight quantization (per output row, symmetric) and the checkpoint tensors of one folded linear."""

from __future__ import annotations

import torch

from vllm_outliertune.format import weight_qmax
from vllm_outliertune.offline.fold import FoldedLinear


def quantize_weight(weight: torch.Tensor, bits: int, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K] in ±weight_qmax(bits), float32 scale [N]); ``clip`` < 1 shrinks each row's
    range (values beyond it saturate). All-zero rows get scale 1."""
    qmax = weight_qmax(bits)
    absmax = weight.float().abs().amax(dim=1) * clip
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.round(weight.float() / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def checkpoint_tensors(folded: FoldedLinear, bits: int, model_dtype: torch.dtype, clip: float = 1.0,
                       ) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of format v1 for one linear (CPU). output_bias uses the *quantized* weight, so the shift
    correction matches what the integer GEMM computes."""
    q, scale = quantize_weight(folded.weight, bits, clip)
    output_bias = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    if folded.correction_shift is not None:
        output_bias += dequantize_weight(q, scale) @ folded.correction_shift
    if folded.row_bias is not None:
        output_bias += folded.row_bias
    tensors = {"weight": q, "weight_scale": scale, "output_bias": output_bias}
    if folded.bias is not None:
        tensors["bias"] = folded.bias.to(model_dtype)
    if folded.inv_scale is not None:
        tensors["input_inv_scale"] = folded.inv_scale
    if folded.input_shift is not None and bool(folded.input_shift.any()):
        tensors["input_shift"] = folded.input_shift
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in tensors.items()}
