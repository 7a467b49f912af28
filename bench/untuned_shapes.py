"""How fast a shape runs with the shape-generic "default" tiles instead of its own, from the tuner's own timings (no
GPU needed): for each M bucket, the time of the (kernel, tile) the dispatch would run with the shape's tuned entries
and with the device's default entries, both looked up in the timings the tuner measured for that shape (the quick
search times the default tiles too). Run it on shapes left out of the spread the default was tuned over.

    python bench/untuned_shapes.py STATE.jsonl TABLE.json "NVIDIA H200" 7168x5120,5120x5120,27648x5120,5120x13824
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm_outliertune.kernels.configs import m_bucket, owners_at, owners_by_bucket, shape_key
from vllm_outliertune.kernels.shapes import parse_shapes
from vllm_outliertune.kernels.tune import TuneState


def dispatched(entries: dict[str, dict], m: int) -> tuple[str, dict]:
    """(kernel, config) that kernels/linear.py's dispatch runs for M rows under these entries (every kernel able
    to run)."""
    listed = {kernel: {int(b) for b in per_m} for kernel, per_m in entries.items()}
    kernel = next(iter(owners_at(owners_by_bucket(listed), m)), "int8_gemm")
    return kernel, entries[kernel][str(m_bucket(m, sorted(listed[kernel])))]


def timed(results: dict, kernel: str, m: int, config: dict) -> float | None:
    return next((t for t, c in results.get(kernel, {}).get(m, []) if c == config), None)


def main() -> None:
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
