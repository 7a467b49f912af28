"""The GEMVs of a decode step with and without programmatic dependent launch (GPU):

    python bench/pdl_chain.py [LAYERS]

Per layer, as a one-sequence decode step runs them: activation quant -> qkv -> quant -> o -> quant -> gate_up ->
quant -> down (Llama-3-8B TP 1 shapes, M = 1, every layer its own weights so that they stream from HBM), int8
(W8A8) and W4A8 (g128) weights, each GEMV with the tile the table ships for M = 1. With the config key PDL the
GEMV starts while the quant kernel before it finishes, asks for its weights, and waits only before it reads the
activations (kernels/int8_gemm.py early_launch). Prints µs per step (CUDA-graph replays, median of 5 x 10) and
checks that both ways give the same outputs."""

from __future__ import annotations

import statistics
import sys

import torch

from vllm_outliertune.kernels import configs, tune
from vllm_outliertune.kernels.act_quant import quantize_activation
from vllm_outliertune.kernels.splitk_gemm import splitk_gemm
from vllm_outliertune.kernels.w4a8_gemm import w4a8_gemm

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))  # (N, K): qkv, o, gate_up, down


def layer_gemvs(fmt: str, keys: tuple) -> list:
    """One layer: [(quant inputs, GEMV(a_q, config), its table config, kernel name)] per shape."""
    steps = []
    for n, k in SHAPES:
        p = tune.make_inputs(1, n, k)
        quant = (p["x"], p["inv_scale"], p["shift"])
        if fmt == "int8":
            kernel = next(iter(configs.kernels_for(1, n, k, keys)), "int8_gemm")
            if kernel != "splitk_gemm":  # PDL is wired into the split-K kernels only
                raise SystemExit(f"N={n} K={k}: the table runs {kernel} at M = 1, not splitk_gemm")
            w_q = p["w_q"]
            gemv = (lambda a, c, w_q=w_q, p=p: splitk_gemm(a, w_q, p["w_scale"], p["bias"], None, None, 8,
                                                           torch.bfloat16, c))
        else:
            kernel = next(iter(configs.kernels_for(1, n, k, keys, "w4a8_gemm")), "w4a8_gemm")
            words, scales, zeros = tune.packed_weight(n, k, tune.W4A8_GROUP_SIZE)
            gemv = (lambda a, c, kernel=kernel, w=(words, scales, zeros), p=p: w4a8_gemm(
                a, *w, tune.W4A8_GROUP_SIZE, p["w_scale"], p["bias"], torch.bfloat16, kernel, c))
        steps.append((quant, gemv, configs.get_config(kernel, 1, n, k, keys), kernel))
    return steps


def step_fn(layers: list, pdl: bool):
    def step():
        outs = []
        for layer in layers:
            for quant, gemv, config, _ in layer:
                outs.append(gemv(quantize_activation(*quant, 8), dict(config, PDL=1) if pdl else config))
        return outs
    return step


def graph_us(step, layers: int) -> tuple[float, list]:
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 10)
    return statistics.median(times), [o.clone() for o in outs]


def main(layers: int = 32) -> None:
    keys = configs.table_keys(torch.device("cuda"))
    tune.warm_gpu()
    for fmt in ("int8", "w4a8"):
        chain = [layer_gemvs(fmt, keys) for _ in range(layers)]
        kernels = ", ".join(kernel for *_, kernel in chain[0])
        plain_us, plain_out = graph_us(step_fn(chain, False), layers)
        early_us, early_out = graph_us(step_fn(chain, True), layers)
        same = all(torch.equal(a, b) for a, b in zip(plain_out, early_out))
        print(f"{fmt}: {layers} layers of quant + GEMV ({kernels}): {plain_us:.0f} µs per step, with PDL "
              f"{early_us:.0f} µs ({plain_us / early_us:.3f}x); outputs equal: {same}", flush=True)
        del chain
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:2]))
