"""Re-time the W4A8 loop variants (kernels/w4a8_gemm.py: dp4a PREFETCH, tensor-core PREFETCH / WORD_LEVELS) on the
tiles the table ships and on the best few of the earlier full searches, per shape and small-M bucket, against the
shipped dispatch; then write a copy of the shipped table where a tile beat the dispatch by 3 % (GPU):

    python bench/w4a8_refine.py 6144x4096,4096x4096,28672x4096,4096x14336 OUT_DIR [M,...] [--stream] [--columns]

A narrow search (tens of timings per bucket where `outliertune tune --search full` has hundreds): how the H200
entries of session 11 were chosen. OUT_DIR gets refine_state.jsonl (the tuner's state format, search "quick"),
refine.json (per bucket and kernel: the shipped dispatch's time and the best tile) and refined_table.json. M,...
limits it to those row buckets; at M = 1 it also times the GEMV tiles of several groups (tune.w4a8_gemv_tiles) and
the column GEMV's (tune.w4a8_column_tiles; with --columns only those, against the shipped tile).
--stream times back to back over weight copies past the L2 (tune.stream_time_us), as decode streams its layers,
instead of the tuner's graph replay after an L2 flush (which chose the shipped tiles)."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Callable

import torch

from vllm_outliertune.kernels import configs, linear, tune
from vllm_outliertune.kernels.shapes import parse_shapes

BUCKETS = {"w4a8_splitk": (1, 4, 16, 32, 64, 128), "w4a8_gemm": (32, 64, 128)}
EARLIER = ("bench/tune_state_h200_w4a8.jsonl.gz", "bench/tune_state_h200_w4a8_m64.jsonl.gz")
TOP = 4  # best FACTORED tiles taken from an earlier full search (and its best two of any loop)
REP_MS = 10  # graph timing: repeats per tile, in ms
SHIP_BELOW = 0.97  # a tile replaces the dispatch's choice when it takes less than this fraction of its time


def earlier_records() -> dict[tuple, dict]:
    records = {}
    for path in EARLIER:
        for line in gzip.open(path, "rt"):
            r = json.loads(line)
            records[(r["kernel"], r["n"], r["k"], r["m"])] = r
    return records


def candidates(kernel: str, n: int, k: int, m: int, keys: tuple, earlier: dict, columns_only: bool = False
               ) -> list[dict]:
    found = []
    listed = configs.find_entry(kernel, keys, n, k)
    if listed:
        per_m = configs.effective_table()["devices"][listed[0]][kernel][listed[1]]
        found += [per_m[str(m)]] if str(m) in per_m else []
    if (kernel, n, k, m) in earlier:
        timings = [c for _, c in earlier[(kernel, n, k, m)]["timings"]]
        found += [c for c in timings if c.get("FACTORED")][:TOP] + timings[:2]
    if (kernel, m) != ("w4a8_splitk", 1):
        return tune.w4a8_loop_variants(found)
    if columns_only:
        return found[:1] + tune.w4a8_column_tiles()
    return tune.w4a8_loop_variants(found) + tune.w4a8_gemv_tiles() + tune.w4a8_column_tiles()


def format_ops(kernel: str, args: tuple) -> tuple[torch.Tensor, Callable[[tuple], Callable[[dict], torch.Tensor]]]:
    """(the output every tile of ``kernel`` must reproduce: a plain tile's, operands -> a runner of the shipped
    dispatch of its weight format on them, as tune.runner's but ignoring the tile), so that int8 kernels are refined
    the same way (bench/splitk_refine.py)."""
    if kernel in tune.W4A8_KERNELS:
        return (tune.runner("w4a8_gemm", args)({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}),
                lambda a: lambda config: linear.w4a8_gemm(*a, torch.bfloat16))
    return (tune.runner("int8_gemm", args)({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}),
            lambda a: lambda config: linear.int8_gemm(*a, torch.bfloat16))


def time_plans(plans: list[tuple], state: tune.TuneState, device_key: str, stream: bool = False) -> list[dict]:
    """Time each plan's tiles and its shipped dispatch: as CUDA-graph replays after an L2 flush (the tuner's way),
    or with ``stream`` back to back over copies of the weight that together exceed the L2 (tune.stream_time_us)."""
    summary = []
    timing = "stream" if stream else "graph"
    tune.warm_gpu()
    for kernel, n, k, m, tiles in plans:
        args = tune.gemm_args(m, n, k, kernel)
        want, dispatch = format_ops(kernel, args)
        copies = tune.weight_copies(args) if stream else [args]
        shipped_us = tune.candidate_time_us([dispatch(a) for a in copies], {}, timing, REP_MS)
        runs = [tune.runner(kernel, a) for a in copies]
        timings = []
        for config in tiles:
            try:
                got = runs[0](config)
            except Exception as error:  # e.g. out of shared memory or registers: skip this tile
                print(f"skip {kernel} N={n} K={k} M={m} {config}: {error}"[:200], flush=True)
                continue
            if not torch.equal(got, want):
                raise AssertionError(f"{kernel} N={n} K={k} M={m} {config} differs from the plain tile's output")
            timings.append((tune.candidate_time_us(runs, config, timing, REP_MS), config))
        del copies, runs
        state.add((device_key, kernel, n, k, m), "quick", timings, timing=timing)
        best_us, best = min(timings, key=lambda t: t[0]) if timings else (None, None)
        summary.append({"kernel": kernel, "n": n, "k": k, "m": m, "shipped_us": round(shipped_us, 1),
                        "best_us": best_us and round(best_us, 1), "best": best})
        print(json.dumps(summary[-1]), flush=True)
    return summary


def refined_table(summary: list[dict], device_key: str) -> dict:
    """The shipped table with each bucket's fastest tile (over the kernels timed) where it beat the dispatch; a
    fallback winner (w4a8_gemm, int8_gemm) takes the bucket from the kernels that the dispatch would run first."""
    table = json.loads(json.dumps(configs.load_table()))  # a copy: load_table's result is cached
    device = table["devices"][device_key]
    for row in summary:
        rivals = [r for r in summary if (r["n"], r["k"], r["m"]) == (row["n"], row["k"], row["m"]) and r["best_us"]]
        if min(rivals, key=lambda r: r["best_us"]) is not row or row["best_us"] > SHIP_BELOW * row["shipped_us"]:
            continue
        shape = configs.shape_key(row["n"], row["k"])
        entry = device.setdefault(row["kernel"], {}).setdefault(shape, {}) | {str(row["m"]): row["best"]}
        device[row["kernel"]][shape] = configs.by_bucket(entry)
        if row["kernel"] in configs.DISPATCH_ORDER:  # the fallback runs a bucket that no other kernel lists
            for other in configs.DISPATCH_ORDER[row["kernel"]]:
                device.get(other, {}).get(shape, {}).pop(str(row["m"]), None)
        print(f"ship {shape} M={row['m']} {row['kernel']}: {row['shipped_us']} -> {row['best_us']} us", flush=True)
    return table


def main(shapes: str, out: Path, buckets: set[int] | None = None, stream: bool = False,
         columns_only: bool = False) -> None:
    keys = configs.table_keys(torch.device("cuda"))
    earlier = earlier_records()
    refine([(kernel, n, k, m, candidates(kernel, n, k, m, keys, earlier, columns_only))
            for n, k in parse_shapes(shapes)
            for kernel, ms in BUCKETS.items() for m in ms if buckets is None or m in buckets], out, keys[0], stream)


def refine(plans: list[tuple], out: Path, device_key: str, stream: bool = False) -> None:
    """Compile and time plans [(kernel, n, k, m, tiles)] (time_plans), then write OUT_DIR's state, summary and
    refined table."""
    jobs = [(kernel, m, n, k, c) for kernel, n, k, m, tiles in plans for c in tiles]
    print(f"{len(jobs)} timings", flush=True)
    with concurrent.futures.ProcessPoolExecutor(16, mp_context=multiprocessing.get_context("spawn")) as pool:
        tune.precompile(pool, jobs, 16, print)
    out.mkdir(parents=True, exist_ok=True)
    summary = time_plans(plans, tune.TuneState.load(out / "refine_state.jsonl"), device_key, stream)
    (out / "refine.json").write_text(json.dumps(summary, indent=1))
    (out / "refined_table.json").write_text(json.dumps(refined_table(summary, device_key), indent=1) + "\n")


if __name__ == "__main__":
    positional = [arg for arg in sys.argv[1:] if arg not in ("--stream", "--columns")]
    rows = {int(m) for m in positional[2].split(",")} if len(positional) > 2 else None
    main(positional[0], Path(positional[1]), rows, "--stream" in sys.argv, "--columns" in sys.argv)
