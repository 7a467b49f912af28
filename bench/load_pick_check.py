"""The load-time pick for untuned shapes (kernels/load_pick.py) on a GPU, against known answers. Per shape and M,
the dispatched GEMM's time with the table as shipped ("table": the shape's own tuned tiles where it has them), with
the shape's own entries taken out (the shape-generic lookup), and after pick_untuned_shape; with --state, also the
best (kernel, tile) that tuner state holds for the shape (its own full search), timed in the same process.
CUDA-graph replays, cold L2:

    python bench/load_pick_check.py 4096x14336,6144x4096,4096x2048 [--m 1,4,16,32]
    python bench/load_pick_check.py 4608x3584,3584x18944 --w4a8 --state bench/tune_state_h200_w4a8_s15.jsonl.gz

Issue 12's aim: a shape in no table within 15 % of its tuned speed."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

from vllm_outliertune.kernels import configs, linear, load_pick, tune
from vllm_outliertune.kernels.shapes import parse_shapes

GROUP_SIZE = tune.W4A8_GROUP_SIZE


def operands(m: int, n: int, k: int, w4a8: bool) -> tuple:
    return tune.gemm_args(m, n, k, "w4a8_gemm" if w4a8 else "int8_gemm")


def dispatch_us(n: int, k: int, rows: list[int], w4a8: bool) -> dict[int, float]:
    """µs of the GEMM as the table dispatches it now, per M."""
    gemm = linear.w4a8_gemm if w4a8 else linear.int8_gemm
    times = {}
    for m in rows:
        args = operands(m, n, k, w4a8)
        times[m] = tune.graph_time_us(lambda: gemm(*args, torch.bfloat16), 10)
    return times


def state_best_us(state: tune.TuneState, device: str, n: int, k: int, rows: list[int], w4a8: bool) -> dict:
    """µs of the best (kernel, tile) the state holds for the shape at each M, timed here."""
    kernels = load_pick.W4A8_KERNELS if w4a8 else load_pick.INT8_KERNELS
    results = state.results(device, n, k)
    times = {}
    for m in rows:
        timed = [(t, kernel, c) for kernel in kernels for t, c in results.get(kernel, {}).get(m, [])]
        if timed:
            _, kernel, config = min(timed, key=lambda item: item[0])
            run = tune.runner(kernel, operands(m, n, k, w4a8))
            times[m] = tune.graph_time_us(lambda: run(config), 10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes")
    parser.add_argument("--m", default="1,4,16,32")
    parser.add_argument("--w4a8", action="store_true", help=f"packed 4-bit weights (group size {GROUP_SIZE})")
    parser.add_argument("--state", type=Path, help="tuner state (.jsonl or .jsonl.gz) whose best tiles to time too")
    args = parser.parse_args()
    shapes, rows = parse_shapes(args.shapes), [int(m) for m in args.m.split(",")]
    device = torch.device("cuda")
    keys = configs.table_keys(device)
    state = None
    if args.state:
        text = gzip.open(args.state, "rt").read() if args.state.suffix == ".gz" else args.state.read_text()
        state = tune.TuneState(None, {(r["device"], r["kernel"], r["n"], r["k"], r["m"]): r
                                      for r in map(json.loads, text.splitlines()) if r})
    tune.warm_gpu()
    table = {shape: dispatch_us(*shape, rows, args.w4a8) for shape in shapes}
    best = {shape: state_best_us(state, keys[0], *shape, rows, args.w4a8) if state else {} for shape in shapes}
    kernels = load_pick.W4A8_KERNELS if args.w4a8 else load_pick.INT8_KERNELS
    entries = configs.load_table()["devices"][keys[0]]  # the cached table: the lookups see the change
    for kernel in kernels:
        for n, k in shapes:
            entries.get(kernel, {}).pop(configs.shape_key(n, k), None)
    # the lookups below the table cache (configs.clear_caches would reload the table from disk)
    for cached in (configs.effective_table, configs.lookup_order, configs._per_m, configs.kernels_by_bucket):
        cached.cache_clear()
    for n, k in shapes:
        generic = dispatch_us(n, k, rows, args.w4a8)
        picked = load_pick.pick_untuned_shape(n, k, device, GROUP_SIZE if args.w4a8 else None)
        after = dispatch_us(n, k, rows, args.w4a8)
        print(f"{n}x{k}: picked {picked}")
        for m in rows:
            reference = best[(n, k)].get(m)
            print(f"  M={m}: table {table[(n, k)][m]:.1f} µs, generic {generic[m]:.1f}, load pick {after[m]:.1f}"
                  + (f", state's best {reference:.1f} (pick / best {after[m] / reference:.2f}x)" if reference else "")
                  + f", pick / table {after[m] / table[(n, k)][m]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
