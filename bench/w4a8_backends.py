"""Our W4A8 GEMM against vLLM's 4-bit-weight GEMMs that could run the same checkpoint, at decode batch sizes (GPU,
vLLM's CUDA build: the bundle of ../shared/gpu). Each column streams its weights from memory as decode does
(tune.stream_time_us over weight copies past the L2), µs per GEMM; the W8A8 int8 GEMM of the same shape is the
baseline. Issue 15 asks W4A8 >= 1.0x W8A8 at 64 sequences; our W4A8 tensor-core loop takes ~1.9x the int8 GEMM's
time there (docs/benchmarks.md), which a kernel reading half the bytes should not.

    python bench/w4a8_backends.py [--shapes 6144x4096,4096x4096,28672x4096,4096x14336] [--rows 1,16,64,256]

Columns (all on the same random packed weight: 4-bit codes, group size 128, integer group scales and zero points,
a float scale per output channel, a bias; the activations our int8 codes):
- int8: our int8 GEMM dispatch on int8 levels of that shape (the W8A8 row's GEMM; CUTLASS where the table picks it).
- ours: our W4A8 dispatch (linear.w4a8_gemm).
- marlin: vLLM's Marlin, bf16 activations holding the int8 codes (exact: |code| <= 127), uint4 codes with zero
  points, group scales s_g * w_scale[n] rounded to bf16, bias fused.
- machete: vLLM's Machete (Hopper CUTLASS), the same operands (zero points pre-scaled as vLLM does); + bias is an
  extra add, timed with it.
- marlin_i8: vLLM's Marlin W4A8-INT8 (int8 tensor cores, per-token activation scale): symmetric uint4b8 codes only,
  so not our checkpoints' format (asymmetric groups); its speed says what an int8 MMA reaches from packed weights.
Before timing, each output is compared with ours (relative RMS difference: bf16 group scales and another
summation order make it ~1e-3, a wrong conversion ~1)."""

from __future__ import annotations

import argparse
import functools

import torch

from vllm_outliertune.format import code_levels, group_count, pack_int4
from vllm_outliertune.kernels import linear, tune
from vllm_outliertune.kernels.shapes import parse_shapes

GROUP_SIZE = 128
LLAMA3_8B = "6144x4096,4096x4096,28672x4096,4096x14336"


def random_w4(n: int, k: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """A random packed 4-bit weight: codes [N, K], group scales / zeros [N, groups] (levels inside int8), per-row
    scale and bias."""
    groups = group_count(k, GROUP_SIZE)
    return dict(codes=torch.randint(0, 16, (n, k), device=device, dtype=torch.uint8),
                scale=torch.randint(1, 9, (n, groups), device=device, dtype=torch.uint8),
                zero=torch.randint(0, 16, (n, groups), device=device, dtype=torch.uint8),
                w_scale=torch.rand(n, device=device) * 0.01, bias=torch.randn(n, device=device))


def levels(w: dict) -> torch.Tensor:
    """int8 levels [N, K] = (code - zero) * scale per group."""
    return code_levels(w["codes"], w["scale"], w["zero"], GROUP_SIZE).to(torch.int8)


def ours_operands(w: dict) -> tuple:
    """(words, group scales, group zeros) as the plugin stores them on the GPU (N-major)."""
    return (linear.w4a8_gpu_words(pack_int4(w["codes"]), w["codes"].shape[1]),
            linear.w4a8_gpu_layout(w["scale"]), linear.w4a8_gpu_layout(w["zero"]))


def k_packed(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] -> int32 [K / 8, N], 8 channels along K per word (GPTQ's layout, as Marlin and Machete take)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    return pack_quantized_values_into_int32(codes.t().int(), scalar_types.uint4, packed_dim=0).contiguous()


def group_scales(w: dict, dtype: torch.dtype) -> torch.Tensor:
    """[groups, N]: s_g * w_scale[n] in dtype."""
    return (w["scale"].t().float() * w["w_scale"][None, :]).to(dtype).contiguous()


class _MarlinGemm:
    """What vLLM's Marlin GEMMs share: the workspace, the empty act-order index, the GPTQ repack and the launch."""

    IS_A_8BIT = False

    def __init__(self, w: dict):
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils

        self.ops, self.utils, (self.n, self.k) = ops, marlin_utils, w["codes"].shape
        self.workspace = marlin_utils.marlin_make_workspace_new(torch.device("cuda"))
        self.empty = marlin_utils.marlin_make_empty_g_idx(torch.device("cuda"))

    def repack(self, codes: torch.Tensor) -> torch.Tensor:
        return self.ops.gptq_marlin_repack(k_packed(codes), self.empty, self.k, self.n, 4, is_a_8bit=self.IS_A_8BIT)

    def permuted_scales(self, w: dict, dtype: torch.dtype) -> torch.Tensor:
        return self.utils.marlin_permute_scales(group_scales(w, dtype), self.k, self.n, GROUP_SIZE,
                                                is_a_8bit=self.IS_A_8BIT)

    def gemm(self, a: torch.Tensor, weight: torch.Tensor, b_type, bias, scales, a_scales, zeros) -> torch.Tensor:
        return self.ops.marlin_gemm(a, None, weight, bias, scales, a_scales, None, zeros, self.empty, self.empty,
                                    self.workspace, b_type, a.shape[0], self.n, self.k, is_k_full=True,
                                    use_atomic_add=False, use_fp32_reduce=True)


class Marlin(_MarlinGemm):
    """vLLM's Marlin on bf16 activations (our codes), uint4 with zero points, bias fused."""

    def __init__(self, w: dict):
        super().__init__(w)
        self.scales = self.permuted_scales(w, torch.bfloat16)
        self.zeros = self.utils.marlin_zero_points(w["zero"].t().int().contiguous(), self.k // GROUP_SIZE, self.n, 4)
        self.bias = self.utils.marlin_permute_bias(w["bias"].to(torch.bfloat16))
        self.weight = self.repack(w["codes"])

    def run(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from vllm.scalar_type import scalar_types

        return self.gemm(a, weight, scalar_types.uint4, self.bias, self.scales, None, self.zeros)


class Machete:
    """vLLM's Machete on bf16 activations (our codes), uint4 with zero points pre-scaled (-zero * scale), + bias."""

    def __init__(self, w: dict):
        from vllm import _custom_ops as ops

        self.ops = ops
        self.scales = group_scales(w, torch.bfloat16)
        self.zeros = (-w["zero"].t().float() * self.scales.float()).to(torch.bfloat16).contiguous()
        self.bias = w["bias"].to(torch.bfloat16)
        self.weight = self.repack(w["codes"])

    def repack(self, codes: torch.Tensor) -> torch.Tensor:
        from vllm.scalar_type import scalar_types

        return self.ops.machete_prepack_B(k_packed(codes).t().contiguous().t(), a_type=torch.bfloat16,
                                          b_type=scalar_types.uint4, group_scales_type=torch.bfloat16)

    def run(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from vllm.scalar_type import scalar_types

        out = self.ops.machete_mm(a=a, b_q=weight, b_type=scalar_types.uint4, b_group_scales=self.scales,
                                  b_group_zeros=self.zeros, b_group_size=GROUP_SIZE)
        return out.add_(self.bias)


class MarlinInt8(_MarlinGemm):
    """vLLM's Marlin W4A8-INT8: int8 activations with a per-token scale, symmetric uint4b8 codes (code - 8), float
    group scales (vLLM turns them into int16 steps of the largest one)."""

    IS_A_8BIT = True

    def __init__(self, w: dict):
        super().__init__(w)
        self.scales, self.global_scale = self.utils.marlin_act_int8_process_scales(
            self.permuted_scales(w, torch.float16))
        self.weight = self.repack(w["codes"])
        self.token_scales: dict[int, torch.Tensor] = {}  # per row count, made by the untimed first call

    def run(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from vllm.scalar_type import scalar_types

        m = a.shape[0]
        if m not in self.token_scales:
            self.token_scales[m] = torch.ones(m, device=a.device) * self.global_scale
        return self.gemm(a, weight, scalar_types.uint4b8, None, self.scales, self.token_scales[m], self.empty)


def relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def symmetric_reference(a_q: torch.Tensor, w: dict) -> torch.Tensor:
    """MarlinInt8's exact output: codes - 8 as the levels, float group scales."""
    eight = torch.full_like(w["zero"], 8)
    weight = code_levels(w["codes"], w["scale"], eight, GROUP_SIZE).float() * w["w_scale"][:, None]
    return a_q.float() @ weight.t()


def time_shape(n: int, k: int, rows: list[int]) -> None:
    w = random_w4(n, k)
    copies = max(8, int(tune.STREAM_BYTES / (n * k)))  # at int8's byte count: the 4-bit runs stream half of that
    level = levels(w)
    int8_weights = [level] + [torch.randint_like(level, -127, 128) for _ in range(copies - 1)]
    ours = ours_operands(w)
    ours_words = [ours[0]] + [linear.w4a8_gpu_layout(torch.randint(-(1 << 31), (1 << 31) - 1, ours[0].shape,
                                                                   device="cuda", dtype=torch.int32))
                              for _ in range(copies - 1)]
    backends = {name: cls(w) for name, cls in (("marlin", Marlin), ("machete", Machete), ("marlin_i8", MarlinInt8))}
    backend_weights = {name: [b.weight] + [b.repack(torch.randint_like(w["codes"], 0, 16)) for _ in range(copies - 1)]
                       for name, b in backends.items()}
    for m in rows:
        a_q = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        a_bf16 = a_q.to(torch.bfloat16)
        launches = {
            "int8": [functools.partial(linear.int8_gemm, a_q, wq, w["w_scale"], w["bias"], torch.bfloat16)
                     for wq in int8_weights],
            "ours": [functools.partial(linear.w4a8_gemm, a_q, words, ours[1], ours[2], GROUP_SIZE, w["w_scale"],
                                       w["bias"], torch.bfloat16) for words in ours_words],
        }
        for name, backend in backends.items():
            a = a_q if name == "marlin_i8" else a_bf16
            launches[name] = [functools.partial(backend.run, a, wb) for wb in backend_weights[name]]
        reference = launches["ours"][0]()
        checks = {name: relative_difference(launches[name][0](), reference) for name in ("int8", "marlin", "machete")}
        checks["marlin_i8"] = relative_difference(launches["marlin_i8"][0](), symmetric_reference(a_q, w))
        times = {name: tune.stream_time_us(runs) for name, runs in launches.items()}
        print(f"| {n}x{k} | {m} | " + " | ".join(f"{times[name]:.1f}" for name in launches) + " | "
              + " | ".join(f"{times['int8'] / times[name]:.2f}" for name in list(launches)[1:]) + " | "
              + " ".join(f"{name} {value:.1e}" for name, value in checks.items()) + " |", flush=True)
    del int8_weights, ours_words, backend_weights
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=LLAMA3_8B, help="NxK,... (default: Llama-3-8B at TP 1)")
    parser.add_argument("--rows", default="1,16,64,256")
    args = parser.parse_args()
    from vllm_outliertune import cutlass

    cutlass.register()  # as the plugin does inside vLLM: the int8 table may pick it
    tune.warm_gpu()
    print(f"{torch.cuda.get_device_name()}, group size {GROUP_SIZE}, µs per GEMM, weights streamed\n")
    print("| shape NxK | M | int8 | ours | marlin | machete | marlin_i8 | int8/ours | int8/marlin | int8/machete | "
          "int8/marlin_i8 | relative difference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, k in parse_shapes(args.shapes):
        time_shape(n, k, [int(r) for r in args.rows.split(",")])


if __name__ == "__main__":
    main()
