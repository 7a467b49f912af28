"""Does prefetching the next GEMM's weights into the L2, while kernels that leave the HBM idle run, shorten a decode
layer? A stand-in decoder layer in one CUDA graph: each GEMM (the table's dispatch, int8 or W4A8) is followed by a
spin kernel of the given µs (no memory traffic: attention at one sequence, a norm, SiLU-mul), over layer copies
past the L2; with prefetch, a launch of the prefetch kernel below after each GEMM asks for the first BUDGET MB of
the next GEMM's weight (the last GEMM's next is the next layer's first); "read" reads them instead (a torch sum that
waits for its data). First, each GEMM alone: streamed over weight copies, and the same weight again (L2-resident
where it fits). GPU, no vLLM:

    python bench/l2_prefetch.py [--shapes 6144x4096,4096x4096,28672x4096,4096x14336] [--gaps 15,4,3.6,4]
        [--rows 1,16] [--budgets 8,16,32] [--modes bulk,lines,read] [--w4a8]

H200, session 24 (docs/benchmarks.md): a net loss in every setting. The GEMMs' share of the chain (chain minus
prefetch + spins) fell 0.3-1.1 µs a layer at one int8 row (of ~62) and 3-4.5 µs at 16 rows and at one W4A8 row,
while each prefetch launch added 2.9-5.0 µs. And a small weight that stays in the L2 is read only 1.1-1.45x faster
(int8 qkv 8.4 -> 5.8 µs, o 6.2 -> 4.6; W4A8 o 5.7 -> 5.2), so the plugin does not prefetch."""

from __future__ import annotations

import argparse
import math

import torch
import triton
import triton.language as tl

from vllm_outliertune.kernels import linear, tune
from vllm_outliertune.kernels.shapes import parse_shapes

LLAMA3_8B = "6144x4096,4096x4096,28672x4096,4096x14336"


# The prefetch kernel: sm90's bulk L2 prefetch (cp.async.bulk.prefetch, one instruction per CHUNK bytes) or, with
# BULK off, one prefetch.global.L2 per 128-byte line (sm80 and newer). Neither has a completion to wait on.
LINE_BYTES = 128


@triton.jit
def _l2_prefetch_kernel(ptr, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BULK: tl.constexpr):
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    left = n_bytes - offsets
    if BULK:  # sizes in multiples of 16 bytes (the instruction's unit); none past the end
        sizes = (tl.minimum(left, CHUNK) & ~15).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [ptr + offsets, sizes], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s64 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
            "=r,l,l", [ptr + offsets, left], dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch(t: torch.Tensor, max_bytes: int, bulk: bool = True, chunk: int = 4096, block: int = 128) -> None:
    """Prefetch the first min(max_bytes, t's bytes) of CUDA tensor t's memory into the L2. t may be a permuted view
    (the W4A8 words are stored N-major): its elements must fill one span of memory, which is what is prefetched."""
    dims = sorted(zip(t.stride(), t.shape))
    if any(stride != math.prod(size for _, size in dims[:i]) for i, (stride, _) in enumerate(dims)):
        raise ValueError(f"l2_prefetch: a tensor of shape {list(t.shape)} and strides {t.stride()} does not fill one "
                         "span of memory; pass the stored weight")
    n_bytes = min(max_bytes, t.numel() * t.element_size())
    if n_bytes <= 0:
        return
    chunk = chunk if bulk else LINE_BYTES
    grid = (triton.cdiv(triton.cdiv(n_bytes, chunk), block),)
    _l2_prefetch_kernel[grid](byte_span(t), n_bytes, CHUNK=chunk, BLOCK=block, BULK=bulk, num_warps=4)


def byte_span(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor that fills one span of memory, from its first (strides are positive: data_ptr's)."""
    return t.as_strided((t.numel(),), (1,)).view(torch.int8)


def spin_cycles_per_us() -> float:
    """torch.cuda._sleep's cycles per µs on this GPU (its clock under a spin), from one graph of spins."""
    cycles = 200_000
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            torch.cuda._sleep(cycles)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return cycles * 10 / (start.elapsed_time(end) * 1e3)


def layer_chain(layers: list[list[tuple]], gemm, gaps_us: list[float], cycles_per_us: float, gemms: bool = True,
                prefetch: tuple[str, int] | None = None) -> list:
    """One launch per layer of its GEMMs, each followed by [a prefetch of the next weight] and its spin."""
    weights = [args[1] for layer in layers for args in layer]

    def run(i: int) -> None:
        for j, args in enumerate(layers[i]):
            if gemms:
                gemm(args)
            if prefetch is not None:
                mode, budget = prefetch
                following = weights[(i * len(layers[i]) + j + 1) % len(weights)]
                if mode == "read":  # a read that waits for its data: what an L2 hit is worth, in the same chain
                    byte_span(following)[:budget].view(torch.int32).sum()
                else:
                    l2_prefetch(following, budget, bulk=mode == "bulk")
            if gaps_us[j] > 0:
                torch.cuda._sleep(int(gaps_us[j] * cycles_per_us))
    return [lambda i=i: run(i) for i in range(len(layers))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=LLAMA3_8B)
    parser.add_argument("--gaps", default="15,4,3.6,4", help="µs of spin after each GEMM of a layer")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--budgets", default="8,16,32", help="MB prefetched of each next weight")
    parser.add_argument("--modes", default="bulk,lines", help="bulk, lines, or read (a blocking read, for reference)")
    parser.add_argument("--w4a8", action="store_true", help="packed 4-bit weights (the W4A8 dispatch)")
    args = parser.parse_args()
    shapes, gaps = parse_shapes(args.shapes), [float(g) for g in args.gaps.split(",")]
    if len(gaps) != len(shapes):
        raise SystemExit(f"--gaps has {len(gaps)} values for {len(shapes)} shapes")
    kernel = "w4a8_splitk" if args.w4a8 else "int8_gemm"
    if args.w4a8:
        def gemm(a):
            return linear.w4a8_gemm(*a, torch.bfloat16)
    else:
        def gemm(a):
            return linear.int8_gemm(*a, torch.bfloat16)
    tune.warm_gpu()
    print("µs per GEMM, streamed over weight copies / the same weight again (L2-resident where it fits):")
    for m in (int(r) for r in args.rows.split(",")):
        for n, k in shapes:
            copies = tune.weight_copies(tune.gemm_args(m, n, k, kernel))
            streamed = tune.stream_time_us([lambda a=a: gemm(a) for a in copies])
            again = tune.stream_time_us([lambda: gemm(copies[0])] * len(copies))
            print(f"  M={m:3d} {n}x{k}: {streamed:6.1f} / {again:6.1f}", flush=True)
        del copies
    cycles = spin_cycles_per_us()
    print(f"spin: {cycles:.0f} cycles per µs; gaps {gaps} µs after {args.shapes} ({kernel})")
    for m in (int(r) for r in args.rows.split(",")):
        probe = [tune.gemm_args(m, n, k, kernel) for n, k in shapes]
        layer_bytes = sum(a[1].numel() * a[1].element_size() for a in probe)
        count = max(4, math.ceil(2 * tune.STREAM_BYTES / layer_bytes))
        layers = [probe] + [[tune.gemm_args(m, n, k, kernel) for n, k in shapes] for _ in range(count - 1)]
        rows = [("spins alone", dict(gemms=False)), ("GEMMs alone", dict(gaps=[0.0] * len(gaps))),
                ("chain, no prefetch", {})]
        for mode in args.modes.split(","):
            for mb in (int(b) for b in args.budgets.split(",")):
                rows.append((f"{mode} {mb} MB: prefetch + spins", dict(gemms=False, prefetch=(mode, mb << 20))))
                rows.append((f"{mode} {mb} MB: chain", dict(prefetch=(mode, mb << 20))))
        print(f"M={m}: {count} layers of {layer_bytes / 2**20:.0f} MiB")
        for _ in range(2):  # twice: the spread between rounds beside the differences
            for name, kw in rows:
                options = dict(kw)
                launches = layer_chain(layers, gemm, options.pop("gaps", gaps), cycles, **options)
                print(f"  {name:34s} {tune.stream_time_us(launches):8.1f} µs/layer",
                      flush=True)
        del layers, probe


if __name__ == "__main__":
    main()
