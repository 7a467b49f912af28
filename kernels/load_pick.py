"""Load-time tile choice for a weight shape that no tile table tuned (int8 and packed 4-bit weights).

Such a shape runs the shape-generic entries, whose small-M kernel and tile won on average over the tuned spread but
lose by up to 2.2x on some shapes: at small M the best choice depends on the shape's width and depth. The shipped
table lists, per small-M bucket, a few alternatives chosen to cover the spread (tune.generic_alternates); at load
the plugin times them on this GPU for the new shape and serves the shape from the fastest for the rest of the
process. Left out of the H200's tuning spread one shape at a time, this puts 80 of 84 int8 (shape, M <= 256)
points within 15 % of the shape's own best, against 70 for the generic entries alone, and 45 of 48 W4A8 ones (M <=
128, eight Llama-3-8B and Qwen2.5-7B shapes) against 35 (22 with the generic W4A8 entries before;
docs/benchmarks.md). `outliertune tune` still gives every bucket its own search; OUTLIERTUNE_LOAD_PICK=0 turns the
choice off."""

from __future__ import annotations

import os
from typing import Callable

import torch

from vllm_outliertune.kernels import configs

PICK_REP_MS = 5.0  # timing per candidate: the choices differ by 15 % and more where it matters
LOAD_PICK_ENV = "OUTLIERTUNE_LOAD_PICK"
# Each weight format's kernels, its fallback first.
INT8_KERNELS = ("int8_gemm", *configs.DISPATCH_ORDER["int8_gemm"])
W4A8_KERNELS = ("w4a8_gemm", *configs.DISPATCH_ORDER["w4a8_gemm"])
TUNED_DEPTH = 4096  # the most common K of the shapes the alternatives won on (5 of the H200's 12; others 1024-27648)

# Timer: (kernel, config, M) -> µs, or None where that kernel or tile cannot run here.
Timer = Callable[[str, dict, int], "float | None"]


def pick_entries(n: int, k: int, keys: tuple[str, ...], time_us: Timer, kernels: tuple[str, ...] = INT8_KERNELS
                 ) -> tuple[dict, dict[str, str]] | None:
    """({kernel: {bucket: config}} serving shape (n, k) in the weight format of `kernels` (INT8_KERNELS,
    W4A8_KERNELS): the entries the lookup gives it now, with each alternates bucket run by the fastest of that
    format's alternatives and of what the lookup runs there now; {bucket: kernel picked}), or None where there is
    nothing to pick from (no alternates for this device and format, none runs)."""
    fallback = kernels[0]
    entries = {kernel: {str(b): configs.get_config(kernel, b, n, k, keys)
                        for b in configs.listed_buckets(kernel, n, k, keys)} for kernel in kernels}
    choices = {}
    for bucket, listed in configs.alternates(keys).items():
        alternatives = [option for option in listed if option[0] in kernels]
        if not alternatives:
            continue
        m = int(bucket)
        current = next(iter(configs.kernels_for(m, n, k, keys, fallback)), fallback)
        options = [[current, configs.get_config(current, m, n, k, keys)]]
        for option in alternatives + [fitted for option in alternatives for fitted in fitted_to_depth(*option, k)]:
            if option not in options:
                options.append(option)
        choices[bucket] = options
    # Every option runs once first, then all are timed: a first run compiles, the GPU lowers its clocks while it
    # waits, and timings right after a compile came out up to 4x slow on the H200 (tune.warm_gpu), which would
    # favour whatever happens to be timed last.
    for bucket, options in choices.items():
        for kernel, config in options:
            time_us(kernel, config, int(bucket))
    picked: dict[str, str] = {}
    for bucket, options in choices.items():
        m = int(bucket)
        timed = [(t, kernel, config) for kernel, config in options if (t := time_us(kernel, config, m)) is not None]
        if not timed:
            continue
        _, kernel, config = min(timed, key=lambda item: item[0])
        for other in kernels[1:]:  # the bucket's owner is the picked kernel, else the fallback
            entries[other].pop(bucket, None)
        # the fallback lists every bucket: where a picked kernel cannot run, it does
        entries[fallback][bucket] = config if kernel == fallback else configs.get_config(fallback, m, n, k, keys)
        if kernel != fallback:
            entries[kernel][bucket] = config
        picked[bucket] = kernel
    if not picked:
        return None
    return {kernel: configs.by_bucket(per_m) for kernel, per_m in entries.items()}, picked


def fitted_to_depth(kernel: str, config: dict, k: int) -> list[list]:
    """A split-K alternative fitted to this shape's depth K, as [kernel, config] options timed beside it (none where
    it fits already). The alternatives won on the spread's shapes, K = TUNED_DEPTH deep more often than not:
    - shallower K: BLOCK_K cut to K rounded up to a power of two. One-row tiles do best when a program covers the
      whole K (H200: the 4096x2048 shape at M = 1 ran 15.3 µs with BLOCK_K 2048, 64-66 µs with the alternatives'
      1024 and 4096).
    - deeper K: SPLIT_K times K / TUNED_DEPTH (rounded up to a power of two), so each program's K loop stays as
      long as where the tile won (H200, 4096x14336 at M = 4: the alternatives' BLOCK_M 16 tile 33.2 µs with SPLIT_K
      1, 27.9 with 4, the shape's own best; CUDA-graph timings of bench/tune_state_h200_graph.jsonl.gz)."""
    if kernel != "splitk_gemm":  # (int8 only: the W4A8 alternatives come from shapes of K 3,584-18,944)
        return []
    depth = 1 << (k - 1).bit_length()
    fitted = []
    if config["BLOCK_K"] > depth:
        fitted.append([kernel, dict(config, BLOCK_K=depth)])
    deeper = -(-k // TUNED_DEPTH)
    if deeper > 1 and config.get("SPLIT_K", 1) > 0:  # SPLIT_K 0 chooses its split itself
        fitted.append([kernel, dict(config, SPLIT_K=config.get("SPLIT_K", 1) << (deeper - 1).bit_length())])
    return fitted


def gpu_timer(n: int, k: int, device: torch.device, group_size: int | None = None) -> Timer:
    """Times one (kernel, tile) on random operands of this shape on `device`, as the tuner does (CUDA-graph
    replays, cold L2); None where it cannot run (unsupported kernel, or a tile Triton cannot compile here).
    group_size: a packed 4-bit weight's (its kernels' operands), None for int8 weights."""
    from vllm_outliertune.kernels import tune
    from vllm_outliertune.kernels.act_quant import quantize_activation

    with torch.cuda.device(device):
        p = tune.make_inputs(tune.ALTERNATES_UP_TO_M, n, k)
        codes = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
        weight = (p["w_q"],) if group_size is None else (*tune.packed_weight(n, k, group_size), group_size)

    def time_us(kernel: str, config: dict, m: int) -> float | None:
        args = (codes[:m], *weight, p["w_scale"], p["bias"])
        if not tune.kernel_applies(kernel, args):
            return None
        run = tune.runner(kernel, args)
        try:
            with torch.cuda.device(device):
                return tune.graph_time_us(lambda: run(config), PICK_REP_MS)
        except Exception:  # e.g. OutOfResources: a tile tuned on a GPU with more shared memory
            return None

    return time_us


def pick_untuned_shape(n: int, k: int, device: torch.device, group_size: int | None = None
                       ) -> dict[str, str] | None:
    """On a CUDA device, for a weight shape (n, k) whose tiles no table tuned for it on this GPU (int8 weights, or
    packed 4-bit ones of this group size): time the alternates and serve the shape from the fastest for the rest of
    the process. Returns {bucket: kernel picked}, None where nothing was done (not CUDA, tuned shape, no alternates,
    turned off)."""
    if device.type != "cuda" or os.environ.get(LOAD_PICK_ENV, "1") == "0":
        return None
    kernels = INT8_KERNELS if group_size is None else W4A8_KERNELS
    keys = configs.table_keys(device)
    if configs.tile_source(n, k, keys, kernels[0]) is None or not configs.alternates(keys):
        return None
    result = pick_entries(n, k, keys, gpu_timer(n, k, device, group_size), kernels)
    if result is None:
        return None
    entries, picked = result
    configs.add_shape_entries(keys[0], n, k, entries)
    return picked
