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
    ("_w4a8_wgmma_kernel", "our W4A8 GEMMs"),
    ("_w4a8_wgmma_swap_kernel", "our W4A8 GEMMs"),
    ("triton_red_fused__to_copy_clamp_fused_add_rms_norm_int8_gemm_round_sub_1", "RMSNorm + quant (fused by inductor)"),
    ("triton_poi_fused__to_copy_clamp_int8_gemm_mul_round_silu_slice_sub_2", "SiLU-mul + quant (fused by inductor)"),
    ("triton_poi_fused__to_copy_clamp_int8_gemm_round_view_0", "activation quant (inductor, standalone)"),
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90", "attention"),
    ("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT", "cuBLAS / other GEMM (lm_head)"),
    ("triton_poi_fused_4", "everything else"),
    ("_guard_fixup_kernel", "our token-guard fix-up (after the guard in parts)"),
    # vLLM's fp8 row (H200 profile, session 21)
    ("void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t", "CUTLASS fp8 (vLLM's fp8 row)"),
    ("triton_red_fused__to_copy_abs_clamp_cutlass_scaled_mm_div_fused_add_rms_norm_1",
     "RMSNorm / SiLU-mul + fp8 quant (fused by inductor)"),
])
def test_profile_kernel_kinds(e2e_gpu, kernel, kind):
    assert e2e_gpu._kind(kernel) == kind


def test_rates_are_medians_of_repeats_with_their_spread(e2e_gpu):
    assert e2e_gpu.median_spread([300.0, 330.0, 270.0]) == (300.0, 0.2)
    assert e2e_gpu.median_spread([5.0]) == (5.0, 0.0)


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


@pytest.mark.parametrize("lm_head", ["none", "int8"])
def test_synthetic_checkpoint_has_a_real_quantizes_tensors(e2e_gpu, tmp_path, monkeypatch, lm_head):
    """make8b --synthetic (the speed rows' W8A8 / W4A8 checkpoints): every tensor a real quantize of the architecture
    writes, at the big model's shapes and dtypes, values the format accepts, and one set of input vectors per shared
    input (vLLM's merged q/k/v and gate/up loaders refuse differing ones); with --lm-head int8 also lm_head's."""
    import torch
    from safetensors import safe_open

    from vllm_outliertune import format as fmt

    monkeypatch.setitem(e2e_gpu.LLAMA3_8B, "hidden_size", 256)
    monkeypatch.setitem(e2e_gpu.LLAMA3_8B, "intermediate_size", 384)
    monkeypatch.setitem(e2e_gpu.LLAMA3_8B, "num_hidden_layers", 3)
    monkeypatch.setitem(e2e_gpu.LLAMA3_8B, "vocab_size", 600)
    e2e_gpu._make8b(tmp_path, w4a8=True, synthetic=True, lm_head=lm_head)

    def tensors(directory):
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found |= {name: f.get_tensor(name) for name in f.keys()}
        return found

    suffix = "" if lm_head == "none" else "-lmhead"
    for name in (f"w8a8{suffix}", f"w4a8{suffix}"):
        out_dir, layout_dir = tmp_path / f"llama3-8b-{name}", tmp_path / f"layout-{name}" / "quantized"
        config = json.loads((out_dir / "config.json").read_text())
        spec = fmt.QuantizationConfig.from_dict(config["quantization_config"])
        fmt.validate_checkpoint_dir(out_dir, spec)
        synthetic, layout = tensors(out_dir), tensors(layout_dir)
        for layer in range(3):
            names = {n.replace("model.layers.0.", f"model.layers.{layer}.") for n in layout if ".layers.0." in n}
            assert names <= set(synthetic), names - set(synthetic)
            assert all(synthetic[n].dtype == layout[n.replace(f".layers.{layer}.", ".layers.0.")].dtype for n in names)
        assert synthetic["model.layers.1.mlp.gate_proj.weight_scale"].shape == (384,)
        assert spec.quantized_lm_head == (lm_head == "int8")
        if spec.quantized_lm_head:
            assert synthetic["lm_head.weight"].dtype == torch.int8 and synthetic["lm_head.weight"].shape == (600, 256)
        shared = 0
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            for suffix in ("input_shift", "input_inv_scale"):  # present where the quantize wrote them
                vectors = [synthetic.get(f"model.layers.2.{module}.{suffix}") for module in group]
                if vectors[0] is not None:
                    assert all(torch.equal(vectors[0], v) for v in vectors[1:]), f"{group} {suffix}"
                    shared += 1
        assert shared, "no shared input vectors to compare"


def test_w4a8_refine_ships_only_clear_wins_and_gives_a_gemm_winner_the_bucket():
    spec = importlib.util.spec_from_file_location("w4a8_refine", BENCH / "w4a8_refine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from vllm_outliertune.kernels import configs

    tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "FACTORED": 1, "num_warps": 4, "num_stages": 4}
    shape = "N=4096,K=14336"  # the H200 table lists w4a8_splitk for it at 16 and 64
    summary = [
        {"kernel": "w4a8_splitk", "n": 4096, "k": 14336, "m": 16, "shipped_us": 30.0, "best_us": 29.5,
         "best": dict(tile, WORD_LEVELS=1)},  # within 3 %: stays
        {"kernel": "w4a8_splitk", "n": 4096, "k": 14336, "m": 64, "shipped_us": 45.0, "best_us": 40.0,
         "best": dict(tile, SPLIT_K=4)},  # beaten by w4a8_gemm below
        {"kernel": "w4a8_gemm", "n": 4096, "k": 14336, "m": 64, "shipped_us": 45.0, "best_us": 30.0,
         "best": dict(tile, BLOCK_M=64, WORD_LEVELS=1)}]
    before = configs.load_table()["devices"]["NVIDIA H200"]
    device = module.refined_table(summary, "NVIDIA H200")["devices"]["NVIDIA H200"]
    assert device["w4a8_splitk"][shape]["16"] == before["w4a8_splitk"][shape]["16"]
    assert device["w4a8_gemm"][shape]["64"] == dict(tile, BLOCK_M=64, WORD_LEVELS=1)
    assert "64" not in device["w4a8_splitk"][shape]  # else the dispatch would still run split-K at M = 64
    assert "64" in configs.load_table()["devices"]["NVIDIA H200"]["w4a8_splitk"][shape]  # the cached table intact
    # an int8 fallback winner takes its bucket from split-K the same way (bench/splitk_refine.py --tiles full)
    int8_shape = "N=28672,K=4096"  # the H200 table lists split-K for it at 16
    gemm_tile = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    device = module.refined_table([
        {"kernel": "splitk_gemm", "n": 28672, "k": 4096, "m": 16, "shipped_us": 30.0, "best_us": 29.0, "best": tile},
        {"kernel": "int8_gemm", "n": 28672, "k": 4096, "m": 16, "shipped_us": 30.0, "best_us": 25.0,
         "best": gemm_tile}], "NVIDIA H200")["devices"]["NVIDIA H200"]
    assert device["int8_gemm"][int8_shape]["16"] == gemm_tile and "16" not in device["splitk_gemm"][int8_shape]


def test_make8b_sizes_give_each_models_gemm_shapes(e2e_gpu, tmp_path):
    """make8b --shape: the Llama config it writes has the per-rank GEMM shapes of the model it stands for (qkv, o,
    gate_up, down at TP 1), which is what its end-to-end rows measure."""
    from vllm_outliertune.kernels.shapes import model_shapes

    want = {"llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
            "qwen2.5-7b": [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)]}
    assert set(e2e_gpu.MODEL_SIZES) == set(want)
    for name, sizes in e2e_gpu.MODEL_SIZES.items():
        config = dict(sizes, architectures=["LlamaForCausalLM"], model_type="llama")
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert sorted(model_shapes(tmp_path / name, [1])[0][1]) == sorted(want[name]), name


def test_l2_prefetch_takes_only_a_tensor_that_fills_one_span():
    """bench/l2_prefetch.py prefetches a weight's memory span from its first element: a permuted view (the W4A8
    words, stored N-major) fills one span and passes (nothing to launch at 0 bytes); a slice with gaps does not."""
    import torch

    spec = importlib.util.spec_from_file_location("l2_prefetch", BENCH / "l2_prefetch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.l2_prefetch(torch.zeros(5, 3, dtype=torch.int32).t(), 0)
    module.l2_prefetch(torch.zeros(0, 3), 1 << 20)
    with pytest.raises(ValueError, match="does not fill one span"):
        module.l2_prefetch(torch.zeros(4, 6)[:, :3], 1 << 20)


def test_w4a8_backends_hand_vllm_the_weight_our_format_stands_for():
    """bench/w4a8_backends.py gives vLLM's 4-bit GEMMs our packed weight: its int8 levels are format.packed_levels'
    (the int8 column's weight), its K-packed words hold channel k of row n at bits 4 * (k % 8) of word [k // 8, n]
    (GPTQ's layout, which Marlin's repack and Machete's prepack take), and Machete's pre-scaled zero points give
    (code - zero) * s_g * w_scale back."""
    import torch

    from vllm_outliertune.format import pack_int4, packed_levels

    spec = importlib.util.spec_from_file_location("w4a8_backends", BENCH / "w4a8_backends.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = module.random_w4(48, 3 * module.GROUP_SIZE, device="cpu")
    assert torch.equal(module.levels(w).short(), packed_levels(pack_int4(w["codes"]), w["scale"], w["zero"],
                                                               module.GROUP_SIZE))
    words = module.k_packed(w["codes"])
    assert words.shape == (3 * module.GROUP_SIZE // 8, 48) and words.dtype == torch.int32
    k = torch.arange(3 * module.GROUP_SIZE)
    unpacked = (words[k // 8].long() >> (4 * (k % 8))[:, None]) & 15
    assert torch.equal(unpacked.t(), w["codes"].long())
    scales = module.group_scales(w, torch.float32)  # [groups, N]
    weight = (w["codes"].float().t().reshape(3, module.GROUP_SIZE, 48) * scales[:, None, :]
              - (w["zero"].t().float() * scales)[:, None, :]).reshape(-1, 48).t()
    assert torch.allclose(weight, module.levels(w).float() * w["w_scale"][:, None], rtol=1e-6, atol=1e-6)


def test_ship_runner_ups_lists_the_triton_kernel_of_cutlass_buckets_where_it_beats_the_tiled_gemm():
    spec = importlib.util.spec_from_file_location("ship_runner_ups", BENCH / "ship_runner_ups.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from vllm_outliertune.kernels import linear, tune

    state = tune.TuneState.load(None)
    tma = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    plain = dict(tma, BLOCK_N=128, num_warps=4)
    for kernel, config, times in (("int8_gemm", plain, (100.0, 400.0, 800.0)),
                                  ("int8_gemm_tma", tma, (90.0, 450.0, 700.0)),
                                  ("cutlass_scaled_mm", {}, (80.0, 300.0, 600.0))):
        for m, us in zip((1024, 4096, 8192), times):
            state.add(("GPU X", kernel, 4112, 4096, m), "full", [(us, config)])
    shipped = {"cutlass_scaled_mm": {"N=4112,K=4096": {"1024": {}, "4096": {}, "8192": {}}, "default": {"1024": {}}},
               "int8_gemm_tma": {"N=4112,K=4096": {"8192": tma}}}
    # 1024: TMA beats the tiled GEMM; 4096: it does not; 8192: already listed; "default" from the shapes searched
    # in full (this one)
    assert module.runner_ups(state, shipped, "GPU X") == {"int8_gemm_tma": {"N=4112,K=4096": {"1024": tma},
                                                                            "default": {"1024": tma}}}
    # the shipped H200 entries have them: without CUTLASS, Llama-3-8B's down_proj at 4096 rows runs the TMA GEMM
    h200 = ("NVIDIA H200", "sm90", "default")
    assert linear._pick_kernel(4096, 4096, 14336, h200, lambda: True) == "int8_gemm_tma"
    assert linear._pick_kernel(4096, 4096, 14336, h200, lambda: False) == "int8_gemm"


def test_wgmma_ship_takes_clear_wins_and_alternates_chosen_on_the_tuned_shapes(tmp_path, monkeypatch):
    """bench/w4a8_wgmma.py ship: a tuned shape's bucket goes to its best WGMMA tile only where that beats the
    shipped dispatch by SHIP_GAIN (a w4a8_unpack listing there is dropped); the load-pick alternates are the tiles
    that cover the tuned shapes, whatever the held-out shapes would have preferred."""
    import sys

    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("w4a8_wgmma", BENCH / "w4a8_wgmma.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from vllm_outliertune.kernels import configs

    table = tmp_path / "tile_configs.json"
    shipped = json.loads(configs.TABLE_PATH.read_text())
    for options in shipped["alternates"]["NVIDIA H200"].values():  # as before any WGMMA tile was shipped
        options[:] = [option for option in options if not option[1].get("WGMMA")]
    table.write_text(json.dumps(shipped))
    monkeypatch.setattr(configs, "TABLE_PATH", table)
    narrow, wide, held_out_best = "wg64_64_3_1_4", "wg64_128_4_2_1", "wg64_32_3_1_8"
    rows = [{"n": n, "k": k, "m": 64, "shipped": 10.0, "int8": 9.0, narrow: 8.0 if n < 8192 else 12.0,
             wide: 12.0 if n < 8192 else 8.0, held_out_best: 11.0} for n, k in module.TUNED]
    rows[0]["shipped"] = 8.1  # qkv: within 3 % of its best tile, keeps what it runs
    rows += [{"n": n, "k": k, "m": 64, "shipped": 10.0, "int8": 9.0, narrow: 9.0, wide: 9.0, held_out_best: 1.0}
             for n, k in module.HELD_OUT]
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps(rows))
    before = json.loads(table.read_text())
    module.ship(timings, "NVIDIA H200")
    after = json.loads(table.read_text())
    device, old = after["devices"]["NVIDIA H200"], before["devices"]["NVIDIA H200"]
    assert device["w4a8_splitk"]["N=6144,K=4096"].get("64") == old["w4a8_splitk"]["N=6144,K=4096"].get("64")
    assert device["w4a8_splitk"]["N=4096,K=4096"]["64"] == module.config_of(narrow)
    assert device["w4a8_splitk"]["N=28672,K=4096"]["64"] == module.config_of(wide)
    assert "64" not in device.get("w4a8_unpack", {}).get("N=4096,K=4096", {})
    added = after["alternates"]["NVIDIA H200"]["64"][len(before["alternates"]["NVIDIA H200"]["64"]):]
    assert [config for _, config in added][:2] in ([module.config_of(narrow), module.config_of(wide)],
                                                   [module.config_of(wide), module.config_of(narrow)])
    assert all(kernel == "w4a8_splitk" for kernel, _ in added)
    sys.modules.pop("ship_w4a8_small_m", None)  # imported from bench/ for this test only
