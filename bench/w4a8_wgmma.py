"""The Gluon W4A8 kernel (kernels/w4a8_wgmma.py) on a Hopper GPU: exactness, stream timings against the shipped
W4A8 dispatch and our int8 dispatch, and shipping its tiles into kernels/tile_configs.json.

    python bench/w4a8_wgmma.py time OUT.json [--rows 16,32,64,128] [--shapes 6144x4096,...] [--grid swap]  # GPU
    python bench/w4a8_wgmma.py ship OUT.json ["NVIDIA H200"]                                   # anywhere

time: first every WGMMA tile of a grid (--grid levels: weights widened into shared memory; swap: SWAP_AB, weights
from registers, gathered and NATURAL_K; both) against torch_ref on odd shapes (M not a multiple of 64, K
splits, the token guard's row scale, no bias, one group per row), then per (shape, M) the shipped dispatch
(kernels/linear.py's w4a8_gemm op: table lookup, no load pick), the int8 dispatch on an int8 weight of the shape,
and each WGMMA tile, all as tune.stream_time_us (weight copies past the L2, back to back in a CUDA graph, as decode
streams layers).
ship: for TUNED shapes (Llama-3-8B TP 1), each bucket's best tile where it beats the shipped dispatch by
ship_w4a8_small_m.SHIP_GAIN (as w4a8_splitk, the bucket's first kernel; a w4a8_unpack listing there is dropped); and
per bucket ALTERNATES_PER_BUCKET tiles chosen on the tuned shapes (tune.generic_alternates) added to the device's
load-pick alternates, with their cover of the held-out shapes (Qwen2.5-7B TP 1) printed."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from vllm_outliertune.kernels.tune import SWAP_TILES, levels_tile, swap_tile

TUNED = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # Llama-3-8B TP 1
HELD_OUT = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]  # Qwen2.5-7B TP 1
# Timed tiles (BLOCK_M, BLOCK_N, stages, level buffers) and their K splits: one warpgroup, and two from M = 128
TILES = [(64, bn, stages, bufs) for bn in (128, 64, 32) for stages, bufs in ((4, 2), (3, 1))]
TILE_SPLITS = (1, 2, 4, 8)
LARGE_TILES = [(128, bn, 4, 2) for bn in (64, 128)]
LARGE_SPLITS = (1, 2, 4)
# Checked tiles: every combination, with an uneven split and the automatic one
CHECKED = list(itertools.product((64, 128), (32, 64, 128), (3, 4), (1, 2)))
CHECKED_SWAP = ((16, 64, 4, False), (32, 128, 4, False), (64, 128, 8, False), (128, 64, 4, False),
                (32, 64, 4, True), (64, 128, 4, True), (128, 128, 8, True))  # (BLOCK_M, BLOCK_N, warps, NATURAL_K)
SWAP_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "SPLIT_K")
LEVEL_KEYS = ("BLOCK_M", "BLOCK_N", "num_stages", "LEVEL_BUFS", "SPLIT_K")


def name_of(config: dict) -> str:
    keys = SWAP_KEYS if config.get("SWAP_AB") else LEVEL_KEYS
    kind = ("sn" if config.get("NATURAL_K") else "sw") if config.get("SWAP_AB") else "wg"
    return kind + "_".join(str(config[key]) for key in keys)


def grid_configs(m: int, grid: str) -> list[dict]:
    """The timed tiles at M = m of a grid (levels, swap or both). Swap: the tuner's SWAP_AB tiles (tune.SWAP_TILES)
    at BLOCK_M = min(M, 128), and at 64 from M = 128, each gathered and NATURAL_K."""
    configs = []
    if grid in ("levels", "both"):
        configs += [levels_tile(*tile, split) for tile in TILES for split in TILE_SPLITS]
        configs += [levels_tile(*tile, split) for tile in LARGE_TILES for split in LARGE_SPLITS] if m > 64 else []
    if grid in ("swap", "both"):
        configs += [swap_tile(bm, bn, warps, split, natural) for bm in sorted({min(m, 128), min(m, 64)})
                    for bn, warps in SWAP_TILES for natural in (False, True) for split in TILE_SPLITS]
    return configs


def check_exact(grid: str) -> int:
    """The grid's kind of tiles on odd problems against torch_ref; returns the number of mismatches (printed)."""
    import torch

    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.kernels.tune import packed_weight
    from vllm_outliertune.kernels.w4a8_wgmma import w4a8_wgmma, wgmma_applies

    bad = 0
    for m, n, k, group in ((1, 128, 256, 128), (37, 384, 512, 128), (64, 256, 1024, 0), (130, 4608, 3584, 128),
                           (64, 28672, 4096, 128), (16, 6144, 4096, 128), (200, 192, 1152, 384)):
        words, scales, zeros = packed_weight(n, k, group)
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        for row_scale, b in ((None, bias), (torch.rand(m, device="cuda") + 0.5, None)):
            want = torch_ref.w4a8_gemm_ref(a, words, scales, zeros, group, w_scale, b, torch.bfloat16, row_scale)
            tiles = [levels_tile(*tile, split) for tile, split in itertools.product(CHECKED, (1, 3, 0))
                     if grid != "swap"]
            tiles += [swap_tile(bm, bn, warps, split, natural) for (bm, bn, warps, natural), split
                      in itertools.product(CHECKED_SWAP, (1, 3)) if grid != "levels"]
            tiles += [swap_tile(*CHECKED_SWAP[1][:3], 0)] if grid != "levels" else []
            for config in tiles:
                if not wgmma_applies(a, words, scales, group, True, config):
                    continue
                out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
                got = w4a8_wgmma(a, words, scales, zeros, group, w_scale, b, out, row_scale, config)
                if not torch.equal(got, want):
                    bad += 1
                    print(f"DIFF M={m} N={n} K={k} group={group} {config} row_scale={row_scale is not None}")
    print(f"exactness: {bad} mismatches")
    return bad


def time_shapes(out: Path, rows: list[int], shapes: list[tuple[int, int]], grid: str) -> None:
    import torch

    from vllm_outliertune.kernels import linear
    from vllm_outliertune.kernels.tune import packed_weight, stream_time_us, weight_copies
    from vllm_outliertune.kernels.w4a8_wgmma import w4a8_wgmma, wgmma_applies

    if check_exact(grid):
        raise SystemExit("WGMMA tiles differ from the reference: not timed")
    results = []
    for (n, k), m in itertools.product(shapes, rows):
        words, scales, zeros = packed_weight(n, k, 128)
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w_scale, bias = torch.rand(n, device="cuda") / 100, torch.randn(n, device="cuda")
        copies = weight_copies((a, words, scales, zeros, w_scale, bias))
        row = {"n": n, "k": k, "m": m, "shipped": stream_time_us(
            [lambda c=c: linear.w4a8_gemm(c[0], c[1], c[2], c[3], 128, c[4], c[5], torch.bfloat16) for c in copies])}
        int8 = weight_copies((a, torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8), w_scale, bias))
        row["int8"] = stream_time_us([lambda c=c: linear.int8_gemm(*c, torch.bfloat16) for c in int8])
        for config in grid_configs(m, grid):
            if not wgmma_applies(a, words, scales, 128, True, config):
                continue
            result = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
            row[name_of(config)] = stream_time_us([lambda c=c, config=config: w4a8_wgmma(
                c[0], c[1], c[2], c[3], 128, c[4], c[5], result, None, config) for c in copies])
        best = min((t, key) for key, t in configs_of(row).items())
        print(f"{n}x{k} M={m}: shipped {row['shipped']:.1f} int8 {row['int8']:.1f} µs, best {best[1]} {best[0]:.1f}"
              f" ({row['shipped'] / best[0]:.2f}x shipped, {row['int8'] / best[0]:.2f}x int8)", flush=True)
        results.append(row)
        out.write_text(json.dumps(results, indent=1) + "\n")  # (each row as it comes: a call may time out)


def configs_of(row: dict) -> dict[str, float]:
    return {key: t for key, t in row.items() if key[:2] in ("wg", "sw", "sn")}


def config_of(name: str) -> dict:
    values = list(map(int, name[2:].split("_")))
    return swap_tile(*values, natural=name.startswith("sn")) if name[:2] in ("sw", "sn") else levels_tile(*values)


def ship(timings: Path, device: str) -> None:
    from ship_w4a8_small_m import SHIP_GAIN  # (bench/ is the script's directory)

    from vllm_outliertune.kernels import configs, tune

    rows = json.loads(timings.read_text())
    table = json.loads(configs.TABLE_PATH.read_text())
    entries = table["devices"][device]
    for row in rows:
        if (row["n"], row["k"]) not in TUNED:
            continue
        best = min(configs_of(row), key=configs_of(row).get)
        if row["shipped"] < SHIP_GAIN * row[best]:
            print(f"N={row['n']},K={row['k']} M={row['m']}: keeps its tile ({row['shipped']:.1f} µs, best WGMMA "
                  f"{row[best]:.1f})")
            continue
        shape, bucket = f"N={row['n']},K={row['k']}", str(row["m"])
        entries.setdefault("w4a8_splitk", {}).setdefault(shape, {})[bucket] = config_of(best)
        entries.get("w4a8_unpack", {}).get(shape, {}).pop(bucket, None)
        print(f"{shape} M={row['m']}: {best} {row[best]:.1f} µs against {row['shipped']:.1f}")
    # load-pick alternates: chosen on the tuned shapes only, so that the held-out ones show what an untuned shape gets
    spread = [{"w4a8_gemm": {row["m"]: [] for row in rows},
               "w4a8_splitk": {m: [(t, config_of(name)) for row in rows if (row["n"], row["k"]) == shape
                                   and row["m"] == m for name, t in configs_of(row).items()]
                               for m in {row["m"] for row in rows}}} for shape in TUNED]
    alternates = tune.generic_alternates(spread, fallback="w4a8_gemm")
    for bucket, options in alternates.items():
        listed = table["alternates"].setdefault(device, {}).setdefault(bucket, [])
        listed += [option for option in options if option not in listed]
        for row in (r for r in rows if (r["n"], r["k"]) in HELD_OUT and r["m"] == int(bucket)):
            n, k = row["n"], row["k"]
            picked = min(row[name_of(config)] for _, config in options)
            print(f"held out {n}x{k} M={bucket}: alternates {picked:.1f} µs, own best WGMMA "
                  f"{min(configs_of(row).values()):.1f}, shipped lookup {row['shipped']:.1f}, int8 {row['int8']:.1f}")
    configs.TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("time", "ship"))
    parser.add_argument("timings", type=Path, help="JSON of per-(shape, M) timings (time writes it, ship reads it)")
    parser.add_argument("device", nargs="?", default="NVIDIA H200", help="ship: the table's device entry")
    parser.add_argument("--rows", default="16,32,64,128")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in TUNED + HELD_OUT))
    parser.add_argument("--grid", choices=("levels", "swap", "both"), default="both", help="time: which tiles")
    args = parser.parse_args()
    if args.command == "time":
        time_shapes(args.timings, [int(m) for m in args.rows.split(",")],
                    [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")], args.grid)
    else:
        ship(args.timings, args.device)


if __name__ == "__main__":
    main()
