"""The load-time pick for untuned shapes (kernels/load_pick.py) on a GPU, where the answer is known: tuned shapes
with their own table entries taken out. Per M, the dispatched int8 GEMM's time with the shape's tuned tiles, with
the shape-generic lookup, and after pick_untuned_shape (CUDA-graph replays, cold L2, one process):

    python bench/load_pick_check.py 4096x14336,6144x4096,4096x2048 [1,4,16,32]

Issue 12's aim: a shape in no table within 15 % of its tuned speed."""

from __future__ import annotations

import sys

import torch

from vllm_outliertune.kernels import configs, load_pick
from vllm_outliertune.kernels.act_quant import quantize_activation
from vllm_outliertune.kernels.linear import int8_gemm
from vllm_outliertune.kernels.shapes import parse_shapes
from vllm_outliertune.kernels.tune import graph_time_us, make_inputs, warm_gpu


def gemm_times(n: int, k: int, rows: list[int]) -> dict[int, float]:
    """µs of the int8 GEMM as the table dispatches it now, per M."""
    times = {}
    for m in rows:
        p = make_inputs(m, n, k)
        codes = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
        times[m] = graph_time_us(lambda: int8_gemm(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16), 10)
    return times


def main() -> None:
    shapes = parse_shapes(sys.argv[1])
    rows = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1,4,16,32").split(",")]
    device = torch.device("cuda")
    warm_gpu()
    tuned = {shape: gemm_times(*shape, rows) for shape in shapes}
    keys = configs.table_keys(device)
    for per_shape in configs.load_table()["devices"][keys[0]].values():  # the cached table: lookups see the change
        for n, k in shapes:
            per_shape.pop(configs.shape_key(n, k), None)
    # the lookups below the table cache (configs.clear_caches would reload the table from disk)
    for cached in (configs.effective_table, configs.lookup_order, configs._per_m, configs.kernels_by_bucket):
        cached.cache_clear()
    for n, k in shapes:
        generic = gemm_times(n, k, rows)
        picked = load_pick.pick_untuned_shape(n, k, device)
        after = gemm_times(n, k, rows)
        print(f"{n}x{k}: picked {picked}")
        for m in rows:
            print(f"  M={m}: tuned {tuned[(n, k)][m]:.1f} µs, generic lookup {generic[m]:.1f}, load pick {after[m]:.1f}"
                  f" ({after[m] / tuned[(n, k)][m]:.2f}x tuned)", flush=True)


if __name__ == "__main__":
    main()
