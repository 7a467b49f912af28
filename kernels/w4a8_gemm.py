"""W4A8 GEMM: int8 activation codes x packed 4-bit weights with integer group scales, int32 accumulation, the
per-output-channel scale + bias epilogue of the int8 GEMMs.

The weight comes as int32 words [N, ceil(K/8)] (kernels/w4a8_words.py: 8 consecutive channels per word; rows or
columns contiguous: the plugin stores them N-major on the GPU, linear.w4a8_gpu_layout); the int8 weight level of
channel k is (code - zero[n, g]) * scale[n, g] for g = k // group_size (vllm_outliertune.format). Four loops:
- DP4A (tiles inside one group, BLOCK_M < 16, activation rows viewable as int32 words): the decode loop. Each weight
  word meets two activation words in two dp4a (low nibbles: channels 8j..8j+3, high: 8j+4..8j+7), and the group
  terms apply per output: (sum a * code - zero * sum a) * scale, the same integer. About 5 integer instructions per
  8 weights; the byte layout before needed ~16 (H200, Llama-3-8B shapes: W4A8 GEMVs at 0.75-0.80x the int8 GEMV's
  speed, bound by that work at a marginal 1.4 TB/s). With ACC_K the scaled products accumulate in a
  [BLOCK_M, BLOCK_K / 8, BLOCK_N] register tile reduced once after the K loop instead of once per tile. Its tiles
  may also hold several whole groups (TILE_GROUPS, a power of two), so checkpoints with groups below the tuned
  BLOCK_K (--group-size 64 or 32) keep the dp4a loop (H200, the shipped BLOCK_K 128 tiles at group size 64, M = 1:
  gate_up 41.8 µs against 203.5 for the per-weight loop they fell to; at group size 128 tiles of 256 and 512
  channels lost to the one-group tiles on all four Llama-3-8B shapes, so the tuner does not try them). GEMV (a
  config key, one-row tiles inside one group) keeps the products in the weight words' own [BLOCK_K / 8, BLOCK_N]
  layout and subtracts the zero point's share per word (_gemv_step): no shared-memory layout change or
  cross-warp sum inside the K loop (sm90 PTX of the shipped M = 1 tile: 8 barriers per K step; with GEMV none).
  WGMMA (a config key) runs a tensor-core tile as one of kernels/w4a8_wgmma.py's Gluon kernels on Hopper, which
  widen the weights into shared memory (or, with SWAP_AB, into the wgmma's register operand) while the previous
  step's wgmma runs (elsewhere: this file's loop of the same tile).
  COLUMNS (a config key) runs a one-row tile as kernels/w4a8_gemv.py's column GEMV instead, where the words are
  N-major: a group's words inside one thread, its terms once per group and column (H200: the M = 1 entries since
  session 27, 4-10 % ahead of GEMV tiles on Llama-3-8B's shapes).
- WORD_DOTS (tiles inside one group, tensor-core tiles with BLOCK_K >= 64): the low nibbles of the words' bytes
  are channels 8j + b, the high ones 8j + 4 + b; shifted out into two int8 code tiles, two tensor-core dots against
  the activations of those channels (split out of the activation tile in registers), the group terms per output.
  WORD_LEVELS (a config key) puts the zero points into the weight operand ((code - zero) as int8) and reads the
  activations of the low and high nibbles' channels as two tiles straight from memory: no activation sums, no
  splitting in registers (H200, graph replays: gate_up 28672x4096 at M = 128, 96.6 µs vs 109.8 widening first;
  timed with a subtraction per weight, before _level_rows did it four to a word, which is not timed yet).
  SCALED_LEVELS (a config key) also puts the group scale into the weight operand: (code - zero) * scale for four
  codes in one 32-bit multiply-add and an xor (kernels/w4a8_swar.py; _scaled_level_rows), so the dots of all K steps
  accumulate in one int32 tile with no multiply per step. Only where every code * scale <= 255
  (format.levels_fit_bytes, checked per layer at load; the launcher runs WORD_LEVELS otherwise). H200, same tile,
  graph replays: median ~1.00x WORD_LEVELS, up to 1.14x at M = 64 / 128; shipped only for the 6 (shape, M) points
  where it beat the tuned tile by >= 3 % (TP 1 qkv M = 32, TP 2 qkv / o / down at M = 32-128; docs/benchmarks.md).
- FACTORED (tiles inside one group otherwise: activation rows that are no words, small tensor-core tiles): each
  channel reads its word (the 8 channels of a word share a cache line: the weights still stream once) and shifts its
  nibble out; one dot of the activations with the codes, the group terms per output as above.
- otherwise (tiles across groups): the codes widen to int8 levels per weight, one dot with the activations.
Tensor-core dots from BLOCK_M 16 and BLOCK_K 32, CUDA-core multiply-adds below. One kernel serves decode and
prefill: SPLIT_K > 1 splits the K loop across programs (small M: enough programs to stream the weights) and they
meet through splitk_gemm.split_k_store. PREFETCH (a config key, the loops with group terms per output) loads the
next K step's group scales and zeros one step ahead (the dp4a loop also its words and activations, which Triton
pipelines only where they feed a dot), so their latency overlaps the dots instead of stalling them
(H200: gate_up at M = 64 82.0 -> 64.7 µs with WORD_LEVELS, down 4096x14336 at M = 64 50.0 -> 45.6 µs; at BLOCK_M
128 with 8 warps it loses, so it is a tuned choice like the others; CUDA-graph replays, docs/benchmarks.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import group_count
from vllm_outliertune.kernels.int8_gemm import epilogue_vectors, grouped_tile, launch_options, start_gemm
from vllm_outliertune.kernels.splitk_gemm import (DP4A_ASM, as_words, code_sums, dot4_accumulate, split_k_plan,
                                                  split_k_store)
from vllm_outliertune.kernels.w4a8_gemv import column_gemv_applies, w4a8_gemv
from vllm_outliertune.kernels.w4a8_swar import level_offset, level_words
from vllm_outliertune.kernels.w4a8_wgmma import w4a8_wgmma, wgmma_applies
from vllm_outliertune.kernels.w4a8_words import CHANNELS_PER_WORD


@triton.jit
def _tile_group(scale_ptr, zero_ptr, rows_w, group, stride_gn, stride_gk):
    """int32 scale and zero point [BLOCK_N] of one group (a scalar) for the tile's output rows."""
    offsets = rows_w.to(tl.int64) * stride_gn + group * stride_gk
    return tl.load(scale_ptr + offsets).to(tl.int32), tl.load(zero_ptr + offsets).to(tl.int32)


@triton.jit
def _tile_groups(scale_ptr, zero_ptr, rows_w, first_group, last_group, stride_gn, stride_gk,
                 TILE_GROUPS: tl.constexpr, ROWS_PER_GROUP: tl.constexpr):
    """int32 scales and zero points [TILE_GROUPS * ROWS_PER_GROUP, BLOCK_N] of the groups from first_group (none
    past last_group), each repeated on ROWS_PER_GROUP rows (the GEMV loop: one row per weight word)."""
    groups = tl.minimum(first_group + tl.arange(0, TILE_GROUPS * ROWS_PER_GROUP) // ROWS_PER_GROUP, last_group)
    offsets = rows_w[None, :].to(tl.int64) * stride_gn + groups[:, None].to(tl.int64) * stride_gk
    return tl.load(scale_ptr + offsets).to(tl.int32), tl.load(zero_ptr + offsets).to(tl.int32)


@triton.jit
def word_code(words, shift):
    """The 4-bit code at bit ``shift`` of each int32 word (channel 8j + c sits at bit 8 * (c % 4) + 4 * (c // 4))."""
    return (words >> shift) & 15


@triton.jit
def _channel_codes(words, offs_k):
    """int32 words [BLOCK_K, BLOCK_N] read per channel (row k holds channel k's word) -> int32 codes of channel k."""
    return word_code(words, ((offs_k % 4) * 8 + ((offs_k // 4) % 2) * 4)[:, None])


@triton.jit
def _dot(a, b, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N] = a int8 [BLOCK_M, BLOCK_K] @ b int8 [BLOCK_K, BLOCK_N]."""
    if BLOCK_M >= 16 and BLOCK_K >= 32:  # int8 tensor-core dots take M >= 16 and K >= 32
        return tl.dot(a, b, out_dtype=tl.int32)
    else:
        return tl.sum(a.to(tl.int32)[:, :, None] * b.to(tl.int32)[None, :, :], axis=1)


@triton.jit
def _word_products(a_words, w_words, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, USE_ASM: tl.constexpr):
    """sum over the 8 channels of each weight word of activation x code: a_words int32 [BLOCK_M, 2 * BLOCK_W] (4
    activation codes per word), w_words int32 [BLOCK_W, BLOCK_N] -> int32 [BLOCK_M, BLOCK_W, BLOCK_N]."""
    a_low, a_high = tl.split(tl.reshape(a_words, (BLOCK_M, BLOCK_W, 2)))
    products = dot4_accumulate((w_words & 0x0F0F0F0F)[None, :, :], a_low[:, :, None],
                               tl.zeros((BLOCK_M, BLOCK_W, w_words.shape[1]), dtype=tl.int32), USE_ASM)
    return dot4_accumulate(((w_words >> 4) & 0x0F0F0F0F)[None, :, :], a_high[:, :, None], products, USE_ASM)


@triton.jit
def _column_words(w_ptrs, offs_ww, words):
    """The dp4a loops' weight words [BLOCK_K / 8, BLOCK_N] (word offsets offs_ww along K), zero from word ``words``
    on (past K or the split); read once, so evicted first."""
    return tl.load(w_ptrs, mask=(offs_ww < words)[:, None], other=0, eviction_policy="evict_first")


@triton.jit
def _gemv_activations(a_ptrs, offs_ww, words):
    """The activation words of one row that meet weight words offs_ww: those of their low nibbles' channels (word
    2j of the row) and of their high ones' (2j + 1), zero from word ``words`` on (past K or the split)."""
    return (tl.load(a_ptrs, mask=2 * offs_ww < words, other=0),
            tl.load(a_ptrs + 1, mask=2 * offs_ww + 1 < words, other=0))


@triton.jit
def _gemv_step(a_low, a_high, w_words, scale, zero, USE_ASM: tl.constexpr):
    """One K step of a one-row tile, int32 [BLOCK_K / 8, BLOCK_N] in the weight words' own layout: per word, the
    group-scaled sum of its 8 activation x code products minus the zero point's share (zero * scale * the word's
    activation sum), so that neither the weights change layout nor a sum crosses threads inside the K loop (the
    [BLOCK_M, words, BLOCK_N] tile of the other dp4a loop converted the weight planes through shared memory and
    reduced the activation sums across warps at every step: 8 barriers per step in its sm90 PTX). scale and zero
    are [BLOCK_N] (the tile inside one group) or, in a tile of several whole groups, [BLOCK_K / 8, BLOCK_N] (the
    group terms per word: reshaping the products by group would cost barriers); either broadcasts."""
    products = dot4_accumulate(w_words & 0x0F0F0F0F, a_low[:, None], tl.zeros(w_words.shape, dtype=tl.int32), USE_ASM)
    products = dot4_accumulate((w_words >> 4) & 0x0F0F0F0F, a_high[:, None], products, USE_ASM)
    a_sum = code_sums(a_high, code_sums(a_low, tl.zeros(a_low.shape, dtype=tl.int32), USE_ASM), USE_ASM)
    return products * scale - a_sum[:, None] * (zero * scale)


@triton.jit
def _word_dots(a, words, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k code[:, k] * a[:, k] over a tile of whole words on tensor cores, transposed: int32 [BLOCK_N, BLOCK_M]
    from words int32 [BLOCK_N, BLOCK_K / 8] and activation codes a int8 [BLOCK_M, BLOCK_K]. The low nibbles of the
    words' bytes are channels 8j + b, the high ones 8j + 4 + b; shifted out and joined along the last dimension they
    sit in K order 4j + b without a transpose, so the weights are the dots' left operand (the MMA's M side, as
    small-M CUTLASS kernels swap A and B) and the activations of those channels, split out in registers, the right.
    H200, M = 16, Llama-3-8B shapes: 14-26 % faster than weight codes as the right operand [K, N]."""
    a_low, a_high = tl.split(tl.permute(tl.reshape(a, (BLOCK_M, BLOCK_K // 8, 2, 4)), (0, 1, 3, 2)))
    codes_sum = tl.dot(_nibble_rows(words, 0, BLOCK_K).to(tl.int8),
                       tl.trans(tl.reshape(a_low, (BLOCK_M, BLOCK_K // 2))), out_dtype=tl.int32)
    return tl.dot(_nibble_rows(words, 4, BLOCK_K).to(tl.int8), tl.trans(tl.reshape(a_high, (BLOCK_M, BLOCK_K // 2))),
                  codes_sum, out_dtype=tl.int32)


@triton.jit
def _level_dots(a_low, a_high, words, zero, BLOCK_K: tl.constexpr):
    """sum_k (code[:, k] - zero) * a[:, k] over a tile of whole words on tensor cores, transposed as _word_dots, from
    the activation codes of the low and high nibbles' channels read as two tiles a_low, a_high int8 [BLOCK_M,
    BLOCK_K / 2] (channels 8j + b and 8j + 4 + b at column 4j + b): the zero points go into the weight operand
    (|code - zero| <= 15), so no activation sums are needed and the activations go from memory to the MMA as read."""
    zero_bytes = (zero.to(tl.uint32) * 0x01010101)[:, None]  # the zero point in each byte of a word
    codes_sum = tl.dot(_level_rows(words, 0, zero_bytes, BLOCK_K), tl.trans(a_low), out_dtype=tl.int32)
    return tl.dot(_level_rows(words, 4, zero_bytes, BLOCK_K), tl.trans(a_high), codes_sum, out_dtype=tl.int32)


@triton.jit
def _scaled_level_dots(a_low, a_high, words, zero, scale, acc, BLOCK_K: tl.constexpr):
    """acc + sum_k (code[:, k] - zero) * scale * a[:, k], transposed as _level_dots (same activation tiles), with the
    group scale inside the weight operand: the int8 levels themselves meet the activations, so the dots accumulate
    straight into acc across K steps (no per-step multiply of their result, which makes each step wait for its
    MMA). Needs code * scale <= 255 (SWAR bytes; format.levels_fit_bytes)."""
    scale = scale.to(tl.uint32)
    offset = level_offset(scale, zero.to(tl.uint32))
    acc = tl.dot(_scaled_level_rows(words, 0, scale, offset, BLOCK_K), tl.trans(a_low), acc, out_dtype=tl.int32)
    return tl.dot(_scaled_level_rows(words, 4, scale, offset, BLOCK_K), tl.trans(a_high), acc, out_dtype=tl.int32)


@triton.jit
def _scaled_level_rows(words, nibble, scale, offset, BLOCK_K: tl.constexpr):
    """int8 levels (code - zero) * scale [BLOCK_N, BLOCK_K / 2] in _nibble_rows' order, four to a word: one
    multiply-add and an xor per word of the nibble plane (kernels/w4a8_swar.py)."""
    codes = (words.to(tl.uint32, bitcast=True) >> nibble) & 0x0F0F0F0F
    return _byte_columns(level_words(codes, scale, offset), BLOCK_K).to(tl.int8)


@triton.jit
def _level_rows(words, nibble, zero_bytes, BLOCK_K: tl.constexpr):
    """int8 code - zero [BLOCK_N, BLOCK_K / 2] in _nibble_rows' order, four to a word: each byte of the nibble plane
    becomes 128 + code - zero (113..143: no borrow between bytes), and flipping bit 7 back leaves code - zero as an
    int8 (PTX for sm90, Triton 3.9, 64 x 128 x 128 tile: 548 instructions per K step against 813 for a subtraction
    per weight; LLVM packs the bytes for the MMA with none)."""
    plane = (words.to(tl.uint32, bitcast=True) >> nibble) & 0x0F0F0F0F
    return _byte_columns(((plane | 0x80808080) - zero_bytes) ^ 0x80808080, BLOCK_K).to(tl.int8)


@triton.jit
def _nibble_rows(words, nibble, BLOCK_K: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K / 8] -> int32 codes [BLOCK_N, BLOCK_K / 2] at column 4j + b: nibble (0 low,
    4 high) of byte b of word j."""
    return _byte_columns((words.to(tl.uint32, bitcast=True) >> nibble) & 0x0F0F0F0F, BLOCK_K)


@triton.jit
def _byte_columns(words, BLOCK_K: tl.constexpr):
    """uint32 [BLOCK_N, BLOCK_K / 8] -> their bytes [BLOCK_N, BLOCK_K / 2], byte b of word j at column 4j + b."""
    planes = tl.join(tl.join(words & 0xFF, (words >> 16) & 0xFF),
                     tl.join((words >> 8) & 0xFF, (words >> 24) & 0xFF))  # [N, W, 2, 2]: b = 2x + y
    return tl.reshape(planes, (words.shape[0], BLOCK_K // 2))


@triton.jit
def _w4a8_gemm_kernel(a_ptr, w_ptr, gscale_ptr, gzero_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr,
                      count_ptr, M, N, K, stride_am, stride_wn, stride_wk, stride_gn, stride_gk, stride_om,
                      K_PER_SPLIT, GROUP_SIZE, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, GROUP_TILE: tl.constexpr,
                      EVEN_N: tl.constexpr, FACTORED: tl.constexpr, WORD_DOTS: tl.constexpr, DP4A: tl.constexpr,
                      DP4A_ASM: tl.constexpr, WORD_LEVELS: tl.constexpr, SCALED_LEVELS: tl.constexpr,
                      PREFETCH: tl.constexpr,
                      ACC_K: tl.constexpr, TILE_GROUPS: tl.constexpr, GEMV: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # K, K_PER_SPLIT and BLOCK_K count channels; with DP4A a_ptr is the int32 view of the codes (stride_am in words).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m, offs_n, rows_a, rows_w = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if EVEN_N:  # no tile reaches past N: say the columns are contiguous, so N-major loads vectorize (as gemlite)
        rows_w = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    rows_w_offsets = rows_w.to(tl.int64) * stride_wn
    if WORD_DOTS or WORD_LEVELS:
        if WORD_LEVELS:  # the activations of the low / high nibbles' channels (8j + b, 8j + 4 + b) read as two tiles
            half = tl.arange(0, BLOCK_K // 2)
            offs_k = tl.max_contiguous(tl.multiple_of(k_start + (half // 4) * 8 + half % 4, 4), 4)  # 4-byte runs
        else:
            offs_k = k_start + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        offs_ww = k_start // 8 + tl.arange(0, BLOCK_K // 8)
        w_ptrs = w_ptr + rows_w_offsets[:, None] + offs_ww[None, :].to(tl.int64) * stride_wk  # [BLOCK_N, words]
        acc_nk = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)  # the output transposed (operands swapped)
    elif DP4A:
        offs_aw = k_start // 4 + tl.arange(0, BLOCK_K // 4)
        a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_aw[None, :]
        offs_ww = k_start // 8 + tl.arange(0, BLOCK_K // 8)
        w_ptrs = w_ptr + rows_w_offsets[None, :] + offs_ww[:, None].to(tl.int64) * stride_wk
        if GEMV:  # the activation words of the weight words' low and high nibbles: words 2j and 2j + 1 of the row
            a_ptrs = a_ptr + tl.min(rows_a, axis=0).to(tl.int64) * stride_am + 2 * offs_ww
            acc_w = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.int32)
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rows_a[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        # Each channel reads its word: the 8 channels of a word share one cache line, the weights stream once.
        # The loads coalesce along N where the words are stored N-major (stride_wn 1, the plugin's GPU layout).
        w_ptrs = w_ptr + rows_w_offsets[None, :] + (offs_k // 8)[:, None].to(tl.int64) * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    if ACC_K:
        acc3 = tl.zeros((BLOCK_M, BLOCK_K // 8, BLOCK_N), dtype=tl.int32)
    last_group = (K - 1) // GROUP_SIZE
    ROWS_PER_GROUP: tl.constexpr = BLOCK_K // 8 // TILE_GROUPS if GEMV else 1
    split_end = tl.minimum(K, k_start + K_PER_SPLIT)  # loads a step ahead stop there: past it, traffic for nothing
    if PREFETCH:
        if TILE_GROUPS > 1:
            next_scale, next_zero = _tile_groups(gscale_ptr, gzero_ptr, rows_w, k_start // GROUP_SIZE, last_group,
                                                 stride_gn, stride_gk, TILE_GROUPS, ROWS_PER_GROUP)
        else:
            next_scale, next_zero = _tile_group(gscale_ptr, gzero_ptr, rows_w, k_start // GROUP_SIZE, stride_gn,
                                                stride_gk)
        if GEMV:
            next_a, next_a_high = _gemv_activations(a_ptrs, offs_ww, K // 4)
            next_w = _column_words(w_ptrs, offs_ww, (K + 7) // 8)
        elif DP4A:  # and the first step's words: each step then asks for the next step's before it computes
            next_a = tl.load(a_ptrs, mask=(offs_aw < K // 4)[None, :], other=0)
            next_w = _column_words(w_ptrs, offs_ww, (K + 7) // 8)
    for i in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
        if FACTORED and TILE_GROUPS > 1:  # the dp4a loop over tiles of several whole groups
            if PREFETCH:
                scale, zero = next_scale, next_zero
                next_scale, next_zero = _tile_groups(gscale_ptr, gzero_ptr, rows_w, (k_start + (i + 1) * BLOCK_K)
                                                     // GROUP_SIZE, last_group, stride_gn, stride_gk, TILE_GROUPS,
                                                     ROWS_PER_GROUP)
            else:
                scale, zero = _tile_groups(gscale_ptr, gzero_ptr, rows_w, (k_start + i * BLOCK_K) // GROUP_SIZE,
                                           last_group, stride_gn, stride_gk, TILE_GROUPS, ROWS_PER_GROUP)
        elif FACTORED:
            if PREFETCH:  # this tile's group terms came in one step ago; ask for the next ones now
                scale, zero = next_scale, next_zero
                next_scale, next_zero = _tile_group(gscale_ptr, gzero_ptr, rows_w, tl.minimum(
                    (k_start + (i + 1) * BLOCK_K) // GROUP_SIZE, last_group), stride_gn, stride_gk)
            else:
                scale, zero = _tile_group(gscale_ptr, gzero_ptr, rows_w, (k_start + i * BLOCK_K) // GROUP_SIZE,
                                          stride_gn, stride_gk)
        if WORD_DOTS or WORD_LEVELS:
            if WORD_LEVELS:
                a_low = tl.load(a_ptrs, mask=(offs_k < K)[None, :], other=0)
                a_high = tl.load(a_ptrs + 4, mask=(offs_k + 4 < K)[None, :], other=0)
            else:
                a = tl.load(a_ptrs, mask=(offs_k < K)[None, :], other=0)
            w_words = tl.load(w_ptrs, mask=(offs_ww < (K + 7) // 8)[None, :], other=0, eviction_policy="evict_first")
            if SCALED_LEVELS:
                acc_nk = _scaled_level_dots(a_low, a_high, w_words, zero, scale, acc_nk, BLOCK_K)
            elif WORD_LEVELS:
                acc_nk += _level_dots(a_low, a_high, w_words, zero, BLOCK_K) * scale[:, None]
            else:
                acc_nk += (_word_dots(a, w_words, BLOCK_M, BLOCK_K)
                           - zero[:, None] * tl.sum(a.to(tl.int32), axis=1)[None, :]) * scale[:, None]
            offs_k += BLOCK_K
            a_ptrs += BLOCK_K
            offs_ww += BLOCK_K // 8
            w_ptrs += (BLOCK_K // 8) * stride_wk
        elif GEMV:
            if PREFETCH:
                a_low, a_high, w_words = next_a, next_a_high, next_w
                next_a, next_a_high = _gemv_activations(a_ptrs + BLOCK_K // 4, offs_ww + BLOCK_K // 8, split_end // 4)
                next_w = _column_words(w_ptrs + (BLOCK_K // 8) * stride_wk, offs_ww + BLOCK_K // 8,
                                       (split_end + 7) // 8)
            else:
                a_low, a_high = _gemv_activations(a_ptrs, offs_ww, K // 4)
                w_words = _column_words(w_ptrs, offs_ww, (K + 7) // 8)
            acc_w += _gemv_step(a_low, a_high, w_words, scale, zero, DP4A_ASM)
            a_ptrs += BLOCK_K // 4
            offs_ww += BLOCK_K // 8
            w_ptrs += (BLOCK_K // 8) * stride_wk
        elif DP4A:
            if PREFETCH:
                a_words, w_words = next_a, next_w
                next_a = tl.load(a_ptrs + BLOCK_K // 4, mask=(offs_aw + BLOCK_K // 4 < split_end // 4)[None, :],
                                 other=0)
                next_w = _column_words(w_ptrs + (BLOCK_K // 8) * stride_wk, offs_ww + BLOCK_K // 8,
                                       (split_end + 7) // 8)
            else:
                a_words = tl.load(a_ptrs, mask=(offs_aw < K // 4)[None, :], other=0)
                w_words = _column_words(w_ptrs, offs_ww, (K + 7) // 8)
            products = _word_products(a_words, w_words, BLOCK_M, BLOCK_K // 8, DP4A_ASM)
            # the zero-point term needs each row's sum of its activation codes, per group
            a_sums = code_sums(a_words, tl.zeros(a_words.shape, dtype=tl.int32), DP4A_ASM)
            if TILE_GROUPS > 1:  # words and activation words of the tile as [.., group, word in group, ..]
                scaled = tl.reshape(products, (BLOCK_M, TILE_GROUPS, BLOCK_K // 8 // TILE_GROUPS, BLOCK_N)) \
                    * scale[None, :, None, :]
                if ACC_K:
                    acc3 += tl.reshape(scaled, (BLOCK_M, BLOCK_K // 8, BLOCK_N))
                else:
                    acc += tl.sum(tl.sum(scaled, axis=2), axis=1)
                a_sum = tl.sum(tl.reshape(a_sums, (BLOCK_M, TILE_GROUPS, BLOCK_K // 4 // TILE_GROUPS)), axis=2)
                acc -= tl.sum(a_sum[:, :, None] * (zero * scale)[None, :, :], axis=1)
            else:
                if ACC_K:
                    acc3 += products * scale[None, None, :]
                else:
                    acc += tl.sum(products * scale[None, None, :], axis=1)
                acc -= tl.sum(a_sums, axis=1)[:, None] * (zero * scale)[None, :]
            offs_aw += BLOCK_K // 4
            a_ptrs += BLOCK_K // 4
            offs_ww += BLOCK_K // 8
            w_ptrs += (BLOCK_K // 8) * stride_wk
        else:
            a = tl.load(a_ptrs, mask=(offs_k < K)[None, :], other=0)
            # Channels past K read a padded code, whose level need not be 0: the zeroed activations cancel them.
            codes = _channel_codes(tl.load(w_ptrs, mask=(offs_k < K)[:, None], other=0,
                                           eviction_policy="evict_first"), offs_k)
            if FACTORED:
                a_sum = tl.sum(a.to(tl.int32), axis=1)
                acc += (_dot(a, codes.to(tl.int8), BLOCK_M, BLOCK_K) - a_sum[:, None] * zero[None, :]) \
                    * scale[None, :]
            else:
                if GROUP_TILE:  # one group (a scalar) for the whole tile
                    scale, zero = _tile_group(gscale_ptr, gzero_ptr, rows_w, (k_start + i * BLOCK_K) // GROUP_SIZE,
                                              stride_gn, stride_gk)
                    scale, zero = scale[None, :], zero[None, :]
                else:  # one group per channel
                    offsets = rows_w[None, :].to(tl.int64) * stride_gn \
                        + (tl.minimum(offs_k, K - 1) // GROUP_SIZE)[:, None].to(tl.int64) * stride_gk
                    scale = tl.load(gscale_ptr + offsets).to(tl.int32)
                    zero = tl.load(gzero_ptr + offsets).to(tl.int32)
                acc += _dot(a, ((codes - zero) * scale).to(tl.int8), BLOCK_M, BLOCK_K)
            offs_k += BLOCK_K
            a_ptrs += BLOCK_K
            w_ptrs += (BLOCK_K // 8) * stride_wk
    if ACC_K:
        acc += tl.sum(acc3, axis=1)
    if GEMV:
        acc += tl.sum(acc_w, axis=0)[None, :]
    if WORD_DOTS or WORD_LEVELS:
        acc += tl.trans(acc_nk)
    # After the loop, unlike the int8 split-K GEMM: loaded before it, these kernels measured 0.96-0.97x (H200).
    scale_n, row_scale, bias = epilogue_vectors(scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, True,
                                                HAS_ROW_SCALE, HAS_BIAS)
    split_k_store(acc, out_ptr, scale_n, row_scale, bias, ws_ptr, count_ptr, pid, offs_m, offs_n, M, N,
                  stride_om, SPLIT_K, HAS_ROW_SCALE, HAS_BIAS)


def check_packed_args(k: int, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
                      group_size: int) -> None:
    """Raise ValueError naming the argument when the packed weight words and their group tensors do not fit K."""
    n = w_words.shape[0]
    words = triton.cdiv(k, CHANNELS_PER_WORD)
    if w_words.dtype != torch.int32 or w_words.dim() != 2 or w_words.shape[1] != words or 1 not in w_words.stride():
        raise ValueError(f"w_words is {w_words.dtype} {list(w_words.shape)}; expected int32 [N, {words}] (8 4-bit "
                         f"codes per word for K = {k}, kernels/w4a8_words.pack_words) with contiguous rows or "
                         "columns")
    if group_size < 0 or group_size % CHANNELS_PER_WORD:
        raise ValueError(f"group_size {group_size} must be 0 (one group per row) or a positive multiple of "
                         f"{CHANNELS_PER_WORD}")
    groups = group_count(k, group_size)
    for name, t in (("group_scale", group_scale), ("group_zero", group_zero)):
        if t.dtype != torch.uint8 or tuple(t.shape) != (n, groups) or 1 not in t.stride() \
                or t.device != w_words.device:
            raise ValueError(f"{name} is {t.dtype} {list(t.shape)} on {t.device}; expected uint8 [{n}, {groups}] on "
                             f"{w_words.device}, with contiguous rows or columns")
    if group_scale.stride() != group_zero.stride():
        raise ValueError("group_scale and group_zero must have the same strides")


def wgmma_loop_tile(config: dict) -> dict:
    """The tensor-core loop of this file with a WGMMA tile's blocks, warps, stages and split, for operands or devices
    kernels/w4a8_wgmma.py does not take (CPU / the interpreter, another GPU, levels beyond a byte)."""
    tile = {key: value for key, value in config.items() if key not in ("WGMMA", "LEVEL_BUFS", "SWAP_AB", "NATURAL_K")}
    return tile | {"FACTORED": 1, "SCALED_LEVELS": 1, "PREFETCH": 1}


def w4a8_gemm(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
              group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
              kernel: str = "w4a8_gemm", config: dict | None = None, row_scale: torch.Tensor | None = None,
              levels_fit_bytes: bool = True) -> torch.Tensor:
    """a_q int8 [M, K] @ levels(w_words)^T in int32, * w_scale[n] (* row_scale[m]) (+ bias[n]) -> out_dtype [M, N].
    ``kernel`` names the tile table entry ("w4a8_gemm": tiled, or "w4a8_splitk": small M, SPLIT_K 0 = automatic);
    ``config`` overrides it. levels_fit_bytes: every code times its group scale is <= 255 (format.levels_fit_bytes),
    which the SCALED_LEVELS loop needs; without it a SCALED_LEVELS tile runs WORD_LEVELS."""
    k = a_q.shape[1] if a_q.dim() == 2 else -1
    check_packed_args(k, w_words, group_scale, group_zero, group_size)
    # start_gemm checks a_q, w_scale, bias and the output against an int8 [N, K] weight: a K-byte stand-in.
    shape_probe = torch.empty(max(k, 1), dtype=torch.int8, device=w_words.device).as_strided(
        (w_words.shape[0], max(k, 0)), (0, 1))
    a_q, out, config = start_gemm(kernel, a_q.dtype == torch.int8, a_q, shape_probe, w_scale, bias, out_dtype,
                                  config, scaled_only=True, row_scale=row_scale)
    if config is None:
        return out
    (m, k), n = a_q.shape, w_words.shape[0]
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if block_k % 16:
        raise ValueError(f"BLOCK_K {block_k} must be a multiple of 16 (two words of 8 packed channels)")
    if config.get("WGMMA"):
        if wgmma_applies(a_q, w_words, group_scale, group_size, levels_fit_bytes, config):
            return w4a8_wgmma(a_q, w_words, group_scale, group_zero, group_size, w_scale, bias, out, row_scale,
                              config)
        config = wgmma_loop_tile(config)
    if config.get("COLUMNS"):
        a_words = as_words(a_q)
        if column_gemv_applies(a_words, w_words, group_scale, group_size, config):
            return w4a8_gemv(a_words, w_words, group_scale, group_zero, group_size, w_scale, bias, out, row_scale,
                             config)
        # another layout or group size: the same tile as a GEMV of the loop below
        config = {key: value for key, value in config.items() if key not in ("COLUMNS", "K_WARPS")} | {
            "FACTORED": 1, "GEMV": 1, "PREFETCH": 1, "num_warps": 4}
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, k_per_split, partial_sums, counters = split_k_plan(m, n, k, tiles, block_k, config, a_q.device)
    group = group_size or block_k * triton.cdiv(k, block_k)  # 0: one group spans the row (and every tile)
    in_group = group % block_k == 0
    # the dp4a loop reads the activation rows as int32 words (K a multiple of 4, aligned rows); its tiles may also
    # hold several whole groups (a power of two of them)
    whole_groups = block_k % group == 0 and triton.next_power_of_2(block_k // group) == block_k // group
    a_words = as_words(a_q) if config.get("FACTORED") and block_m < 16 and (in_group or whole_groups) else None
    dp4a = a_words is not None
    factored = bool(config.get("FACTORED")) and (in_group or dp4a)
    word_dots = factored and block_m >= 16 and block_k >= 64  # two dots of K = BLOCK_K / 2 >= 32
    word_levels = word_dots and bool(config.get("WORD_LEVELS") or config.get("SCALED_LEVELS"))
    scaled_levels = word_levels and bool(config.get("SCALED_LEVELS")) and levels_fit_bytes
    gemv = dp4a and block_m == 1 and bool(config.get("GEMV"))
    _w4a8_gemm_kernel[(tiles, split_k)](
        a_words if dp4a else a_q, w_words, group_scale, group_zero, out, w_scale, row_scale, bias, partial_sums,
        counters, m, n, k, a_q.stride(0) // (4 if dp4a else 1), w_words.stride(0), w_words.stride(1),
        group_scale.stride(0), group_scale.stride(1), out.stride(0), k_per_split, group,
        HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k, GROUP_TILE=in_group,
        EVEN_N=n % block_n == 0,
        FACTORED=factored, WORD_DOTS=word_dots and not word_levels, WORD_LEVELS=word_levels,
        SCALED_LEVELS=scaled_levels,
        PREFETCH=factored and bool(config.get("PREFETCH")), DP4A=dp4a, DP4A_ASM=DP4A_ASM,
        ACC_K=dp4a and not gemv and bool(config.get("ACC_K")), TILE_GROUPS=1 if in_group else block_k // group,
        GEMV=gemv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config.get("GROUP_M", 1),
        **launch_options(config), enable_fp_fusion=False)
    return out
