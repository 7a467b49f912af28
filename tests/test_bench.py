"""The GPU benchmark scripts run only on the device machine; what they compute from its output is checked here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def e2e_gpu():
    spec = importlib.util.spec_from_file_location("e2e_gpu", BENCH / "e2e_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel, kind", [
    # Names seen in the H100 profile of vLLM 0.26 (inductor names fused kernels after the ops they contain).
    ("_splitk_gemm_kernel", "our int8 GEMMs"),
    ("_int8_gemm_tma_kernel", "our int8 GEMMs"),
    ("triton_red_fused__to_copy_clamp_fused_add_rms_norm_int8_gemm_round_sub_1", "RMSNorm + quant (fused by inductor)"),
    ("triton_poi_fused__to_copy_clamp_int8_gemm_mul_round_silu_slice_sub_2", "SiLU-mul + quant (fused by inductor)"),
    ("triton_poi_fused__to_copy_clamp_int8_gemm_round_view_0", "activation quant (inductor, standalone)"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90", "attention"),
    ("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT", "cuBLAS / other GEMM (lm_head)"),
    ("triton_poi_fused_4", "everything else"),
])
def test_profile_kernel_kinds(e2e_gpu, kernel, kind):
    assert e2e_gpu._kind(kernel) == kind


def test_kernel_times_sum_kernel_events(e2e_gpu, tmp_path):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "name": "a", "dur": 2.0}, {"cat": "kernel", "name": "a", "dur": 3.0},
        {"cat": "cpu_op", "name": "a", "dur": 100.0}, {"cat": "kernel", "name": "b", "dur": 1.5}]}))
    assert e2e_gpu._kernel_times(trace) == {"a": 5.0, "b": 1.5}


def test_weight_only_baseline_groups_with_a_short_last_group():
    """The weight-only W4 RTN baseline of docs/accuracy.md: each group of a row (the last one shorter, as with
    SmolLM2's K = 576 at group size 128) is on its own 16-level grid, within half a step of the weight."""
    import torch

    spec = importlib.util.spec_from_file_location("weight_only_baseline", BENCH / "weight_only_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weight = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
    rounded = module.rtn_weight_only(weight, 128)
    for group, original in ((rounded[:, :128], weight[:, :128]), (rounded[:, 128:], weight[:, 128:])):
        step = (original.amax(1) - original.amin(1)) / 15
        assert all(len(row.unique()) <= 16 for row in group)
        assert ((group - original).abs() <= step[:, None] * 0.5 + 1e-6).all()
