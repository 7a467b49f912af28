"""Per-channel activation quantization plans: how each input channel of a linear is shifted and scaled.

A plan for an input of K channels describes

    x_folded = x / fold                                  (folded upstream: RMSNorm gamma, v_proj rows, up_proj rows)
    q = clamp(round(x_folded * inv_scale - shift))       (inv_scale / shift as stored in the checkpoint, or None)

so a channel's quantization step is s = fold / inv_scale, and the linear's weight columns become W * diag(s).
Shifts are integers (in quantized units), which keeps exact zero representable: x = 0 maps to q = -shift exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from vllm_outliertune.format import guard_scale, qrange
from vllm_outliertune.offline.calibrate import InputStats

# Channels whose step would be below this fraction of the layer's largest step get this floor instead: keeps
# gamma / s and the folded rows finite in fp16 and the weight columns of dead channels harmless.
_MIN_STEP_FRACTION = 2.0 ** -12


@dataclasses.dataclass
class ChannelPlan:
    fold: torch.Tensor                 # [K] float32, divides the input upstream (ones when nothing is folded)
    inv_scale: torch.Tensor | None     # [K] float32 stored as input_inv_scale, or None (all ones)
    shift: torch.Tensor | None         # [K] float32 integer-valued, quantized units, or None
    # Channel indices that bypass quantization (step 1, shift 0, their weight columns in a floating-point side
    # GEMM), or None.
    exact: torch.Tensor | None = None

    @property
    def step(self) -> torch.Tensor:
        return self.fold if self.inv_scale is None else self.fold / self.inv_scale

    def fake_quantize(self, x: torch.Tensor, bits: int, token_guard: bool = False,
                      guard_floor: float = 1.0) -> torch.Tensor:
        """x -> dequantized x, in the input's original units (for searches and tests); exact channels unchanged.
        ``token_guard``: each token (row) u = x / step - shift is rounded at t = max(guard_floor, max u / (qmax +
        1/2), min u / (qmin - 1/2)) times the step, as a checkpoint with quantization_config.token_guard (and
        token_guard_floor) computes it (kernels/torch_ref)."""
        qmin, qmax = qrange(bits)
        step = self.step.to(x.device)
        shift = 0.0 if self.shift is None else self.shift.to(x.device)
        units = x / step - shift
        if token_guard:
            t = guard_scale(units, bits, guard_floor)
            out = (torch.round(units / t).clamp(qmin, qmax) * t + shift) * step
        else:
            out = (torch.round(units).clamp(qmin, qmax) + shift) * step
        if self.exact is not None:
            out[..., self.exact] = x[..., self.exact]
        return out


def outlier_channels(stats: InputStats, count: int, factor: float) -> torch.Tensor | None:
    """Up to ``count`` channels whose calibrated range (max - min, including 0) is over ``factor`` times the median
    channel range, widest first; None when there is none."""
    lo, hi = ranges(stats)
    width = hi - lo
    order = width.argsort(descending=True)[:count]
    chosen = order[width[order] > factor * float(width.median())]
    return chosen.sort().values if chosen.numel() else None


def with_exact(plan: ChannelPlan, exact: torch.Tensor | None) -> ChannelPlan:
    """``plan`` with channels ``exact`` left unquantized: step 1 and shift 0 there (nothing folded for them)."""
    if exact is None:
        return plan
    fold = plan.fold.clone()
    fold[exact] = 1.0
    inv_scale = None if plan.inv_scale is None else plan.inv_scale.clone().index_fill_(0, exact, 1.0)
    shift = None if plan.shift is None else plan.shift.clone().index_fill_(0, exact, 0.0)
    return ChannelPlan(fold, inv_scale, shift, exact)


def group_max(vector: torch.Tensor, group_size: int, head_dim: int) -> torch.Tensor:
    """Each entry replaced by the largest of its position across the q-heads that share one kv head (GQA)."""
    grouped = vector.view(-1, group_size, head_dim)
    return grouped.amax(dim=1, keepdim=True).expand_as(grouped).reshape(vector.shape).clone()


def _same(step: torch.Tensor) -> torch.Tensor:
    return step


def _floored(step: torch.Tensor, median_floor: float = 0.0) -> torch.Tensor:
    """``step`` at least _MIN_STEP_FRACTION of its largest entry, then (``median_floor`` > 0) at least that fraction
    of its median."""
    top = float(step.max()) if step.numel() else 0.0
    if not top > 0:  # every channel is exactly zero: any step works
        return torch.ones_like(step)
    step = step.clamp(min=top * _MIN_STEP_FRACTION)
    return step if median_floor == 0 else step.clamp(min=float(step.median()) * median_floor)


def ranges(stats: InputStats, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [lo, hi] containing 0, shrunk by ``clip`` (1.0 = the full calibration range)."""
    return stats.min.clamp(max=0) * clip, stats.max.clamp(min=0) * clip


def integer_shift(lo: torch.Tensor, hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Integer shift that centres [lo, hi] / step in the quantized range."""
    return torch.round((lo + hi) / (2 * step))


def per_channel(stats: InputStats, bits: int, shift: bool = True, clip: float = 1.0,
                median_floor: float = 0.0) -> ChannelPlan:
    """Each channel gets its own step, folded upstream; with ``shift`` the range is centred by an integer shift so
    the full 2^bits levels cover [lo, hi] (one level spare for the rounding of the shift). ``median_floor``: no step
    below that fraction of the median step (SearchGrid.step_floor)."""
    lo, hi = ranges(stats, clip)
    qmin, qmax = qrange(bits)
    if shift:
        step = _floored((hi - lo) / (qmax - qmin - 1), median_floor)
        return ChannelPlan(step, None, integer_shift(lo, hi, step))
    step = _floored(torch.maximum(-lo / -qmin, hi / qmax), median_floor)
    return ChannelPlan(step, None, None)


def balanced(stats: InputStats, weight: torch.Tensor, bits: int, alpha: float, strength: float, clip: float,
             shift: bool, share: Callable[[torch.Tensor], torch.Tensor] = _same,
             median_floor: float = 0.0) -> ChannelPlan:
    """Per-channel steps balanced between activations and the folded weight columns:

        s_j = max(floor_j, strength * m * rms(x_j)^alpha / |W_:,j|^(1-alpha))

    floor_j is the step that fits the (clipped) channel range in the integer range (so ``strength`` 0 is
    ``per_channel``); raising a channel's step above it shrinks its activation in integer units, which lowers the
    error of the per-row weight quantization, at the cost of activation resolution. m = median of floor_j / g_j puts
    ``strength`` on a scale comparable between layers. ``share`` makes steps equal where they must be (o_proj
    under GQA: symmetrize.group_max); it can only raise a step, so nothing starts clipping. ``median_floor``: no
    step below that fraction of the median step (SearchGrid.step_floor)."""
    floor = per_channel(stats, bits, shift=shift, clip=clip, median_floor=median_floor).step
    # Plans live where the statistics are (the CPU); the weight may be on the calibration device.
    column = weight.detach().float().norm(dim=0).clamp(min=1e-8).to(floor.device)
    target = stats.rms.clamp(min=1e-8).pow(alpha) / column.pow(1 - alpha)
    step = torch.maximum(floor, strength * float((floor / target).median()) * target)
    return _with_steps(stats, share(_floored(step, median_floor)), clip, shift)


def evened(stats: InputStats, bits: int, evenness: float, clip: float, shift: bool,
           share: Callable[[torch.Tensor], torch.Tensor] = _same, median_floor: float = 0.0) -> ChannelPlan:
    """Per-channel steps moved toward one step for every channel: s_j = floor_j^(1 - evenness) * max(floor)^evenness,
    floor being ``per_channel``'s steps (evenness 0: per channel; 1: one step per tensor). Folded into the weight, a
    common step leaves the weight's columns as they are, which 4-bit group rounding can prefer to columns scaled by
    each channel's range (docs/accuracy.md, "Evened plans"). s_j >= floor_j: nothing clips beyond ``clip``."""
    floor = per_channel(stats, bits, shift=shift, clip=clip, median_floor=median_floor).step
    return _with_steps(stats, share(floor.pow(1 - evenness) * float(floor.max()) ** evenness), clip, shift)


def _with_steps(stats: InputStats, step: torch.Tensor, clip: float, shift: bool) -> ChannelPlan:
    """The plan of these steps, with the integer shift that centres each (clipped) channel range if ``shift``."""
    if not shift:
        return ChannelPlan(step, None, None)
    lo, hi = ranges(stats, clip)
    return ChannelPlan(step, None, integer_shift(lo, hi, step))


def per_tensor(stats: InputStats, bits: int) -> ChannelPlan:
    """Static per-tensor absmax, no shift: every entry of input_inv_scale is equal."""
    _, qmax = qrange(bits)
    absmax = float(torch.maximum(-stats.min, stats.max).max())
    step = absmax / qmax if absmax > 0 else 1.0
    return ChannelPlan(torch.ones_like(stats.min), torch.full_like(stats.min, 1.0 / step), None)


def smoothquant(stats: InputStats, weight_col_absmax: torch.Tensor, bits: int, alpha: float = 0.5,
                share: Callable[[torch.Tensor], torch.Tensor] = _same) -> ChannelPlan:
    """SmoothQuant: migrate difficulty with m = a^alpha / w^(1-alpha) folded upstream, then static per-tensor absmax
    of x / m (no shift)."""
    act = torch.maximum(-stats.min, stats.max).clamp(min=1e-5)
    weight = weight_col_absmax.detach().float().clamp(min=1e-5).to(stats.max.device)
    migration = share((act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=1e-5))
    _, qmax = qrange(bits)
    absmax = float((act / migration).max())
    step = absmax / qmax if absmax > 0 else 1.0
    return ChannelPlan(migration, torch.full_like(migration, 1.0 / step), None)


def share_within_groups(stats: InputStats, group_size: int, head_dim: int) -> InputStats:
    """Stats of o_proj's input made identical across the q-heads that share one kv head (GQA): o_proj's scale and
    shift fold into v_proj rows, and one v row serves ``group_size`` q-heads."""
    if group_size == 1:
        return stats

    def reduce(t: torch.Tensor, op) -> torch.Tensor:
        grouped = t.view(-1, group_size, head_dim)  # [kv_heads, group, head_dim]
        return op(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(t.shape).clone()

    return InputStats(min=reduce(stats.min, lambda t, **kw: t.amin(**kw)),
                      max=reduce(stats.max, lambda t, **kw: t.amax(**kw)),
                      sum_sq=reduce(stats.sum_sq, lambda t, **kw: t.amax(**kw)),
                      count=stats.count, sample=stats.sample, gram=stats.gram)
