"""int8 x int8 -> int32 GEMMs on Hopper tensor cores with a wgmma kept in flight across K steps: Gluon kernels
(Triton's explicit-layout language) for the GEMMs where our Triton kernels trail CUTLASS or vLLM's fp8.

Why not kernels/int8_gemm.py, int8_gemm_tma.py or splitk_gemm.py: Triton makes a tl.dot asynchronous across K steps
only when its accumulator is float32 (its WGMMA pipeliner's rule "accumulator is not fp32"), so with int32 every K
step waits for its own wgmma (TTGIR `warp_group_dot_wait {pendings = 0}` in Triton 3.6 and 3.9, with pointer and TMA
loads alike) and the tensor cores idle while the next step is issued; fp16 and fp8 dots of the same loop keep one
in flight. Here, per K step of 128 channels: cp.async (16-byte copies) brings A [BLOCK_M, 128] and W [BLOCK_N, 128]
into a STAGES-deep ring of 128-byte swizzled tiles, STAGES - 1 steps ahead; one async wgmma per step, then a wait
for the one before (pendings = 1), so that step i's wgmma runs while step i + 1 is issued.
- _int8_wgmma_kernel (large M): tiles of 64 or 128 rows by up to 256 columns in grouped order, the int8 GEMMs'
  epilogue (acc * w_scale[n] (* row_scale[m]) + bias[n] in float32) stored from the accumulator's registers;
  _int8_wgmma_tma_kernel, the same with its operands brought by TMA (an mbarrier per stage).
- _int8_wgmma_swap_kernel (decode, 16-128 rows): the weights are the wgmma's M (64 rows per warpgroup) and the
  tokens its N, K split over programs whose partial sums the last one adds (kernels/w4a8_wgmma.py's _finish).

Not in the dispatch: bench/int8_wgmma.py checks them bit for bit and times them against CUTLASS, our Triton GEMMs
and the shipped dispatch on the H200; they join the tuner's backends where they measure faster (written in
session 34 without a GPU: compiled for sm90 and checked with ptxas, speed not yet measured). Gluon has no
interpreter."""

from __future__ import annotations

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from vllm_outliertune.kernels.w4a8_wgmma import (_async_load, _barrier, _every_warpgroup_waited, _finish,
                                                     _loop_steps, _program_tile, _store_scaled)
except ImportError:  # a Triton without Gluon's Hopper API
    gluon = None

from vllm_outliertune.kernels.w4a8_wgmma import BLOCK_K, wgmma_device

if gluon is not None:
    _BLOCK_K = gl.constexpr(BLOCK_K)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # (3.6's name; later async_load)

    @gluon.jit
    def _copy_step(step, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn, k_start,
                   STAGES: gl.constexpr):
        """Ask for K step ``step``'s A and W tiles (none past ``steps``: predicated off, the stage zero-filled)."""
        s = step % STAGES
        valid = step < steps
        k0 = k_start + step * _BLOCK_K
        _async_load(a_s.index(s), a_ptr + offs_am[:, None].to(gl.int64) * stride_am + (k0 + offs_k)[None, :],
                    mask=(offs_am < M)[:, None] & valid)
        _async_load(w_s.index(s), w_ptr + offs_wn[:, None].to(gl.int64) * stride_wn + (k0 + offs_k)[None, :],
                    mask=(offs_wn >= 0)[:, None] & valid, eviction_policy="evict_first")
        async_copy.commit_group()

    @gluon.jit
    def _operand_ring(a_ptr, w_ptr, m0, n0, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The K steps' copy ring, STAGES deep: A [BLOCK_M, 128] and W [BLOCK_N, 128] (128-byte swizzled: wgmma
        operands), and the rows and channels a thread copies (16-byte cp.async)."""
        WARPS: gl.constexpr = gl.num_warps()
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // _BLOCK_K, _BLOCK_K // 16], [WARPS, 1],
                                                     [1, 0])
        swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        return (gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, _BLOCK_K], swizzled),
                gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, _BLOCK_K], swizzled),
                m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, copy_layout)),
                n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, copy_layout)),
                gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, copy_layout)))

    @gluon.jit
    def _k_loop(acc, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn, k_start, steps,
                STAGES: gl.constexpr, SWAP_AB: gl.constexpr):
        """acc += this program's K steps: A x W^T, or W x A^T with SWAP_AB (the weights as the wgmma's M, the tokens
        its N). One async wgmma a step, a wait for the one before."""
        for step in gl.static_range(STAGES - 1):
            _copy_step(step, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn,
                       k_start, STAGES)
        for i in range(_loop_steps(steps, True)):
            s = i % STAGES
            async_copy.wait_group(STAGES - 2)
            _barrier()  # every thread's copies of step i have landed
            if SWAP_AB:
                acc = warpgroup_mma(w_s.index(s), a_s.index(s).permute((1, 0)), acc, is_async=True)
            else:
                acc = warpgroup_mma(a_s.index(s), w_s.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            _every_warpgroup_waited()
            # step i - 1's wgmma has retired, so its stage takes step i + STAGES - 1
            _copy_step(i + STAGES - 1, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am,
                       stride_wn, k_start, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)
        return acc

    @gluon.jit
    def _int8_wgmma_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, M, N, K, stride_am, stride_wn,
                           stride_om, HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        a_s, w_s, offs_am, offs_wn, offs_k = _operand_ring(a_ptr, w_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_M,
                                                           BLOCK_N, STAGES)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, _large_acc_layout(BLOCK_N, gl.num_warps()))
        acc = _k_loop(acc, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn, 0, K // _BLOCK_K,
                      STAGES, False)
        _store_large(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, pid_m, pid_n, M, N, stride_om, HAS_ROW_SCALE,
                     HAS_BIAS, BLOCK_M, BLOCK_N)

    @gluon.jit
    def _int8_wgmma_tma_kernel(a_desc, w_desc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, M, N, K, stride_om,
                               HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        # _int8_wgmma_kernel with its operands brought by TMA (one thread issues a step's two copies; an mbarrier per
        # stage counts their bytes; rows past M arrive as zeros) instead of every thread's cp.async
        pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        a_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, _BLOCK_K], a_desc.layout)
        w_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, _BLOCK_K], w_desc.layout)
        landed = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(STAGES):
            mbarrier.init(landed.index(stage), count=1)
        steps = K // _BLOCK_K
        for step in gl.static_range(STAGES - 1):
            _tma_step(step, steps, a_desc, w_desc, a_s, w_s, landed, m0, n0, STAGES)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, _large_acc_layout(BLOCK_N, gl.num_warps()))
        for i in range(_loop_steps(steps, True)):
            s = i % STAGES
            mbarrier.wait(landed.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_s.index(s), w_s.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            _every_warpgroup_waited()
            # step i - 1's wgmma has retired, so its stage takes step i + STAGES - 1
            _tma_step(i + STAGES - 1, steps, a_desc, w_desc, a_s, w_s, landed, m0, n0, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc])
        for stage in gl.static_range(STAGES):
            mbarrier.invalidate(landed.index(stage))
        _store_large(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, pid_m, pid_n, M, N, stride_om, HAS_ROW_SCALE,
                     HAS_BIAS, BLOCK_M, BLOCK_N)

    @gluon.jit
    def _tma_step(step, steps, a_desc, w_desc, a_s, w_s, landed, m0, n0, STAGES: gl.constexpr):
        """Ask TMA for K step ``step``'s A and W tiles, counted by the stage's mbarrier (none past ``steps``)."""
        s = step % STAGES
        valid = step < steps
        mbarrier.expect(landed.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=valid)
        _tma_load(a_desc, [m0, step * _BLOCK_K], landed.index(s), a_s.index(s), pred=valid)
        _tma_load(w_desc, [n0, step * _BLOCK_K], landed.index(s), w_s.index(s), pred=valid)

    @gluon.jit
    def _grouped_tile(M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
        """This program's (M tile, N tile) in grouped order, as int8_gemm.grouped_tile: GROUP_M row blocks walk the
        N tiles together, so their weight tiles come from L2."""
        pid = gl.program_id(0)
        pids_per_group = GROUP_M * (N // BLOCK_N)
        first_m = (pid // pids_per_group) * GROUP_M
        group_rows = gl.minimum(gl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        return first_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows

    @gluon.constexpr_function
    def _large_acc_layout(block_n, warps):
        """The large tiles' accumulator: 16 rows per warp, wgmmas of N <= 128 (Triton 3.6 emits no wider int8 wgmma;
        a BLOCK_N 256 tile issues two per K step)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                         instr_shape=[16, min(block_n, 128), 32])

    @gluon.jit
    def _store_large(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, pid_m, pid_n, M, N, stride_om,
                     HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr):
        """The epilogue stored from the accumulator's registers: a layout conversion would need BLOCK_M x BLOCK_N x 4
        bytes of shared memory beside the ring."""
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc.type.layout))
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc.type.layout))
        _store_scaled(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M,
                      (offs_m < M)[:, None] & (offs_n < N)[None, :], stride_om, HAS_ROW_SCALE, HAS_BIAS)

    @gluon.jit
    def _int8_wgmma_swap_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr, count_ptr, M, N,
                                K, stride_am, stride_wn, stride_om, K_PER_SPLIT, HAS_ROW_SCALE: gl.constexpr,
                                HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr,
                                BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        # Decode: the weights [BLOCK_N, 128] are the wgmma's M (64 rows per warpgroup) and the tokens [BLOCK_M, 128]
        # its N (16-128), K split SPLIT_K ways (kernels/w4a8_wgmma.py's _finish adds the splits' partial sums).
        WARPS: gl.constexpr = gl.num_warps()
        pid_n, pid_m, pid_k, n0, k_start, steps = _program_tile(K, K_PER_SPLIT, BLOCK_N)
        a_s, w_s, offs_am, offs_wn, offs_k = _operand_ring(a_ptr, w_ptr, pid_m * BLOCK_M, n0, BLOCK_M, BLOCK_N,
                                                           STAGES)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                              instr_shape=[16, BLOCK_M, 32])
        acc = _k_loop(gl.zeros([BLOCK_N, BLOCK_M], gl.int32, acc_layout), a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn,
                      offs_k, M, stride_am, stride_wn, k_start, steps, STAGES, True)
        _finish(gl.permute(acc, (1, 0)), out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr, count_ptr, M, N,
                stride_om, pid_n, pid_m, pid_k, HAS_ROW_SCALE, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


def int8_wgmma_applies(a_q: torch.Tensor, w_q: torch.Tensor, config: dict) -> bool:
    """Whether this kernel can run these operands: a Hopper GPU with Gluon, K a multiple of 128, whole BLOCK_N
    tiles, rows K-contiguous and 16-byte aligned (cp.async)."""
    k, n = a_q.shape[1], w_q.shape[0]
    return (gluon is not None and a_q.is_cuda
            and wgmma_device(a_q.device)
            and k % BLOCK_K == 0 and n % config["BLOCK_N"] == 0
            and all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, w_q)))


def int8_wgmma(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor, row_scale: torch.Tensor | None, config: dict) -> torch.Tensor:
    """out [M, N] = a_q int8 [M, K] @ w_q int8 [N, K]^T * w_scale[n] (* row_scale[m]) (+ bias[n]) on operands
    int8_wgmma_applies accepts. ``config``: num_stages and either BLOCK_M 64 or 128 (one or two warpgroups of 64
    rows), BLOCK_N a multiple of 16 up to 256, GROUP_M and TMA (operands by TMA, else cp.async), or SWAP_AB with
    BLOCK_N 64 or 128, a multiple of 16 * num_warps (64 weight rows per warpgroup), BLOCK_M 16-128 (the tokens, a
    multiple of 16) and SPLIT_K (0 = automatic)."""
    from vllm_outliertune.kernels.splitk_gemm import scratch_workspace, split_k_plan  # (Triton code)

    (m, k), n = a_q.shape, w_q.shape[0]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    stages = config.get("num_stages", 4)
    if config.get("SWAP_AB"):
        warps = config.get("num_warps", 4)
        if block_n % (16 * warps) or block_n > 128 or block_m % 16 or not 16 <= block_m <= 128 or warps not in (4, 8):
            raise ValueError(f"int8 WGMMA SWAP_AB tile {config}: BLOCK_N must be 64 or 128, a multiple of 16 * "
                             "num_warps (4 or 8), and BLOCK_M a multiple of 16 up to 128")
        grid_n, grid_m = n // block_n, triton.cdiv(m, block_m)
        split_k, k_per_split, _, counters = split_k_plan(m, n, k, grid_n * grid_m, BLOCK_K, config, a_q.device)
        partial_sums = scratch_workspace(split_k * m * n, a_q.device) if split_k > 1 else None
        _int8_wgmma_swap_kernel[(grid_n, grid_m, split_k)](
            a_q, w_q, out, w_scale, row_scale, bias, partial_sums, counters, m, n, k, a_q.stride(0), w_q.stride(0),
            out.stride(0), k_per_split, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
            SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=warps,
            enable_fp_fusion=False)
        return out
    if block_m not in (64, 128) or block_n % 16 or not 16 <= block_n <= 256:
        raise ValueError(f"int8 WGMMA tile {config}: BLOCK_M must be 64 or 128 (one or two warpgroups) and BLOCK_N "
                         "a multiple of 16 up to 256")
    grid = (triton.cdiv(m, block_m) * (n // block_n),)
    options = dict(HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                   STAGES=stages, GROUP_M=config.get("GROUP_M", 8), num_warps=block_m // 16, enable_fp_fusion=False)
    if config.get("TMA"):
        swizzled = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        _int8_wgmma_tma_kernel[grid](TensorDescriptor.from_tensor(a_q, [block_m, BLOCK_K], swizzled),
                                     TensorDescriptor.from_tensor(w_q, [block_n, BLOCK_K], swizzled), out, w_scale,
                                     row_scale, bias, m, n, k, out.stride(0), **options)
    else:
        _int8_wgmma_kernel[grid](a_q, w_q, out, w_scale, row_scale, bias, m, n, k, a_q.stride(0), w_q.stride(0),
                                 out.stride(0), **options)
    return out
