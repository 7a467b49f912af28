"""Kernel tests. CPU CI runs every Triton kernel under TRITON_INTERPRET=1 in ONE subprocess (triton.jit reads the
variable when the kernels are decorated at import, so it cannot be switched on inside a pytest process that may
already have imported them); the subprocess is this file run as a script and prints one JSON line per case.
GPU tests (pytest.mark.gpu) run the compiled kernels on real sizes and skip without CUDA."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels.w4a8_swar import level_offset, level_words

SMALL_M, SMALL_K, SMALL_N = (1, 3, 17), (48, 200), (24, 136)
ACT_BITS = (8, 6, 4)


def interpreter_cases() -> list[tuple[int, int, int]]:
    return list(itertools.product(SMALL_M, SMALL_K, SMALL_N))


def make_problem(m: int, k: int, n: int, bits: int, seed: int, device: str = "cpu", dtype=torch.bfloat16,
                 with_vectors: bool = True, with_bias: bool = True) -> dict:
    """Random inputs (never zeros): activations with channel outliers, exact .5 ties, int8 weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (1 + 30 * (torch.rand(k, generator=g) > 0.9))
    x[:, : k // 8] = torch.randint(-140, 140, (m, k // 8), generator=g) + 0.5  # ties: round half to even
    inv_scale = torch.rand(k, generator=g) + 0.5 if with_vectors else None
    shift = torch.randint(-4, 5, (k,), generator=g).float() if with_vectors else None
    if with_vectors:
        inv_scale[: k // 8] = 1.0  # keep the ties exact
    qmax = (1 << (bits - 1)) - 1
    problem = dict(x=x.to(dtype), inv_scale=inv_scale, shift=shift,
                   w_q=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                   w_scale=torch.rand(n, generator=g) * 0.01 + 1e-4,
                   bias=torch.randn(n, generator=g) if with_bias else None, bits=bits, qmax=qmax)
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in problem.items()}


def check_case(m: int, k: int, n: int, seed: int, device: str = "cpu") -> list[str]:
    """Every kernel against the torch reference on one shape; returns the failures (empty when all pass)."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.int8_gemm_tma import int8_gemm_tma
    from vllm_outliertune.kernels import act_quant
    from vllm_outliertune.kernels.linear import (
        guard_parts, int8_gemm, quantize_activation, quantize_activation_guarded,
        quantize_activation_guarded_in_parts, quantized_linear)
    from vllm_outliertune.kernels.splitk_gemm import splitk_gemm, zeroed_workspace

    bits = ACT_BITS[seed % len(ACT_BITS)]
    p = make_problem(m, k, n, bits, seed, device, with_vectors=seed % 4 != 3, with_bias=seed % 2 == 0)
    failures = []

    def expect_equal(name, got, want):
        if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got, want):
            diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else "shape"
            failures.append(f"{name} M={m} K={k} N={n} bits={bits}: {got.dtype} {list(got.shape)} vs reference "
                            f"{want.dtype} {list(want.shape)}, max |diff| {diff}")

    x, w_q, w_scale, bias = p["x"], p["w_q"], p["w_scale"], p["bias"]
    q_ref = torch_ref.quantize_activation_ref(x, p["inv_scale"], p["shift"], bits)
    expect_equal("quantize_activation", quantize_activation(x, p["inv_scale"], p["shift"], bits), q_ref)
    # The token guard's codes and t per row (rows beyond the range get t > 1, with a floor below 1 small rows
    # t < 1), rows in registers and, with the block limits lowered, in two passes of several blocks; against the
    # reference on the CPU (CUDA's eager division by a Python number multiplies by its reciprocal: t an ulp off).
    floor = (1.0, 1 / 16)[seed % 2]
    on_cpu = [None if v is None else v.cpu() for v in (x, p["inv_scale"], p["shift"])]
    codes_want, t_want = torch_ref.quantize_activation_guarded_ref(*on_cpu, bits, floor)
    for one_block_k, pass_block_k in ((act_quant.GUARDED_ONE_BLOCK_K, act_quant.GUARDED_PASS_BLOCK_K), (32, 64)):
        limits = act_quant.GUARDED_ONE_BLOCK_K, act_quant.GUARDED_PASS_BLOCK_K
        act_quant.GUARDED_ONE_BLOCK_K, act_quant.GUARDED_PASS_BLOCK_K = one_block_k, pass_block_k
        try:
            codes, t = quantize_activation_guarded(x, p["inv_scale"], p["shift"], bits, floor)
        finally:
            act_quant.GUARDED_ONE_BLOCK_K, act_quant.GUARDED_PASS_BLOCK_K = limits
        name = f"quantize_activation_guarded floor={floor} {'one block' if k <= one_block_k else 'two passes'}"
        expect_equal(f"{name} codes", codes.cpu(), codes_want)
        expect_equal(f"{name} t", t.cpu(), t_want)
    # The guard in parts (floor 1): codes at t = 1, then guard_fixup rewrites rows with t > 1 in blocks of K (one
    # block; with the block lowered several, on x stored channel-major, whose codes then are too).
    codes_want, t_want = torch_ref.quantize_activation_guarded_ref(*on_cpu, bits)
    for parts, block_k, layout in ((guard_parts(k), act_quant.GUARD_FIXUP_BLOCK_K, x),
                                   (k // 8, 32, x.t().contiguous().t())):
        limit, act_quant.GUARD_FIXUP_BLOCK_K = act_quant.GUARD_FIXUP_BLOCK_K, block_k
        try:
            codes, t = quantize_activation_guarded_in_parts(layout, p["inv_scale"], p["shift"], bits, parts)
        finally:
            act_quant.GUARD_FIXUP_BLOCK_K = limit
        name = f"quantize_activation_guarded_in_parts parts={parts} block_k={block_k}"
        expect_equal(f"{name} codes", codes.cpu(), codes_want)
        expect_equal(f"{name} t", t.cpu(), t_want)
    expect_equal("int8_gemm int32", int8_gemm(q_ref, w_q, None, None, torch.int32),
                 torch_ref.int_mm_exact(q_ref, w_q))
    for out_dtype in (torch.bfloat16, torch.float16):
        y_ref = torch_ref.int8_gemm_ref(q_ref, w_q, w_scale, bias, out_dtype)
        expect_equal(f"int8_gemm {out_dtype}", int8_gemm(q_ref, w_q, w_scale, bias, out_dtype), y_ref)
    y_ref = torch_ref.int8_gemm_ref(q_ref, w_q, w_scale, bias, torch.bfloat16)
    if k % 16 == 0:  # TMA needs 16-byte aligned rows
        tma_config = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
        expect_equal("int8_gemm_tma", int8_gemm_tma(q_ref, w_q, w_scale, bias, torch.bfloat16, tma_config), y_ref)
    # PROGRAMS_PER_SM: a persistent grid (the interpreter counts one SM, so one or two programs walk all tiles).
    for block_m, split_k, variant in ((16, 1, {}), (16, 3, {}), (2, 2, {}), (1, 1, {"ACC_K": 1}),
                                      (4, 3, {"ACC_K": 1}), (1, 2, {"PACKED": 1}), (2, 1, {"PACKED": 1}),
                                      (1, 1, {"PACKED": 1, "PROGRAMS_PER_SM": 1}),
                                      (16, 2, {"PROGRAMS_PER_SM": 2}), (16, 1, {"SWAP_AB": 1}),
                                      (32, 3, {"SWAP_AB": 1})):
        config = {"BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k, **variant}
        name = f"splitk_gemm block_m={block_m} split_k={split_k} {variant}"
        # Float input (quantized in the prologue; PACKED does not apply) and int8 codes.
        got = splitk_gemm(x, w_q, w_scale, bias, p["inv_scale"], p["shift"], bits, torch.bfloat16, config)
        expect_equal(f"{name} float x", got, y_ref)
        expect_equal(f"{name} int8 x", splitk_gemm(q_ref, w_q, w_scale, bias, None, None, 8, torch.bfloat16, config),
                     y_ref)
        # K - 1 columns at an odd byte offset: no 32-bit words, PACKED falls back to byte loads.
        q_odd, w_odd = q_ref[:, 1:], w_q[:, 1:]
        expect_equal(f"{name} int8 x, odd K", splitk_gemm(q_odd, w_odd, w_scale, bias, None, None, 8,
                                                           torch.bfloat16, config),
                     torch_ref.int8_gemm_ref(q_odd, w_odd, w_scale, bias, torch.bfloat16))
    expect_equal("quantized_linear", quantized_linear(x.view(1, m, k), w_q, w_scale, bias, p["inv_scale"],
                                                      p["shift"], bits, torch.bfloat16), y_ref.view(1, m, n))
    # The token guard's per-row scale t (>= 1, one row at 1) in every epilogue: tiled, split-K (one and two K
    # splits), TMA, and the op's table dispatch.
    row_scale = 1 + torch.rand(m, 1, generator=torch.Generator().manual_seed(seed)).to(device) * 3
    row_scale[0] = 1.0
    y_rows = torch_ref.int8_gemm_ref(q_ref, w_q, w_scale, bias, torch.bfloat16, row_scale)
    expect_equal("int8_gemm row_scale", int8_gemm(q_ref, w_q, w_scale, bias, torch.bfloat16, row_scale), y_rows)
    for split_k in (1, 2):
        config = {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": split_k}
        expect_equal(f"splitk_gemm split_k={split_k} row_scale", splitk_gemm(
            q_ref, w_q, w_scale, bias, None, None, 8, torch.bfloat16, config, row_scale), y_rows)
    if k % 16 == 0:
        expect_equal("int8_gemm_tma row_scale", int8_gemm_tma(q_ref, w_q, w_scale, bias, torch.bfloat16, tma_config,
                                                              row_scale), y_rows)
    failures += check_w4a8_case(q_ref, n, w_scale, bias, seed, row_scale)
    failures += check_column_gemv(q_ref, n, w_scale, bias, seed, row_scale)
    # The split-K calls above share one workspace, each leaving it zeroed for the next (no memset per call).
    if zeroed_workspace(1, x.device).any() or zeroed_workspace(1, x.device, torch.int64).any():
        failures.append("split-K workspace: partial sums, tile counters or tallies not put back to zero")
    return failures


def make_packed_codes(n: int, k: int, group_size: int, seed: int,
                      max_scale: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random 4-bit codes [N, K] with group scales up to max_scale and zero points (up to scale 8 every code and
    zero point keeps the levels inside int8; above, the codes are clamped into int8 as `quantize` clamps them and
    each group's first channel takes its largest code, where code * scale is largest: up to 255 at scale 17)."""
    from vllm_outliertune.format import group_count

    g = torch.Generator().manual_seed(seed)
    groups = group_count(k, group_size)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.randint(1, max_scale + 1, (n, groups), generator=g, dtype=torch.uint8)  # 8: |level| <= 120
    zero = torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8)
    if max_scale > 8:
        index = torch.arange(k) // (group_size or k)
        s, z = scale[:, index].long(), zero[:, index].long()
        low, high = (z - 128 // s).clamp(min=0), (z + 127 // s).clamp(max=15)
        codes = torch.minimum(torch.maximum(codes.long(), low), high)
        first = torch.arange(k) % (group_size or k) == 0
        codes[:, first] = high[:, first]
        codes = codes.to(torch.uint8)
    return codes, scale, zero


def make_packed_weight(n: int, k: int, group_size: int, seed: int,
                       max_scale: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_packed_codes as the W4A8 ops take it: int32 words of 8 channels (kernels/w4a8_words.py, from the
    checkpoint's bytes), row-major, with the group tensors."""
    from vllm_outliertune.format import pack_int4
    from vllm_outliertune.kernels.w4a8_words import pack_words

    codes, scale, zero = make_packed_codes(n, k, group_size, seed, max_scale)
    return pack_words(pack_int4(codes), k), scale, zero


# (kernel, group size, config): tiles inside one group and groups gathered per channel, split K, M < 16 and >= 16,
# and the FACTORED loops (group terms per output): dp4a on words (M < 16; with the K accumulator ACC_K) and
# tensor-core dots on the codes, also with the zero points in the weight operand (WORD_LEVELS) and loads a step
# ahead (PREFETCH). Case i (interpreter_cases) runs variant i: those with PREFETCH meet K = 200 (several steps).
W4A8_VARIANTS = (("w4a8_splitk", 32, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}),
                 ("w4a8_splitk", 48, {"BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 0}),
                 ("w4a8_splitk", 32, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "FACTORED": 1,
                                      "PREFETCH": 1}),
                 ("w4a8_gemm", 0, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}),
                 ("w4a8_gemm", 16, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}),
                 ("w4a8_splitk", 32, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3, "FACTORED": 1}),
                 ("w4a8_gemm", 64, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "FACTORED": 1,
                                    "PREFETCH": 1, "WORD_LEVELS": 1}),
                 ("w4a8_gemm", 64, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "FACTORED": 1, "PREFETCH": 1}),
                 ("w4a8_gemm", 64, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "FACTORED": 1}),
                 ("w4a8_splitk", 128, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3, "FACTORED": 1,
                                       "WORD_LEVELS": 1}),
                 ("w4a8_splitk", 32, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "FACTORED": 1,
                                      "ACC_K": 1}),
                 ("w4a8_splitk", 0, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "FACTORED": 1, "ACC_K": 1}),
                 # dp4a tiles of several whole groups (the second K step and the split's tail past K: 2 of 4 groups)
                 ("w4a8_splitk", 8, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "FACTORED": 1, "PREFETCH": 1}),
                 ("w4a8_splitk", 16, {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "FACTORED": 1,
                                      "ACC_K": 1}),
                 # the one-row GEMV loop, with its loads a step ahead across a split
                 ("w4a8_splitk", 32, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "FACTORED": 1, "GEMV": 1}),
                 ("w4a8_splitk", 64, {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "FACTORED": 1,
                                      "GEMV": 1, "PREFETCH": 1}),
                 # and over tiles of several whole groups (4 and 2 per tile)
                 ("w4a8_splitk", 8, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "FACTORED": 1,
                                     "GEMV": 1, "PREFETCH": 1}),
                 ("w4a8_splitk", 16, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "FACTORED": 1, "GEMV": 1}),
                 # the group scale inside the weight operand (SCALED_LEVELS): split K with loads a step ahead, and
                 # one step of 128 channels (K = 200: the second partly past K)
                 ("w4a8_gemm", 64, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "FACTORED": 1,
                                    "PREFETCH": 1, "SCALED_LEVELS": 1}),
                 ("w4a8_splitk", 128, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "FACTORED": 1,
                                       "SCALED_LEVELS": 1}),
                 # WGMMA tiles (kernels/w4a8_wgmma.py on Hopper; here and on other GPUs the loop of the same tile)
                 ("w4a8_splitk", 128, {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
                                       "num_stages": 3, "LEVEL_BUFS": 1, "WGMMA": 1}),
                 ("w4a8_gemm", 0, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4,
                                   "LEVEL_BUFS": 2, "WGMMA": 1}),
                 ("w4a8_splitk", 128, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
                                       "num_stages": 4, "SWAP_AB": 1, "WGMMA": 1}),
                 ("w4a8_splitk", 128, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4,
                                       "num_stages": 3, "SWAP_AB": 1, "NATURAL_K": 1, "WGMMA": 1}))


# (group size, config) of the column GEMV (kernels/w4a8_gemv.py): one group a step over 2 K chunks, two groups a step
# with K split, one chunk with a 3-way split (the last split short), 4 chunks of 8-channel groups with the split
# chosen by the launcher. Case i runs variant i mod 4, at M = 1, 3 and 17 (one program row each).
COLUMN_VARIANTS = ((32, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 32, "K_WARPS": 2, "SPLIT_K": 1, "COLUMNS": 1}),
                   (16, {"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 32, "K_WARPS": 2, "SPLIT_K": 2, "COLUMNS": 1}),
                   (64, {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64, "K_WARPS": 1, "SPLIT_K": 3, "COLUMNS": 1}),
                   (8, {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 16, "K_WARPS": 4, "SPLIT_K": 0, "COLUMNS": 1}))


def check_column_gemv(codes: torch.Tensor, n: int, w_scale: torch.Tensor, bias: torch.Tensor | None, seed: int,
                      row_scale: torch.Tensor) -> list[str]:
    """The column GEMV against the torch reference, exactly, with and without the token guard's row scale: on
    N-major words (the plugin's GPU layout), where the launcher must run it, and on row-major ones, where it must
    run the same tile as a GEMV of the other loop."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import w4a8_gpu_layout
    from vllm_outliertune.kernels.splitk_gemm import as_words
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm
    from vllm_outliertune.kernels.w4a8_gemv import column_gemv_applies

    failures = []
    group_size, config = COLUMN_VARIANTS[seed % len(COLUMN_VARIANTS)]
    (m, k) = codes.shape
    for layout, n_major in ((w4a8_gpu_layout, True), (torch.Tensor.contiguous, False)):
        packed = [layout(t.to(codes.device)) for t in make_packed_weight(n, k, group_size, seed)]
        if column_gemv_applies(as_words(codes), packed[0], packed[1], group_size, config) != n_major:
            failures.append(f"column GEMV applies to {packed[0].stride()} words: {not n_major}")
        for scale in (None, row_scale):
            want = torch_ref.w4a8_gemm_ref(codes, *packed, group_size, w_scale, bias, torch.bfloat16, scale)
            got = w4a8_gemm(codes, *packed, group_size, w_scale, bias, torch.bfloat16, "w4a8_splitk", config, scale)
            if not torch.equal(got, want):
                failures.append(f"column GEMV group_size={group_size} {config} M={m} K={k} N={n} words "
                                f"{packed[0].stride()} row_scale={scale is not None}: max |diff| "
                                f"{(got.float() - want.float()).abs().max().item()}")
    return failures


def check_w4a8_case(codes: torch.Tensor, n: int, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    seed: int, row_scale: torch.Tensor) -> list[str]:
    """The W4A8 kernel and the w4a8_gemm op's table dispatch against the torch reference, exactly; the widened
    levels against the checkpoint format's own unpacking of the bytes. The kernel runs this case's variants
    (W4A8_VARIANTS[i] runs in case i mod the number of cases), at K channels with the words stored row-major and at
    K - 1, an odd K whose activation rows are no 32-bit words, stored N-major as the plugin lays them out on a GPU."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import w4a8_gemm as w4a8_op
    from vllm_outliertune.kernels.linear import w4a8_gpu_layout
    from vllm_outliertune.format import code_levels
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm
    from vllm_outliertune.kernels.w4a8_unpack import unpack_levels

    failures = []
    cases = len(interpreter_cases())  # variant i runs in case i, i - cases, ...
    variants = [v for i, v in enumerate(W4A8_VARIANTS) if i % cases == seed % cases]
    for (kernel, group_size, config), (a_q, layout) in itertools.product(
            variants, ((codes, torch.Tensor.contiguous), (codes[:, :-1], w4a8_gpu_layout))):
        (m, k) = a_q.shape
        packed = [layout(t.to(a_q.device)) for t in make_packed_weight(n, k, group_size, seed)]
        want = torch_ref.w4a8_gemm_ref(a_q, *packed, group_size, w_scale, bias, torch.bfloat16)
        got = w4a8_gemm(a_q, *packed, group_size, w_scale, bias, torch.bfloat16, kernel, config)
        if not torch.equal(got, want):
            failures.append(f"{kernel} group_size={group_size} {config} M={m} K={k} N={n}: max |diff| "
                            f"{(got.float() - want.float()).abs().max().item()}")
        if config.get("SCALED_LEVELS"):  # group scales up to the byte's edge (17), and past it, which the launcher
            failures += check_scaled_levels(a_q, n, group_size, layout, kernel, config, w_scale, bias, seed)
        if layout is torch.Tensor.contiguous:  # the token guard's per-row scale in the W4A8 epilogue
            got = w4a8_gemm(a_q, *packed, group_size, w_scale, bias, torch.bfloat16, kernel, config, row_scale)
            if not torch.equal(got, torch_ref.w4a8_gemm_ref(a_q, *packed, group_size, w_scale, bias, torch.bfloat16,
                                                            row_scale)):
                failures.append(f"{kernel} group_size={group_size} {config} M={m} K={k} N={n} with row_scale")
        # w4a8_unpack: the widened levels (a tile that leaves partial tiles along N and K), then the int8 GEMM
        levels = unpack_levels(*packed, group_size, k, {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4})
        want_levels = code_levels(*make_packed_codes(n, k, group_size, seed), group_size).to(torch.int8)
        if not torch.equal(levels, want_levels.to(levels.device)):
            failures.append(f"unpack_levels group_size={group_size} K={k} N={n} strides {packed[0].stride()}")
    if seed == 0:  # warming up a packed weight at load runs the W4A8 dispatch at every row count it lists
        from vllm_outliertune.kernels.configs import table_keys
        from vllm_outliertune.kernels.linear import PackedGroups, warm_up, warmup_rows

        k = codes.shape[1]
        packed = [t.to(codes.device) for t in make_packed_weight(n, k, 32, seed)]
        ran = warm_up(packed[0], w_scale, bias, torch.bfloat16, 40, PackedGroups(packed[1], packed[2], 32, k))
        if ran != len(warmup_rows(n, k, table_keys(codes.device), False, 40, packed=True)):
            failures.append(f"warm_up of a packed weight ran {ran} GEMMs")
    if seed % 3:  # the table's dispatch on every third case
        return failures
    packed = [t.to(codes.device) for t in make_packed_weight(n, codes.shape[1], 32, seed)]
    dispatched = w4a8_op(codes, *packed, 32, w_scale, bias, torch.float16)
    if not torch.equal(dispatched, torch_ref.w4a8_gemm_ref(codes, *packed, 32, w_scale, bias, torch.float16)):
        failures.append(f"w4a8_gemm op (table dispatch) M={codes.shape[0]} K={codes.shape[1]} N={n}")
    dispatched = w4a8_op(codes, *packed, 32, w_scale, bias, torch.float16, row_scale)
    if not torch.equal(dispatched, torch_ref.w4a8_gemm_ref(codes, *packed, 32, w_scale, bias, torch.float16,
                                                           row_scale)):
        failures.append(f"w4a8_gemm op with row_scale M={codes.shape[0]} K={codes.shape[1]} N={n}")
    return failures


def check_scaled_levels(a_q: torch.Tensor, n: int, group_size: int, layout, kernel: str, config: dict,
                        w_scale: torch.Tensor, bias: torch.Tensor | None, seed: int) -> list[str]:
    """A SCALED_LEVELS tile on group scales whose code * scale reach 255 (the loop's edge: exact) and on larger
    ones (format.levels_fit_bytes False: the launcher must run the other loop, also exact)."""
    from vllm_outliertune.format import pack_int4, levels_fit_bytes
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm

    failures = []
    k = a_q.shape[1]
    for max_scale, fits in ((17, True), (40, False)):
        codes, scale, zero = make_packed_codes(n, k, group_size, seed, max_scale)
        if levels_fit_bytes(pack_int4(codes), scale, group_size, k) != fits:
            failures.append(f"levels_fit_bytes(max_scale {max_scale}) is not {fits}")
        packed = [layout(t.to(a_q.device)) for t in make_packed_weight(n, k, group_size, seed, max_scale)]
        want = torch_ref.w4a8_gemm_ref(a_q, *packed, group_size, w_scale, bias, torch.bfloat16)
        got = w4a8_gemm(a_q, *packed, group_size, w_scale, bias, torch.bfloat16, kernel, config,
                        levels_fit_bytes=fits)
        if not torch.equal(got, want):
            failures.append(f"{kernel} group_size={group_size} {config} M={a_q.shape[0]} K={k} N={n} group scales "
                            f"up to {max_scale}: max |diff| {(got.float() - want.float()).abs().max().item()}")
    return failures


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, list[str]]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    # (400 s on a quiet 2-core CI machine in session 17, 630 s in session 18 with the guard-in-parts checks added)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {line["case"]: line["failures"] for line in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("m,k,n", interpreter_cases())
def test_kernels_match_reference_in_interpreter(interpreter_results, m, k, n):
    failures = interpreter_results[f"{m},{k},{n}"]
    assert not failures, "\n".join(failures)


def test_cpu_ops_fall_back_to_reference_and_register_fakes():
    """Without the interpreter, CPU tensors take the exact torch path; opcheck validates schema + fake impls."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import (
        int8_gemm, quantize_activation, quantize_activation_guarded, quantized_linear)

    p = make_problem(5, 72, 40, 8, seed=1)
    q = torch_ref.quantize_activation_ref(p["x"], p["inv_scale"], p["shift"], 8)
    y = quantized_linear(p["x"], p["w_q"], p["w_scale"], p["bias"], p["inv_scale"], p["shift"], 8, torch.bfloat16)
    assert torch.equal(y, torch_ref.int8_gemm_ref(q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16))
    torch.library.opcheck(quantize_activation, (p["x"], p["inv_scale"], None, 6))
    codes, t = quantize_activation_guarded(p["x"], p["inv_scale"], p["shift"], 8, 0.5)
    expected = torch_ref.quantize_activation_guarded_ref(p["x"], p["inv_scale"], p["shift"], 8, 0.5)
    assert torch.equal(codes, expected[0]) and torch.equal(t, expected[1])
    torch.library.opcheck(quantize_activation_guarded, (p["x"], p["inv_scale"], p["shift"], 8, 0.5))
    torch.library.opcheck(int8_gemm, (q, p["w_q"], p["w_scale"], None, torch.float16))
    row_scale = torch.linspace(1, 3, 5).view(5, 1)  # the token guard's t: the reference's epilogue, and the fake
    y = int8_gemm(q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, row_scale)
    assert torch.equal(y, torch_ref.int8_gemm_ref(q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, row_scale))
    assert not torch.equal(y, torch_ref.int8_gemm_ref(q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16))
    torch.library.opcheck(int8_gemm, (q, p["w_q"], p["w_scale"], p["bias"], torch.float16, row_scale))
    torch.library.opcheck(quantized_linear, (p["x"].view(1, 5, 72), p["w_q"], p["w_scale"], p["bias"], None,
                                             p["shift"], 8, torch.bfloat16))


def test_w4a8_ops_on_cpu_use_the_reference_and_register_fakes():
    """Without the interpreter the W4A8 ops run the exact reference: the int8 GEMM on the unpacked levels."""
    from vllm_outliertune.format import code_levels
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import w4a8_gemm, w4a8_linear

    p = make_problem(3, 96, 40, 8, seed=2)
    packed = make_packed_weight(40, 96, 32, seed=2)
    levels = code_levels(*make_packed_codes(40, 96, 32, seed=2), 32).to(torch.int8)
    q = torch_ref.quantize_activation_ref(p["x"], p["inv_scale"], p["shift"], 8)
    y = w4a8_linear(p["x"], *packed, 32, p["w_scale"], p["bias"], p["inv_scale"], p["shift"], 8, torch.bfloat16)
    assert torch.equal(y, torch_ref.int8_gemm_ref(q, levels, p["w_scale"], p["bias"], torch.bfloat16))
    torch.library.opcheck(w4a8_gemm, (q, *packed, 32, p["w_scale"], None, torch.float16))
    row_scale = torch.tensor([[1.0], [2.5], [1.25]])
    assert torch.equal(w4a8_gemm(q, *packed, 32, p["w_scale"], p["bias"], torch.bfloat16, row_scale),
                       torch_ref.int8_gemm_ref(q, levels, p["w_scale"], p["bias"], torch.bfloat16, row_scale))
    torch.library.opcheck(w4a8_gemm, (q, *packed, 32, p["w_scale"], None, torch.float16, row_scale))
    torch.library.opcheck(w4a8_linear, (p["x"].view(1, 3, 96), *packed, 32, p["w_scale"],
                                        p["bias"], None, p["shift"], 4, torch.bfloat16))


def test_bad_arguments_are_named():
    from vllm_outliertune.kernels.int8_gemm import check_gemm_args

    a = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="w_q"):
        check_gemm_args(True, a, torch.zeros(8, 4, dtype=torch.int8).t(), None, None, torch.int32)
    with pytest.raises(ValueError, match="w_scale"):
        check_gemm_args(True, a, torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None, torch.bfloat16)
    with pytest.raises(ValueError, match="row_scale"):  # one per activation row (2 here)
        check_gemm_args(True, a, torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), None, torch.bfloat16,
                        row_scale=torch.ones(3, 1))


H100_KEYS = ("NVIDIA H100 80GB HBM3", "sm90", "default")
H200_KEYS = ("NVIDIA H200", "sm90", "default")
LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


@pytest.mark.parametrize("keys", [H100_KEYS, H200_KEYS, ("default",)], ids=["h100-table", "h200-table", "default-table"])
@pytest.mark.parametrize("tma_ok", [True, False])
def test_warmup_rows_reach_every_compiled_variant(keys, tma_ok):
    """The rows warmed up at load must hit every (kernel, tile, M specialisation) that any batch of 1 .. max_m rows
    can reach, or a request of that size would still wait for a JIT compile: int8 weights and packed 4-bit ones
    (W4A8 kernels, and the int8 GEMM after w4a8_unpack)."""
    from vllm_outliertune.kernels.linear import compile_variant, warm_up, warmup_rows

    for (n, k), max_m, packed in itertools.product(LLAMA3_8B_SHAPES + ((136, 200),), (16384, 300), (False, True)):
        rows = warmup_rows(n, k, keys, tma_ok, max_m, packed)
        reachable = {compile_variant(m, n, k, keys, tma_ok, packed) for m in range(1, max_m + 1)}
        assert {compile_variant(m, n, k, keys, tma_ok, packed) for m in rows} == reachable, (n, k, max_m, packed)
        assert len(rows) == len(reachable) and max(rows) <= max_m
    p = make_problem(1, 48, 24, 8, seed=0)
    assert warm_up(p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, 64) == 0  # nothing to compile off CUDA


def test_warmup_of_a_guarded_layer_compiles_its_row_scale_variants(monkeypatch):
    """A layer with the token guard runs every GEMM with t in the epilogue (HAS_ROW_SCALE, variants of their own):
    its warm-up passes a float32 per-row scale of ones, one value per row, and an unguarded layer's passes none;
    under the bfloat16 default dtype vLLM loads a bf16 model with (a bf16 t failed the GEMM's check on the H200)."""
    from types import SimpleNamespace

    from vllm_outliertune.kernels import linear

    calls = []
    monkeypatch.setattr(linear, "_runs_triton", lambda t: True)
    monkeypatch.setattr(linear, "_triton", lambda: SimpleNamespace(supports_tma=lambda *_: False))
    monkeypatch.setattr(linear, "_gemm", lambda a_q, *args: calls.append((a_q.shape[0], args[-1])))
    p = make_problem(1, 48, 24, 8, seed=0)
    torch.set_default_dtype(torch.bfloat16)
    for guarded in (True, False):
        calls.clear()
        try:
            ran = linear.warm_up(p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, 64, guarded=guarded)
        finally:
            torch.set_default_dtype(torch.float32)
        assert ran == len(calls) > 0
        for m, row_scale in calls:
            if guarded:
                assert row_scale.dtype == torch.float32 and row_scale.shape == (m, 1) and bool((row_scale == 1).all())
            else:
                assert row_scale is None


def test_tuner_replaces_only_the_tuned_buckets(tmp_path):
    from vllm_outliertune.kernels.tune import keep_untuned_buckets, write_table

    path = tmp_path / "table.json"
    write_table(path, "GPU", {"splitk_gemm": {"N=8,K=8": {"1": {"old": 1}, "4": {"old": 4}, "16": {"old": 16}},
                                              "N=9,K=9": {"1": {"old": 1}}, "N=7,K=7": {"4": {"old": 4}}}})
    tuned = {"N=8,K=8": {"4": {"new": 4}}}  # N=9 was tuned too, and the kernel lost its bucket 1 this time
    merged = keep_untuned_buckets(path, "GPU", "splitk_gemm", tuned, [1, 4], {"N=8,K=8", "N=9,K=9"})
    # N=7 was not tuned in this run: all its buckets stay
    assert merged == {"N=8,K=8": {"4": {"new": 4}, "16": {"old": 16}}, "N=9,K=9": {}, "N=7,K=7": {"4": {"old": 4}}}
    assert keep_untuned_buckets(tmp_path / "absent.json", "GPU", "splitk_gemm", tuned, [4], {"N=8,K=8"}) == tuned


def test_tuner_keeps_buckets_of_an_external_gemm_it_did_not_time(tmp_path):
    from vllm_outliertune.kernels.tune import keep_untimed_owners, write_table

    path = tmp_path / "table.json"
    write_table(path, "GPU", {"int8_gemm": {"N=8,K=8": {"16": {"old": 16}, "64": {"old": 64}}},
                              "cutlass_scaled_mm": {"N=8,K=8": {"64": {}}, "N=7,K=7": {"64": {}}}})
    run = {"int8_gemm": {"N=8,K=8": {"16": {"new": 16}, "64": {"new": 64}}},
           "splitk_gemm": {"N=8,K=8": {"16": {"new": 16}, "64": {"new": 64}}}}
    # A run without CUTLASS: at CUTLASS's bucket 64 split-K would run ahead of it; the table's choice stays.
    kept = keep_untimed_owners(path, "GPU", json.loads(json.dumps(run)), ("int8_gemm", "splitk_gemm"))
    assert kept == {"int8_gemm": {"N=8,K=8": {"16": {"new": 16}, "64": {"old": 64}}},
                    "splitk_gemm": {"N=8,K=8": {"16": {"new": 16}}}}
    # A run that timed CUTLASS decides bucket 64 itself.
    assert keep_untimed_owners(path, "GPU", json.loads(json.dumps(run)), ("int8_gemm", "splitk_gemm",
                                                                          "cutlass_scaled_mm")) == run


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,n", [(1, 4096, 6144), (7, 14336, 4096), (16, 4096, 28672), (33, 4096, 4096),
                                   (300, 4096, 6144), (1024, 14336, 4096), (4097, 4096, 1000), (8192, 4096, 4096),
                                   (3, 200, 136), (17, 48, 24)])
def test_gpu_kernels_match_reference(m, k, n):
    failures = check_case(m, k, n, seed=m + k + n, device="cuda")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@gpu
def test_gpu_split_k_is_deterministic_and_graph_capturable():
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import quantized_linear
    from vllm_outliertune.kernels.splitk_gemm import splitk_gemm

    p = make_problem(4, 14336, 4096, 8, seed=3, device="cuda")
    args = (p["x"], p["w_q"], p["w_scale"], p["bias"], p["inv_scale"], p["shift"], 8, torch.bfloat16)
    config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 8, "num_warps": 4, "num_stages": 3}
    first = splitk_gemm(*args, config)
    for _ in range(20):
        assert torch.equal(splitk_gemm(*args, config), first)
    eager = quantized_linear(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = quantized_linear(*args)
    # Replays, with other split-K launches (larger M) between them.
    for rows in (4, 64, 4):
        graph.replay()
        assert torch.equal(captured, eager)
        wide = make_problem(rows, 14336, 4096, 8, seed=rows, device="cuda")
        wide_args = (wide["x"], *args[1:4], wide["inv_scale"], wide["shift"], 8, torch.bfloat16)
        codes = torch_ref.quantize_activation_ref(wide["x"], wide["inv_scale"], wide["shift"], 8)
        assert torch.equal(splitk_gemm(*wide_args, dict(config, BLOCK_M=64 if rows > 16 else 16)),
                           torch_ref.int8_gemm_ref(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16))
    compiled = torch.compile(lambda x: quantized_linear(x, *args[1:]), fullgraph=True)
    assert torch.equal(compiled(p["x"]), eager)


@pytest.mark.gpu
@gpu
def test_gpu_tma_gemm_replays_from_a_cuda_graph():
    """The persistent TMA GEMM builds host-side tensor descriptors at launch: captured in a CUDA graph (as vLLM runs
    decode batches up to its capture size), a replay must read the new contents of the captured input buffer."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.int8_gemm_tma import int8_gemm_tma, supports_tma

    m, k, n = 256, 4096, 28672
    p = make_problem(m, k, n, 8, seed=5, device="cuda")
    first = torch_ref.quantize_activation_ref(p["x"], p["inv_scale"], p["shift"], 8)
    second = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
    if not supports_tma(first, p["w_q"]):
        pytest.skip("needs a Hopper GPU")
    config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    codes = first.clone()
    int8_gemm_tma(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, config)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = int8_gemm_tma(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, config)
    for values in (first, second):
        codes.copy_(values)
        graph.replay()
        assert torch.equal(captured, torch_ref.int8_gemm_ref(values, p["w_q"], p["w_scale"], p["bias"],
                                                             torch.bfloat16))


@triton.jit
def _level_words_probe(codes_ptr, scale_ptr, zero_ptr, out_ptr, ROWS: tl.constexpr):
    """kernels/w4a8_swar.py's level_words on int32 words [ROWS, 4] of four codes with one scale / zero per row."""
    rows = tl.arange(0, ROWS)
    words = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    scale = tl.load(scale_ptr + rows).to(tl.uint32)
    codes = tl.load(codes_ptr + words).to(tl.uint32, bitcast=True)
    levels = level_words(codes, scale, level_offset(scale, tl.load(zero_ptr + rows).to(tl.uint32)))
    tl.store(out_ptr + words, levels.to(tl.int32, bitcast=True))


def check_level_words() -> list[str]:
    """The widening that the Triton and Gluon W4A8 kernels share (one source, kernels/w4a8_swar.py) on every
    (code, zero, scale) whose level the format allows (inside int8) with code * scale <= 255 (levels_fit_bytes):
    each byte is (code - zero) * scale, also where zero * scale > 128 makes the offset borrow across bytes."""
    rows, expected = [], []
    for scale, zero in itertools.product(range(1, 256), range(16)):
        valid = [c for c in range(16) if c * scale <= 255 and -128 <= (c - zero) * scale <= 127]
        if valid:  # the 16 codes, those the format does not allow replaced by an allowed one
            codes = [c if c in valid else valid[0] for c in range(16)]
            rows.append((codes, scale, zero))
            expected.append([(c - zero) * scale for c in codes])
    count = triton.next_power_of_2(len(rows))
    rows += [([0] * 16, 1, 0)] * (count - len(rows))
    expected += [[0] * 16] * (count - len(expected))
    codes = torch.tensor([r[0] for r in rows], dtype=torch.uint8).view(torch.int32)  # [rows, 4] words
    scale, zero = (torch.tensor([r[i] for r in rows], dtype=torch.int32) for i in (1, 2))
    out = torch.empty_like(codes)
    _level_words_probe[(1,)](codes, scale, zero, out, ROWS=count)
    got = out.view(torch.int8).to(torch.int16)
    bad = (got != torch.tensor(expected, dtype=torch.int16)).any(dim=1).nonzero().flatten().tolist()
    return [f"level_words: scale {rows[i][1]} zero {rows[i][2]}: {got[i].tolist()} != {expected[i]}"
            for i in bad[:5]]


def test_level_words_match_the_format_for_every_allowed_level(interpreter_results):
    assert not interpreter_results["level_words"], "\n".join(interpreter_results["level_words"])


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest, or with TRITON_INTERPRET=1"
    print(json.dumps({"case": "level_words", "failures": check_level_words()}), flush=True)
    for seed, (m, k, n) in enumerate(interpreter_cases()):
        print(json.dumps({"case": f"{m},{k},{n}", "failures": check_case(m, k, n, seed)}), flush=True)


def _compile_gluon_for_hopper(kernel, pointers: list[str], constants: dict, aligned: list[str],
                              warps: int) -> tuple[str, str]:
    """A Gluon kernel compiled for sm90 by the installed Triton, without a GPU (ptxas ships with Triton); its TTGIR
    and what `ptxas -v` says of its PTX. ``pointers``: the types of its first arguments, the rest i32; ``aligned``:
    the arguments Triton specializes as 16-divisible at launch (pointers, strides)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import compile as triton_compile
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = dict(zip(kernel.arg_names, pointers + ["i32"] * (len(kernel.arg_names) - len(pointers))))
    signature.update({name: "constexpr" for name in constants})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton_compile(GluonASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        ptxas = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(ptx), "-o", str(ptx.with_suffix(".o"))],
                               capture_output=True, text=True, check=True)
    return compiled.asm["ttgir"], ptxas.stdout + ptxas.stderr


def _compile_wgmma_for_hopper(config: dict, has_row_scale: bool) -> tuple[str, str]:
    """kernels/w4a8_wgmma.py's kernel for ``config`` (SWAP_AB or not): _compile_gluon_for_hopper."""
    from vllm_outliertune.kernels import w4a8_wgmma

    swap = config.get("SWAP_AB")
    kernel = w4a8_wgmma._w4a8_wgmma_swap_kernel if swap else w4a8_wgmma._w4a8_wgmma_kernel
    pointers = ["*i8", "*i32", "*u8", "*u8", "*bf16", "*fp32", "*fp32", "*fp32", "*i32", "*i32"]
    constants = dict(GROUP_SIZE=128, HAS_ROW_SCALE=has_row_scale, HAS_BIAS=True, SPLIT_K=config["SPLIT_K"],
                     BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], STAGES=config["num_stages"])
    natural = bool(config.get("NATURAL_K"))
    constants.update(dict(w4a8_wgmma._swap_layouts(config["BLOCK_N"], config["num_warps"], natural), NATURAL=natural)
                     if swap else dict(LEVEL_BUFS=config["LEVEL_BUFS"]))
    aligned = list(kernel.arg_names[:len(pointers)]) + ["N", "K", "stride_am", "stride_wk", "stride_gk", "stride_om",
                                                        "K_PER_SPLIT"]
    return _compile_gluon_for_hopper(kernel, pointers, constants, aligned, config["num_warps"])


@pytest.mark.parametrize("config, has_row_scale", [
    ({"BLOCK_M": 64, "BLOCK_N": 32, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3, "LEVEL_BUFS": 1}, True),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 4, "LEVEL_BUFS": 2}, False),
    ({"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4, "SWAP_AB": 1}, True),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3, "SWAP_AB": 1}, False),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 3, "SWAP_AB": 1, "NATURAL_K": 1},
     True),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4, "SWAP_AB": 1, "NATURAL_K": 1},
     False)])
def test_wgmma_kernel_keeps_a_wgmma_in_flight(config, has_row_scale):
    """The Gluon W4A8 kernels build for Hopper with this Triton (CI's differs from the GPU bundle's 3.6: both names
    of the moved APIs are handled), and their K loop issues the wgmma asynchronously and waits only for the one
    before (pendings = 1), so the next step's widening overlaps the tensor cores: the reason the kernel exists. With
    SWAP_AB the widened weights are the wgmma's register operand and nothing in the loop stores to shared memory
    (the copies' cp.async aside). (Results are checked on the GPU: test_gpu_kernels_match_reference's WGMMA
    variants; Gluon has no interpreter.) And ptxas keeps them asynchronous: no C7515 ("wgmma.mma_async instructions
    are serialized"), which the NATURAL_K tiles of one row block per warp got from the loop's zero-trip path."""
    from vllm_outliertune.kernels import w4a8_wgmma

    if w4a8_wgmma.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API; WGMMA tiles run kernels/w4a8_gemm.py's loop")
    ttgir, ptxas_log = _compile_wgmma_for_hopper(config, has_row_scale)
    assert "C7515" not in ptxas_log, ptxas_log
    assert re.search(r"ttng.warp_group_dot .*isAsync = true", ttgir)
    assert re.search(r"ttng.warp_group_dot_wait .*pendings = 1", ttgir)
    loop = ttgir[ttgir.index("scf.for"):ttgir.index("ttng.warp_group_dot_wait", ttgir.index("pendings = 1"))]
    if config.get("SWAP_AB"):
        assert re.search(r"ttng.warp_group_dot %\S+, .*: tensor<\d+x128xi8, #ttg.dot_op<\{opIdx = 0", loop)
        assert "ttg.local_store" not in loop
    else:
        assert "ttg.local_store" in loop


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 128, "BLOCK_N": 256, "num_stages": 3, "num_warps": 8},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 5, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "num_stages": 4, "num_warps": 8, "TMA": 1},
    {"BLOCK_M": 16, "BLOCK_N": 128, "num_stages": 4, "num_warps": 4, "SWAP_AB": 1, "SPLIT_K": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 4, "num_warps": 8, "SWAP_AB": 1, "SPLIT_K": 1}])
def test_int8_wgmma_keeps_a_wgmma_in_flight(config):
    """kernels/int8_wgmma.py builds for Hopper with this Triton, and its K loop keeps one wgmma in flight (pendings =
    1; Triton's own int8 dots wait for every one: pendings = 0, the reason the kernel exists), the operands from the
    shared-memory ring; ptxas keeps the wgmmas asynchronous (no C7515). (Results: bench/int8_wgmma.py and
    test_gpu_int8_wgmma_matches_the_reference on the GPU.)"""
    from vllm_outliertune.kernels import int8_wgmma

    if int8_wgmma.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    swap, tma = config.get("SWAP_AB"), config.get("TMA")
    kernel = (int8_wgmma._int8_wgmma_swap_kernel if swap else int8_wgmma._int8_wgmma_tma_kernel if tma
              else int8_wgmma._int8_wgmma_kernel)
    swizzled = "NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)"
    operands = ([f"tensordesc<i8[{config[block]}, 128],{swizzled}>" for block in ("BLOCK_M", "BLOCK_N")] if tma
                else ["*i8", "*i8"])
    pointers = operands + ["*bf16", "*fp32", "*fp32", "*fp32"] + (["*i32", "*i32"] if swap else [])
    constants = dict(HAS_ROW_SCALE=True, HAS_BIAS=True, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
                     STAGES=config["num_stages"]) | (dict(SPLIT_K=config["SPLIT_K"]) if swap else dict(GROUP_M=8))
    aligned = [name for name in kernel.arg_names[:len(pointers)] if not name.endswith("_desc")] + [
        name for name in ("N", "K", "stride_am", "stride_wn", "stride_om", "K_PER_SPLIT") if name in kernel.arg_names]
    ttgir, ptxas_log = _compile_gluon_for_hopper(kernel, pointers, constants, aligned, config["num_warps"])
    assert "C7515" not in ptxas_log, ptxas_log
    assert re.search(r"ttng.warp_group_dot_wait .*pendings = 1", ttgir)
    assert not re.search(r"ttng.warp_group_dot_wait .*pendings = 0", ttgir[:ttgir.index("pendings = 1")])
    loop = ttgir[ttgir.rindex("scf.for", 0, ttgir.index("pendings = 1")):ttgir.index("pendings = 1")]
    assert re.search(r"ttng.warp_group_dot %\S+, %\S+, .*isAsync = true.*: !ttg.memdesc<\d+x128xi8", loop)
    if tma:  # the operands by TMA, counted by a barrier per stage; no thread's own copies
        assert "ttng.async_tma_copy_global_to_local" in ttgir and "ttg.async_copy_global_to_local" not in ttgir


@pytest.mark.gpu
@gpu
def test_gpu_int8_wgmma_matches_the_reference():
    """On a Hopper GPU kernels/int8_wgmma.py gives torch_ref's int8 GEMM bit for bit: M no multiple of the tile,
    the token guard's row scale, with and without a bias, both tile widths, SWAP_AB tiles over uneven K splits."""
    from vllm_outliertune.kernels.int8_wgmma import int8_wgmma, int8_wgmma_applies
    from vllm_outliertune.kernels.torch_ref import int8_gemm_ref

    for m, n, k in ((1, 256, 128), (37, 512, 1152), (300, 4096, 4096)):
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        for row_scale, b in ((None, bias), (torch.rand(m, device="cuda") + 0.5, None)):
            for config in ({"BLOCK_M": 128, "BLOCK_N": 256, "num_stages": 3}, {"BLOCK_M": 64, "BLOCK_N": 128,
                                                                                "num_stages": 5},
                           {"BLOCK_M": 128, "BLOCK_N": 256, "num_stages": 4, "TMA": 1},
                           {"BLOCK_M": 16, "BLOCK_N": 128, "num_stages": 4, "SWAP_AB": 1, "SPLIT_K": 3},
                           {"BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 4, "num_warps": 8, "SWAP_AB": 1,
                            "SPLIT_K": 1}):
                if not int8_wgmma_applies(a, w, config):
                    pytest.skip("needs a Hopper GPU and a Triton with Gluon")
                got = int8_wgmma(a, w, w_scale, b, torch.empty((m, n), dtype=torch.bfloat16, device="cuda"),
                                 row_scale, config)
                assert torch.equal(got, int8_gemm_ref(a, w, w_scale, b, torch.bfloat16, row_scale)), (m, n, k, config)


@pytest.mark.gpu
@gpu
def test_gpu_wgmma_tiles_run_the_gluon_kernel_on_hopper():
    """On a Hopper GPU a WGMMA tile runs kernels/w4a8_wgmma.py (not the loop it falls back to), exactly, over K
    splits, row scales, one group per row and M that is no multiple of 64."""
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.linear import w4a8_gpu_layout
    from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm
    from vllm_outliertune.kernels.w4a8_wgmma import wgmma_applies

    for m, k, n, group_size, split_k in ((1, 4096, 6144, 128, 4), (37, 1152, 192, 384, 3), (130, 3584, 4608, 128, 1),
                                         (64, 1024, 256, 0, 2)):
        codes = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        packed = [w4a8_gpu_layout(t.cuda()) for t in make_packed_weight(n, k, group_size, seed=m)]
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        row_scale = torch.rand(m, device="cuda") + 1
        want = torch_ref.w4a8_gemm_ref(codes, *packed, group_size, w_scale, bias, torch.bfloat16, row_scale)
        for config in ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                        "num_stages": 3, "LEVEL_BUFS": 1, "WGMMA": 1},
                       {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                        "num_stages": 4, "SWAP_AB": 1, "WGMMA": 1},
                       {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                        "num_stages": 3, "SWAP_AB": 1, "NATURAL_K": 1, "WGMMA": 1},
                       # the tiles whose K loop runs at least one step (_loop_steps)
                       {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 8,
                        "num_stages": 4, "LEVEL_BUFS": 2, "WGMMA": 1},
                       {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": split_k, "num_warps": 4,
                        "num_stages": 4, "SWAP_AB": 1, "NATURAL_K": 1, "WGMMA": 1}):
            if n % config["BLOCK_N"]:  # (whole BLOCK_N tiles only)
                continue
            if not wgmma_applies(codes, packed[0], packed[1], group_size, True, config):
                pytest.skip("needs a Hopper GPU and a Triton with Gluon")
            got = w4a8_gemm(codes, *packed, group_size, w_scale, bias, torch.bfloat16, "w4a8_splitk", config,
                            row_scale)
            assert torch.equal(got, want), (m, k, n, group_size, split_k, config)
