"""The entry points the plugin calls: quantized_linear (float activations in), int8_gemm (int8 codes in),
their packed 4-bit weight versions w4a8_linear / w4a8_gemm, and quantize_activation, registered as torch custom
ops (namespace "outliertune_kernels") with fake implementations
so torch.compile and CUDA graphs capture them. Importable without Triton: CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1) run the Triton kernels, everything else the exact torch reference."""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch

from vllm_outliertune.kernels import torch_ref
from vllm_outliertune.kernels.w4a8_words import pack_words
from vllm_outliertune.kernels.configs import (
    EXTERNAL_KERNELS,
    KERNELS,
    W4A8_KERNELS,
    get_config,
    kernels_for,
    listed_buckets,
    table_keys,
)

# Read once, like triton.jit does when it decorates the kernels at import.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _runs_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (_TRITON_INTERPRET and t.device.type == "cpu")


@functools.cache
def _triton() -> SimpleNamespace:
    """The Triton kernels, imported on first use so that CPU-only installs without Triton keep the torch path."""
    from vllm_outliertune.kernels.act_quant import guard_fixup, quantize_activation, quantize_activation_guarded
    from vllm_outliertune.kernels.int8_gemm import int8_gemm
    from vllm_outliertune.kernels.int8_gemm_tma import int8_gemm_tma, supports_tma
    from vllm_outliertune.kernels.splitk_gemm import splitk_gemm
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm
    from vllm_outliertune.kernels.w4a8_unpack import unpack_levels
    return SimpleNamespace(quantize_activation=quantize_activation,
                           quantize_activation_guarded=quantize_activation_guarded, guard_fixup=guard_fixup,
                           int8_gemm=int8_gemm,
                           splitk_gemm=splitk_gemm,
                           int8_gemm_tma=int8_gemm_tma, supports_tma=supports_tma, w4a8_gemm=w4a8_gemm,
                           unpack_levels=unpack_levels)


class ExternalGemm(NamedTuple):
    """A GEMM of another library with our contract: run(a_q, w_q, w_scale, bias, out_dtype, row_scale) -> out [M, N];
    supports(a_q, w_q, out_dtype) says whether it takes these operands."""
    run: Callable[..., torch.Tensor]
    supports: Callable[[torch.Tensor, torch.Tensor, torch.dtype], bool]


_EXTERNAL_GEMMS: dict[str, ExternalGemm] = {}


def register_external_gemm(name: str, gemm: ExternalGemm) -> None:
    """Make `name` (one of configs.EXTERNAL_KERNELS) a backend the dispatch runs where the tile table lists it (the
    vLLM glue registers vLLM's CUTLASS GEMM; kernels/ itself imports no vLLM)."""
    if name not in EXTERNAL_KERNELS:
        raise ValueError(f"unknown external GEMM {name!r}; the table knows {EXTERNAL_KERNELS}")
    _EXTERNAL_GEMMS[name] = gemm


def external_gemms() -> dict[str, ExternalGemm]:
    return dict(_EXTERNAL_GEMMS)


def _pick_kernel(m: int, n: int, k: int, keys: tuple[str, ...], tma_ok: Callable[[], bool],
                 external_ok: Callable[[str], bool] = lambda name: False) -> str:
    """The kernel the tile table routes M rows of this shape to: the first one the table lists at M's bucket
    (configs.kernels_for) that runs here (an external GEMM: registered and taking these operands; TMA: where the
    operands allow it), else the tiled GEMM."""
    for kernel in kernels_for(m, n, k, keys):
        if (kernel == "splitk_gemm" or (kernel == "int8_gemm_tma" and tma_ok())
                or (kernel in _EXTERNAL_GEMMS and external_ok(kernel))):
            return kernel
    return "int8_gemm"


def _quantize(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
              bits: int) -> torch.Tensor:
    if _runs_triton(x):
        return _triton().quantize_activation(x, inv_scale, shift, bits)
    return torch_ref.quantize_activation_ref(x, inv_scale, shift, bits)


def _gemm(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
          out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in; scaled float out (times row_scale[m] where given: the token guard's t) on the kernel the tile
    table picks for this M, or the raw int32 accumulator (w_scale None); the exact torch reference where Triton does
    not run."""
    if not _runs_triton(a_q):
        if w_scale is None:
            return torch_ref.int_mm_exact(a_q, w_q)
        return torch_ref.int8_gemm_ref(a_q, w_q, w_scale, bias, out_dtype, row_scale)
    kernels = _triton()
    if w_scale is None or out_dtype == torch.int32:
        return kernels.int8_gemm(a_q, w_q, w_scale, bias, out_dtype, row_scale=row_scale)
    (m, k), n = a_q.shape, w_q.shape[0]
    kernel = _pick_kernel(m, n, k, table_keys(a_q.device), lambda: kernels.supports_tma(a_q, w_q),
                          lambda name: _EXTERNAL_GEMMS[name].supports(a_q, w_q, out_dtype))
    if kernel == "splitk_gemm":
        return kernels.splitk_gemm(a_q, w_q, w_scale, bias, None, None, 8, out_dtype, row_scale=row_scale)
    if kernel in _EXTERNAL_GEMMS:
        return _EXTERNAL_GEMMS[kernel].run(a_q, w_q, w_scale, bias, out_dtype, row_scale)
    return getattr(kernels, kernel)(a_q, w_q, w_scale, bias, out_dtype, row_scale=row_scale)


def _pick_w4a8_kernel(m: int, n: int, k: int, keys: tuple[str, ...]) -> str:
    """The W4A8 kernel the tile table routes M rows of this shape to (every one of them runs everywhere)."""
    return next(iter(kernels_for(m, n, k, keys, "w4a8_gemm")), "w4a8_gemm")


def _w4a8(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
          group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
          row_scale: torch.Tensor | None = None, levels_fit_bytes: bool = True) -> torch.Tensor:
    """int8 codes x packed 4-bit weight: the split-K kernel where the table lists w4a8_splitk at M's bucket, the
    int8 GEMM's dispatch on the widened levels where it lists w4a8_unpack, else the tiled one; the exact torch
    reference where Triton does not run. levels_fit_bytes: format.levels_fit_bytes of the weight."""
    if not _runs_triton(a_q):
        return torch_ref.w4a8_gemm_ref(a_q, w_words, group_scale, group_zero, group_size, w_scale, bias, out_dtype,
                                       row_scale)
    (m, k), n = a_q.shape, w_words.shape[0]
    keys = table_keys(a_q.device)
    kernel = _pick_w4a8_kernel(m, n, k, keys)
    kernels = _triton()
    if kernel == "w4a8_unpack":
        levels = kernels.unpack_levels(w_words, group_scale, group_zero, group_size, k,
                                       get_config(kernel, m, n, k, keys))
        return _gemm(a_q, levels, w_scale, bias, out_dtype, row_scale)
    return kernels.w4a8_gemm(a_q, w_words, group_scale, group_zero, group_size, w_scale, bias, out_dtype, kernel,
                             row_scale=row_scale, levels_fit_bytes=levels_fit_bytes)


def compile_variant(m: int, n: int, k: int, keys: tuple[str, ...], tma_ok: bool, packed: bool = False) -> tuple:
    """What decides which compiled Triton kernel a GEMM of M rows runs: the kernel, its tile, and how Triton
    specialises the integer M (divisible by 16, or equal to 1); for a packed 4-bit weight (``packed``) the W4A8
    kernel's, and after w4a8_unpack also the int8 GEMM's of the widened levels. (Registered external GEMMs count as
    taking the operands: warming them up once is harmless.)"""
    if packed:
        kernel = _pick_w4a8_kernel(m, n, k, keys)
    else:
        kernel = _pick_kernel(m, n, k, keys, lambda: tma_ok, lambda name: True)
    variant = (kernel, tuple(sorted(get_config(kernel, m, n, k, keys).items())), m % 16 == 0, m == 1)
    return variant + compile_variant(m, n, k, keys, tma_ok) if kernel == "w4a8_unpack" else variant


def warmup_rows(n: int, k: int, keys: tuple[str, ...], tma_ok: bool, max_m: int, packed: bool = False) -> list[int]:
    """Row counts that, run once each, compile every kernel variant (compile_variant) that M = 1 .. max_m can
    reach: the variants change only at the table's bucket edges, so the rows next to each edge cover them."""
    edges = {1, max_m}
    for kernel in KERNELS + EXTERNAL_KERNELS + (W4A8_KERNELS if packed else ()):
        edges |= {int(bucket) for bucket in listed_buckets(kernel, n, k, keys)}
    rows: dict[tuple, int] = {}
    for edge in sorted(edges):
        for m in (edge - 1, edge, edge + 1, edge + 16, edge + 17):
            if 1 <= m <= max_m:
                rows.setdefault(compile_variant(m, n, k, keys, tma_ok, packed), m)
    return sorted(rows.values())


class PackedGroups(NamedTuple):
    """What a packed 4-bit weight needs besides its bytes (the w4a8_gemm op's arguments)."""
    group_scale: torch.Tensor
    group_zero: torch.Tensor
    group_size: int
    in_features: int
    levels_fit_bytes: bool = True


def warm_up(w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
            max_m: int, packed: PackedGroups | None = None, guarded: bool = False) -> int:
    """Run the GEMM once at each of warmup_rows() so Triton compiles (or loads from its cache) every variant a
    batch of up to max_m rows can hit now, at load, instead of stalling the first requests of each size. With
    ``packed``, w_q is a packed 4-bit weight and the W4A8 dispatch is warmed; ``guarded``: with the token guard's
    per-row scale in the epilogue (a variant of its own), as the layer runs. Returns the number of GEMMs run (0
    where Triton does not run)."""
    if not _runs_triton(w_q):
        return 0
    n, k = w_q.shape[0], w_q.shape[1] if packed is None else packed.in_features
    keys = table_keys(w_q.device)
    probe = torch.empty((1, k), dtype=torch.int8, device=w_q.device)
    # widened levels are a fresh row-major [N, K] tensor: aligned like the probe
    tma_ok = _triton().supports_tma(probe, probe if packed else w_q)
    rows = warmup_rows(n, k, keys, tma_ok, max_m, packed is not None)
    codes = torch.ones((max(rows), k), dtype=torch.int8, device=w_q.device)  # leading rows: contiguous views
    # float32 explicitly: vLLM loads the model (and warms up) under the model's default dtype, e.g. bfloat16
    row_scales = torch.ones((max(rows), 1), dtype=torch.float32, device=w_q.device) if guarded else None
    for m in rows:
        row_scale = None if row_scales is None else row_scales[:m]
        if packed is None:
            _gemm(codes[:m], w_q, w_scale, bias, out_dtype, row_scale)
        else:
            _w4a8(codes[:m], w_q, packed.group_scale, packed.group_zero, packed.group_size, w_scale, bias, out_dtype,
                  row_scale, packed.levels_fit_bytes)
    return len(rows)


@torch.library.custom_op("outliertune_kernels::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                        bits: int) -> torch.Tensor:
    """x float [M, K] -> int8 [M, K]: clamp(round(x * inv_scale - shift)) in the signed range of `bits`."""
    return _quantize(x, inv_scale, shift, bits)


@quantize_activation.register_fake
def _(x, inv_scale, shift, bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("outliertune_kernels::quantize_activation_guarded", mutates_args=())
def quantize_activation_guarded(x: torch.Tensor, inv_scale: torch.Tensor | None, shift: torch.Tensor | None,
                                bits: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (int8 codes [M, K], t float32 [M, 1]): the per-token overflow guard
    (torch_ref.quantize_activation_guarded_ref) in one pass per row."""
    if _runs_triton(x):
        return _triton().quantize_activation_guarded(x, inv_scale, shift, bits, floor)
    return torch_ref.quantize_activation_guarded_ref(x, inv_scale, shift, bits, floor)


@quantize_activation_guarded.register_fake
def _(x, inv_scale, shift, bits, floor):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("outliertune_kernels::guard_fixup", mutates_args=("codes",))
def guard_fixup(x: torch.Tensor, codes: torch.Tensor, part_scales: torch.Tensor, inv_scale: torch.Tensor | None,
                shift: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The token guard (floor 1) finished after quantization at t = 1: t float32 [M, 1] from the row parts' largest
    guard quotients (torch_ref.row_part_scales), and the codes of rows with t > 1 rewritten in place
    (torch_ref.guard_fixup_ref)."""
    if _runs_triton(x):
        return _triton().guard_fixup(x, codes, part_scales, inv_scale, shift, bits)
    return torch_ref.guard_fixup_ref(x, codes, part_scales, inv_scale, shift, bits)


@guard_fixup.register_fake
def _(x, codes, part_scales, inv_scale, shift, bits):
    return x.new_empty((x.shape[0], 1), dtype=torch.float32)


# The guard in parts (quantize_activation_guarded_in_parts): rows are split into parts of this many channels (or
# the largest power of two dividing K, down to GUARD_MIN_PART_K; below that the row is one part).
GUARD_PART_K = 1024
GUARD_MIN_PART_K = 64
# Traced, the guard in parts beat the guard fused whole into the producer at every row count timed (1 to 2,048)
# where a pointwise producer (SiLU-mul, attention's output) writes rows of 14,336 channels or more, and lost at
# 3,584 - 8,192 below 2,048 rows (H200, bench/guard_cost.py, session 18): its second kernel costs a launch, while
# the fused guard's one-program-per-row reduction grows with K. RMSNorm (a row reduction of its own) was faster
# with the guard fused at every K timed. The variable is read at import; vLLM's compile cache does not see it
# (clear ~/.cache/vllm/torch_compile_cache, or set VLLM_DISABLE_COMPILE_CACHE=1, after changing it).
GUARD_IN_PARTS_MIN_K = int(os.environ.get("OUTLIERTUNE_GUARD_IN_PARTS_MIN_K", 12288))


def traced_guard_in_parts(k: int, floor: float, pointwise_producer: bool) -> bool:
    """Whether a traced layer computes the token guard in parts (quantize_activation_guarded_in_parts) rather
    than as torch ops for inductor to fuse into the producer whole (torch_ref.quantize_activation_guarded_ref):
    for rows of k channels written by a pointwise producer, with floor 1 (a floor below 1 rescales every row)."""
    return pointwise_producer and floor == 1.0 and k >= GUARD_IN_PARTS_MIN_K


def guard_parts(k: int) -> int:
    """How many equal parts quantize_activation_guarded_in_parts splits a row of k channels into."""
    part = math.gcd(k, GUARD_PART_K)
    return k // part if part >= GUARD_MIN_PART_K else 1


def quantize_activation_guarded_in_parts(x: torch.Tensor, inv_scale: torch.Tensor | None,
                                         shift: torch.Tensor | None, bits: int,
                                         parts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation_guarded (floor 1) as torch ops for inductor to fuse into the producer of x, and one
    small op after it: the producer's kernel writes x, the codes at t = 1 and each row part's largest guard quotient
    (one reduction per part), all parallel over the row's parts; guard_fixup then reads those, and only rows beyond
    the plan's range (t > 1) are quantized again. The same codes and t as quantize_activation_guarded_ref."""
    part_scales = torch_ref.row_part_scales(x, inv_scale, shift, bits, parts or guard_parts(x.shape[-1]))
    codes = torch_ref.quantize_activation_ref(x, inv_scale, shift, bits)
    return codes, guard_fixup(x, codes, part_scales, inv_scale, shift, bits)


@torch.library.custom_op("outliertune_kernels::int8_gemm", mutates_args=())
def int8_gemm(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
              out_dtype: torch.dtype, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """a_q int8 [M, K] @ w_q int8 [N, K]^T (int32) * w_scale[n] (* row_scale[m]) (+ bias[n]) -> out_dtype [M, N];
    with out_dtype=torch.int32 and w_scale=None, the raw int32 accumulator. Small M (where the tile table lists the
    split-K kernel) streams the weights with split-K, large M on Hopper runs the persistent TMA GEMM where the table
    lists it, the rest the tiled GEMM. row_scale (float32, one per row): the token guard's t."""
    return _gemm(a_q, w_q, w_scale, bias, out_dtype, row_scale)


@int8_gemm.register_fake
def _(a_q, w_q, w_scale, bias, out_dtype, row_scale=None):
    return a_q.new_empty((a_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("outliertune_kernels::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     inv_scale: torch.Tensor | None, shift: torch.Tensor | None, act_bits: int,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """y = w_scale * (quantize(x) @ w_q^T) + bias for x float [..., K], w_q int8 [N, K] -> out_dtype [..., N]: the
    eager path (the compiled plugin fuses the quantization upstream and calls int8_gemm). One quantization pass, then
    the GEMM the table picks: the split-K tiles are tuned on int8 codes, and with them quantizing inside the split-K
    prologue measured slower at M = 1 (qkv 39.2 µs vs 18.6 µs for the GEMM on codes, H100)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    out = _gemm(_quantize(x2, inv_scale, shift, act_bits), w_q, w_scale, bias, out_dtype)
    return out.view(*x.shape[:-1], w_q.shape[0])


@quantized_linear.register_fake
def _(x, w_q, w_scale, bias, inv_scale, shift, act_bits, out_dtype):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=out_dtype)


def w4a8_gpu_layout(operand: torch.Tensor) -> torch.Tensor:
    """A packed weight's words [N, K/8] or its group scales / zeros [N, groups] as the W4A8 kernels read them
    fastest on a GPU: stored N-major, so one K position is contiguous across output channels and a tile's loads
    vectorize (gemlite stores its packed weights so too). Row-major tiles gather single words along K."""
    return operand.t().contiguous().t()


def w4a8_gpu_words(w_packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """A checkpoint's packed weight uint8 [N, ceil(K/2)] as the W4A8 ops take it on a GPU: int32 words of 8
    channels (w4a8_words.pack_words), N-major."""
    return w4a8_gpu_layout(pack_words(w_packed, in_features))


@torch.library.custom_op("outliertune_kernels::w4a8_gemm", mutates_args=())
def w4a8_gemm(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
              group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype, row_scale: torch.Tensor | None = None,
              levels_fit_bytes: bool = True) -> torch.Tensor:
    """a_q int8 [M, K] @ levels^T (int32) * w_scale[n] (* row_scale[m]) (+ bias[n]) -> out_dtype [M, N], where
    levels = (code - group_zero) * group_scale are the int8 weights that a packed weight in int32 words [N,
    ceil(K/8)] (w4a8_gpu_words) stands for (vllm_outliertune.format.packed_levels of the checkpoint's bytes).
    levels_fit_bytes: format.levels_fit_bytes of the weight (False keeps the kernels off the loop that needs it)."""
    return _w4a8(a_q, w_words, group_scale, group_zero, group_size, w_scale, bias, out_dtype, row_scale,
                 levels_fit_bytes)


@w4a8_gemm.register_fake
def _(a_q, w_words, group_scale, group_zero, group_size, w_scale, bias, out_dtype, row_scale=None,
      levels_fit_bytes=True):
    return a_q.new_empty((a_q.shape[0], w_words.shape[0]), dtype=out_dtype)


@torch.library.custom_op("outliertune_kernels::w4a8_linear", mutates_args=())
def w4a8_linear(x: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
                group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, inv_scale: torch.Tensor | None,
                shift: torch.Tensor | None, act_bits: int, out_dtype: torch.dtype,
                levels_fit_bytes: bool = True) -> torch.Tensor:
    """quantized_linear with a packed 4-bit weight: one quantization pass, then w4a8_gemm's dispatch."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    out = _w4a8(_quantize(x2, inv_scale, shift, act_bits), w_words, group_scale, group_zero, group_size, w_scale,
                bias, out_dtype, levels_fit_bytes=levels_fit_bytes)
    return out.view(*x.shape[:-1], w_words.shape[0])


@w4a8_linear.register_fake
def _(x, w_words, group_scale, group_zero, group_size, w_scale, bias, inv_scale, shift, act_bits, out_dtype,
      levels_fit_bytes=True):
    return x.new_empty((*x.shape[:-1], w_words.shape[0]), dtype=out_dtype)
