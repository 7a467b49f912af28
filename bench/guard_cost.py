"""What the per-token overflow guard (quantization_config.token_guard) costs on a GPU, per piece (no vLLM needed): the
int8 GEMM with and without the per-row scale t in its epilogue (Llama-3-8B qkv, the tile table's dispatch), and the
producers of activations (by default RMSNorm + residual, K = 4096; SiLU-mul, K = 14336; attention's output, "alone", K =
4096; --producers picks others) with their quantization compiled by torch.compile (inductor, as vLLM's compiled mode
fuses them): plain; the guard as torch ops fused into the producer (default inductor options; "guard one maximum": t
from one row reduction, as the plugin traces it since session 23; with the row maximum in 8 or 32 parts first; with
cooperative reductions, which spread a row over several programs; with multi-kernel, which times a looped and a
persistent reduction; with persistent reductions up to K = 16,384, the row read once); the guard as its own kernel
(custom op quantize_activation_guarded) after the plain producer; the guard in parts ("guard fix-up": codes at t = 1 and
each part's largest guard quotient fused into the producer, then the guard_fixup op; what the plugin runs for long rows
of pointwise producers; "guard fix-up from part extrema": each part's maximum and minimum instead, as before session
23). Then the GEMM with and without t, and eager mode's torch ops against the kernel. CUDA-graph replays, cold L2,
medians:

    python bench/guard_cost.py ["guard in 8 parts" ...]   # (names: only these variants besides plain and guard)
    python bench/guard_cost.py "guard fix-up" --producers SiLU-mul:7168,alone:8192 --rows 1,16 --typical-only \
        --producers-only

The end-to-end cost is the `w8a8` row of `bench/e2e_gpu.py table` (the default: guarded) against `w8a8-noguard`."""

from __future__ import annotations

import argparse
import contextlib

import torch

from vllm_outliertune.format import guard_limits, guard_scale
from vllm_outliertune.kernels.linear import (
    guard_fixup, guard_parts, int8_gemm, quantize_activation_guarded, quantize_activation_guarded_in_parts)
from vllm_outliertune.kernels.torch_ref import (
    activation_units, guarded_codes, quantize_activation_guarded_ref, quantize_activation_guarded_traced,
    quantize_activation_ref, row_part_scales)
from vllm_outliertune.kernels.tune import graph_time_us, make_inputs, warm_gpu

N, K = 6144, 4096  # Llama-3-8B qkv at TP 1
INTERMEDIATE = 14336  # down_proj's input (SiLU-mul of gate_up)
ROWS = (1, 64, 2048)
COOPERATIVE = {"triton.cooperative_reductions": True}
MULTI_KERNEL = {"triton.multi_kernel": 1}  # both a looped and a persistent reduction, the faster picked at run time
ROW_PARTS = (8, 32)  # the guard's row maximum in parts first
FIXUP_PARTS = (1, 16, 64)  # guard fix-up: parts of a row besides linear.guard_parts' (K 4096: 4; 14336: 14)
TYPICAL_OVERFLOW = 1 / 16  # plan_for's typical inputs: rows beyond the plan's range
PERSISTENT_UP_TO = 16384  # persistent reductions (the row in registers, read once) up to this K; inductor: 1024


def persistent_reductions():
    """A context in which inductor compiles row reductions of up to PERSISTENT_UP_TO elements as persistent ones
    (inductor's choice heuristics are meant to be replaced out of tree: torch._inductor.choices)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Persistent(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, *args, **kwargs):
            if features.get_reduction_hint() == ReductionHint.INNER:
                return V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_UP_TO)
            return InductorChoices.should_use_persistent_reduction(features, *args, **kwargs)

    return V.set_choices_handler(Persistent())


def rms_norm(x: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5) * gamma).to(x.dtype), h


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def guarded_in_parts(x: torch.Tensor, inv_scale: torch.Tensor, shift: torch.Tensor, parts: int):
    """The whole-row guard with each row's largest guard quotient taken over `parts` parts of the row first, then over
    their results (bit-identical t: maxima are order-free), so that inductor spreads a row over several programs."""
    t = row_part_scales(x, inv_scale, shift, 8, parts).amax(-1, keepdim=True).clamp(min=1.0)
    return guarded_codes(activation_units(x, inv_scale, shift), t, 8)


def fixup_from_part_extrema(x: torch.Tensor, inv_scale: torch.Tensor, shift: torch.Tensor):
    """The guard in parts as the plugin traced it before session 23: each part's maximum and minimum (two
    reductions), the part's guard scale from them, then guard_fixup."""
    low, high = guard_limits(8)
    units = activation_units(x, inv_scale, shift).unflatten(-1, (guard_parts(x.shape[-1]), -1))
    part_scales = torch.maximum(units.amax(-1) / high, units.amin(-1) / low)
    codes = quantize_activation_ref(x, inv_scale, shift, 8)
    return codes, guard_fixup(x, codes, part_scales, inv_scale, shift, 8)


def quant_variants():
    """name -> (quantization of an activation (x, inv_scale, shift), inductor options, compile context)."""
    plain = lambda x, s, z: quantize_activation_ref(x, s, z, 8)
    guard = lambda x, s, z: quantize_activation_guarded_ref(x, s, z, 8)
    return {"plain": (plain, {}, contextlib.nullcontext), "guard": (guard, {}, contextlib.nullcontext),
            "guard cooperative": (guard, COOPERATIVE, contextlib.nullcontext),
            "guard one maximum": (lambda x, s, z: quantize_activation_guarded_traced(x, s, z, 8), {},
                                  contextlib.nullcontext),
            **{f"guard in {parts} parts": (lambda x, s, z, parts=parts: guarded_in_parts(x, s, z, parts), {},
                                           contextlib.nullcontext) for parts in ROW_PARTS},
            "guard kernel": (lambda x, s, z: quantize_activation_guarded(x, s, z, 8, 1.0), {}, contextlib.nullcontext),
            "guard fix-up": (lambda x, s, z: quantize_activation_guarded_in_parts(x, s, z, 8), {},
                             contextlib.nullcontext),
            "guard fix-up from part extrema": (fixup_from_part_extrema, {}, contextlib.nullcontext),
            **{f"guard fix-up in {parts} parts": (
                lambda x, s, z, parts=parts: quantize_activation_guarded_in_parts(x, s, z, 8, parts), {},
                contextlib.nullcontext) for parts in FIXUP_PARTS},
            "plain multi-kernel": (plain, MULTI_KERNEL, contextlib.nullcontext),
            "guard multi-kernel": (guard, MULTI_KERNEL, contextlib.nullcontext),
            "plain persistent": (plain, {}, persistent_reductions),
            "guard persistent": (guard, {}, persistent_reductions)}


def producer_inputs(producer: str, k: int, m: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The producer's inputs for m rows and its output x (eager)."""
    if producer == "RMSNorm":
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        args = (x, torch.randn_like(x), torch.rand(k, device="cuda") + 0.5)
        return args, rms_norm(*args)[0]
    if producer == "SiLU-mul":
        args = (torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16) * 4,)
        return args, silu_mul(*args)
    args = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 40,)
    return args, args[0]


def plan_for(x: torch.Tensor, overflowing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (inv_scale, shift) for x: random steps and shifts that overflow nearly every row
    (``overflowing``), or the same scaled so that the plan's range holds all rows of x but a TYPICAL_OVERFLOW
    fraction of them (all of them at one row), as the guard meets calibrated text."""
    k = x.shape[-1]
    inv_scale, shift = torch.rand(k, device="cuda") * 10 + 1, torch.randn(k, device="cuda")
    if not overflowing:
        t = guard_scale(activation_units(x, inv_scale, shift), 8, floor=0.0)[:, 0]
        scale = 0.99 / torch.quantile(t, 1 - TYPICAL_OVERFLOW if x.shape[0] > 1 else 1.0)
        inv_scale, shift = inv_scale * scale, shift * scale
    return inv_scale, shift


def time_producers(only: list[str], producers: list[tuple[str, int]], rows: tuple[int, ...],
                   modes: tuple[bool, ...]) -> None:
    """Each producer + quant of K channels (RMSNorm + residual; SiLU-mul, K its output's; "alone": attention's
    output feeding o_proj), each variant compiled by inductor once for all row counts (dynamic M, as vLLM
    compiles), on typical and / or overflowing inputs (plan_for, ``modes``: overflowing or not); every guarded
    variant's codes and t are compared with the eager torch reference's."""
    for producer, k in producers:
        torch._dynamo.reset()  # each producer's variants compile afresh (dynamo's recompile limit is per code object)
        compiled = {}
        for overflowing in modes:
            for m in sorted(rows, key=lambda m: m == 1):  # compiled first at M > 1 (dynamic; 1 specializes)
                args, x = producer_inputs(producer, k, m)
                inv_scale, shift = plan_for(x, overflowing)
                expected = quantize_activation_guarded_ref(x, inv_scale, shift, 8)
                times = {}
                for name, (quant, options, context) in quant_variants().items():
                    if only and name not in ("plain", "guard", *only):
                        continue
                    if name not in compiled:
                        if producer == "RMSNorm":
                            def fn(x, residual, gamma, inv_scale, shift, quant=quant):
                                y, h = rms_norm(x, residual, gamma)
                                return quant(y, inv_scale, shift), h
                        elif producer == "SiLU-mul":
                            fn = lambda gate_up, inv_scale, shift, quant=quant: quant(silu_mul(gate_up), inv_scale,
                                                                                     shift)
                        else:
                            fn = lambda x, inv_scale, shift, quant=quant: quant(x, inv_scale, shift)
                        compiled[name] = (torch.compile(fn, options=options), context)
                    fn, context = compiled[name]
                    for arg in args[:2] if m > 1 else ():
                        torch._dynamo.mark_dynamic(arg, 0)
                    with context():  # inductor compiles at the first call
                        result = fn(*args, inv_scale, shift)
                    if name.startswith("guard"):
                        got = result[0] if producer == "RMSNorm" else result
                        # Compiled producers may round their bf16 output differently from eager: count, don't assert.
                        mismatched = sum(int((a != b).sum()) for a, b in zip(got, expected))
                        name = f"{name} [{mismatched} differ]" if mismatched else name
                    times[name] = graph_time_us(lambda: fn(*args, inv_scale, shift), 5)
                rows_over = int((expected[1] > 1).sum())
                print(f"{producer} + quant K={k} M={m} ({rows_over} rows over the range): " + ", ".join(
                    f"{name} {us:.1f} µs ({us / times['plain']:.2f}x)" for name, us in times.items()), flush=True)


def time_eager() -> None:
    """Eager mode (enforce_eager: no compile, no CUDA graphs): the guard as torch ops (a dozen kernel launches)
    against our one-kernel op, wall time per call including launches."""
    import time
    for k in (K, INTERMEDIATE):
        inv_scale, shift = torch.rand(k, device="cuda") * 10 + 1, torch.randn(k, device="cuda")
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 40
            times = {}
            for name, fn in (("torch ops", quantize_activation_guarded_ref),
                             ("kernel", lambda *a: quantize_activation_guarded(*a, 1.0))):
                for _ in range(10):
                    fn(x, inv_scale, shift, 8)
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(200):
                    fn(x, inv_scale, shift, 8)
                torch.cuda.synchronize()
                times[name] = (time.perf_counter() - started) / 200 * 1e6
            print(f"eager guard K={k} M={m}: torch ops {times['torch ops']:.1f} µs, kernel {times['kernel']:.1f} µs "
                  f"({times['torch ops'] / times['kernel']:.2f}x)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="only these variants besides plain and guard")
    parser.add_argument("--producers", default=f"RMSNorm:{K},SiLU-mul:{INTERMEDIATE},alone:{K}",
                        help="producer:K,... (RMSNorm, SiLU-mul, alone)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts M")
    parser.add_argument("--typical-only", action="store_true", help="skip the overflowing inputs")
    parser.add_argument("--producers-only", action="store_true", help="skip the GEMM and eager timings")
    args = parser.parse_args()
    producers = [(name, int(k)) for name, k in (item.split(":") for item in args.producers.split(","))]
    warm_gpu()
    time_producers(args.variants, producers, tuple(int(m) for m in args.rows.split(",")),
                   (False,) if args.typical_only else (False, True))
    if args.producers_only:
        return
    for m in ROWS:
        p = make_inputs(m, N, K)
        codes = quantize_activation_ref(p["x"], p["inv_scale"], p["shift"], 8)
        t = 1 + torch.rand(m, 1, device="cuda")
        plain = graph_time_us(lambda: int8_gemm(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16), 5)
        guarded = graph_time_us(lambda: int8_gemm(codes, p["w_q"], p["w_scale"], p["bias"], torch.bfloat16, t), 5)
        print(f"GEMM {N}x{K} M={m}: {plain:.1f} µs, with t in the epilogue {guarded:.1f} µs "
              f"({guarded / plain:.3f}x)", flush=True)
    time_eager()


if __name__ == "__main__":
    main()
