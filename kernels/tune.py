"""Re-tune the tile table on this GPU and rewrite kernels/tile_configs.json (or --out).

    python -m vllm_outliertune.kernels.tune                      # Llama-3-8B shapes, all kernels, all M buckets
    python -m vllm_outliertune.kernels.tune --shapes 6144x4096 --out /tmp/table.json
    python -m vllm_outliertune.kernels.tune --only splitk_gemm   # one kernel, against the table's int8_gemm tiles
    python -m vllm_outliertune.kernels.tune --only splitk_gemm --buckets 1,4   # only these M buckets

For every shape (N x K) and M bucket it times each candidate tile of the tiled int8_gemm, of the split-K small-M
kernel and (Hopper) of the persistent TMA GEMM, all on int8 activation codes (what the compiled plugin runs: the
quantization is fused into the producing norm / activation), cold L2 (triton's do_bench flushes it), median of
repeats. It keeps the fastest of each and lists the split-K kernel for the buckets from M=1 up, the TMA GEMM for
the buckets from the largest M down, while they beat int8_gemm (linear.py dispatches on that). A per-device
"default" serves untuned shapes: the candidate with the best geometric-mean time over the tuned shapes. Entries
for other devices are kept."""

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
from vllm_outliertune.kernels.configs import KERNELS, TABLE_PATH, get_config, shape_key, table_keys
from vllm_outliertune.kernels.int8_gemm import int8_gemm
from vllm_outliertune.kernels.int8_gemm_tma import int8_gemm_tma, supports_tma
from vllm_outliertune.kernels.splitk_gemm import splitk_gemm

LLAMA3_8B_SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down
GEMM_M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
SPLITK_M_BUCKETS = (1, 4, 16, 32, 64)
TMA_M_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def _gemm(bm, bn, bk, warps, stages, group=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


def gemm_candidates(m: int) -> list[dict]:
    if m <= 128:
        return [_gemm(*c) for c in ((16, 32, 256, 4, 5), (16, 64, 256, 4, 4), (16, 64, 512, 4, 3),
                                    (16, 128, 256, 4, 4), (32, 64, 256, 4, 4), (32, 128, 256, 4, 4),
                                    (64, 64, 256, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3),
                                    (64, 256, 128, 4, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4))
                if c[0] <= max(16, m)]
    return [_gemm(*c) for c in ((64, 128, 128, 4, 4), (64, 256, 128, 4, 3), (128, 128, 128, 4, 4),
                                (128, 128, 128, 8, 4), (128, 128, 64, 4, 5), (128, 256, 64, 8, 4),
                                (128, 256, 128, 8, 3), (256, 128, 64, 8, 4), (256, 128, 128, 8, 3))]


def tma_candidates(m: int) -> list[dict]:
    """Tiles whose operand stages fit in shared memory. (Triton 3.6's warp specialisation on Hopper passed the
    small interpreter-sized GPU test but hung the tuner at these tiles: not offered.)"""
    return [_gemm(*c) for c in ((128, 128, 128, 4, 4), (128, 128, 128, 8, 4), (128, 128, 128, 8, 5),
                                (128, 128, 256, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 3),
                                (128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (256, 128, 128, 8, 4))]


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
            # A few rows by (nearly) all of K per program: every load of a program in flight at once (at most
            # 128 accumulator words per thread).
            tiles += [(bn, bk, {"PACKED": 1, "num_warps": warps}) for bn, bk in (
                (2, 4096), (4, 4096), (8, 2048), (8, 4096), (16, 1024), (16, 2048), (16, 4096), (32, 1024))
                for warps in (4, 8, 16) if bm * bn * bk <= 128 * 128 * warps]
            # Persistent grids: a few programs per SM walk the tiles.
            tiles += [(bn, bk, {"PACKED": 1, "PROGRAMS_PER_SM": per_sm, "num_warps": warps})
                      for bn, bk, warps in ((16, 512, 4), (32, 512, 4), (8, 2048, 8), (8, 4096, 8))
                      for per_sm in (2, 4, 8) if bm * bn * bk <= 128 * 128 * warps]
        candidates += [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                        "num_stages": 3 if bk * (bn + bm) > 48 * 1024 else 4, **variant}
                       for bn, bk, variant in tiles for split in (1, 2, 4, 8)
                       # split K at most 8 ways at BLOCK_K 256, 4 at 512, 2 from 1024 up; persistent grids not at all
                       if split == 1 or ("PROGRAMS_PER_SM" not in variant and split <= 2 * 1024 // min(bk, 1024))]
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


def tune_shape(n: int, k: int, m_buckets: list[int], kernels: tuple[str, ...], log) -> dict[str, dict]:
    """All timings of one shape: {kernel: {M: [(µs, config)]}}. int8_gemm, the baseline of the other two, is timed
    with the table's own tile when it is not being tuned."""
    results = {kernel: {} for kernel in KERNELS}
    for m in m_buckets:
        p = make_inputs(m, n, k)
        a_q = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
        args = (a_q, p["w_q"], p["w_scale"], p["bias"])
        for kernel, candidates, run in (
                ("int8_gemm", gemm_candidates(m) if "int8_gemm" in kernels else
                 [get_config("int8_gemm", m, n, k, table_keys(a_q.device))],
                 lambda c: int8_gemm(*args, torch.bfloat16, c)),
                ("splitk_gemm", splitk_candidates(m) if "splitk_gemm" in kernels and m in SPLITK_M_BUCKETS else [],
                 lambda c: splitk_gemm(*args, None, None, 8, torch.bfloat16, c)),
                ("int8_gemm_tma", tma_candidates(m) if "int8_gemm_tma" in kernels and m in TMA_M_BUCKETS
                 and supports_tma(a_q, p["w_q"]) else [],
                 lambda c: int8_gemm_tma(*args, torch.bfloat16, c))):
            timings = []
            for config in candidates:
                try:
                    timings.append((time_us(lambda: run(config)), config))
                except Exception as error:  # e.g. out of shared memory or registers: skip this tile
                    log(f"skip {kernel} N={n} K={k} M={m} {config}: {type(error).__name__}: {error}"[:300])
            if timings:
                results[kernel][m] = timings
                ranked = sorted(timings, key=lambda t: t[0])
                runners_up = ", ".join(f"{t:.1f}" for t, _ in ranked[1:4])
                log(f"{kernel:13s} N={n:5d} K={k:5d} M={m:5d} best {ranked[0][0]:9.1f} us {ranked[0][1]} "
                    f"(next: {runners_up})")
    return results


def _winning_run(results: dict, kernel: str, buckets) -> dict[str, dict]:
    """Best configs of `kernel` for the tuned buckets, in the given order, while it beats int8_gemm."""
    entries = {}
    for m in buckets:
        timings = results[kernel].get(m)
        if not timings:
            continue
        if _best(timings)[0] >= _best(results["int8_gemm"][m])[0]:
            break
        entries[str(m)] = _best(timings)[1]
    return entries


def table_entries(results: dict) -> dict[str, dict[str, dict]]:
    """Best configs of one shape: int8_gemm everywhere it was tuned, split-K from M=1 up and TMA from the largest M
    down while each wins (the dispatch compares M with the smallest / largest listed bucket)."""
    return {"int8_gemm": {str(m): _best(t)[1] for m, t in results["int8_gemm"].items()},
            "splitk_gemm": _winning_run(results, "splitk_gemm", SPLITK_M_BUCKETS),
            "int8_gemm_tma": _winning_run(results, "int8_gemm_tma", sorted(TMA_M_BUCKETS, reverse=True))}


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


def keep_untuned_buckets(path: Path, device_key: str, kernel: str, entries: dict[str, dict],
                         tuned: list[int]) -> dict[str, dict]:
    """This device's existing entries of `kernel` in the table at `path`, with the tuned buckets replaced by
    `entries` (per shape; a tuned bucket the kernel lost is dropped)."""
    old = json.loads(path.read_text())["devices"].get(device_key, {}).get(kernel, {}) if path.exists() else {}
    merged = {}
    for shape in old.keys() | entries.keys():
        per_m = {m: c for m, c in old.get(shape, {}).items() if int(m) not in tuned} | entries.get(shape, {})
        merged[shape] = dict(sorted(per_m.items(), key=lambda item: int(item[0])))
    return merged


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
    parser.add_argument("--only", choices=KERNELS,
                        help="re-tune one kernel (its M buckets), timed against this device's int8_gemm tiles")
    parser.add_argument("--buckets", help="comma-separated M buckets to re-tune (with --only); this device's "
                        "entries for the other buckets are kept")
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
    kernels = (args.only,) if args.only else KERNELS
    kernel_buckets = {"int8_gemm": GEMM_M_BUCKETS, "splitk_gemm": SPLITK_M_BUCKETS, "int8_gemm_tma": TMA_M_BUCKETS}
    m_buckets = sorted(set().union(*(kernel_buckets[kernel] for kernel in kernels)))
    if args.buckets:
        chosen = sorted({int(b) for b in args.buckets.split(",")})
        if not args.only or not set(chosen) <= set(kernel_buckets[args.only]):
            raise SystemExit(f"tune: --buckets needs --only KERNEL and buckets from that kernel's list "
                             f"({kernel_buckets[args.only] if args.only else kernel_buckets})")
        m_buckets = chosen
    all_results, per_kernel = [], {kernel: {} for kernel in kernels}
    for n, k in shapes:
        results = tune_shape(n, k, m_buckets, kernels, log)
        all_results.append(results)
        for kernel, per_m in table_entries(results).items():
            if kernel in kernels:
                per_kernel[kernel][shape_key(n, k)] = per_m
    for kernel in kernels:
        # int8_gemm serves every M; the others only the buckets where they won on every tuned shape.
        per_kernel[kernel]["default"] = {
            m: c for m, c in default_entries(all_results, kernel).items()
            if kernel == "int8_gemm" or all(m in per_kernel[kernel].get(shape_key(n, k), {}) for n, k in shapes)}
    device_key = torch.cuda.get_device_name()
    if args.buckets:
        per_kernel = {kernel: keep_untuned_buckets(args.out, device_key, kernel, entries, m_buckets)
                      for kernel, entries in per_kernel.items()}
    write_table(args.out, device_key, per_kernel)
    log(f"wrote {args.out} for {device_key!r}: " + ", ".join(
        f"{sum(len(v) for v in entries.values())} {kernel} entries" for kernel, entries in per_kernel.items()))


if __name__ == "__main__":
    main()
