"""W4A8 on Hopper tensor cores with the widening overlapped: a Gluon kernel (Triton's explicit-layout language)
whose 4-bit weights are widened into shared memory as the wgmma's B operand while the previous step's wgmma runs.

Why not kernels/w4a8_gemm.py's tensor-core loop: Triton makes the widened weights a register operand of the wgmma
and waits for every wgmma before the next step's widening, so the unpack and the tensor cores never overlap; on the
H200 its 64-row gate_up tile took 1.4x our int8 GEMM's time (docs/benchmarks.md, session 30). Here one warpgroup per
64 rows, per K step of 128 channels:
- cp.async brings the step's activation codes [BLOCK_M, 128] (the wgmma's A operand, swizzled), weight words
  [16, BLOCK_N] (N-major) and the group's scale and zero [BLOCK_N] into a STAGES-deep ring, STAGES - 1 steps ahead;
- each thread widens the words of its output rows into int8 levels (code - zero) * scale, four per 32-bit word
  (kernels/w4a8_swar.py: needs every code * scale <= 255, format.levels_fit_bytes), in channel order, and stores them
  K-major into a level buffer (LEVEL_BUFS of them; with one, the previous wgmma is waited for before the store);
- an async wgmma accumulates levels x activations in int32 and stays in flight during the next step's widening.
The epilogue is the int8 GEMMs' (acc * scale[n] (* row_scale[m]) + bias[n]). SPLIT_K programs store their partial
sums in slices of their own and the last to arrive (a per-tile counter, as splitk_gemm.split_k_store's) adds them:
atomic adds into one slice were bound by the L2's atomic throughput at 64 x 128 outputs a program (gate_up at 64
rows 30.4 -> 60.2 µs with two splits). H200, Llama-3-8B layer at 64 rows: 74.2 µs against 120.9 for the tiles
shipped before and 78.7 for our int8 GEMMs (docs/benchmarks.md, session 31).

SWAP_AB tiles run a second kernel: the weights are the wgmma's A operand straight from registers (64 of their rows
per warpgroup) and the tokens its N (16-128), so nothing is stored to shared memory in the K loop; each thread widens
exactly the 4-channel chunks of the A fragment it holds, and the activation copies gather the channels into that
order. H200, Llama-3-8B layer: 70.6 -> 60.0 µs at 16 rows, 254.3 -> 217.4 at 256; from 64 to 128 rows the first
kernel stays faster (docs/benchmarks.md, session 32). NATURAL_K tiles copy the activations in channel order
instead, with the words shuffled to the lanes that widen them: fewer registers (session 33; a candidate at every
SWAP_AB tile since session 34, when ptxas stopped serializing those of 64 weight rows: _loop_steps).
Both kernels give the exact integer every W4A8 kernel computes. Gluon has no interpreter: CPU runs take the Triton
loop (w4a8_gemm.py) for a WGMMA tile."""

from __future__ import annotations

import functools

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    from vllm_outliertune.kernels.w4a8_swar import gluon_level_offset, gluon_level_words
except ImportError:  # a Triton without Gluon's Hopper API: the WGMMA tiles run the Triton loop instead
    gluon = None

BLOCK_K = 128  # channels per K step: one 128-byte swizzled row of levels and of activation codes

if gluon is not None:
    # Names that moved between Triton releases (3.6: the GPU bundle's; later: async_load / barrier)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    _REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))  # else _reinterpret
    _BLOCK_K = gl.constexpr(BLOCK_K)

    @gluon.jit
    def _copy_step(step, steps, a_ptr, w_ptr, gs_ptr, gz_ptr, a_s, w_s, gs_s, gz_s, offs_am, offs_ak, offs_wk,
                   offs_wn, offs_gn, M, stride_am, stride_wk, stride_gk, k_start, GROUP_SIZE: gl.constexpr,
                   STAGES: gl.constexpr):
        """Ask for K step ``step``'s operands (none past ``steps``: predicated off, the stage zero-filled)."""
        s = step % STAGES
        valid = step < steps
        k0 = k_start + step * _BLOCK_K
        a_ptrs = a_ptr + offs_am[:, None].to(gl.int64) * stride_am + (k0 + offs_ak)[None, :]
        _async_load(a_s.index(s), a_ptrs, mask=(offs_am < M)[:, None] & valid)
        w_ptrs = w_ptr + (k0 // 8 + offs_wk)[:, None].to(gl.int64) * stride_wk + offs_wn[None, :]
        _async_load(w_s.index(s), w_ptrs, mask=(offs_wk >= 0)[:, None] & valid, eviction_policy="evict_first")
        g = (k0 // GROUP_SIZE).to(gl.int64) * stride_gk + offs_gn
        _async_load(gs_s.index(s), gs_ptr + g, mask=(offs_gn >= 0) & valid)
        _async_load(gz_s.index(s), gz_ptr + g, mask=(offs_gn >= 0) & valid)
        async_copy.commit_group()

    @gluon.jit
    def _program_tile(K, K_PER_SPLIT, BLOCK_N: gl.constexpr):
        """This program's (N tile, M tile, K split), its first output column and channel, and its K steps."""
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(2)
        k_start = pid_k * K_PER_SPLIT
        return (pid_n, gl.program_id(1), pid_k, pid_n * BLOCK_N, k_start,
                gl.cdiv(gl.minimum(K - k_start, K_PER_SPLIT), _BLOCK_K))

    @gluon.jit
    def _loop_steps(steps, AT_LEAST_ONE: gl.constexpr):
        """The K loop's trip count: ``steps``, or at least one step where AT_LEAST_ONE (split_k_plan makes no empty
        split; one would add its zero-filled stage: 0). Where a path leads around the loop, ptxas finds the
        accumulator's zeros defined between the last wgmma and the final wait and serializes every wgmma of the
        tile (C7515; Triton 3.6 and 3.9): every 128-row tile of the levels kernel, and NATURAL_K tiles of 64 weight
        rows or of 16 tokens. The other tiles keep the loop they were timed with."""
        return gl.maximum(steps, 1) if AT_LEAST_ONE else steps

    @gluon.jit
    def _every_warpgroup_waited():
        """After a warpgroup_mma_wait, before shared memory that wgmma read is refilled: a warpgroup's wait covers
        only its own wgmmas, so with two warpgroups a barrier waits for the other's too."""
        if gl.num_warps() > 4:
            _barrier()

    @gluon.jit
    def _ring(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The K steps' copy ring, STAGES deep: activation codes [BLOCK_M, 128] (128-byte swizzled: a wgmma
        operand), weight words [16, BLOCK_N] (N-major) and the group's scale and zero bytes [BLOCK_N]."""
        swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        plain2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        plain1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        return (gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, _BLOCK_K], swizzled),
                gl.allocate_shared_memory(gl.int32, [STAGES, _BLOCK_K // 8, BLOCK_N], plain2),
                gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N], plain1),
                gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N], plain1))

    @gluon.jit
    def _weight_copy_offsets(n0, BLOCK_N: gl.constexpr):
        """Offsets of a K step's weight words (16-byte copies of N-major rows) and group bytes (4-byte ones)."""
        WARPS: gl.constexpr = gl.num_warps()
        w_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // BLOCK_N, BLOCK_N // 4], [WARPS, 1], [1, 0])
        g_copy: gl.constexpr = gl.BlockedLayout([4], [32], [WARPS], [0])
        return (gl.arange(0, _BLOCK_K // 8, layout=gl.SliceLayout(1, w_copy)),
                n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_copy)),
                n0 + gl.arange(0, BLOCK_N, layout=g_copy))

    @gluon.jit
    def _landed_step(i, w_s, gs_s, gz_s, WORDS_LAYOUT: gl.constexpr, STAGES: gl.constexpr):
        """Waits until every thread's copies of K step i have landed; the step's stage, its weight words
        [BLOCK_N, 16] in WORDS_LAYOUT and its group scale and zero [BLOCK_N] (uint32)."""
        s = i % STAGES
        async_copy.wait_group(STAGES - 2)
        _barrier()
        group_layout: gl.constexpr = gl.SliceLayout(1, WORDS_LAYOUT)
        return (s, w_s.index(s).permute((1, 0)).load(WORDS_LAYOUT).to(gl.uint32, bitcast=True),
                gs_s.index(s).load(group_layout).to(gl.uint32), gz_s.index(s).load(group_layout).to(gl.uint32))

    @gluon.jit
    def _scaled_planes(words, scale, zero):
        """uint32 words [BLOCK_N, W] of 8 codes, scale / zero [BLOCK_N] -> the words of the int8 levels (code - zero)
        * scale of their low nibbles (channels 8j..8j+3) and of their high ones (8j+4..8j+7), four to a word
        (kernels/w4a8_swar.py: one multiply-add and an xor per word)."""
        offset = gluon_level_offset(scale, zero)
        return (gluon_level_words(words & 0x0F0F0F0F, scale, offset),
                gluon_level_words((words >> 4) & 0x0F0F0F0F, scale, offset))

    @gluon.jit
    def _scaled_levels(words, scale, zero):
        """_scaled_planes' level words [BLOCK_N, 2W] in channel order: word 2j holds channels 8j..8j+3."""
        low, high = _scaled_planes(words, scale, zero)
        return gl.reshape(gl.join(low, high), [words.shape[0], 2 * words.shape[1]])

    @gluon.jit
    def _w4a8_wgmma_kernel(a_ptr, w_ptr, gs_ptr, gz_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr,
                           count_ptr, M, N, K, stride_am, stride_wk, stride_gk, stride_om, K_PER_SPLIT,
                           GROUP_SIZE: gl.constexpr, HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr,
                           SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, LEVEL_BUFS: gl.constexpr):
        # Words and group tensors are N-major: word j of row n at n + j * stride_wk, group g's at n + g * stride_gk.
        WARPS: gl.constexpr = gl.num_warps()
        pid_n, pid_m, pid_k, n0, k_start, steps = _program_tile(K, K_PER_SPLIT, BLOCK_N)

        # 16-byte copies of the activations
        a_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // _BLOCK_K, _BLOCK_K // 16], [WARPS, 1], [1, 0])
        offs_am = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_copy))
        offs_ak = gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, a_copy))
        offs_wk, offs_wn, offs_gn = _weight_copy_offsets(n0, BLOCK_N)

        swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        swizzled_words: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        a_s, w_s, gs_s, gz_s = _ring(BLOCK_M, BLOCK_N, STAGES)
        levels_s = gl.allocate_shared_memory(gl.int8, [LEVEL_BUFS, BLOCK_N, _BLOCK_K], swizzled)

        # Widening: a thread owns one output row (n) and a run of its words, so its level words are contiguous
        # along K (16-byte stores; the swizzle spreads the rows' stores over all banks).
        WARPS_N: gl.constexpr = min(WARPS, BLOCK_N // 32)
        WARPS_K: gl.constexpr = WARPS // WARPS_N
        words_layout: gl.constexpr = gl.BlockedLayout([1, _BLOCK_K // 8 // WARPS_K], [32, 1], [WARPS_N, WARPS_K],
                                                      [1, 0])
        levels_layout: gl.constexpr = gl.BlockedLayout([1, _BLOCK_K // 4 // WARPS_K], [32, 1], [WARPS_N, WARPS_K],
                                                       [1, 0])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                              instr_shape=[16, BLOCK_N, 32])
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, acc_layout)
        for step in gl.static_range(STAGES - 1):
            _copy_step(step, steps, a_ptr, w_ptr, gs_ptr, gz_ptr, a_s, w_s, gs_s, gz_s, offs_am, offs_ak, offs_wk,
                       offs_wn, offs_gn, M, stride_am, stride_wk, stride_gk, k_start, GROUP_SIZE, STAGES)
        for i in range(_loop_steps(steps, WARPS > 4)):
            s, words, scale, zero = _landed_step(i, w_s, gs_s, gz_s, words_layout, STAGES)
            level_words = gl.convert_layout(_scaled_levels(words, scale, zero), levels_layout)
            if LEVEL_BUFS == 1:  # the previous wgmma still reads the one buffer
                acc = warpgroup_mma_wait(0, deps=[acc])
                _every_warpgroup_waited()
            levels = levels_s.index(i % LEVEL_BUFS)
            if _REINTERPRET:
                level_words_s = levels.reinterpret(gl.int32, [BLOCK_N, _BLOCK_K // 4], swizzled_words)
            else:
                level_words_s = levels._reinterpret(gl.int32, [BLOCK_N, _BLOCK_K // 4], swizzled_words)
            level_words_s.store(level_words.to(gl.int32, bitcast=True))
            fence_async_shared()
            _barrier()
            acc = warpgroup_mma(a_s.index(s), levels.permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            _every_warpgroup_waited()  # (the copy below refills the stage of that wgmma's activations)
            # step i - 1's wgmma has retired, so its stage takes step i + STAGES - 1
            _copy_step(i + STAGES - 1, steps, a_ptr, w_ptr, gs_ptr, gz_ptr, a_s, w_s, gs_s, gz_s, offs_am, offs_ak,
                       offs_wk, offs_wn, offs_gn, M, stride_am, stride_wk, stride_gk, k_start, GROUP_SIZE, STAGES)
        acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)

        _finish(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr, count_ptr, M, N, stride_om, pid_n, pid_m,
                pid_k, HAS_ROW_SCALE, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)

    @gluon.jit
    def _w4a8_wgmma_swap_kernel(a_ptr, w_ptr, gs_ptr, gz_ptr, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr,
                                count_ptr, M, N, K, stride_am, stride_wk, stride_gk, stride_om, K_PER_SPLIT,
                                GROUP_SIZE: gl.constexpr, HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr,
                                SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                STAGES: gl.constexpr, WORDS_LAYOUT: gl.constexpr, CHUNKS_LAYOUT: gl.constexpr,
                                NATURAL: gl.constexpr):
        # The weights are the wgmma's A operand, straight from registers: [BLOCK_N, 128] per K step, 64 rows per
        # warpgroup, against the activations as B [128, BLOCK_M] (the tokens are the MMA's N: 16..128).
        WARPS: gl.constexpr = gl.num_warps()
        pid_n, pid_m, pid_k, n0, k_start, steps = _program_tile(K, K_PER_SPLIT, BLOCK_N)

        # A thread's A fragment holds, per 32 channels of the MMA's K (kappa), the 4-channel chunks c and c + 4
        # (c = lane % 4) of its rows; it widens word c of each 32 channels of the weights, whose low nibbles are
        # channels 8c..8c+3 and high ones 8c+4..8c+7. So kappa chunk u of each 32 is channel chunk 2 (u % 4) + u // 4
        # of the activations, which the 4-byte copies gather into the swizzled B tile in that order. NATURAL: the
        # activations in channel order (16-byte copies); each word goes to both lanes of a pair, which widen its low
        # and its high nibbles (chunks 2j and 2j + 1). That costs shuffles but fewer registers: a 128 x 128 tile of 4
        # warps fits in 254 without spills (gathered: 255 and 280 bytes spilled), and H200 gate_up at 128 rows took
        # 38.5 µs against 54.7 for the best gathered tile (docs/benchmarks.md, session 33).
        if NATURAL:
            a_copy: gl.constexpr = gl.BlockedLayout([1, 16], [32 * 16 // _BLOCK_K, _BLOCK_K // 16], [WARPS, 1],
                                                    [1, 0])
            offs_ak = gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, a_copy))
        else:
            a_copy: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [WARPS, 1], [1, 0])
            kappa = gl.arange(0, _BLOCK_K, layout=gl.SliceLayout(0, a_copy))
            chunk = (kappa % 32) // 4
            offs_ak = gl.max_contiguous(gl.multiple_of(
                kappa // 32 * 32 + (chunk % 4 * 2 + chunk // 4) * 4 + kappa % 4, 4), 4)
        offs_am = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, a_copy))
        offs_wk, offs_wn, offs_gn = _weight_copy_offsets(n0, BLOCK_N)
        a_s, w_s, gs_s, gz_s = _ring(BLOCK_M, BLOCK_N, STAGES)

        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                              instr_shape=[16, BLOCK_M, 32])
        a_operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=4)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.int32, acc_layout)
        in_flight = gl.zeros([BLOCK_N, _BLOCK_K // 4], gl.uint32, CHUNKS_LAYOUT)
        for step in gl.static_range(STAGES - 1):
            _copy_step(step, steps, a_ptr, w_ptr, gs_ptr, gz_ptr, a_s, w_s, gs_s, gz_s, offs_am, offs_ak, offs_wk,
                       offs_wn, offs_gn, M, stride_am, stride_wk, stride_gk, k_start, GROUP_SIZE, STAGES)
        for i in range(_loop_steps(steps, NATURAL)):
            s, words, scale, zero = _landed_step(i, w_s, gs_s, gz_s, WORDS_LAYOUT, STAGES)
            if NATURAL:
                # chunk u of the channels is plane u % 2 of word u // 2: each word to the two lanes that take it
                pairs = gl.convert_layout(gl.reshape(gl.join(words, words), [BLOCK_N, _BLOCK_K // 4]), CHUNKS_LAYOUT)
                u = gl.arange(0, _BLOCK_K // 4, layout=gl.SliceLayout(0, CHUNKS_LAYOUT))
                scale = gl.convert_layout(scale, gl.SliceLayout(1, CHUNKS_LAYOUT))
                zero = gl.convert_layout(zero, gl.SliceLayout(1, CHUNKS_LAYOUT))
                chunks = gluon_level_words((pairs >> (u % 2 * 4)[None, :].to(gl.uint32)) & 0x0F0F0F0F, scale,
                                           gluon_level_offset(scale, zero))
            else:
                low, high = _scaled_planes(words, scale, zero)
                # word 4i + c's planes h -> kappa chunk 8i + 4h + c, then its bytes in order: the A fragment
                chunks = gl.join(gl.reshape(low, [BLOCK_N, 4, 4]), gl.reshape(high, [BLOCK_N, 4, 4]))
                chunks = gl.convert_layout(gl.reshape(gl.permute(chunks, (0, 1, 3, 2)), [BLOCK_N, _BLOCK_K // 4]),
                                           CHUNKS_LAYOUT)
            levels = gl.join(gl.join(chunks & 0xFF, (chunks >> 16) & 0xFF), gl.join((chunks >> 8) & 0xFF, chunks >> 24))
            levels = gl.convert_layout(gl.reshape(levels, [BLOCK_N, _BLOCK_K]).to(gl.int8), a_operand)
            acc = warpgroup_mma(levels, a_s.index(s).permute((1, 0)), acc, is_async=True)
            # the previous step's wgmma has retired: its stage takes step i + STAGES - 1 and its registers are free
            # (kept alive until here as the level words they are: the wait takes no 8-bit operands)
            acc, in_flight = warpgroup_mma_wait(1, deps=[acc, in_flight])
            in_flight = chunks
            _every_warpgroup_waited()  # (the copy below refills the stage of that wgmma's activations)
            _copy_step(i + STAGES - 1, steps, a_ptr, w_ptr, gs_ptr, gz_ptr, a_s, w_s, gs_s, gz_s, offs_am, offs_ak,
                       offs_wk, offs_wn, offs_gn, M, stride_am, stride_wk, stride_gk, k_start, GROUP_SIZE, STAGES)
        acc, in_flight = warpgroup_mma_wait(0, deps=[acc, in_flight])
        async_copy.wait_group(0)
        _finish(gl.permute(acc, (1, 0)), out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr, count_ptr, M, N,
                stride_om, pid_n, pid_m, pid_k, HAS_ROW_SCALE, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)

    @gluon.jit
    def _finish(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, ws_ptr, count_ptr, M, N, stride_om, pid_n, pid_m,
                pid_k, HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """The tile's int32 sums acc [BLOCK_M, BLOCK_N] (any layout) scaled into out, after the other K splits'."""
        WARPS: gl.constexpr = gl.num_warps()
        out_layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // BLOCK_N, BLOCK_N // 4], [WARPS, 1], [1, 0])
        acc = gl.convert_layout(acc, out_layout)
        n0 = pid_n * BLOCK_N
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT_K > 1:
            # Each split stores its partial sums in its own slice of the workspace [SPLIT_K, M, N]; the last split
            # to arrive (per-tile counter) adds the others' and stores the tile. (Atomic adds into one slice, as
            # splitk_gemm.split_k_store does, cost 2x the whole GEMM on 64-row tiles: L2 atomic throughput.)
            tile = pid_m * gl.num_programs(0) + pid_n
            gl.store(ws_ptr + (pid_k * M + offs_m[:, None]).to(gl.int64) * N + offs_n[None, :], acc, mask=mask)
            _barrier()  # every thread's partial sums are out before this program counts itself in
            arrived = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                for split in gl.static_range(SPLIT_K):
                    if split != pid_k:  # read at L2 (.cg), past stale L1 lines
                        acc += gl.load(ws_ptr + (split * M + offs_m[:, None]).to(gl.int64) * N + offs_n[None, :],
                                       mask=mask, other=0, cache_modifier=".cg")
                _store_scaled(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, mask, stride_om,
                              HAS_ROW_SCALE, HAS_BIAS)
                gl.store(count_ptr + tile, 0)  # every split has counted itself in
        else:
            _store_scaled(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, mask, stride_om,
                          HAS_ROW_SCALE, HAS_BIAS)

    @gluon.jit
    def _store_scaled(acc, out_ptr, scale_ptr, row_scale_ptr, bias_ptr, offs_m, offs_n, M, mask, stride_om,
                      HAS_ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr):
        """int8_gemm.store_scaled's arithmetic: acc * scale[n] (* row_scale[m]) + bias[n] in float32, unfused
        (whole BLOCK_N tiles: the columns need no mask)."""
        out = acc.to(gl.float32) * gl.load(scale_ptr + offs_n)[None, :]
        if HAS_ROW_SCALE:
            out = out * gl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=1.0)[:, None]
        if HAS_BIAS:
            out = out + gl.load(bias_ptr + offs_n).to(gl.float32)[None, :]
        gl.store(out_ptr + offs_m[:, None].to(gl.int64) * stride_om + offs_n[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)


def wgmma_device(device: torch.device) -> bool:
    """Whether CUDA ``device`` runs the Gluon Hopper kernels: Gluon's Hopper API in this Triton and an sm90 GPU."""
    return _sm90_with_gluon(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm90_with_gluon(index: int) -> bool:
    return gluon is not None and torch.cuda.get_device_capability(index) == (9, 0)


def wgmma_applies(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_size: int,
                  levels_fit_bytes: bool, config: dict) -> bool:
    """Whether a WGMMA tile can run these operands; the launcher runs the Triton loop of the same tile otherwise.
    Needs: a Hopper GPU with Gluon; whole K steps and groups (K and the group size multiples of 128, or one group
    per row); whole BLOCK_N tiles; N-major words and group tensors (the plugin's GPU layout); activation rows
    16-byte aligned (cp.async); levels within a byte per code (format.levels_fit_bytes)."""
    k = a_q.shape[1]
    n = w_words.shape[0]
    return (a_q.is_cuda and wgmma_device(a_q.device)
            and levels_fit_bytes and k % BLOCK_K == 0 and (group_size == 0 or group_size % BLOCK_K == 0)
            and n % config["BLOCK_N"] == 0 and w_words.stride(0) == 1 and group_scale.stride(0) == 1
            and a_q.stride(1) == 1 and a_q.stride(0) % 16 == 0 and a_q.data_ptr() % 16 == 0)


def _swap_layouts(block_n: int, warps: int, natural: bool = False) -> dict:
    """The swapped kernel's register layouts of a K step's weight words [BLOCK_N, 16] and of their level words in
    the wgmma's channel order [BLOCK_N, 32]: thread (warp w, lane l) holds 4-channel chunks l % 4 + 4t (t = 0..7)
    of rows 16w + l // 4 and + 8 (and + 16 * warps ...), the rows and chunks of the wgmma's A fragment (PTX ISA,
    wgmma .m64nNk32 register fragment for 8-bit A). Its words: 4i + l % 4 (i = 0..3), both nibbles of each (the
    activations gathered to match); natural: (l % 4) // 2 + 2t, the lanes 2x and 2x + 1 holding the same."""
    rows = [[16 * warps << t, 0] for t in range((block_n // (16 * warps)).bit_length() - 1)]
    lanes = [[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]]
    warp_rows = [[16 << t, 0] for t in range(warps.bit_length() - 1)]
    words = gl.DistributedLinearLayout([[8, 0], [0, 2], [0, 4], [0, 8]] + rows, [[0, 0], [0, 1]] + lanes[2:],
                                       warp_rows, [], [block_n, 16]) if natural else \
        gl.DistributedLinearLayout([[8, 0], [0, 4], [0, 8]] + rows, lanes, warp_rows, [], [block_n, 16])
    return dict(WORDS_LAYOUT=words,
                CHUNKS_LAYOUT=gl.DistributedLinearLayout([[0, 4], [8, 0], [0, 8], [0, 16]] + rows, lanes, warp_rows,
                                                         [], [block_n, 32]))


def w4a8_wgmma(a_q: torch.Tensor, w_words: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
               group_size: int, w_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
               row_scale: torch.Tensor | None, config: dict) -> torch.Tensor:
    """out [M, N] = a_q int8 [M, K] @ levels^T * w_scale[n] (* row_scale[m]) (+ bias[n]) with a WGMMA tile on
    operands wgmma_applies accepts. ``config``: num_stages, SPLIT_K (0 = automatic) and either BLOCK_M 64 per 4
    warps, BLOCK_N 32, 64 or 128 and LEVEL_BUFS (weights widened into shared memory), or SWAP_AB with BLOCK_N a
    multiple of 16 * num_warps (64 weight rows per warpgroup, from registers), BLOCK_M 16, 32, 64 or 128 (the
    tokens) and NATURAL_K (activations in channel order) or not."""
    from vllm_outliertune.kernels.splitk_gemm import scratch_workspace, split_k_plan  # (Triton code)

    (m, k), n = a_q.shape, w_words.shape[0]
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    warps = config.get("num_warps", 4)
    swap = bool(config.get("SWAP_AB"))
    if swap and (block_n % (16 * warps) or block_m not in (16, 32, 64, 128) or warps not in (4, 8)):
        raise ValueError(f"WGMMA SWAP_AB tile {config}: BLOCK_N must be a multiple of 16 * num_warps (4 or 8) and "
                         "BLOCK_M 16, 32, 64 or 128")
    if not swap and (block_m != 16 * warps or block_n not in (32, 64, 128)):
        raise ValueError(f"WGMMA tile {config}: BLOCK_M must be 16 * num_warps (64 per warpgroup) and BLOCK_N "
                         "32, 64 or 128")
    grid_n, grid_m = n // block_n, triton.cdiv(m, block_m)
    # split_k_plan's per-tile counters (zeroed); the partial sums go to slices of a scratch buffer instead
    split_k, k_per_split, _, counters = split_k_plan(m, n, k, grid_n * grid_m, BLOCK_K, config, a_q.device)
    partial_sums = scratch_workspace(split_k * m * n, a_q.device) if split_k > 1 else None
    natural = bool(config.get("NATURAL_K"))
    variant = dict(_swap_layouts(block_n, warps, natural), NATURAL=natural) if swap \
        else dict(LEVEL_BUFS=config.get("LEVEL_BUFS", 2))
    kernel = _w4a8_wgmma_swap_kernel if swap else _w4a8_wgmma_kernel
    kernel[(grid_n, grid_m, split_k)](
        a_q, w_words, group_scale, group_zero, out, w_scale, row_scale, bias, partial_sums, counters, m, n, k,
        # (one group per row: no group stride, so that the group bytes' copies are known to be aligned)
        a_q.stride(0), w_words.stride(1), group_scale.stride(1) if group_scale.shape[1] > 1 else 0, out.stride(0),
        k_per_split,
        GROUP_SIZE=group_size or k, HAS_ROW_SCALE=row_scale is not None, HAS_BIAS=bias is not None,
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=config.get("num_stages", 4), num_warps=warps,
        enable_fp_fusion=False, **variant)
    return out
