"""kernels/int8_wgmma.py (the Gluon int8 GEMM whose wgmmas stay in flight) on a Hopper GPU: exactness against
torch_ref, then speed against CUTLASS (`cutlass_scaled_mm`, with vLLM's CUDA build) and our Triton int8 dispatch at
large M, where issue 12 asks the Triton path for >= 0.85x CUTLASS.

    python bench/int8_wgmma.py OUT.json [--rows 1024,2048,4096,8192] [--shapes 6144x4096,...]        # GPU

First every tile of TILES on odd problems (M no multiple of BLOCK_M, the token guard's row scale, no bias) against
torch_ref.int8_gemm_ref, bit for bit; a mismatch stops the run untimed. Then per (shape, M), as bench/bench_gemm.py
times (tune.graph_time_us: a CUDA graph replayed with a cold L2): "triton" = the int8_gemm op with CUTLASS
unregistered (the table's tiled or TMA Triton GEMM), "cutlass" where vLLM provides it, and each tile of the new
kernel. Shapes: Llama-3-8B TP 1 (the table's tuned shapes) and Qwen2.5-7B TP 1 (held out), unless --shapes."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

TUNED = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3-8B TP 1
HELD_OUT = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]  # Qwen2.5-7B TP 1
# (BLOCK_M, BLOCK_N, stages): one or two warpgroups; 128 x 256 x 4 stages uses 192 KB of shared memory
TILES = [(128, 256, 3), (128, 256, 4), (128, 128, 4), (128, 128, 5), (64, 256, 4), (64, 128, 5)]


def tile(block_m: int, block_n: int, stages: int) -> dict:
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_stages": stages, "GROUP_M": 8}


def name_of(config: dict) -> str:
    return f"wg{config['BLOCK_M']}x{config['BLOCK_N']}x{config['num_stages']}"


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
            for config in map(lambda t: tile(*t), TILES):
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
    from vllm_outliertune.kernels.tune import graph_time_us

    if check_exact():
        raise SystemExit("int8 WGMMA tiles differ from the reference: not timed")
    cutlass.register()
    results = []
    for (n, k), m in itertools.product(shapes, rows):
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        with triton_only():
            row = {"n": n, "k": k, "m": m, "triton": graph_time_us(lambda: int8_gemm(a, w, w_scale, bias,
                                                                                     torch.bfloat16))}
        if vllm_ops is not None:
            a_scale, bias_bf16 = torch.ones(m, 1, device="cuda"), bias.bfloat16()
            row["cutlass"] = graph_time_us(lambda: vllm_ops.cutlass_scaled_mm(a, w.t(), a_scale, w_scale.view(n, 1),
                                                                              torch.bfloat16, bias_bf16))
        result = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
        for config in map(lambda t: tile(*t), TILES):
            if int8_wgmma_applies(a, w, config):
                row[name_of(config)] = graph_time_us(lambda config=config: int8_wgmma(a, w, w_scale, bias, result,
                                                                                      None, config))
        best_us, best = min((t, key) for key, t in row.items() if key.startswith("wg"))
        tops = 2 * m * n * k / best_us / 1e6
        vs_cutlass = f", {row['cutlass'] / best_us:.2f}x CUTLASS" if "cutlass" in row else ""
        print(f"{n}x{k} M={m}: triton {row['triton']:.1f} µs, cutlass {row.get('cutlass', float('nan')):.1f}, best "
              f"{best} {best_us:.1f} ({tops:.0f} TOPS; {row['triton'] / best_us:.2f}x triton{vs_cutlass})", flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")  # (each row as it comes: a call may time out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON of the timings (written row by row)")
    parser.add_argument("--rows", default="1024,2048,4096,8192", help="M values")
    parser.add_argument("--shapes", help="NxK,... (default: Llama-3-8B and Qwen2.5-7B at TP 1)")
    args = parser.parse_args()
    shapes = ([tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes
              else TUNED + HELD_OUT)
    time_shapes(args.out, [int(v) for v in args.rows.split(",")], shapes)


if __name__ == "__main__":
    main()
