"""kernels/int8_wgmma.py (the Gluon int8 GEMMs whose wgmmas stay in flight) on a Hopper GPU: exactness against
torch_ref, then speed against what the plugin runs today.

    python bench/int8_wgmma.py OUT.json [--rows 16,32,64,128,1024,2048,4096,8192] [--shapes 6144x4096,...]  # GPU

First every tile of both grids on odd problems (M no multiple of BLOCK_M, uneven K splits, the token guard's row
scale, no bias) against torch_ref.int8_gemm_ref, bit for bit; a mismatch stops the run untimed. Then per (shape, M):
- M <= 128 (decode), as decode streams its layers (tune.stream_time_us: weight copies past the L2, back to back in
  a CUDA graph): "shipped" = the int8_gemm op through the table (CUTLASS registered, as in the plugin) against the
  SWAP_AB tiles (weights as the wgmma's M, K split 1-8 ways);
- larger M, as bench/bench_gemm.py times (tune.graph_time_us, cold L2): "triton" = the int8_gemm op with CUTLASS
  unregistered (issue 12 asks the Triton path for >= 0.85x CUTLASS there), "cutlass" where vLLM provides it, against
  the large tiles.
Shapes: Llama-3-8B TP 1 (the table's tuned shapes) and Qwen2.5-7B TP 1 (held out), unless --shapes."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

TUNED = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3-8B TP 1
HELD_OUT = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]  # Qwen2.5-7B TP 1
# (BLOCK_M, BLOCK_N, stages): one or two warpgroups; 128 x 256 x 4 stages uses 192 KB of shared memory; each with
# cp.async and with TMA copies
LARGE_TILES = [(128, 256, 3), (128, 256, 4), (128, 128, 4), (128, 128, 5), (64, 256, 4), (64, 128, 5)]
# SWAP_AB tiles (BLOCK_N, warps) at BLOCK_M = M rounded up to 16 (at most 128), and 64 from M = 128, K split these
# ways, with a ring of 4 or 8 stages (3 or 6 at 128 tokens: up to 192 KB; decode streams weights, so bytes in flight
# may matter more than occupancy)
SWAP_TILES = ((64, 4), (128, 4), (128, 8))
SPLITS = (1, 2, 4, 8)
DECODE_MAX_M = 128


def large_tile(block_m: int, block_n: int, stages: int, tma: bool = False) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_stages": stages, "GROUP_M": 8} | ({"TMA": 1} if tma else {})


def swap_tile(block_m: int, block_n: int, warps: int, split: int, deep: bool = False) -> dict:
    stages = 4 if block_m <= 64 else 3
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": 2 * stages if deep else stages,
            "SWAP_AB": 1, "SPLIT_K": split}


def grid(m: int) -> list[dict]:
    """The timed tiles at M = m."""
    if m > DECODE_MAX_M:
        return [large_tile(*t, tma) for t in LARGE_TILES for tma in (False, True)]
    tokens = -(-m // 16) * 16
    return [swap_tile(bm, bn, warps, split, deep) for bm in sorted({min(tokens, 128), min(tokens, 64)})
            for bn, warps in SWAP_TILES for split in SPLITS for deep in (False, True)]


# Checked tiles: the large ones (cp.async and TMA), and SWAP_AB ones of 16, 64 and 128 tokens unsplit and split 3
# ways (uneven), the deep rings unsplit
CHECKED = [large_tile(*t, tma) for t in LARGE_TILES for tma in (False, True)] + [
    swap_tile(bm, bn, warps, split, split == 1 and bm != 64) for bm in (16, 64, 128) for bn, warps in SWAP_TILES
    for split in (1, 3)]


def name_of(config: dict) -> str:
    if config.get("SWAP_AB"):
        return (f"sw{config['BLOCK_M']}x{config['BLOCK_N']}w{config['num_warps']}s{config['SPLIT_K']}"
                f"st{config['num_stages']}")
    return f"{'tm' if config.get('TMA') else 'wg'}{config['BLOCK_M']}x{config['BLOCK_N']}x{config['num_stages']}"


def check_exact() -> int:
    """Every tile on odd problems against torch_ref; returns the number of mismatches (printed)."""
    import torch

    from vllm_outliertune.kernels.int8_wgmma import int8_wgmma, int8_wgmma_applies
    from vllm_outliertune.kernels.torch_ref import int8_gemm_ref

    bad = 0
    for m, n, k in ((1, 256, 128), (37, 512, 384), (130, 768, 1152), (300, 4096, 4096), (1025, 6144, 4096)):
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        for row_scale, b in ((None, bias), (torch.rand(m, device="cuda") + 0.5, None)):
            want = int8_gemm_ref(a, w, w_scale, b, torch.bfloat16, row_scale)
            for config in CHECKED:
                if not int8_wgmma_applies(a, w, config):
                    continue
                got = int8_wgmma(a, w, w_scale, b, torch.empty((m, n), dtype=torch.bfloat16, device="cuda"),
                                 row_scale, config)
                if not torch.equal(got, want):
                    bad += 1
                    print(f"DIFF M={m} N={n} K={k} {config} row_scale={row_scale is not None}")
    print(f"exactness: {bad} mismatches")
    return bad


def time_shapes(out: Path, rows: list[int], shapes: list[tuple[int, int]]) -> None:
    import torch
    from bench_gemm import triton_only, vllm_ops  # (bench/ is the script's directory)

    from vllm_outliertune import cutlass
    from vllm_outliertune.kernels.int8_wgmma import int8_wgmma, int8_wgmma_applies
    from vllm_outliertune.kernels.linear import int8_gemm
    from vllm_outliertune.kernels.tune import graph_time_us, stream_time_us, weight_copies

    if check_exact():
        raise SystemExit("int8 WGMMA tiles differ from the reference: not timed")
    cutlass.register()  # as the plugin does inside vLLM: the table may pick it
    results = []
    for (n, k), m in itertools.product(shapes, rows):
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        result = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        tiles = [config for config in grid(m) if int8_wgmma_applies(a, w, config)]
        row = {"n": n, "k": k, "m": m}
        if m <= DECODE_MAX_M:
            copies = weight_copies((a, w, w_scale, bias))
            row["shipped"] = stream_time_us([lambda c=c: int8_gemm(*c, torch.bfloat16) for c in copies])
            for config in tiles:
                row[name_of(config)] = stream_time_us([lambda c=c, config=config: int8_wgmma(
                    *c, result, None, config) for c in copies])
            baselines = ("shipped",)
        else:
            with triton_only():
                row["triton"] = graph_time_us(lambda: int8_gemm(a, w, w_scale, bias, torch.bfloat16))
            if vllm_ops is not None:
                a_scale, bias_bf16 = torch.ones(m, 1, device="cuda"), bias.bfloat16()
                row["cutlass"] = graph_time_us(lambda: vllm_ops.cutlass_scaled_mm(
                    a, w.t(), a_scale, w_scale.view(n, 1), torch.bfloat16, bias_bf16))
            for config in tiles:
                row[name_of(config)] = graph_time_us(lambda config=config: int8_wgmma(a, w, w_scale, bias, result,
                                                                                      None, config))
            baselines = ("triton", "cutlass")
        best_us, best = min((t, key) for key, t in row.items() if key[:2] in ("wg", "tm", "sw"))
        against = ", ".join(f"{row[key] / best_us:.2f}x {key} ({row[key]:.1f} µs)" for key in baselines if key in row)
        print(f"{n}x{k} M={m}: best {best} {best_us:.1f} µs ({2 * m * n * k / best_us / 1e6:.0f} TOPS): {against}",
              flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")  # (each row as it comes: a call may time out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON of the timings (written row by row)")
    parser.add_argument("--rows", default="16,32,64,128,1024,2048,4096,8192", help="M values")
    parser.add_argument("--shapes", help="NxK,... (default: Llama-3-8B and Qwen2.5-7B at TP 1)")
    args = parser.parse_args()
    shapes = ([tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes
              else TUNED + HELD_OUT)
    time_shapes(args.out, [int(v) for v in args.rows.split(",")], shapes)


if __name__ == "__main__":
    main()
