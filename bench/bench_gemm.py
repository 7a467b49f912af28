"""Benchmark the OutlierTune linear against cuBLAS bf16, torch._int_mm and (when vLLM's GPU build is installed)
CUTLASS cutlass_scaled_mm on the Llama-3-8B linear shapes. One run, cold L2 (do_bench flushes it), medians; every
column replays a CUDA graph (as vLLM runs decode), so Python launch overhead stays out.

    python bench/bench_gemm.py [--m 1,16,64,256,1024,4096,8192] [--markdown out.md]

Columns: ours = the int8_gemm op on int8 activation codes with the scale + bias epilogue, bf16 out (what the
compiled plugin runs: inductor fuses the quantization into the norm / activation that produces the input; small M
goes to the split-K kernel, large M on Hopper to the TMA GEMM); ours+quant = the quantized_linear op, bf16
activations in (the eager path: a quantization pass, then the same GEMM dispatch); bf16 =
torch.nn.functional.linear on bf16 weights (cuBLAS); int_mm and cutlass also start from int8 activations (int_mm: no
epilogue, int32 out). TOPS counts 2*M*N*K; at M <= 64 the "roof" column is the share of HBM bandwidth (3.35 TB/s)
reached on the bytes moved (weights + activations + out), else the share of the H100's dense int8 peak (1979 TOPS)."""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

from vllm_outliertune.kernels.linear import int8_gemm, quantize_activation, quantized_linear
from vllm_outliertune.kernels.tune import LLAMA3_8B_SHAPES, make_inputs, time_us

SHAPE_NAMES = {(6144, 4096): "qkv", (4096, 4096): "o", (28672, 4096): "gate_up", (4096, 14336): "down"}
PEAK_INT8_TOPS = 1979.0
HBM_BYTES_PER_S = 3.35e12
MEMORY_BOUND_MAX_M = 64

try:  # only in vLLM's CUDA build
    from vllm import _custom_ops as vllm_ops
except Exception:  # noqa: BLE001 - any import failure means "not available here"
    vllm_ops = None


def graph_time_us(fn) -> float:
    """Time of fn captured in a CUDA graph (as vLLM runs decode), so host launch overhead stays out."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay)


def bench_one(m: int, n: int, k: int) -> dict[str, float | None]:
    p = make_inputs(m, n, k)
    a_q = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    times = {
        "ours": graph_time_us(lambda: int8_gemm(a_q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16)),
        "ours_quant": graph_time_us(lambda: quantized_linear(p["x"], p["w_q"], p["w_scale"], p["bias"], p["inv_scale"],
                                                             p["shift"], 8, torch.bfloat16)),
        "bf16": graph_time_us(lambda: F.linear(p["x"], w_bf16)),
        # torch._int_mm needs M > 16 on CUDA
        "int_mm": graph_time_us(lambda: torch._int_mm(a_q, p["w_q"].t())) if m > 16 else None,
        "cutlass": None,
    }
    if vllm_ops is not None:
        a_scale = torch.ones(m, 1, device="cuda")
        b_t = p["w_q"].t()  # column-major [K, N], the layout cutlass_scaled_mm takes
        bias = p["bias"].bfloat16()
        times["cutlass"] = graph_time_us(lambda: vllm_ops.cutlass_scaled_mm(a_q, b_t, a_scale, p["w_scale"].view(n, 1),
                                                                            torch.bfloat16, bias))
    return times


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", default="1,16,64,256,1024,4096,8192")
    parser.add_argument("--markdown", help="also write the table as markdown here")
    args = parser.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    header = ("| shape | M | ours µs | ours+quant µs | bf16 µs | int_mm µs | cutlass µs | ours TOPS | roof % | "
              "bf16/ours | bf16/ours+quant | int_mm/ours | cutlass/ours |")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"cutlass_scaled_mm {'available' if vllm_ops else 'n/a (no vLLM CUDA build)'}",
             "", header, "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for n, k in LLAMA3_8B_SHAPES:
        for m in ms:
            t = bench_one(m, n, k)
            tops = 2 * m * n * k / (t["ours"] * 1e-6) / 1e12
            if m <= MEMORY_BOUND_MAX_M:
                moved = n * k + m * k + m * n * 2
                roof = f"{moved / (t['ours'] * 1e-6) / HBM_BYTES_PER_S * 100:.0f} HBM"
            else:
                roof = f"{tops / PEAK_INT8_TOPS * 100:.0f} int8"

            def ratio(key, base="ours"):
                return None if t[key] is None else t[key] / t[base]

            line = (f"| {SHAPE_NAMES[(n, k)]} {k}→{n} | {m} | {t['ours']:.1f} | {t['ours_quant']:.1f} | "
                    f"{t['bf16']:.1f} | {fmt(t['int_mm'], '.1f')} | {fmt(t['cutlass'], '.1f')} | {tops:.0f} | {roof} | "
                    f"{ratio('bf16'):.2f} | {ratio('bf16', 'ours_quant'):.2f} | {fmt(ratio('int_mm'), '.2f')} | "
                    f"{fmt(ratio('cutlass'), '.2f')} |")
            lines.append(line)
            print(line, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
