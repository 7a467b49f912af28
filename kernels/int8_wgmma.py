"""int8 x int8 -> int32 GEMM on Hopper tensor cores with a wgmma kept in flight across K steps: a Gluon kernel
(Triton's explicit-layout language) for the large-M GEMMs where our Triton kernels trail CUTLASS.

Why not kernels/int8_gemm.py or int8_gemm_tma.py: Triton makes a tl.dot asynchronous across K steps only when its
accumulator is float32 (its WGMMA pipeliner's rule "accumulator is not fp32"), so with int32 every K step waits for
its own wgmma (TTGIR `warp_group_dot_wait {pendings = 0}` in Triton 3.6 and 3.9, with pointer and TMA loads alike)
and the tensor cores idle while the next step is issued; fp16 and fp8 dots of the same loop keep one in flight.
Here, per K step of 128 channels: cp.async (16-byte copies) brings A [BLOCK_M, 128] and W [BLOCK_N, 128] into a
STAGES-deep ring of 128-byte swizzled tiles, STAGES - 1 steps ahead; one async wgmma per step, then a wait for the
one before (pendings = 1), so that step i's wgmma runs while step i + 1 is issued. The epilogue is the int8 GEMMs'
(acc * w_scale[n] (* row_scale[m]) + bias[n] in float32), stored from the accumulator's registers.

Not in the dispatch: bench/int8_wgmma.py checks it against torch_ref and times it against CUTLASS and our Triton
kernels on the H200; it joins the tuner's backends once it measures faster somewhere (docs/benchmarks.md, session
34: written without a GPU, its speed not yet measured). Gluon has no interpreter."""

from __future__ import annotations

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

    from vllm_outliertune.kernels.w4a8_wgmma import _async_load, _barrier, _loop_steps, _store_scaled
except ImportError:  # a Triton without Gluon's Hopper API
    gluon = None

from vllm_outliertune.kernels.w4a8_wgmma import BLOCK_K, wgmma_device

if gluon is not None:
    _BLOCK_K = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _copy_step(step, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn,
                   STAGES: gl.constexpr):
        """Ask for K step ``step``'s A and W tiles (none past ``steps``: predicated off, the stage zero-filled)."""
        s = step % STAGES
        valid = step < steps
        k0 = step * _BLOCK_K
        _async_load(a_s.index(s), a_ptr + offs_am[:, None].to(gl.int64) * stride_am + (k0 + offs_k)[None, :],
                    mask=(offs_am < M)[:, None] & valid)
        _async_load(w_s.index(s), w_ptr + offs_wn[:, None].to(gl.int64) * stride_wn + (k0 + offs_k)[None, :],
                    mask=(offs_wn >= 0)[:, None] & valid, eviction_policy="evict_first")
        async_copy.commit_group()

    @gluon.jit
    def _int8_wgmma_kernel(a_ptr, w_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, M, N, K, stride_am, stride_wn,
                           stride_om, HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        WARPS: gl.constexpr = gl.num_warps()
        # grouped order, as int8_gemm.grouped_tile: GROUP_M row blocks walk the N tiles together (weights from L2)
        pid = gl.program_id(0)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        pids_per_group = GROUP_M * (N // BLOCK_N)
        first_m = (pid // pids_per_group) * GROUP_M
        group_rows = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % pids_per_group) % group_rows
        pid_n = (pid % pids_per_group) // group_rows

        copy_layout: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // _BLOCK_K, _BLOCK_K // 16], [WARPS, 1],
                                                     [1, 0])
        offs_am = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, copy_layout))
        offs_wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, copy_layout))
        offs_k = gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, copy_layout))
        swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, _BLOCK_K], swizzled)
        w_s = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, _BLOCK_K], swizzled)

        # (wgmmas of N <= 128: Triton 3.6 emits no int8 wgmma wider; a BLOCK_N 256 tile issues two per K step)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                              instr_shape=[16, min(BLOCK_N, 128), 32])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, acc_layout)
        steps = K // _BLOCK_K
        for step in gl.static_range(STAGES - 1):
            _copy_step(step, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am, stride_wn, STAGES)
        for i in range(_loop_steps(steps, True)):
            s = i % STAGES
            async_copy.wait_group(STAGES - 2)
            _barrier()  # every thread's copies of step i have landed
            acc = warpgroup_mma(a_s.index(s), w_s.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            if WARPS > 4:  # every warpgroup's wgmma has left the stage that the copy refills
                _barrier()
            # step i - 1's wgmma has retired, so its stage takes step i + STAGES - 1
            _copy_step(i + STAGES - 1, steps, a_ptr, w_ptr, a_s, w_s, offs_am, offs_wn, offs_k, M, stride_am,
                       stride_wn, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)

        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        _store_scaled(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M,
                      (offs_m < M)[:, None] & (offs_n < N)[None, :], stride_om, HAS_ROW_SCALE, HAS_BIAS)


def int8_wgmma_applies(a_q: torch.Tensor, w_q: torch.Tensor, config: dict) -> bool:
    """Whether this kernel can run these operands: a Hopper GPU with Gluon, K a multiple of 128, whole BLOCK_N
    tiles, rows K-contiguous and 16-byte aligned (cp.async)."""
    k, n = a_q.shape[1], w_q.shape[0]
    return (gluon is not None and a_q.is_cuda
            and wgmma_device(a_q.device.index if a_q.device.index is not None else torch.cuda.current_device())
            and k % BLOCK_K == 0 and n % config["BLOCK_N"] == 0
            and all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a_q, w_q)))


def int8_wgmma(a_q: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor, row_scale: torch.Tensor | None, config: dict) -> torch.Tensor:
    """out [M, N] = a_q int8 [M, K] @ w_q int8 [N, K]^T * w_scale[n] (* row_scale[m]) (+ bias[n]) on operands
    int8_wgmma_applies accepts. ``config``: BLOCK_M (64 per warpgroup: num_warps = BLOCK_M // 16), BLOCK_N (a
    multiple of 16, at most 256), num_stages, GROUP_M."""
    (m, k), n = a_q.shape, w_q.shape[0]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    if block_m not in (64, 128) or block_n % 16 or not 16 <= block_n <= 256:
        raise ValueError(f"int8 WGMMA tile {config}: BLOCK_M must be 64 or 128 (one or two warpgroups) and BLOCK_N "
                         "a multiple of 16 up to 256")
    _int8_wgmma_kernel[(triton.cdiv(m, block_m) * (n // block_n),)](
        a_q, w_q, out, w_scale, row_scale, bias, m, n, k, a_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        STAGES=config.get("num_stages", 4), GROUP_M=config.get("GROUP_M", 8), num_warps=block_m // 16,
        enable_fp_fusion=False)
    return out
