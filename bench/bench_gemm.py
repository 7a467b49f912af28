"""Benchmark the OutlierTune linear against cuBLAS bf16, torch._int_mm and (when vLLM's GPU build is installed)
CUTLASS cutlass_scaled_mm on a model's per-rank linear shapes (default: Llama-3-8B at TP 1). One run, cold L2
(do_bench flushes it), medians; every column replays a CUDA graph (as vLLM runs decode), so Python launch overhead
stays out.

    python bench/bench_gemm.py [--model bench/configs/llama-3-8b.json --tp 2] [--m 1,16,64,256,1024,4096,8192]
                               [--markdown out.md] [--w4a8-group-size 128]

Columns: ours = the int8_gemm op on int8 activation codes with the scale + bias epilogue, bf16 out (what the
compiled plugin runs: inductor fuses the quantization into the norm / activation that produces the input; small M
goes to the split-K kernel, large M to the TMA GEMM or CUTLASS where the tile table picks them); triton = the same
op with CUTLASS unregistered (our Triton kernels alone); ours+quant = the quantized_linear op, bf16
activations in (the eager path: a quantization pass, then the same GEMM dispatch); bf16 =
torch.nn.functional.linear on bf16 weights (cuBLAS); int_mm and cutlass also start from int8 activations (int_mm: no
epilogue, int32 out). TOPS counts 2*M*N*K; at M <= 64 the "roof" column is the share of the GPU's datasheet HBM
bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) reached on the bytes moved (weights + activations + out), else the share
of the dense int8 peak (1979 TOPS on both). With --w4a8-group-size G two more columns: w4a8 = the w4a8_gemm op (int8
codes x packed 4-bit weights with integer group scales of G channels, the same epilogue; the table's tiles, the
weight stored N-major as the plugin stores it on the GPU) and ours/w4a8, its speed-up over
the int8 GEMM."""

from __future__ import annotations

import argparse
import contextlib
import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_outliertune.kernels import linear
from vllm_outliertune.kernels.linear import int8_gemm, quantize_activation, quantized_linear, w4a8_gemm
from vllm_outliertune.kernels.shapes import linear_shapes, read_config
from vllm_outliertune.kernels.tune import graph_time_us, make_inputs, packed_weight

PEAK_INT8_TOPS = 1979.0
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet, by a word of the device name
MEMORY_BOUND_MAX_M = 64

try:  # only in vLLM's CUDA build
    from vllm import _custom_ops as vllm_ops
except Exception:  # noqa: BLE001 - any import failure means "not available here"
    vllm_ops = None


@contextlib.contextmanager
def triton_only():
    """Our dispatch with the external GEMMs (CUTLASS) unregistered."""
    saved = dict(linear._EXTERNAL_GEMMS)
    linear._EXTERNAL_GEMMS.clear()
    try:
        yield
    finally:
        linear._EXTERNAL_GEMMS.update(saved)


def bench_one(m: int, n: int, k: int, w4a8_group_size: int | None = None) -> dict[str, float | None]:
    p = make_inputs(m, n, k)
    a_q = quantize_activation(p["x"], p["inv_scale"], p["shift"], 8)
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)

    def ours():
        return int8_gemm(a_q, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16)

    with triton_only():
        triton_us = graph_time_us(ours)
    times = {
        "ours": graph_time_us(ours),
        "triton": triton_us,
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
    if w4a8_group_size is not None:
        packed = packed_weight(n, k, w4a8_group_size)
        times["w4a8"] = graph_time_us(lambda: w4a8_gemm(a_q, *packed, w4a8_group_size, p["w_scale"], p["bias"],
                                                        torch.bfloat16))
    return times


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).with_name("configs") / "llama-3-8b.json",
                        help="config.json (or model directory) whose per-rank linear shapes to run")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of those shapes")
    parser.add_argument("--m", default="1,16,64,256,1024,4096,8192")
    parser.add_argument("--markdown", help="also write the table as markdown here")
    parser.add_argument("--w4a8-group-size", type=int, metavar="G",
                        help="also time the W4A8 GEMM (packed 4-bit weights, groups of G channels; 0: per row)")
    args = parser.parse_args()
    ms = [int(v) for v in args.m.split(",")]
    from vllm_outliertune import cutlass

    cutlass.register()  # as the plugin does inside vLLM: the table may pick it
    shapes = linear_shapes(read_config(args.model), args.tp, str(args.model))
    name = torch.cuda.get_device_name()
    hbm = next((rate for word, rate in HBM_BYTES_PER_S.items() if word in name), HBM_BYTES_PER_S["H100"])
    header = ("| shape | M | ours µs | triton µs | ours+quant µs | bf16 µs | int_mm µs | cutlass µs | ours TOPS | "
              "roof % | bf16/ours | bf16/ours+quant | int_mm/ours | cutlass/ours | cutlass/triton |"
              + (" w4a8 µs | ours/w4a8 |" if args.w4a8_group_size is not None else ""))
    lines = [f"{name}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.model.stem} TP {args.tp}, "
             f"cutlass_scaled_mm {'available' if vllm_ops else 'n/a (no vLLM CUDA build)'}",
             "", header, "|" + "---|" * (header.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for layer, (n, k) in shapes.items():
        for m in ms:
            t = bench_one(m, n, k, args.w4a8_group_size)
            tops = 2 * m * n * k / (t["ours"] * 1e-6) / 1e12
            if m <= MEMORY_BOUND_MAX_M:
                moved = n * k + m * k + m * n * 2
                roof = f"{moved / (t['ours'] * 1e-6) / hbm * 100:.0f} HBM"
            else:
                roof = f"{tops / PEAK_INT8_TOPS * 100:.0f} int8"

            def ratio(key, base="ours"):
                return None if t[key] is None else t[key] / t[base]

            line = (f"| {layer.removesuffix('_proj')} {k}→{n} | {m} | {t['ours']:.1f} | {t['triton']:.1f} | "
                    f"{t['ours_quant']:.1f} | {t['bf16']:.1f} | {fmt(t['int_mm'], '.1f')} | {fmt(t['cutlass'], '.1f')} | "
                    f"{tops:.0f} | {roof} | {ratio('bf16'):.2f} | {ratio('bf16', 'ours_quant'):.2f} | "
                    f"{fmt(ratio('int_mm'), '.2f')} | {fmt(ratio('cutlass'), '.2f')} | "
                    f"{fmt(ratio('cutlass', 'triton'), '.2f')} |")
            if args.w4a8_group_size is not None:
                line += f" {t['w4a8']:.1f} | {t['ours'] / t['w4a8']:.2f} |"
            lines.append(line)
            print(line, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
