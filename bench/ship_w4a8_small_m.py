"""Ship W4A8 small-M tiles from a tuner state of packed-weight searches (`tune --w4a8 --only w4a8_splitk --search
full --buckets ...` over several shapes) into kernels/tile_configs.json, for the buckets that state timed:
- the shape-generic W4A8 entries (the device's and the portable "default" device's): the geometric-mean winners
  over the state's shapes (the fallback w4a8_gemm keeps its other tiles);
- the W4A8 alternates the plugin times at load on a packed shape no table tuned (tune.generic_alternates), beside
  the device's int8 ones;
- the tuned shapes' own entries where the state's best beats what the table runs there now by SHIP_GAIN (shapes the
  table does not list are left to the load pick: a shape listed at a few buckets only would run their tiles at
  every M).

    gunzip -c bench/tune_state_h200_w4a8_s15.jsonl.gz > /tmp/state.jsonl
    OUTLIERTUNE_TILE_CONFIGS=/tmp/none.json python bench/ship_w4a8_small_m.py /tmp/state.jsonl ["NVIDIA H200"]

(no user table: the lookups of what runs now read the shipped table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vllm_outliertune.kernels import configs, tune

SHIP_GAIN = 1.03  # a tuned shape's tile changes where the new one is at least 3 % faster
FORMAT = ("w4a8_gemm", *configs.DISPATCH_ORDER["w4a8_gemm"])


def timed(results: dict, kernel: str, m: int, config: dict) -> float | None:
    return next((t for t, c in results.get(kernel, {}).get(m, []) if c == config), None)


def main(state_path: str, device: str = "NVIDIA H200") -> None:
    state = tune.TuneState.load(Path(state_path))
    shapes = state.shapes(device, "full")
    spread = {shape: state.results(device, *shape) for shape in shapes}
    buckets = sorted({m for r in spread.values() for per_m in r.values() for m in per_m})
    table = json.loads(configs.TABLE_PATH.read_text())  # edited; the lookups below read the table as it was
    generic = tune.table_entries(tune.spread_results(list(spread.values())))
    for key in (device, "default"):
        entries = table["devices"][key]
        for kernel in FORMAT:
            old = entries.get(kernel, {}).get("default", {})
            # the fallback keeps every bucket it had (it runs where the winner cannot; its tiles differ by shape,
            # so the spread may hold no tile of it timed on every shape); the others list where they win
            kept = old if kernel == FORMAT[0] else {b: c for b, c in old.items() if int(b) not in buckets}
            new = kept | generic.get(kernel, {})
            entries.setdefault(kernel, {})["default"] = configs.by_bucket(new)
    keys = (device, "default")
    for (n, k), results in spread.items():
        shape = configs.shape_key(n, k)
        if not any(shape in table["devices"][device].get(kernel, {}) for kernel in FORMAT):
            print(f"{n}x{k}: not in the table (the load pick serves it)")
            continue
        own = tune.table_entries(results)
        for m in buckets:
            kernel = next(iter(configs.kernels_for(m, n, k, keys, "w4a8_gemm")), "w4a8_gemm")
            now = timed(results, kernel, m, configs.get_config(kernel, m, n, k, keys))
            best_kernel = next((name for name in FORMAT[1:] if str(m) in own.get(name, {})), "w4a8_gemm")
            best = own[best_kernel][str(m)]
            best_time = timed(results, best_kernel, m, best)
            if now is not None and now <= best_time * SHIP_GAIN:
                print(f"{n}x{k} M={m}: kept {kernel} ({now:.1f} µs; best {best_time:.1f})")
                continue
            for name in FORMAT:  # the bucket's owner is the new best, the fallback keeps a tile there
                table["devices"][device][name].get(shape, {}).pop(str(m), None)
            fallback = own["w4a8_gemm"][str(m)]
            table["devices"][device]["w4a8_gemm"].setdefault(shape, {})[str(m)] = fallback
            if best_kernel != "w4a8_gemm":
                table["devices"][device][best_kernel].setdefault(shape, {})[str(m)] = best
            print(f"{n}x{k} M={m}: {kernel} {'untimed' if now is None else f'{now:.1f} µs'} -> {best_kernel} "
                  f"{best_time:.1f} µs")
    for name in FORMAT:
        for shape, per_m in table["devices"][device][name].items():
            table["devices"][device][name][shape] = configs.by_bucket(per_m)
    alternates = table.get("alternates", {}).get(device, {})
    w4a8 = tune.generic_alternates(list(spread.values()), fallback="w4a8_gemm")
    merged = {bucket: [o for o in alternates.get(bucket, []) if o[0] not in FORMAT] + w4a8.get(bucket, [])
              for bucket in sorted(alternates.keys() | w4a8.keys(), key=int)}
    per_kernel = {kernel: table["devices"][device].get(kernel, {}) for kernel in FORMAT}
    tune.write_table(configs.TABLE_PATH, device, per_kernel, alternates=merged)
    default_entries = {kernel: table["devices"]["default"][kernel] for kernel in FORMAT}
    tune.write_table(configs.TABLE_PATH, "default", default_entries)
    print(f"generic W4A8 entries at M = {buckets} and {sum(len(v) for v in w4a8.values())} alternates from "
          f"{len(shapes)} shapes written into {configs.TABLE_PATH}")


if __name__ == "__main__":
    main(*sys.argv[1:])
