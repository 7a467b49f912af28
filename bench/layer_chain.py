"""µs per decoder layer of int8 GEMMs (the shapes given, in order: e.g. qkv, o, gate_up, down) at M rows, run one
after another over layer copies that together exceed the L2, in one CUDA graph, with each tile table's dispatch:
a check of a tuning that times every kernel alone, against how decode runs a layer's shapes (GPU, no vLLM needed):

    python bench/layer_chain.py 4608x3584,3584x3584,37888x3584,3584x18944 shipped,/tmp/a.json,/tmp/b.json \\
        [--rows 1,16,64] [--rounds 2]

TABLE: a user table (what OUTLIERTUNE_TILE_CONFIGS names, in front of the shipped one) or "shipped" (none). The
tables are timed in turn, ROUNDS times over, so that the spread between rounds shows beside the differences."""

from __future__ import annotations

import argparse
import functools
import math
import os

import torch

from vllm_outliertune.kernels import configs, linear, tune
from vllm_outliertune.kernels.shapes import parse_shapes


def use_table(table: str) -> None:
    os.environ[configs.USER_TABLE_ENV] = "/nonexistent/shipped-only.json" if table == "shipped" else table
    configs.clear_caches()


def chain_time_us(layers: list[list[tuple]]) -> float:
    """µs per layer of every layer's GEMMs (linear.int8_gemm's dispatch) in one CUDA graph, replayed."""
    def run(layer: list[tuple]) -> None:
        for args in layer:
            linear.int8_gemm(*args, torch.bfloat16)
    return tune.stream_time_us([functools.partial(run, layer) for layer in layers])


def dispatch(m: int, n: int, k: int) -> str:
    """The kernel and tile the current table runs for M rows of this shape."""
    keys = configs.table_keys(torch.device("cuda"))
    kernel = linear._pick_kernel(m, n, k, keys, lambda: True)
    config = configs.get_config(kernel, m, n, k, keys)
    return f"{kernel} {config.get('BLOCK_M')}x{config.get('BLOCK_N')}x{config.get('BLOCK_K')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes")
    parser.add_argument("tables")
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    shapes, tables = parse_shapes(args.shapes), args.tables.split(",")
    count = max(4, math.ceil(tune.STREAM_BYTES / sum(n * k for n, k in shapes)))
    tune.warm_gpu()
    print(f"{count} layer copies of {', '.join(f'{n}x{k}' for n, k in shapes)}")
    for m in (int(r) for r in args.rows.split(",")):
        layers = [[tune.gemm_args(m, n, k) for n, k in shapes] for _ in range(count)]
        times: dict[str, list[float]] = {table: [] for table in tables}
        for _ in range(args.rounds):
            for table in tables:
                use_table(table)
                times[table].append(chain_time_us(layers))
        for table in tables:
            use_table(table)
            tiles = "; ".join(dispatch(m, n, k) for n, k in shapes)
            print(f"M={m:3d} {table:40s} " + " ".join(f"{t:7.1f}" for t in times[table]) + f" µs/layer  {tiles}",
                  flush=True)
        del layers


if __name__ == "__main__":
    main()
