"""How fast a shape runs with the shape-generic "default" tiles instead of its own, from the tuner's own timings (no
GPU needed): for each M bucket, the time of the (kernel, tile) the dispatch would run with the shape's tuned entries
and with the device's default entries, both looked up in the timings the tuner measured for that shape (the quick
search times the default tiles too). Run it on shapes left out of the spread the default was tuned over.

    python bench/untuned_shapes.py STATE.jsonl TABLE.json "NVIDIA H200" 7168x5120,5120x5120,27648x5120,5120x13824

Leave-one-out over the shapes searched in full (each left out of the spread in turn, the generic choice and the
load-time alternatives derived from the others, then looked up in the left-out shape's own timings):

    python bench/untuned_shapes.py STATE.jsonl --leave-one-out "NVIDIA H200" [ALTERNATIVES ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from vllm_outliertune.kernels.configs import m_bucket, owners_at, owners_by_bucket, shape_key
from vllm_outliertune.kernels.load_pick import fitted_to_depth
from vllm_outliertune.kernels.shapes import parse_shapes
from vllm_outliertune.kernels.tune import ALTERNATES_UP_TO_M, TuneState, generic_alternates


def dispatched(entries: dict[str, dict], m: int) -> tuple[str, dict]:
    """(kernel, config) that kernels/linear.py's dispatch runs for M rows under these entries (every kernel able
    to run)."""
    listed = {kernel: {int(b) for b in per_m} for kernel, per_m in entries.items()}
    kernel = next(iter(owners_at(owners_by_bucket(listed), m)), "int8_gemm")
    return kernel, entries[kernel][str(m_bucket(m, sorted(listed[kernel])))]


def timed(results: dict, kernel: str, m: int, config: dict) -> float | None:
    return next((t for t, c in results.get(kernel, {}).get(m, []) if c == config), None)


def leave_one_out(state: TuneState, device: str, count: int) -> None:
    """Per small-M bucket of each left-out shape: the fastest of `count` generic alternatives (count 1: the
    generic choice alone) and their variants fitted to the shape's depth (as the load pick times them) over the
    shape's own best time; how many points are within 15 %."""
    spread = {shape: state.results(device, *shape) for shape in state.shapes(device, "full")}
    ratios = []
    for held, results in spread.items():
        alternates = generic_alternates([r for shape, r in spread.items() if shape != held], count)
        for bucket, options in alternates.items():
            m = int(bucket)
            own = min(t for per_m in results.values() for t, _ in per_m.get(m, []))
            options = options + [fitted for option in options for fitted in fitted_to_depth(*option, held[1])]
            times = [t for kernel, config in options if (t := timed(results, kernel, m, config)) is not None]
            if times:
                ratios.append((min(times) / own, held, m))
    within = sum(ratio <= 1.15 for ratio, _, _ in ratios)
    geomean = math.exp(sum(math.log(ratio) for ratio, _, _ in ratios) / len(ratios))
    worst = ", ".join(f"{n}x{k} M={m} {ratio:.2f}x" for ratio, (n, k), m in sorted(ratios, reverse=True)[:4])
    print(f"| {count} | {within} of {len(ratios)} | {geomean:.3f} | {worst} |")


def main() -> None:
    if sys.argv[2] == "--leave-one-out":
        state, device = TuneState.load(Path(sys.argv[1])), sys.argv[3]
        print(f"| alternatives per bucket (M <= {ALTERNATES_UP_TO_M}) | (shape, M) within 15 % of own best | "
              "geometric-mean slowdown | worst |\n|---|---|---|---|")
        for count in [int(c) for c in sys.argv[4:]] or [1, 2, 3]:
            leave_one_out(state, device, count)
        return
    state_path, table_path, device, shapes = sys.argv[1:5]
    state = TuneState.load(Path(state_path))
    table = json.loads(Path(table_path).read_text())["devices"][device]
    print("| shape | M | tuned µs (kernel) | default tiles µs (kernel) | default / tuned |\n|---|---|---|---|---|")
    for n, k in parse_shapes(shapes):
        results = state.results(device, n, k)
        for m in sorted(results.get("int8_gemm", {})):
            row = []
            for shape in (shape_key(n, k), "default"):
                kernel, config = dispatched({kern: per[shape] for kern, per in table.items() if shape in per}, m)
                row.append((timed(results, kernel, m, config), kernel))
            (tuned, tk), (generic, gk) = row
            ratio = f"{generic / tuned:.2f}" if tuned and generic else "n/a (default tile not timed here)"
            print(f"| {n}x{k} | {m} | {tuned or float('nan'):.1f} ({tk}) | {generic or float('nan'):.1f} ({gk}) | "
                  f"{ratio} |")


if __name__ == "__main__":
    main()
