"""W4A8 decode GEMV on the plugin's N-major words: each thread owns a few output columns along all of its K range.

The dp4a loops of kernels/w4a8_gemm.py spread a tile's weight words over threads along K, so the group terms are
applied per word (a multiply and a subtraction for every 8 weights, the group scale and zero widened per word) and
the products meet across the program's threads after the loop. H200, sm90 SASS of the shipped one-row o tile: ~19
instructions a word in the K loop and ~410 outside it for 16 words a thread, so the small GEMVs issue one
instruction every second cycle on every scheduler and stay instruction-bound (docs/benchmarks.md, session 24).

Here the words are read as [groups, words of a group, columns] with the columns across the threads (the words are
N-major, so a warp reads whole 128-byte lines) and a group's words inside one thread: the 8 products of a word go
into its column's group sum with two dp4a chained (no multiply), and the group scale and zero point apply once per
group and column: (sum code * a - zero * sum a) * scale, the integer every W4A8 kernel computes. The activation
codes of a group (the same for every column) are summed once per step. The program's lanes and warps split its
columns and its K range (K_WARPS chunks), so the only cross-thread sum is one after the loop. SPLIT_K programs meet
through splitk_gemm.split_k_store's per-element tallies (H200, session 28: 1.07x over the per-tile counter of the
other small-M kernels, 16 shapes, M = 1). One program per activation row (M is 1 at decode).
H200, session 27 (docs/benchmarks.md): ~10.7 SASS instructions a word in the loop; at M = 1 4-10 % faster than the
GEMV tiles on the 8 Llama-3-8B TP 1 / TP 2 shapes, W4A8 GEMVs 1,378 -> 1,304 µs per decode step. Loading the next
step's operands first (as the GEMV loop's PREFETCH) measured 1.4-11 % slower here (243 registers against 123)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels.int8_gemm import epilogue_vectors
from vllm_outliertune.kernels.splitk_gemm import DP4A_ASM, code_sums, dot4_accumulate, split_k_plan, split_k_store
from vllm_outliertune.kernels.w4a8_words import CHANNELS_PER_WORD


_WORD = tl.constexpr(CHANNELS_PER_WORD)  # channels per packed word, as the kernel sees it


@triton.jit
def _w4a8_gemv_kernel(a_ptr, w_ptr, gscale_ptr, gzero_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr,
                      M, N, K, stride_am, stride_wk, stride_gk, stride_om, K_PER_SPLIT,
                      HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                      GROUP_WORDS: tl.constexpr, STEP_GROUPS: tl.constexpr, K_WARPS: tl.constexpr,
                      BLOCK_N: tl.constexpr, DP4A_ASM: tl.constexpr):
    # a_ptr: the int32 view of the activation codes (4 per word, stride_am in words). Words, group scales and zeros
    # are N-major (column stride 1). K and K_PER_SPLIT count channels.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.max_contiguous(tl.multiple_of(tl.where(offs_n < N, offs_n, 0), BLOCK_N), BLOCK_N)
    words_total = (K + _WORD - 1) // _WORD
    groups_total = (words_total + GROUP_WORDS - 1) // GROUP_WORDS
    a_words = K // 4
    # Tiles are [STEP_GROUPS, GROUP_WORDS, K_WARPS, BLOCK_N]: Triton's layout puts the columns (contiguous) and
    # then the K_WARPS chunks across lanes and warps (the launcher sizes num_warps so that they fill them), which
    # leaves a step's words inside each thread. Warp chunk w covers its own K_PER_SPLIT / K_WARPS of the split.
    split_words = K_PER_SPLIT // _WORD
    chunk_words = split_words // K_WARPS
    step_words: tl.constexpr = STEP_GROUPS * GROUP_WORDS
    chunk = tl.arange(0, K_WARPS)[None, :]
    group_word = (pid_k * split_words + chunk * chunk_words
                  + tl.arange(0, STEP_GROUPS)[:, None] * GROUP_WORDS)  # [STEP_GROUPS, K_WARPS]: first words
    chunk_end = (pid_k * split_words + (chunk + 1) * chunk_words)[:, None, :]
    a_row = a_ptr + row.to(tl.int64) * stride_am
    acc = tl.zeros((K_WARPS, BLOCK_N), dtype=tl.int32)
    for _ in range(0, tl.cdiv(chunk_words, step_words)):
        word = group_word[:, None, :] + tl.arange(0, GROUP_WORDS)[None, :, None]  # [STEP_GROUPS, GROUP_WORDS, K_WARPS]
        in_chunk = (word < chunk_end) & (word < words_total)
        words = tl.load(w_ptr + word[:, :, :, None].to(tl.int64) * stride_wk + cols[None, None, None, :],
                        mask=in_chunk[:, :, :, None], other=0, eviction_policy="evict_first")
        # activation words 2j and 2j + 1 meet word j's low nibbles (channels 8j..8j+3) and its high ones
        a_low = tl.load(a_row + 2 * word, mask=in_chunk & (2 * word < a_words), other=0)
        a_high = tl.load(a_row + 2 * word + 1, mask=in_chunk & (2 * word + 1 < a_words), other=0)
        a_low, a_high = a_low[:, :, :, None], a_high[:, :, :, None]
        products = dot4_accumulate(words & 0x0F0F0F0F, a_low, tl.zeros(words.shape, tl.int32), DP4A_ASM)
        products = dot4_accumulate((words >> 4) & 0x0F0F0F0F, a_high, products, DP4A_ASM)
        group_sums = tl.sum(products, axis=1)  # [STEP_GROUPS, K_WARPS, BLOCK_N], each inside its thread
        # each group's sum of activation codes, [STEP_GROUPS, K_WARPS, 1]: from the same (broadcast) registers as
        # the products, so that it needs no layout of its own (a shared-memory round trip per step)
        a_sums = tl.sum(code_sums(a_high, code_sums(a_low, tl.zeros(a_low.shape, tl.int32), DP4A_ASM), DP4A_ASM),
                        axis=1)
        group = group_word // GROUP_WORDS
        g_offsets = group[:, :, None].to(tl.int64) * stride_gk + cols[None, None, :]
        g_mask = (group < groups_total)[:, :, None]  # past the split's chunk the sums above are 0
        g_scale = tl.load(gscale_ptr + g_offsets, mask=g_mask, other=0).to(tl.int32)
        g_zero = tl.load(gzero_ptr + g_offsets, mask=g_mask, other=0).to(tl.int32)
        acc += tl.sum((group_sums - a_sums * g_zero) * g_scale, axis=0)
        group_word += step_words
    # after the loop: loaded before it, the 16 shapes of session 28 took 1.02-1.03x longer
    offs_m = row + tl.arange(0, 1)
    scale_n, row_scale, bias = epilogue_vectors(scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, True,
                                                HAS_ROW_SCALE, HAS_BIAS)
    split_k_store(tl.sum(acc, axis=0)[None, :], out_ptr, scale_n, row_scale, bias, ws_ptr, None, None, offs_m,
                  offs_n, M, N, stride_om, SPLIT_K, HAS_ROW_SCALE, HAS_BIAS, TALLY=True)


def column_gemv_applies(a_words: torch.Tensor | None, w_words: torch.Tensor, group_scale: torch.Tensor,
                        group_size: int, config: dict) -> bool:
    """Whether w4a8_gemv can run this call with ``config``: activation rows viewable as int32 words, N-major words
    and group tensors (the plugin's GPU layout), and groups that divide the tile's K step."""
    step = config.get("BLOCK_K", 0)
    return (a_words is not None and w_words.stride(0) == 1 and group_scale.stride(0) == 1 and group_size > 0
            and step % group_size == 0)


def w4a8_gemv(a_words: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
              group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
              row_scale: torch.Tensor | None, config: dict) -> torch.Tensor:
    """Write a_q @ levels^T * w_scale (* row_scale) (+ bias) into out [M, N] (kernels/w4a8_gemm.w4a8_gemm's
    contract, arguments checked there): a_words the int32 view of the codes [M, K / 4]. ``config``: BLOCK_N
    columns per program, BLOCK_K channels per K chunk and step (whole groups), K_WARPS chunks of K per program,
    SPLIT_K (0 = automatic), num_stages; num_warps follows (BLOCK_N * K_WARPS / 128)."""
    m, n, k = a_words.shape[0], w_words.shape[0], 4 * a_words.shape[1]
    block_n, block_k, k_warps = config["BLOCK_N"], config["BLOCK_K"], config.get("K_WARPS", 1)
    # lanes and warps exactly cover [K_WARPS, BLOCK_N] at 4 columns (16 bytes) a lane (the kernel's layout note)
    launch = {"num_warps": max(1, block_n * k_warps // 128), "num_stages": config.get("num_stages", 4)}
    col_tiles = triton.cdiv(n, block_n)
    # each split is a whole number of steps for every one of its warps
    split_k, k_per_split, tallies, _ = split_k_plan(m, n, k, m * col_tiles, block_k * k_warps, config,
                                                    a_words.device, tally=True)
    _w4a8_gemv_kernel[(col_tiles, split_k, m)](
        a_words, w_words, group_scale, group_zero, out, w_scale, row_scale, bias, tallies, m, n, k,
        a_words.stride(0), w_words.stride(1), group_scale.stride(1), out.stride(0), k_per_split,
        HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        GROUP_WORDS=group_size // CHANNELS_PER_WORD, STEP_GROUPS=block_k // group_size, K_WARPS=k_warps,
        BLOCK_N=block_n, DP4A_ASM=DP4A_ASM, **launch, enable_fp_fusion=False)
    return out
