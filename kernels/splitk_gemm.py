"""Small-M (decode) GEMM: split-K, optional activation quantization in the prologue, packed int8 dot products.

At small M the weights dominate the bytes, so the kernel must keep the whole GPU streaming weights:
- x is int8 (already quantized, e.g. by the norm that produced it) or float (quantized here, per tile, with the
  same math as act_quant.quantize_tile: one launch instead of two; the tile table is tuned on int8 codes, with
  which the float variant measured slower, so linear.py quantizes first and this variant waits for its own tiles);
- BLOCK_M >= 16 uses the tensor cores, with SWAP_AB as out^T = W x^T: the weight tile is the MMA's M side (64+
  rows, where Hopper's warpgroup MMA starts) and the few activation rows its N side, as small-M CUTLASS kernels
  swap A and B; below BLOCK_M 16 a multiply-accumulate on CUDA cores, which with ACC_K keeps a
  [BLOCK_M, BLOCK_K, BLOCK_N] accumulator and reduces over K once after the loop (not a cross-thread reduction per
  K step), and with PACKED (int8 x only) reads four int8 values per 32-bit word and multiplies them with one dp4a;
- tiles of a few weight rows by (nearly) all of K put every load of a program in flight at once (the H100 winners at
  M = 1); with PROGRAMS_PER_SM a persistent grid walks the tiles instead of one program per tile;
- when M x N gives too few tiles, the K loop is split across SPLIT_K programs. Their int32 partial sums meet in a
  zeroed workspace through integer atomics (exact, so the result does not depend on arrival order); the last
  program to arrive for a tile, seen through a per-tile counter, reads the sum back, runs the epilogue and leaves
  its partial sums and counter at zero, so one workspace per device serves every call without a memset (a
  memset per GEMM cost ~110 µs of a 2.9 ms W4A8 decode step on the H200). The one-row column GEMV
  (kernels/w4a8_gemv.py) counts arrivals per output element instead (split_k_store's TALLY)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vllm_outliertune.format import qrange
from vllm_outliertune.kernels.act_quant import FLOAT_INPUT_DTYPES, check_activation_args, quantize_tile
from vllm_outliertune.kernels.int8_gemm import (epilogue_vectors, launch_options, multiprocessors, start_gemm,
                                                 store_scaled)

# The interpreter (CPU CI) runs no PTX: there the packed dot product is computed byte by byte (same result).
DP4A_ASM = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def dot4_accumulate(w4, x4, acc, USE_ASM: tl.constexpr):
    """acc + sum over the 4 bytes of int8 products of two int32 words (dp4a.s32.s32), elementwise."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w4, x4, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        # (v << 24 - 8j) >> 24 sign-extends byte j (>> is arithmetic on int32).
        for j in tl.static_range(4):
            acc += ((w4 << (24 - 8 * j)) >> 24) * ((x4 << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def code_sums(a_words, acc, USE_ASM: tl.constexpr):
    """acc + the sum of the 4 activation codes of each int32 word (a dp4a with 1, 1, 1, 1): the W4A8 kernels' zero
    point terms."""
    return dot4_accumulate(a_words, tl.full(a_words.shape, 0x01010101, tl.int32), acc, USE_ASM)


# split_k_store's tally words (int64): the sum of the splits' int32 partial sums in the low bits (two's complement,
# far below 2^39 in size), the number of splits that have added in from bit 40 up
ARRIVAL = tl.constexpr(1 << 40)


@triton.jit
def split_k_store(acc, out_ptr, scale, row_scale, bias, ws_ptr, count_ptr, tile, offs_m, offs_n, M, N,
                  stride_om, SPLIT_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  TALLY: tl.constexpr = False):
    """The epilogue of one K split of output tile ``tile`` (scale, row_scale, bias: int8_gemm.epilogue_vectors'):
    with SPLIT_K > 1 the int32 partial sums meet in the zeroed workspace through atomics and the last split to
    arrive (per-tile counter) stores the scaled result and zeroes what the tile used (its partial sums and counter)
    for the next GEMM. With TALLY each output element counts its own arrivals in its int64 workspace word
    (ARRIVAL): one atomic add that returns the word, and the split that completes it stores the element and zeroes
    the word; no counter, fence or second read. H200, column GEMV (one row, 1-2 outputs a thread): 1.07x over 16
    shapes at M = 1; tensor-core tiles (thousands of outputs a program, each add now waiting for its reply)
    0.94-0.99x at M = 4-64, so the other kernels keep the counter (docs/benchmarks.md, session 28)."""
    if SPLIT_K == 1:
        store_scaled(acc, out_ptr, scale, row_scale, bias, offs_m, offs_n, M, N, stride_om, True, HAS_ROW_SCALE,
                     HAS_BIAS)
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws_ptrs = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        if TALLY:
            mine = acc.to(tl.int64) + ARRIVAL
            tally = tl.atomic_add(ws_ptrs, mine, mask=mask, sem="relaxed") + mine
            last = mask & (tally >= SPLIT_K * ARRIVAL - ARRIVAL // 2)
            store_scaled((tally - SPLIT_K * ARRIVAL).to(tl.int32), out_ptr, scale, row_scale, bias, offs_m, offs_n,
                         M, N, stride_om, True, HAS_ROW_SCALE, HAS_BIAS, last)
            tl.store(ws_ptrs, tl.zeros(mine.shape, tl.int64), mask=last)
        else:
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial sum is in before this program counts itself in
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.atomic_xchg(ws_ptrs, 0, mask=mask, sem="relaxed")  # read at L2, past stale L1 lines
                store_scaled(total, out_ptr, scale, row_scale, bias, offs_m, offs_n, M, N, stride_om, True,
                             HAS_ROW_SCALE, HAS_BIAS)
                tl.store(count_ptr + tile, 0)  # every split has counted itself in


@triton.jit
def _splitk_gemm_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, inv_scale_ptr, shift_ptr, ws_ptr,
                        count_ptr, M, N, K, stride_xm, stride_wn, stride_om, K_PER_SPLIT,
                        QUANTIZE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                        HAS_INV_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                        HAS_BIAS: tl.constexpr,
                        EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, ACC_K: tl.constexpr, PACKED: tl.constexpr,
                        SWAP_AB: tl.constexpr, DP4A_ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # With PACKED, x and w are int32 views (4 int8 per word) and K, K_PER_SPLIT, BLOCK_K, strides count words.
    # One program per (M, N) tile, or (PROGRAMS_PER_SM in the config) a persistent grid that walks the tiles.
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for pid_mn in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * num_pid_n, tl.num_programs(0)):
        pid_m = pid_mn // num_pid_n
        pid_n = pid_mn % num_pid_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        rows_w = tl.where(offs_n < N, offs_n, 0)
        k_start = pid_k * K_PER_SPLIT
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + rows_w[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        # The epilogue's vectors come in while the K loop runs (H200, stream timing, Llama-3-8B and Qwen2.5-7B
        # shapes: 1.025x at M = 1, up to 1.046x; after the loop they were one more memory wait per program).
        scale, row_scale, bias = epilogue_vectors(scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, N, True,
                                                  HAS_ROW_SCALE, HAS_BIAS)

        if ACC_K or PACKED:
            acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.int32)
        elif SWAP_AB:
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for _ in range(0, tl.cdiv(tl.minimum(K - k_start, K_PER_SPLIT), BLOCK_K)):
            mask_k = offs_k < K
            # Weights are read once: evict them first, keep the activations (re-read by every tile) in L2.
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:  # zero weights cancel the padded codes
                w = tl.load(w_ptrs, mask=mask_k[:, None], other=0, eviction_policy="evict_first")
            if QUANTIZE:
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                a = quantize_tile(x, inv_scale_ptr, shift_ptr, offs_k, mask_k, QMIN, QMAX, HAS_INV_SCALE, HAS_SHIFT)
            else:
                a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
            if PACKED:
                acc3 = dot4_accumulate(w[None, :, :], a[:, :, None], acc3, DP4A_ASM)
            elif ACC_K:
                acc3 += a.to(tl.int32)[:, :, None] * w.to(tl.int32)[None, :, :]
            elif SWAP_AB:
                acc_t = tl.dot(tl.trans(w), tl.trans(a), acc_t, out_dtype=tl.int32)
            elif BLOCK_M >= 16:
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            else:
                acc += tl.sum(a.to(tl.int32)[:, :, None] * w.to(tl.int32)[None, :, :], axis=1)
            offs_k += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if ACC_K or PACKED:
            acc = tl.sum(acc3, axis=1)
        elif SWAP_AB:
            acc = tl.trans(acc_t)

        split_k_store(acc, out_ptr, scale, row_scale, bias, ws_ptr, count_ptr, pid_mn, offs_m, offs_n,
                      M, N, stride_om, SPLIT_K, HAS_ROW_SCALE, HAS_BIAS)


def _auto_split_k(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough K splits for ~2 programs per SM, keeping at least 4 K blocks per program."""
    return max(1, min(triton.cdiv(2 * multiprocessors(device), tiles), k_blocks // 4))


def split_k_plan(m: int, n: int, k: int, tiles: int, block_k: int, config: dict, device: torch.device,
                 tally: bool = False):
    """(split_k, K per split, workspace for the partial sums, per-tile counters) for split_k_store: SPLIT_K from
    the config (0 = automatic), reduced to the number of splits that really get K blocks; no workspace without
    a split; with ``tally`` (split_k_store's TALLY) int64 tally words and no counters."""
    k_blocks = triton.cdiv(k, block_k)
    split_k = config.get("SPLIT_K", 1) or _auto_split_k(tiles, k_blocks, device)
    k_per_split = triton.cdiv(k_blocks, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        return 1, k_per_split, None, None
    if tally:
        return split_k, k_per_split, zeroed_workspace(m * n, device, torch.int64)[:m * n], None
    workspace = zeroed_workspace(m * n + tiles, device)
    return split_k, k_per_split, workspace[:m * n], workspace[m * n:m * n + tiles]


_WORKSPACES: dict[tuple, list[torch.Tensor]] = {}


def _workspace(kind: str, words: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The device's buffer of this kind and ``dtype``, at least ``words`` long ("zeroed" ones start as zeros). GEMMs
    of one device run in stream order, so they can share it. A larger one replaces it when needed; the old ones stay
    allocated, as CUDA graphs captured earlier still point at them."""
    held = _WORKSPACES.setdefault((kind, device, dtype), [])
    if not held or held[-1].numel() < words:
        make = torch.zeros if kind == "zeroed" else torch.empty
        held.append(make(triton.next_power_of_2(words), dtype=dtype, device=device))
    return held[-1]


def zeroed_workspace(words: int, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The device's split-K workspace of ``dtype`` (int32 partial sums and counters, int64 tallies; at least
    ``words`` long), all zero between GEMMs (split_k_store puts the zeros back)."""
    return _workspace("zeroed", words, device, dtype)


def scratch_workspace(words: int, device: torch.device) -> torch.Tensor:
    """The device's int32 scratch of at least ``words``, in no particular state (kernels/w4a8_wgmma.py's splits
    each overwrite a slice of their own, so it needs no zeros)."""
    return _workspace("scratch", words, device, torch.int32)


def as_words(t: torch.Tensor) -> torch.Tensor | None:
    """An int8 [R, K] tensor as int32 [R, K/4] (4 codes per word, same memory), or None where the layout forbids."""
    if t.shape[1] % 4 or t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) % 4) or t.data_ptr() % 4:
        return None
    return t.view(torch.int32)


def splitk_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                inv_scale: torch.Tensor | None, shift: torch.Tensor | None, bits: int,
                out_dtype: torch.dtype, config: dict | None = None, row_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [M, K] @ w_q int8 [N, K]^T * w_scale[n] (* row_scale[m]) (+ bias[n]) -> out_dtype [M, N], one launch. Float
    x is quantized in the prologue with inv_scale / shift / bits; int8 x is used as it is (then inv_scale and shift
    must be None). `config` overrides the tile table (SPLIT_K 0 = automatic; PACKED applies to int8 x with K % 4 == 0
    only; SWAP_AB from BLOCK_M 16 where PACKED does not apply; PROGRAMS_PER_SM > 0 launches that many programs per
    SM, each walking several tiles, instead of one program per tile)."""
    quantize = x.dtype != torch.int8
    if quantize:
        check_activation_args(x, inv_scale, shift, bits)
    elif inv_scale is not None or shift is not None:
        raise ValueError("splitk_gemm: x is already int8 codes; pass inv_scale=None and shift=None")
    x, out, config = start_gemm("splitk_gemm", x.dtype in FLOAT_INPUT_DTYPES + (torch.int8,), x, w_q, w_scale, bias,
                                out_dtype, config, scaled_only=True, row_scale=row_scale)
    if config is None:
        return out
    (m, k), n = x.shape, w_q.shape[0]
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    x_words = w_words = None
    if config.get("PACKED") and not quantize and block_k % 4 == 0:
        x_words, w_words = as_words(x), as_words(w_q)
    packed = x_words is not None and w_words is not None
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split_k, k_per_split, partial_sums, counters = split_k_plan(m, n, k, tiles, block_k, config, x.device)
    qmin, qmax = qrange(bits)
    word = 4 if packed else 1
    programs = min(tiles, config.get("PROGRAMS_PER_SM", 0) * multiprocessors(x.device)) or tiles
    _splitk_gemm_kernel[(programs, split_k)](
        x_words if packed else x, w_words if packed else w_q, out, w_scale, row_scale, bias, inv_scale, shift,
        partial_sums, counters, m, n, k // word, x.stride(0) // word, w_q.stride(0) // word, out.stride(0),
        k_per_split // word,
        QUANTIZE=quantize, QMIN=qmin, QMAX=qmax, HAS_INV_SCALE=inv_scale is not None,
        HAS_SHIFT=shift is not None, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, SPLIT_K=split_k,
        ACC_K=bool(config.get("ACC_K")) and block_m < 16, PACKED=packed,
        SWAP_AB=bool(config.get("SWAP_AB")) and block_m >= 16 and not packed, DP4A_ASM=DP4A_ASM, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k // word, **launch_options(config), enable_fp_fusion=False)
    return out
