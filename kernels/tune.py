"""Re-tune the tile table on this GPU and rewrite kernels/tile_configs.json (or --out).

    python -m vllm_outliertune.kernels.tune                      # Llama-3-8B shapes, all M buckets
    python -m vllm_outliertune.kernels.tune --shapes 6144x4096 --out /tmp/table.json

For every shape (N x K) and M bucket it times each candidate tile of the two-step path (int8_gemm on quantized
activations) and of the fused small-M kernel (quantize + GEMM, with split-K), cold L2 (triton's do_bench flushes
it), median of repeats. It keeps the fastest of each, lists the fused kernel for a bucket only while it beats
activation quant + GEMM (linear.py dispatches on that), and adds a per-device "default" for untuned shapes: the
candidate with the best geometric-mean time over the tuned shapes. Entries for other devices are kept."""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch
import triton

from vllm_outliertune.kernels.act_quant import quantize_activation
from vllm_outliertune.kernels.configs import TABLE_PATH, shape_key
from vllm_outliertune.kernels.fused_quant_gemm import fused_quant_gemm
from vllm_outliertune.kernels.int8_gemm import int8_gemm

LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down
GEMM_M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FUSED_M_BUCKETS = (1, 4, 16, 32, 64)


def _gemm(bm, bn, bk, warps, stages, group=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


def gemm_candidates(m: int) -> list[dict]:
    if m <= 128:
        return [_gemm(*c) for c in ((16, 32, 256, 4, 5), (16, 64, 256, 4, 4), (16, 64, 512, 4, 3),
                                    (16, 128, 256, 4, 4), (32, 64, 256, 4, 4), (32, 128, 256, 4, 4),
                                    (64, 64, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3),
                                    (64, 256, 128, 4, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4)) if c[0] <= max(16, m)]
    return [_gemm(*c) for c in ((64, 128, 128, 4, 4), (64, 256, 128, 4, 3), (128, 128, 128, 4, 4),
                                (128, 128, 128, 8, 4), (128, 128, 64, 4, 5), (128, 256, 64, 8, 4),
                                (128, 256, 128, 8, 3), (256, 128, 64, 8, 4), (256, 128, 128, 8, 3))]


def fused_candidates(m: int) -> list[dict]:
    """Tensor-core tiles (BLOCK_M >= 16) and, for a few rows, multiply-reduce tiles (BLOCK_M = M rounded up)."""
    candidates = []
    for bm in sorted({max(16, triton.next_power_of_2(m)), triton.next_power_of_2(m)}):
        sizes = ((64, 128), (64, 256), (128, 128), (128, 256), (64, 512)) if bm >= 16 else \
            ((32, 256), (64, 128), (64, 256), (128, 128), (32, 512))
        candidates += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                        "num_stages": 3 if bk * (bn + bm) > 48 * 1024 else 4}
                       for bn, bk in sizes for split in (1, 2, 4, 8)
                       if not (bm > 16 and bk == 512) and not (bm >= 64 and bn * bk > 16384)]
    return candidates


def time_us(fn) -> float:
    """Median time of fn() in µs with a cold L2 (do_bench flushes it before each call)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def make_inputs(m: int, n: int, k: int, device: str = "cuda") -> dict:
    """Random (never zero) operands of one linear: bf16 activations, int8 weights, per-channel vectors."""
    return dict(x=torch.randn(m, k, device=device, dtype=torch.bfloat16) * 3,
                inv_scale=torch.rand(k, device=device) + 0.5, shift=torch.randint(-3, 4, (k,), device=device).float(),
                w_q=torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8),
                w_scale=torch.rand(n, device=device) * 0.01, bias=torch.randn(n, device=device))


def _best(timings: list[tuple[float, dict]]) -> tuple[float, dict]:
    return min(timings, key=lambda t: t[0])


def tune_shape(n: int, k: int, log) -> dict[str, dict[str, list[tuple[float, dict]]]]:
    """All timings of one shape: {"int8_gemm": {M: [(µs, config)]}, "fused_quant_gemm": {...}, "act_quant": ...}."""
    results = {"int8_gemm": {}, "fused_quant_gemm": {}, "act_quant": {}}
    for m in sorted(set(GEMM_M_BUCKETS) | set(FUSED_M_BUCKETS)):
        p = make_inputs(m, n, k)
        a_q = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
        results["act_quant"][m] = time_us(lambda: quantize_activation(p["x"], p["inv_scale"], p["shift"], 8))
        for kernel, candidates, run in (
                ("int8_gemm", gemm_candidates(m),
                 lambda c: int8_gemm(a_q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, c)),
                ("fused_quant_gemm", fused_candidates(m) if m in FUSED_M_BUCKETS else [],
                 lambda c: fused_quant_gemm(p["x"], p["w_q"], p["w_scale"], p["bias"], p["inv_scale"], p["shift"],
                                            8, torch.bfloat16, c))):
            timings = []
            for config in candidates:
                try:
                    timings.append((time_us(lambda: run(config)), config))
                except Exception as error:  # e.g. out of shared memory on a smaller GPU: skip this tile
                    log(f"skip {kernel} N={n} K={k} M={m} {config}: {type(error).__name__}: {error}"[:300])
            if timings:
                results[kernel][m] = timings
                best = _best(timings)
                log(f"{kernel:16s} N={n:5d} K={k:5d} M={m:5d} best {best[0]:9.1f} us {best[1]}")
        del p, a_q
    return results


def table_entries(results: dict) -> dict[str, dict[str, dict]]:
    """Best configs of one shape, the fused kernel listed only for the buckets (from M=1 up) where it wins."""
    entries = {"int8_gemm": {str(m): _best(t)[1] for m, t in results["int8_gemm"].items()}, "fused_quant_gemm": {}}
    for m in FUSED_M_BUCKETS:
        fused = results["fused_quant_gemm"].get(m)
        gemm = results["int8_gemm"].get(m) or results["int8_gemm"][min(results["int8_gemm"])]
        if not fused or _best(fused)[0] >= results["act_quant"][m] + _best(gemm)[0]:
            break
        entries["fused_quant_gemm"][str(m)] = _best(fused)[1]
    return entries


def default_entries(all_results: list[dict], kernel: str) -> dict[str, dict]:
    """Per M bucket, the config with the best geometric-mean time over all tuned shapes that timed it."""
    defaults = {}
    for m in sorted({m for r in all_results for m in r[kernel]}):
        log_sums: dict[str, list] = {}
        for r in all_results:
            for t, config in r[kernel].get(m, []):
                entry = log_sums.setdefault(json.dumps(config, sort_keys=True), [0.0, 0])
                entry[0] += math.log(t)
                entry[1] += 1
        full = [(s, key) for key, (s, count) in log_sums.items() if count == len(all_results)]
        if full:
            defaults[str(m)] = json.loads(min(full)[1])
    return defaults


def write_table(path: Path, device_key: str, per_kernel: dict) -> None:
    table = json.loads(path.read_text()) if path.exists() else {"version": 1, "devices": {}}
    table["devices"][device_key] = per_kernel
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA3_8B_SHAPES),
                        help="comma-separated NxK weight shapes (out x in features)")
    parser.add_argument("--out", type=Path, default=TABLE_PATH, help="table to rewrite (default: the packaged one)")
    parser.add_argument("--log", type=Path, help="also write the log here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune: needs a CUDA GPU (the table is keyed by the GPU it was tuned on)")
    log_file = open(args.log, "w") if args.log else None

    def log(line: str) -> None:
        print(line, flush=True)
        if log_file:
            print(line, file=log_file, flush=True)

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    all_results, per_kernel = [], {"int8_gemm": {}, "fused_quant_gemm": {}}
    for n, k in shapes:
        results = tune_shape(n, k, log)
        all_results.append(results)
        for kernel, per_m in table_entries(results).items():
            per_kernel[kernel][shape_key(n, k)] = per_m
    per_kernel["int8_gemm"]["default"] = default_entries(all_results, "int8_gemm")
    per_kernel["fused_quant_gemm"]["default"] = {
        m: c for m, c in default_entries(all_results, "fused_quant_gemm").items()
        if all(m in per_kernel["fused_quant_gemm"].get(shape_key(n, k), {}) for n, k in shapes)}
    device_key = torch.cuda.get_device_name()
    write_table(args.out, device_key, per_kernel)
    log(f"wrote {args.out} for {device_key!r}: {sum(len(v) for v in per_kernel['int8_gemm'].values())} int8_gemm "
        f"and {sum(len(v) for v in per_kernel['fused_quant_gemm'].values())} fused entries")


if __name__ == "__main__":
    main()
