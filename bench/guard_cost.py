"""What the per-token overflow guard (quantization_config.token_guard) costs on a GPU, per piece (no vLLM needed):
the int8 GEMM with and without the per-row scale t in its epilogue (Llama-3-8B qkv, the tile table's dispatch), and
RMSNorm + residual + activation quant compiled by torch.compile (inductor, as vLLM's compiled mode fuses them) with
and without the guard's row maximum and division. CUDA-graph replays, cold L2, medians:

    python bench/guard_cost.py

The end-to-end cost is the `w8a8` row of `bench/e2e_gpu.py table` (the default: guarded) against `w8a8-noguard`."""

from __future__ import annotations

import torch

from vllm_outliertune.kernels.linear import int8_gemm
from vllm_outliertune.kernels.torch_ref import quantize_activation_guarded_ref, quantize_activation_ref
from vllm_outliertune.kernels.tune import graph_time_us, make_inputs, warm_gpu

N, K = 6144, 4096  # Llama-3-8B qkv at TP 1
ROWS = (1, 64, 2048)


def rms_norm(x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5) * gamma).to(x.dtype), h


def norm_quant(x, residual, gamma, inv_scale, shift):
    y, h = rms_norm(x, residual, gamma)
    return quantize_activation_ref(y, inv_scale, shift, 8), h


def norm_quant_guarded(x, residual, gamma, inv_scale, shift):
    y, h = rms_norm(x, residual, gamma)
    return *quantize_activation_guarded_ref(y, inv_scale, shift, 8), h


def main() -> None:
    warm_gpu()
    for m in ROWS:
        p = make_inputs(m, N, K)
        codes = quantize_activation_ref(p["x"], p["inv_scale"], p["shift"], 8)
        t = 1 + torch.rand(m, 1, device="cuda")
        plain = graph_time_us(lambda: int8_gemm(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16), 5)
        guarded = graph_time_us(lambda: int8_gemm(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, t), 5)
        print(f"GEMM {N}x{K} M={m}: {plain:.1f} µs, with t in the epilogue {guarded:.1f} µs "
              f"({guarded / plain:.3f}x)", flush=True)
    plain_fn, guarded_fn = torch.compile(norm_quant), torch.compile(norm_quant_guarded)
    for m in ROWS:
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        args = (x, torch.randn_like(x), torch.rand(K, device="cuda") + 0.5, torch.rand(K, device="cuda") * 10 + 1,
                torch.randn(K, device="cuda"))
        plain, guarded = (graph_time_us(lambda fn=fn: fn(*args), 5) for fn in (plain_fn, guarded_fn))
        print(f"RMSNorm + quant M={m}: {plain:.1f} µs, with the guard {guarded:.1f} µs ({guarded / plain:.3f}x)",
              flush=True)


if __name__ == "__main__":
    main()
