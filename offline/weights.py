"""Weight quantization (per output row, symmetric) and the checkpoint tensors of one folded linear."""

from __future__ import annotations

import torch

from vllm_outliertune.format import weight_qmax
from vllm_outliertune.offline.fold import FoldedLinear


def quantize_weight(weight: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K] in ±weight_qmax(bits), float32 scale [N]); ``clip`` (a number or one per row)
    < 1 shrinks a row's range (values beyond it saturate). All-zero rows get scale 1."""
    qmax = weight_qmax(bits)
    absmax = weight.float().abs().amax(dim=1) * clip
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.round(weight.float() / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


ROW_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def best_row_clip(weight: torch.Tensor, bits: int, input_power: torch.Tensor,
                  candidates: tuple[float, ...] = ROW_CLIPS) -> torch.Tensor:
    """Per output row, the clip ratio that minimises that row's output error from weight rounding,
    sum_k (W - dequant(quant(W)))_nk^2 * E[x_k^2] (``input_power``: the mean square of each input channel as the
    GEMM sees it), over ``candidates``. Returns [N] float32."""
    weight = weight.float()
    best_error = best_clip = None
    for clip in candidates:
        q, scale = quantize_weight(weight, bits, clip)
        error = (weight - dequantize_weight(q, scale)).pow(2) @ input_power.to(weight)
        if best_error is None:
            best_error, best_clip = error, torch.full_like(error, clip)
        else:
            better = error < best_error
            best_error, best_clip = torch.where(better, error, best_error), torch.where(better, clip, best_clip)
    return best_clip


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def checkpoint_tensors(folded: FoldedLinear, bits: int, model_dtype: torch.dtype,
                       clip: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
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
