"""Weight quantization and the checkpoint tensors of one folded linear.

Two weight formats (vllm_outliertune.format): per output row into int8 storage (8/6 bits; format 1's 4 bits), and
packed 4-bit codes with integer group scales (format 2, `weight_bits` 4). Both can be rounded to nearest (RTN) or
with GPTQ's error compensation (each column's rounding error is pushed onto the columns not yet rounded, through
the inverse Hessian of the layer's calibration inputs)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from vllm_outliertune.format import PACKED_CODE_MAX, QuantizationConfig, group_count, pack_int4, weight_qmax
from vllm_outliertune.offline.fold import FoldedLinear


def quantize_weight(weight: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (int8 [N, K] in ±weight_qmax(bits), float32 scale [N]); ``clip`` (a number or one per row)
    < 1 shrinks a row's range (values beyond it saturate). All-zero rows get scale 1."""
    scale = row_scale(weight, bits, clip)
    q = torch.round(weight.float() / scale[:, None]).clamp_(-weight_qmax(bits), weight_qmax(bits)).to(torch.int8)
    return q, scale


def row_scale(weight: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    absmax = weight.float().abs().amax(dim=1) * clip
    return torch.where(absmax > 0, absmax / weight_qmax(bits), torch.ones_like(absmax))


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


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a linear's weight is stored: per output row in int8 (group_size None), or packed 4-bit codes with an
    integer scale and zero point per group of group_size input channels (0: one group per row)."""

    bits: int
    group_size: int | None = None

    @classmethod
    def of(cls, config: QuantizationConfig) -> "WeightFormat":
        return cls(config.weight_bits, config.group_size if config.packed else None)

    @property
    def packed(self) -> bool:
        return self.group_size is not None

    def block_size(self, in_features: int) -> int:
        """Columns that share quantization parameters; GPTQ's blocks follow them."""
        return in_features if self.group_size == 0 else (self.group_size or 128)


@dataclasses.dataclass
class QuantizedWeight:
    levels: torch.Tensor                    # int8 [N, K]: what the integer GEMM multiplies
    scale: torch.Tensor                     # float32 [N]: weight ≈ levels * scale[:, None]
    codes: torch.Tensor | None = None       # packed format: uint8 [N, K] codes 0..15
    group_scale: torch.Tensor | None = None  # uint8 [N, groups]
    group_zero: torch.Tensor | None = None   # uint8 [N, groups]

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.levels, self.scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.codes is None:
            return {"weight": self.levels, "weight_scale": self.scale}
        return {"weight": pack_int4(self.codes), "weight_scale": self.scale, "weight_group_scale": self.group_scale,
                "weight_group_zero": self.group_zero}


class _RowQuantizer:
    """Per-row symmetric rounding with fixed row scales."""

    def __init__(self, weight: torch.Tensor, bits: int, clip: float | torch.Tensor):
        self.qmax = weight_qmax(bits)
        self.scale = row_scale(weight, bits, clip)
        self.levels = torch.zeros(weight.shape, dtype=torch.int8, device=weight.device)

    def start_block(self, start: int, columns: torch.Tensor, power: torch.Tensor) -> None:
        pass

    def round(self, start: int, columns: torch.Tensor) -> torch.Tensor:
        levels = torch.round(columns / self.scale[:, None]).clamp_(-self.qmax, self.qmax)
        self.levels[:, start:start + columns.shape[1]] = levels.to(torch.int8)
        return levels * self.scale[:, None]

    def result(self) -> QuantizedWeight:
        return QuantizedWeight(self.levels, self.scale)


@dataclasses.dataclass(frozen=True)
class GroupSearch:
    """The candidates for a 4-bit group's integer scale and zero: scale steps relative to the smallest covering
    scale (0 covers the group's range, -1 clips it), zero steps relative to the zero that centres the range; and
    how GPTQ scores them per row: "power" (rounding error weighted by the Hessian diagonal), "hessian" (e H e^T
    with the group's Hessian block) or "gptq" (GPTQ's own loss over the group: its columns rounded with each
    candidate and the error compensated inside the group, as the real pass does)."""

    scale_steps: tuple[int, ...]
    zero_steps: tuple[int, ...]
    score: str


# --group-clip: how a 4-bit group's integer scale and zero are chosen with GPTQ (round to nearest, which the plan
# search uses, keeps "diagonal"; so does one group per row, --group-size 0, whose K x K block costs much). "diagonal":
# covering or one step clipped, by the power-weighted rounding error (the first W4A8 passes). "hessian" and "gptq":
# up to two steps clipped and the zero moved by one either way (9 candidates), scored through the Hessian block or
# by running GPTQ over the group with each (9 GPTQ passes over the weight: the quantize's GPTQ part costs ~8x).
# SmolLM2 W4A8 g128 (docs/accuracy.md, "Group clipping by output error"), Brown 10 windows: diagonal 55.56,
# hessian 54.93, gptq 54.54.
GROUP_SEARCHES = {"diagonal": GroupSearch((0, -1), (0,), "power"),
                  "hessian": GroupSearch((0, -1, -2), (-1, 0, 1), "hessian"),
                  "gptq": GroupSearch((0, -1, -2), (-1, 0, 1), "gptq")}
DEFAULT_GROUP_CLIP = "gptq"


class _PackedQuantizer:
    """Progressive 4-bit quantization (QServe-style). Each row has a float unit: absmax / 127 (an int8 grid), or with
    group_size 0 its range / 15. Each group then gets an integer scale s and zero z, codes c = round(w / (unit * s)) + z
    in 0..15, clamped so that every int8 level (c - z) * s stays in [-128, 127]. Codes are rounded from the float
    weight directly (not from an intermediate int8 rounding), and kept at most 255 / s, so that code * s fits a byte
    (format.levels_fit_bytes, the GPU's SCALED_LEVELS loop): that binds only where GPTQ's updated columns need s >= 18."""

    def __init__(self, weight: torch.Tensor, group_size: int, search: GroupSearch | None = None):
        n, k = weight.shape
        self.group_size = group_size or k
        self.search = search or GROUP_SEARCHES["diagonal"]
        if group_size == 0:
            lo, hi = weight.amin(1).clamp(max=0), weight.amax(1).clamp(min=0)
            unit = (hi - lo) / PACKED_CODE_MAX
        else:
            unit = weight.abs().amax(1) / 127
        self.unit = torch.where(unit > 0, unit, torch.ones_like(unit)).float()
        groups = group_count(k, group_size)
        self.codes = torch.zeros((n, k), dtype=torch.uint8, device=weight.device)
        self.group_scale = torch.ones((n, groups), dtype=torch.uint8, device=weight.device)
        self.group_zero = torch.zeros((n, groups), dtype=torch.uint8, device=weight.device)

    @staticmethod
    def _codes(units: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        low = (zero - torch.floor(128 / scale)).clamp(min=0)
        high = torch.minimum(zero + torch.floor(127 / scale), torch.floor(255 / scale)).clamp(max=PACKED_CODE_MAX)
        return torch.minimum(torch.maximum(torch.round(units / scale) + zero, low), high)

    def candidates(self, columns: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The search's (integer scale, zero) candidates [N, 1] for a group whose (current) columns are given."""
        units = columns / self.unit[:, None]
        lo, hi = units.amin(1, keepdim=True).clamp(max=0), units.amax(1, keepdim=True).clamp(min=0)
        covering = torch.ceil((hi - lo) / PACKED_CODE_MAX - 1e-3).clamp(min=1)
        for step in self.search.scale_steps:
            scale = (covering + step).clamp(min=1)
            for zero_step in self.search.zero_steps:
                yield scale, (torch.round(-lo / scale) + zero_step).clamp(0, PACKED_CODE_MAX)

    def set_group(self, start: int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        group = start // self.group_size
        self.group_scale[:, group] = scale[:, 0].to(torch.uint8)
        self.group_zero[:, group] = zero[:, 0].to(torch.uint8)

    def start_block(self, start: int, columns: torch.Tensor, weighting: torch.Tensor) -> None:
        """Choose the integer scale and zero of the group starting at ``start`` from its (current) columns: among
        the candidates, per row the one with the least rounding error e weighted by ``weighting``: the inputs' mean
        squares [g] (sum_k e_k^2 w_k) or, with score "hessian", the Hessian block [g, g] of these columns (e H e^T:
        the output error, cross terms between the group's columns included; else its diagonal)."""
        if start % self.group_size:
            return
        if weighting.dim() == 2 and self.search.score != "hessian":
            weighting = weighting.diagonal().clone()
        units = columns / self.unit[:, None]
        best = None
        for scale, zero in self.candidates(columns):
            rounding = (self._codes(units, scale, zero) - zero) * scale - units
            error = ((rounding @ weighting) * rounding).sum(1, keepdim=True) if weighting.dim() == 2 \
                else (rounding.pow(2) @ weighting)[:, None]
            best = _better(best, error, scale, zero)
        self.set_group(start, best[1], best[2])

    def round(self, start: int, columns: torch.Tensor) -> torch.Tensor:
        index = torch.arange(start, start + columns.shape[1], device=columns.device) // self.group_size
        scale, zero = self.group_scale[:, index].float(), self.group_zero[:, index].float()
        codes = self._codes(columns / self.unit[:, None], scale, zero)
        self.codes[:, start:start + columns.shape[1]] = codes.to(torch.uint8)
        return (codes - zero) * scale * self.unit[:, None]

    def result(self) -> QuantizedWeight:
        index = torch.arange(self.codes.shape[1], device=self.codes.device) // self.group_size
        levels = (self.codes.to(torch.int16) - self.group_zero[:, index].to(torch.int16)) \
            * self.group_scale[:, index].to(torch.int16)
        return QuantizedWeight(levels.to(torch.int8), self.unit, self.codes, self.group_scale, self.group_zero)


def _better(best: tuple | None, error: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple:
    """(error, scale, zero) [N, 1] each, per row the candidate of least error of ``best`` and the new one."""
    if best is None:
        return error, scale, zero
    better = error < best[0]
    return (torch.minimum(error, best[0]), torch.where(better, scale, best[1]), torch.where(better, zero, best[2]))


def _quantizer(weight: torch.Tensor, weight_format: WeightFormat, clip: float | torch.Tensor,
               search: GroupSearch | None = None):
    if weight_format.packed:
        return _PackedQuantizer(weight, weight_format.group_size, search)
    return _RowQuantizer(weight, weight_format.bits, clip)


def quantize_rtn(weight: torch.Tensor, weight_format: WeightFormat, clip: float | torch.Tensor = 1.0,
                 input_power: torch.Tensor | None = None) -> QuantizedWeight:
    """Round to nearest. ``clip`` applies to per-row formats; ``input_power`` ([K], E[x_k^2] as the GEMM sees x)
    weights the packed format's choice of group scales (uniform when None)."""
    weight = weight.float()
    power = torch.ones(weight.shape[1], device=weight.device) if input_power is None else input_power.to(weight)
    quantizer = _quantizer(weight, weight_format, clip)
    block = weight_format.block_size(weight.shape[1])
    for start in range(0, weight.shape[1], block):
        columns = weight[:, start:start + block]
        quantizer.start_block(start, columns, power[start:start + block])
        quantizer.round(start, columns)
    return quantizer.result()


GPTQ_DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's default)


@torch.no_grad()
def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, weight_format: WeightFormat,
                  clip: float | torch.Tensor = 1.0, damping: float = GPTQ_DAMPING,
                  group_clip: str = DEFAULT_GROUP_CLIP) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): columns are rounded left to right and each one's error, divided by its
    inverse-Hessian pivot, is subtracted from the remaining columns along the Cholesky factor of H^-1, which
    minimises ||(W - Q) X^T||^2 for the layer inputs X with H = X^T X (``hessian`` [K, K], inputs as the GEMM sees
    them). Group parameters are chosen when GPTQ reaches a group, from the updated weights, as ``group_clip``
    (GROUP_SEARCHES) says; row scales (per-row formats) before it starts, from ``clip``."""
    if group_clip not in GROUP_SEARCHES:
        raise ValueError(f"group_clip {group_clip!r}: choose one of {', '.join(GROUP_SEARCHES)}")
    weight = weight.float().clone()
    k = weight.shape[1]
    hessian = hessian.to(weight).clone()
    dead = hessian.diagonal() == 0  # channels never active: their weights do not matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian.diagonal().add_(damping * float(hessian.diagonal().mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    search = GROUP_SEARCHES[group_clip if weight_format.group_size else "diagonal"]
    quantizer = _quantizer(weight, weight_format, clip, search)
    block = weight_format.block_size(k) if weight_format.packed else 128
    for start in range(0, k, block):
        end = min(start + block, k)
        factor = upper[start:end, start:end]
        if weight_format.packed and search.score == "gptq":
            best = None
            for scale, zero in quantizer.candidates(weight[:, start:end]):
                quantizer.set_group(start, scale, zero)
                loss = _gptq_block(quantizer, start, weight[:, start:end].clone(), factor).pow(2).sum(1, keepdim=True)
                best = _better(best, loss, scale, zero)
            quantizer.set_group(start, best[1], best[2])
        else:
            quantizer.start_block(start, weight[:, start:end], hessian[start:end, start:end])
        errors = _gptq_block(quantizer, start, weight[:, start:end].clone(), factor)
        weight[:, end:] -= errors @ upper[start:end, end:]
    return quantizer.result()


def _gptq_block(quantizer, start: int, columns: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """GPTQ over the block of ``columns`` (modified) starting at column ``start``: rounds them through
    ``quantizer`` and returns each one's error divided by its pivot (their squares sum to the loss this block adds;
    their product with the Cholesky factor's rows beyond the block updates the later columns)."""
    errors = torch.zeros_like(columns)
    for i in range(columns.shape[1]):
        rounded = quantizer.round(start + i, columns[:, i:i + 1])[:, 0]
        error = (columns[:, i] - rounded) / factor[i, i]
        columns[:, i:] -= error[:, None] * factor[i, i:][None, :]
        errors[:, i] = error
    return errors


def input_hessian(gram: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """H = X'^T X' for the GEMM's input X' = X / step (the folded weight is W * diag(step)), from the Gram matrix
    X^T X of the calibration inputs."""
    inverse = 1.0 / step.double().to(gram.device)
    return (gram.double() * inverse[:, None] * inverse[None, :]).float()


def checkpoint_tensors(folded: FoldedLinear, quantized: QuantizedWeight, model_dtype: torch.dtype,
                       exact_slots: int = 0) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one linear (CPU). output_bias uses the *quantized* weight, so the shift correction
    matches what the integer GEMM computes. With ``exact_slots`` (quantization_config.exact_channels), the folded
    weight columns of ``folded.exact`` go to exact_weight (unused slots: channel 0, zero column)."""
    n = quantized.levels.shape[0]
    output_bias = torch.zeros(n, dtype=torch.float32, device=quantized.levels.device)
    if folded.correction_shift is not None:
        output_bias += quantized.dequantize() @ folded.correction_shift
    if folded.row_bias is not None:
        output_bias += folded.row_bias
    tensors = {**quantized.tensors(), "output_bias": output_bias}
    if folded.bias is not None:
        tensors["bias"] = folded.bias.to(model_dtype)
    if folded.inv_scale is not None:
        tensors["input_inv_scale"] = folded.inv_scale
    if folded.input_shift is not None and bool(folded.input_shift.any()):
        tensors["input_shift"] = folded.input_shift
    if exact_slots:
        exact = folded.exact if folded.exact is not None else torch.zeros(0, dtype=torch.long)
        if exact.numel() > exact_slots:
            raise ValueError(f"{exact.numel()} exact channels do not fit in {exact_slots} slots")
        tensors["exact_index"] = torch.zeros(exact_slots, dtype=torch.int32)
        tensors["exact_index"][:exact.numel()] = exact.to(torch.int32)
        tensors["exact_weight"] = torch.zeros(n, exact_slots, dtype=torch.float32, device=folded.weight.device)
        tensors["exact_weight"][:, :exact.numel()] = folded.weight[:, exact.to(folded.weight.device)]
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in tensors.items()}


def fake_quantize(weight: torch.Tensor, weight_format: WeightFormat,
                  input_power: torch.Tensor | None = None) -> torch.Tensor:
    """weight -> its RTN-quantized-and-dequantized copy (for searches and error measurements)."""
    return quantize_rtn(weight, weight_format, input_power=input_power).dequantize()


