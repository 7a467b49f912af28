"""What the per-token overflow guard (quantization_config.token_guard) costs on a GPU, per piece (no vLLM needed):
the int8 GEMM with and without the per-row scale t in its epilogue (Llama-3-8B qkv, the tile table's dispatch), and
the two producers of activations (RMSNorm + residual, K = 4096; SiLU-mul, K = 14336) with their quantization compiled
by torch.compile (inductor, as vLLM's compiled mode fuses them): plain, with the guard as it ships, and with the
guard's row maximum split over several programs. CUDA-graph replays, cold L2, medians:

    python bench/guard_cost.py

The end-to-end cost is the `w8a8` row of `bench/e2e_gpu.py table` (the default: guarded) against `w8a8-noguard`."""

from __future__ import annotations

import torch

from vllm_outliertune.kernels.linear import int8_gemm
from vllm_outliertune.kernels.torch_ref import quantize_activation_guarded_ref, quantize_activation_ref
from vllm_outliertune.format import guard_scale
from vllm_outliertune.kernels.tune import graph_time_us, make_inputs, warm_gpu

N, K = 6144, 4096  # Llama-3-8B qkv at TP 1
INTERMEDIATE = 14336  # down_proj's input (SiLU-mul of gate_up)
ROWS = (1, 64, 2048)
SPLITS = (8, 32)  # programs per row for the split row maximum


def rms_norm(x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5) * gamma).to(x.dtype), h


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def guarded_split(x: torch.Tensor, inv_scale: torch.Tensor, shift: torch.Tensor, splits: int):
    """The guard with its row maximum and minimum taken in two steps, [M, splits, K / splits] -> [M, splits] ->
    [M, 1], so inductor can spread a row over several programs (max and min are order-free: t is bit-identical;
    guard_scale over the partial maxima and minima gives the row's)."""
    units = x.float() * inv_scale - shift
    parts = units.view(units.shape[0], splits, -1)
    t = guard_scale(torch.cat([parts.amax(-1), parts.amin(-1)], dim=-1), 8)
    return torch.round(units / t).clamp_(-128, 127).to(torch.int8), t


def quant_variants():
    """name -> quantization of an activation (x, inv_scale, shift): plain, the guard as shipped, the split guard."""
    return {"plain": lambda x, s, z: quantize_activation_ref(x, s, z, 8),
            "guard": lambda x, s, z: quantize_activation_guarded_ref(x, s, z, 8)} | {
        f"guard split {g}": (lambda x, s, z, g=g: guarded_split(x, s, z, g)) for g in SPLITS}


def time_producers() -> None:
    """RMSNorm + residual + quant (K = 4096) and SiLU-mul + quant (K = 14336), each variant compiled by inductor."""
    for producer, k in (("RMSNorm", K), ("SiLU-mul", INTERMEDIATE)):
        for m in ROWS:
            inv_scale, shift = torch.rand(k, device="cuda") * 10 + 1, torch.randn(k, device="cuda")
            if producer == "RMSNorm":
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                args = (x, torch.randn_like(x), torch.rand(k, device="cuda") + 0.5)
                def make(quant):
                    def norm_quant(x, residual, gamma):
                        y, h = rms_norm(x, residual, gamma)
                        return quant(y, inv_scale, shift), h
                    return norm_quant
            else:
                args = (torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16),)
                def make(quant):
                    return lambda gate_up: quant(silu_mul(gate_up), inv_scale, shift)
            times = {name: graph_time_us(lambda fn=torch.compile(make(quant)): fn(*args), 5)
                     for name, quant in quant_variants().items()}
            print(f"{producer} + quant M={m}: " + ", ".join(
                f"{name} {us:.1f} µs ({us / times['plain']:.2f}x)" for name, us in times.items()), flush=True)


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
    time_producers()


if __name__ == "__main__":
    main()
