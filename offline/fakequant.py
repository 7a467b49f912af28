"""Fake quantization of a Hugging Face model's decoder linears in floating point. Reference only: nothing here is
written to a checkpoint or runs in vLLM.

- dynamic per-token (`outliertune eval --engine torch --fake-quant w8a8-dynamic`): each token's activation row gets
  its own symmetric absmax scale at run time, weights one symmetric scale per output row, round to nearest. The
  bar that static quantization has to meet.
- static plan (`outliertune diagnose`): the per-channel steps, integer shifts and per-row weight clips that
  `outliertune quantize` chose, applied without folding to any subset of the linears, so the loss can be
  attributed to layers and groups. Same arithmetic as the checkpoint: (q + shift) @ dequant(quant(W * s))^T.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from vllm_outliertune.format import weight_qmax
from vllm_outliertune.offline.architectures import architecture_of
from vllm_outliertune.offline.model_io import UserError
from vllm_outliertune.offline.symmetrize import ChannelPlan
from vllm_outliertune.offline.weights import (
    QuantizedWeight, WeightFormat, dequantize_weight, fake_quantize, quantize_weight)

FAKE_QUANT_MODES = ("w8a8-dynamic", "w6a6-dynamic")


def parse_mode(mode: str) -> tuple[int, int]:
    """"w8a8-dynamic" -> (8, 8)."""
    match = re.fullmatch(r"w(\d)a(\d)-dynamic", mode)
    if mode not in FAKE_QUANT_MODES or match is None:
        raise UserError(f"--fake-quant {mode!r} is unknown; choose one of {', '.join(FAKE_QUANT_MODES)}")
    return int(match.group(1)), int(match.group(2))


def per_token_fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of ``x`` rounded to a symmetric grid of ±(2^(bits-1) - 1) steps of absmax(row) / that."""
    qmax = weight_qmax(bits)
    step = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / qmax
    return torch.round(x / step).clamp_(-qmax, qmax) * step


def dynamic_output_error(sample: torch.Tensor, weight: torch.Tensor, weight_format: WeightFormat,
                         a_bits: int) -> float:
    """Relative output error of the dynamic per-token scheme on ``sample`` (as search.output_error for a plan)."""
    reference = sample @ weight.t()
    approx = per_token_fake_quantize(sample, a_bits) @ fake_quantize(weight, weight_format).t()
    return float((approx - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-30))


class DynamicPerTokenLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, w_bits: int, a_bits: int):
        super().__init__()
        self.a_bits = a_bits
        weight = linear.weight.detach().float()
        self.register_buffer("weight", dequantize_weight(*quantize_weight(weight, w_bits)).to(weight.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = per_token_fake_quantize(x.float(), self.a_bits) @ self.weight.t()
        return (y if self.bias is None else y + self.bias).to(x.dtype)


class StaticPlanLinear(torch.nn.Module):
    """y = plan.fake_quantize(x) @ (diag(row_divisor) dequant(quantized) / step)^T + b, ``quantized`` being the
    checkpoint's rounding of the folded weight diag(1 / row_divisor) W diag(step); ``token_guard`` and
    ``guard_floor`` as the checkpoint options (ChannelPlan.fake_quantize)."""

    def __init__(self, linear: torch.nn.Linear, plan: ChannelPlan, quantized: QuantizedWeight, a_bits: int,
                 row_divisor: torch.Tensor | None = None, token_guard: bool = False, guard_floor: float = 1.0):
        super().__init__()
        self.plan, self.a_bits, self.token_guard, self.guard_floor = plan, a_bits, token_guard, guard_floor
        weight = quantized.dequantize().to(linear.weight.device) / plan.step.to(linear.weight.device)
        if row_divisor is not None:
            weight = weight * row_divisor.to(weight)[:, None]
        if plan.exact is not None:  # computed in floating point, from the original columns
            weight[:, plan.exact] = linear.weight.detach()[:, plan.exact].to(weight)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.plan.fake_quantize(x.float(), self.a_bits, self.token_guard, self.guard_floor) @ self.weight.t()
        return (y if self.bias is None else y + self.bias).to(x.dtype)


def replace_linears(model, make: Callable[[int, str, torch.nn.Linear], torch.nn.Module | None]) -> int:
    """Replace decoder linear ``name`` of layer ``index`` by ``make(index, name, linear)`` where that is not None;
    returns how many were replaced."""
    replaced = 0
    arch = architecture_of(model)
    for index, layer in enumerate(model.get_submodule(arch.layers)):
        for name in arch.linears:
            module = make(index, name, layer.get_submodule(name))
            if module is not None:
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, module)
                replaced += 1
    return replaced


def dynamic_per_token(model, w_bits: int, a_bits: int):
    """``model`` (in place) with every decoder linear fake-quantized per token (activations) and per row (weights)."""
    replace_linears(model, lambda index, name, linear: DynamicPerTokenLinear(linear, w_bits, a_bits))
    return model
