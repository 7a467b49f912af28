"""Re-tune the tile table on this GPU and rewrite kernels/tile_configs.json (or --out).

    python -m vllm_outliertune.kernels.tune                      # Llama-3-8B shapes, all M buckets
    python -m vllm_outliertune.kernels.tune --shapes 6144x4096 --out /tmp/table.json

    python -m vllm_outliertune.kernels.tune --only splitk_gemm   # re-tune the small-M kernel, keep the GEMM tiles

For every shape (N x K) and M bucket it times each candidate tile of the tiled int8_gemm and of the split-K small-M
kernel, both on int8 activation codes (what the compiled plugin runs: the quantization is fused into the producing
norm / activation), cold L2 (triton's do_bench flushes it), median of repeats. It keeps the fastest of each, lists
the split-K kernel for a bucket only while it beats int8_gemm (linear.py dispatches on that), and adds a per-device
"default" for untuned shapes: the candidate with the best geometric-mean time over the tuned shapes. Entries for
other devices are kept."""

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
from vllm_outliertune.kernels.int8_gemm import int8_gemm
from vllm_outliertune.kernels.splitk_gemm import splitk_gemm

LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down
GEMM_M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SPLITK_M_BUCKETS = (1, 4, 16, 32, 64)


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


def splitk_candidates(m: int) -> list[dict]:
    """Tensor-core tiles (BLOCK_M >= 16) and, for a few rows, CUDA-core tiles (BLOCK_M = M rounded up): plain
    multiply-reduce, with the K accumulator (ACC_K) and with packed dp4a words (PACKED)."""
    candidates = []
    for bm in sorted({max(16, triton.next_power_of_2(m)), triton.next_power_of_2(m)}):
        if bm >= 16:
            tiles = [(bn, bk, {}) for bn, bk in ((64, 128), (64, 256), (128, 128), (128, 256)) if bn * bk <= 16384
                     or bm == 16]
        else:  # accumulators of BLOCK_M x BLOCK_K x BLOCK_N int32 (/4 when packed) must fit in registers
            tiles = [(bn, bk, {}) for bn, bk in ((32, 256), (64, 128), (64, 256), (128, 128))]
            tiles += [(bn, bk, {"ACC_K": 1}) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 128))
                      if bm * bn * bk <= 8192]
            tiles += [(bn, bk, {"PACKED": 1}) for bn, bk in ((16, 512), (32, 256), (32, 512), (64, 256), (64, 512),
                                                             (128, 256)) if bm * bn * bk <= 32768]
        candidates += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, **variant, "num_warps": 4,
                        "num_stages": 3 if bk * (bn + bm) > 48 * 1024 else 4}
                       for bn, bk, variant in tiles for split in (1, 2, 4, 8)]
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


def tune_shape(n: int, k: int, m_buckets: list[int], log) -> dict[str, dict[int, list[tuple[float, dict]]]]:
    """All timings of one shape: {"int8_gemm": {M: [(µs, config)]}, "splitk_gemm": {...}}."""
    results = {"int8_gemm": {}, "splitk_gemm": {}}
    for m in m_buckets:
        p = make_inputs(m, n, k)
        a_q = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
        for kernel, candidates, run in (
                ("int8_gemm", gemm_candidates(m),
                 lambda c: int8_gemm(a_q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, c)),
                ("splitk_gemm", splitk_candidates(m) if m in SPLITK_M_BUCKETS else [],
                 lambda c: splitk_gemm(a_q, p["w_q"], p["w_scale"], p["bias"], None, None, 8, torch.bfloat16, c))):
            timings = []
            for config in candidates:
                try:
                    timings.append((time_us(lambda: run(config)), config))
                except Exception as error:  # e.g. out of shared memory or registers: skip this tile
                    log(f"skip {kernel} N={n} K={k} M={m} {config}: {type(error).__name__}: {error}"[:300])
            if timings:
                results[kernel][m] = timings
                best = _best(timings)
                log(f"{kernel:12s} N={n:5d} K={k:5d} M={m:5d} best {best[0]:9.1f} us {best[1]}")
    return results


def table_entries(results: dict) -> dict[str, dict[str, dict]]:
    """Best configs of one shape, the split-K kernel listed only for the buckets (from M=1 up) where it wins."""
    entries = {"int8_gemm": {str(m): _best(t)[1] for m, t in results["int8_gemm"].items()}, "splitk_gemm": {}}
    for m in SPLITK_M_BUCKETS:
        splitk = results["splitk_gemm"].get(m)
        if not splitk or _best(splitk)[0] >= _best(results["int8_gemm"][m])[0]:
            break
        entries["splitk_gemm"][str(m)] = _best(splitk)[1]
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
    """Replace this device's entries for the kernels in per_kernel (others and other devices are kept)."""
    table = json.loads(path.read_text()) if path.exists() else {"version": 1, "devices": {}}
    table["devices"].setdefault(device_key, {}).update(per_kernel)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA3_8B_SHAPES),
                        help="comma-separated NxK weight shapes (out x in features)")
    parser.add_argument("--only", choices=("splitk_gemm",),
                        help="re-tune only the small-M kernel (its buckets), keeping this device's int8_gemm tiles")
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
    m_buckets = sorted(SPLITK_M_BUCKETS if args.only else set(GEMM_M_BUCKETS) | set(SPLITK_M_BUCKETS))
    all_results, per_kernel = [], {"int8_gemm": {}, "splitk_gemm": {}}
    for n, k in shapes:
        results = tune_shape(n, k, m_buckets, log)
        all_results.append(results)
        for kernel, per_m in table_entries(results).items():
            per_kernel[kernel][shape_key(n, k)] = per_m
    per_kernel["int8_gemm"]["default"] = default_entries(all_results, "int8_gemm")
    per_kernel["splitk_gemm"]["default"] = {
        m: c for m, c in default_entries(all_results, "splitk_gemm").items()
        if all(m in per_kernel["splitk_gemm"].get(shape_key(n, k), {}) for n, k in shapes)}
    if args.only:
        per_kernel = {args.only: per_kernel[args.only]}
    device_key = torch.cuda.get_device_name()
    write_table(args.out, device_key, per_kernel)
    log(f"wrote {args.out} for {device_key!r}: " + ", ".join(
        f"{sum(len(v) for v in entries.values())} {kernel} entries" for kernel, entries in per_kernel.items()))


if __name__ == "__main__":
    main()
