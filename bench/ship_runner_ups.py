"""List, in one GPU's entries of the shipped kernels/tile_configs.json, the Triton kernel that runs each bucket
another library's GEMM (CUTLASS) won where that library is missing (tune.triton_runner_up: how `outliertune tune`
writes tables since session 26), from the tuner state those entries came from, without re-deriving the rest (later
sessions refined the small-M entries from other states; the shape-generic "default" entry from the geometric means
over the shapes searched in full, as `outliertune tune` derives it):

    python bench/ship_runner_ups.py bench/tune_state_h200.jsonl.gz ["NVIDIA H200"]

Prints each runner-up with its and the fallback's time in the state."""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

from vllm_outliertune.kernels import configs, tune


def load_state(path: Path) -> tune.TuneState:
    """A tuner state, gzipped or not (TuneState.load reads plain text)."""
    if path.suffix != ".gz":
        return tune.TuneState.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.stem
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return tune.TuneState.load(plain)


def shape_results(state: tune.TuneState, device: str, shape: str) -> dict:
    """The state's {kernel: {M: [(µs, config)]}} for a shape key; for "default" the geometric means over the shapes
    searched in full, from which tune.device_entries chooses the shape-generic entry."""
    if shape == "default":
        return tune.spread_results([state.results(device, n, k) for n, k in state.shapes(device, "full")])
    return state.results(device, *configs.shape_of(shape))


def runner_ups(state: tune.TuneState, shipped: dict[str, dict], device: str) -> dict[str, dict[str, dict]]:
    """{kernel: {shape: {bucket: config}}} to add: per shape and bucket that the shipped entries give to an external
    GEMM and to no Triton kernel the dispatch tries after it, that kernel's best tile in the state where it beats
    the fallback there."""
    added: dict[str, dict[str, dict]] = {}
    for fallback, order in configs.DISPATCH_ORDER.items():
        for external in (kernel for kernel in order if kernel in configs.EXTERNAL_KERNELS):
            for shape, buckets in shipped.get(external, {}).items():
                results = shape_results(state, device, shape)
                for bucket in buckets:
                    best = {kernel: tune._best(per_m[int(bucket)]) for kernel, per_m in results.items()
                            if kernel in (fallback, *order) and per_m.get(int(bucket))}
                    kernel = tune.triton_runner_up(best, external, fallback)
                    if kernel and bucket not in shipped.get(kernel, {}).get(shape, {}):
                        added.setdefault(kernel, {}).setdefault(shape, {})[bucket] = best[kernel][1]
                        print(f"{shape:18s} M={bucket:>5s}: {kernel} {best[kernel][0]:.1f} µs "
                              f"(fallback {best[fallback][0]:.1f}, {external} {best[external][0]:.1f})")
    return added


def main(state_path: str, device: str = "NVIDIA H200") -> None:
    shipped = configs.load_table()["devices"][device]
    added = runner_ups(load_state(Path(state_path)), shipped, device)
    per_kernel = {kernel: {shape: configs.by_bucket(shipped.get(kernel, {}).get(shape, {}) | per_m)
                           for shape, per_m in per_shape.items()} for kernel, per_shape in added.items()}
    tune.write_table(configs.TABLE_PATH, device, per_kernel)
    print(f"listed {sum(len(per_m) for per_shape in added.values() for per_m in per_shape.values())} runner-up "
          f"buckets of {device!r} in {configs.TABLE_PATH}")


if __name__ == "__main__":
    main(*sys.argv[1:])
