"""The token guard in parts finished inside the split-K GEMM (int8_gemm_guarded_in_parts) against guard_fixup + the
GEMM (what ran before) and the unguarded GEMM, as a decode step runs down_proj (GPU, no vLLM needed):

    python bench/guard_in_gemm.py [4096x14336:1,16,32 3584x18944:1,16 ...]

Per layer: SiLU-mul of a gate_up output with the codes at t = 1 and the row parts' extrema, compiled by inductor
(as vLLM's compiled mode fuses them), then the GEMM op. One CUDA graph holds LAYERS such layers on weight copies
that together exceed the L2 and is replayed; µs per layer. "1 over" scales row 0 past the plan's range (t > 1: its
codes re-rounded), "0 over" keeps every row inside it. The guarded outputs are compared for equality first."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from vllm_outliertune.kernels.linear import (
    _codes_and_part_extrema, _picked_int8_kernel, guard_fixup, guard_parts, int8_gemm, int8_gemm_guarded_in_parts)
from vllm_outliertune.kernels.shapes import parse_shapes
from vllm_outliertune.kernels.tune import warm_gpu

DEFAULT = ("4096x14336:1,16,32", "3584x18944:1,16")
WEIGHT_BYTES = 1.2e9  # weight copies in one graph: past the L2, as decode streams its layers
REPS = 20


def producer(gate_up: torch.Tensor, inv_scale: torch.Tensor, shift: torch.Tensor):
    gate, up = gate_up.chunk(2, dim=-1)
    x = F.silu(gate) * up
    return (x, *_codes_and_part_extrema(x, inv_scale, shift, 8, guard_parts(x.shape[-1])))


def modes(w_q, w_scale, inv_scale, shift):
    def unguarded(x, codes, high, low):
        return int8_gemm(codes, w_q, w_scale, None, torch.bfloat16)

    def fixup(x, codes, high, low):
        t = guard_fixup(x, codes, high, low, inv_scale, shift, 8)
        return int8_gemm(codes, w_q, w_scale, None, torch.bfloat16, t)

    def in_gemm(x, codes, high, low):
        return int8_gemm_guarded_in_parts(x, codes, high, low, inv_scale, shift, 8, w_q, w_scale, None,
                                          torch.bfloat16)

    return {"unguarded": unguarded, "guard_fixup + GEMM": fixup, "guard in GEMM": in_gemm}


def layer_time_us(step, gate_up, weights, inv_scale, shift, mode: str) -> float:
    """µs per layer of producer + the mode's GEMM over every weight copy, in one CUDA graph."""
    def run():
        for w_q, w_scale in weights:
            modes(w_q, w_scale, inv_scale, shift)[mode](*step(gate_up, inv_scale, shift))
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPS * len(weights))


def main(specs: list[str]) -> None:
    torch.manual_seed(0)
    step = torch.compile(producer, dynamic=False)
    print("| shape | M | kernel | rows over | unguarded µs | guard_fixup + GEMM µs | guard in GEMM µs "
          "| in GEMM / fixup |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        shape, rows = spec.split(":")
        (n, k), = parse_shapes(shape)
        copies = max(8, min(64, int(WEIGHT_BYTES // (n * k))))
        weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
                    torch.rand(n, device="cuda") * 1e-3) for _ in range(copies)]
        inv_scale = torch.rand(k, device="cuda") * 5 + 5  # units of |x| * 5-10: inside 127.5 for typical rows
        shift = torch.randn(k, device="cuda")
        for m in (int(r) for r in rows.split(",")):
            for over in (0, 1):
                gate_up = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16) * 0.5
                if over:
                    gate_up[0] *= 8
                x, codes, high, low = step(gate_up, inv_scale, shift)
                ops = modes(*weights[0], inv_scale, shift)
                want = ops["guard_fixup + GEMM"](x, codes.clone(), high, low)
                got = ops["guard in GEMM"](x, codes.clone(), high, low)
                t = guard_fixup(x, codes.clone(), high, low, inv_scale, shift, 8)
                assert bool((t > 1).any()) == bool(over), (m, over, t.max().item())
                assert torch.equal(got, want), f"{shape} M={m}: guard in GEMM differs from guard_fixup + GEMM"
                warm_gpu()
                times = {mode: layer_time_us(step, gate_up, weights, inv_scale, shift, mode) for mode in ops}
                kernel = _picked_int8_kernel(codes, weights[0][0], torch.bfloat16)
                fused, before = times["guard in GEMM"], times["guard_fixup + GEMM"]
                print(f"| {shape} | {m} | {kernel} | {over} | {times['unguarded']:.1f} | {before:.1f} | {fused:.1f} | "
                      f"{fused / before:.3f} |", flush=True)
        del weights


if __name__ == "__main__":
    main(sys.argv[1:] or list(DEFAULT))
