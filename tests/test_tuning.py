"""Tile lookup order (device name, chip family, shape-generic default; user table over the shipped one), the
tuner's bookkeeping (state file, winners, generic default, quick candidates), per-rank model shapes, the external
GEMM dispatch and `outliertune tune` without CUDA. All CPU: the tuner's timing loop itself needs a GPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vllm_outliertune.kernels import configs, linear, tune
from vllm_outliertune.kernels.shapes import ShapeError, linear_shapes, model_shapes, parse_shapes

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
H100_KEYS = (H100, "sm90", "default")
H200_KEYS = (H200, "sm90", "default")
H800_KEYS = ("NVIDIA H800", "sm90", "default")  # a GPU of the family that no shipped entry names
L40S_KEYS = ("NVIDIA L40S", "sm89", "default")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)


def tile(bm: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


@pytest.fixture
def user_table(tmp_path, monkeypatch):
    """Point the plugin at a user table in tmp_path (absent until written); caches cleared around the test."""
    path = tmp_path / "user" / "tile_configs.json"
    monkeypatch.setenv(configs.USER_TABLE_ENV, str(path))
    configs.clear_caches()
    yield path
    configs.clear_caches()


def source_device(kernel, keys, n, k):
    return configs.find_entry(kernel, keys, n, k)


def test_lookup_order_device_then_family_then_generic(user_table):
    families = configs.load_table()["families"]
    assert families[H100] == "sm90" and families[H200] == "sm90"
    # No entry for the H800: a shape that a GPU of its family tuned comes from the first one that did...
    assert configs.lookup_order(H800_KEYS) == ("NVIDIA H800", H100, H200, "sm90", "default")
    assert source_device("int8_gemm", H800_KEYS, 6144, 4096) == (H100, "N=6144,K=4096")
    assert source_device("int8_gemm", H800_KEYS, 3072, 4096) == (H200, "N=3072,K=4096")  # tuned on the H200 only
    assert configs.tile_source(6144, 4096, H800_KEYS) == f"tiles tuned on {H100!r}"
    # ...an untuned shape takes the family's shape-generic tiles, another chip family the portable default.
    assert source_device("int8_gemm", H800_KEYS, 5008, 4000) == (H100, "default")
    assert configs.tile_source(5008, 4000, H800_KEYS) == f"the shape-generic tiles of {H100!r}"
    assert source_device("int8_gemm", L40S_KEYS, 6144, 4096) == ("default", "default")
    assert configs.tile_source(3072, 4096, H200_KEYS) is None and configs.tile_source(6144, 4096, H100_KEYS) is None

    tune.write_table(user_table, "NVIDIA H800", {"int8_gemm": {"N=4112,K=4096": {"16": tile(16)},
                                                               "default": {"16": tile(32)}}}, "sm90")
    configs.clear_caches()
    assert configs.lookup_order(H800_KEYS) == ("NVIDIA H800", H100, H200, "sm90", "default")
    assert configs.get_config("int8_gemm", 5, 4112, 4096, H800_KEYS) == tile(16)  # own tuned shape
    assert source_device("int8_gemm", H800_KEYS, 6144, 4096) == (H100, "N=6144,K=4096")  # exact shape first
    assert configs.get_config("int8_gemm", 5, 5008, 4000, H800_KEYS) == tile(32)  # own generic tiles
    assert configs.tile_source(4112, 4096, H800_KEYS) is None
    # the H800 tuned this shape: none of its kernels come from another GPU's entries (no TMA listed here)
    assert source_device("int8_gemm_tma", H800_KEYS, 4112, 4096) is None
    # The H100 now sees the H800's tuned shape as a family sibling's.
    assert source_device("int8_gemm", H100_KEYS, 4112, 4096) == ("NVIDIA H800", "N=4112,K=4096")


def test_user_table_replaces_shipped_entries_shape_by_shape(user_table):
    before = configs.get_config("int8_gemm", 4096, 4096, 4096, (H100, "sm90", "default"))
    tune.write_table(user_table, H100, {"int8_gemm": {"N=6144,K=4096": {"4096": tile(64)}}})
    configs.clear_caches()
    keys = (H100, "sm90", "default")
    assert configs.get_config("int8_gemm", 4096, 6144, 4096, keys) == tile(64)
    assert configs.get_config("int8_gemm", 4096, 4096, 4096, keys) == before  # other shapes: shipped
    assert configs.load_table()["devices"][H100]["int8_gemm"]["N=6144,K=4096"] != {"4096": tile(64)}  # untouched


def test_external_gemm_dispatch_only_where_registered_and_listed(user_table, monkeypatch):
    tune.write_table(user_table, "NVIDIA H800", {"int8_gemm": {"default": {"16": tile(16)}},
                                                 "cutlass_scaled_mm": {"N=4112,K=4096": {"1024": {}, "2048": {}}}})
    configs.clear_caches()
    yes = lambda *_: True  # noqa: E731
    assert linear._pick_kernel(4096, 4112, 4096, H800_KEYS, yes, yes) == "int8_gemm"  # not registered
    monkeypatch.setitem(linear._EXTERNAL_GEMMS, "cutlass_scaled_mm", linear.ExternalGemm(None, yes))
    assert linear._pick_kernel(4096, 4112, 4096, H800_KEYS, yes, yes) == "cutlass_scaled_mm"  # above: largest
    assert linear._pick_kernel(17, 4112, 4096, H800_KEYS, yes, yes) == "cutlass_scaled_mm"  # in bucket 1024
    assert linear._pick_kernel(16, 4112, 4096, H800_KEYS, yes, yes) == "int8_gemm"  # int8_gemm's bucket 16
    assert linear._pick_kernel(4096, 4112, 4096, H800_KEYS, yes, lambda name: False) == "int8_gemm"  # unsupported
    # a shape the H800 entry does not list: all its kernels from the H100 entry (same family), which has no CUTLASS
    assert linear._pick_kernel(4096, 6144, 4096, H800_KEYS, yes, yes) == "int8_gemm_tma"
    assert linear._pick_kernel(4096, 4112, 4096, L40S_KEYS, yes, yes) == "int8_gemm"  # listed for sm90 only
    # an untuned shape on the H100: its own shape-generic entries (no CUTLASS), not the H200's generic CUTLASS listing
    assert configs.find_entry("cutlass_scaled_mm", H200_KEYS, 5008, 4000) == (H200, "default")
    assert configs.find_entry("cutlass_scaled_mm", H100_KEYS, 5008, 4000) is None
    with pytest.raises(ValueError, match="unknown external GEMM"):
        linear.register_external_gemm("cublas", linear.ExternalGemm(None, yes))


def results(**per_kernel):
    """{kernel: {m: [(µs, config)]}} from kernel=[(m, µs, tile_bm), ...]."""
    out = {}
    for kernel, rows in per_kernel.items():
        for m, us, bm in rows:
            out.setdefault(kernel, {}).setdefault(m, []).append((us, tile(bm)))
    return out


def test_dispatch_runs_each_buckets_own_winner(user_table, monkeypatch):
    """Every bucket runs the kernel the table lists there, also where the winners alternate with M."""
    tune.write_table(user_table, "NVIDIA H800", {
        "int8_gemm": {"N=4112,K=4096": {str(m): tile(64) for m in (1, 4, 16, 64, 256, 1024, 4096)}},
        "splitk_gemm": {"N=4112,K=4096": {"1": tile(16), "16": tile(16)}},
        "int8_gemm_tma": {"N=4112,K=4096": {"1024": tile(128)}},
        "cutlass_scaled_mm": {"N=4112,K=4096": {"64": {}, "4096": {}}}})
    configs.clear_caches()
    monkeypatch.setitem(linear._EXTERNAL_GEMMS, "cutlass_scaled_mm", linear.ExternalGemm(None, lambda *_: True))
    yes = lambda *_: True  # noqa: E731
    picked = {m: linear._pick_kernel(m, 4112, 4096, H800_KEYS, yes, yes)
              for m in (1, 2, 4, 5, 16, 17, 64, 65, 256, 257, 1024, 1025, 4096, 9999)}
    assert picked == {1: "splitk_gemm", 2: "int8_gemm", 4: "int8_gemm", 5: "splitk_gemm", 16: "splitk_gemm",
                      17: "cutlass_scaled_mm", 64: "cutlass_scaled_mm", 65: "int8_gemm", 256: "int8_gemm",
                      257: "int8_gemm_tma", 1024: "int8_gemm_tma", 1025: "cutlass_scaled_mm",
                      4096: "cutlass_scaled_mm", 9999: "cutlass_scaled_mm"}
    # TMA not possible for these operands: its bucket falls back to the tiled GEMM's tiles for that bucket
    assert linear._pick_kernel(1000, 4112, 4096, H800_KEYS, lambda: False, yes) == "int8_gemm"
    assert configs.get_config("int8_gemm_tma", 1000, 4112, 4096, H800_KEYS) == tile(128)
    assert configs.get_config("splitk_gemm", 9, 4112, 4096, H800_KEYS) == tile(16)


def test_cutlass_bias_is_cast_once_per_bias():
    from vllm_outliertune.cutlass import _bias_as

    bias = torch.randn(48)
    first = _bias_as(bias, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, bias.to(torch.bfloat16))
    assert _bias_as(bias, torch.bfloat16) is first  # cached: no cast kernel on later calls
    assert _bias_as(bias, torch.float16).dtype == torch.float16
    bias.add_(1.0)  # changed in place (e.g. weights reloaded): cast again
    assert torch.equal(_bias_as(bias, torch.bfloat16), bias.to(torch.bfloat16))


def test_table_entries_pick_winners_per_bucket(user_table, monkeypatch):
    r = results(int8_gemm=[(1, 10, 16), (1, 12, 32), (4, 10, 16), (16, 10, 16), (1024, 100, 64), (2048, 200, 64),
                           (4096, 400, 64)],
                splitk_gemm=[(1, 5, 1), (4, 11, 4), (16, 5, 16)],  # wins at 1 and 16, loses at 4
                int8_gemm_tma=[(1024, 90, 128), (2048, 190, 128), (4096, 300, 128)],
                cutlass_scaled_mm=[(1024, 95, 0), (2048, 150, 0), (4096, 250, 0)])
    entries = tune.table_entries(r)
    assert entries["int8_gemm"]["1"] == tile(16) and set(entries["int8_gemm"]) == {"1", "4", "16", "1024", "2048",
                                                                                   "4096"}
    assert list(entries["splitk_gemm"]) == ["1", "16"]  # wins at 1 and 16, loses at 4
    assert list(entries["cutlass_scaled_mm"]) == ["2048", "4096"]  # 95 µs at 1024 loses to TMA's 90
    # TMA wins 1024, and at 2048 / 4096 it runs where CUTLASS is missing: it beats the tiled GEMM there
    assert list(entries["int8_gemm_tma"]) == ["1024", "2048", "4096"]
    assert entries["int8_gemm_tma"]["2048"] == tile(128)
    r["int8_gemm_tma"][2048] = [(210.0, tile(128))]  # slower than the tiled GEMM: CUTLASS alone lists 2048
    assert list(tune.table_entries(r)["int8_gemm_tma"]) == ["1024", "4096"]
    assert tune.triton_runner_up({"int8_gemm": (5.0, {}), "splitk_gemm": (4.0, {}), "cutlass_scaled_mm": (3.0, {})},
                                 "cutlass_scaled_mm", "int8_gemm") is None  # split-K comes before CUTLASS
    # the dispatch of those entries: CUTLASS where it is registered, else the TMA GEMM, else the tiled one
    tune.write_table(user_table, "NVIDIA H800", {kernel: {"N=4112,K=4096": per_m} for kernel, per_m in entries.items()},
                     "sm90")
    configs.clear_caches()
    yes, no = (lambda *_: True), (lambda *_: False)  # noqa: E731
    assert [linear._pick_kernel(m, 4112, 4096, H800_KEYS, yes) for m in (1024, 2048, 4096)] == ["int8_gemm_tma"] * 3
    assert linear._pick_kernel(2048, 4112, 4096, H800_KEYS, no) == "int8_gemm"
    monkeypatch.setitem(linear._EXTERNAL_GEMMS, "cutlass_scaled_mm", linear.ExternalGemm(None, yes))
    assert [linear._pick_kernel(m, 4112, 4096, H800_KEYS, yes, yes) for m in (1024, 2048, 4096)] == \
        ["int8_gemm_tma", "cutlass_scaled_mm", "cutlass_scaled_mm"]
    assert tune.table_entries(results(int8_gemm=[(1, 10, 16)], splitk_gemm=[(1, 11, 1)]))["splitk_gemm"] == {}
    assert "cutlass_scaled_mm" not in tune.table_entries(results(int8_gemm=[(1, 10, 16)]))  # not timed: no entry


def test_state_resumes_and_default_comes_from_full_searches(tmp_path):
    path = tmp_path / "state.jsonl"
    state = tune.TuneState.load(path)
    for (n, k), fast in (((64, 64), 16), ((128, 64), 16), ((256, 64), 32)):
        state.add(("GPU", "int8_gemm", n, k, 16), "full",
                  [(1.0 if bm == fast else 2.0 + bm / 100, tile(bm)) for bm in (16, 32, 64)])
    state.add(("GPU", "int8_gemm", 512, 64, 16), "quick", [(0.5, tile(64))])
    again = tune.TuneState.load(path)
    assert again.records == state.records
    assert again.has(("GPU", "int8_gemm", 64, 64, 16), "quick")  # a full search serves a quick one
    assert not again.has(("GPU", "int8_gemm", 512, 64, 16), "full")  # a quick one does not serve a full one
    assert not again.has(("GPU", "int8_gemm", 64, 64, 32), "quick")
    entries = tune.device_entries(again, "GPU")["int8_gemm"]
    assert entries["N=512,K=64"] == {"16": tile(64)}
    # geometric mean over the three full searches: 16 wins on two shapes, 32 on one
    assert entries["default"] == {"16": tile(16)}
    # a second kernel enters the default where its geometric mean beats the tiled GEMM's best, even if not on every
    # shape: split-K at 2x faster on two shapes, 1.1x slower on the third
    for (n, k), ratio in (((64, 64), 0.5), ((128, 64), 0.5), ((256, 64), 1.1)):
        again.add(("GPU", "splitk_gemm", n, k, 16), "full", [(ratio, tile(1))])
    entries = tune.device_entries(again, "GPU")["splitk_gemm"]
    assert entries["default"] == {"16": tile(1)} and entries["N=256,K=64"] == {}
    assert tune.ranked_config([again.results("GPU", 64, 64), again.results("GPU", 256, 64)], "int8_gemm", 16, 1) \
        == tile(32)


def test_alternates_cover_the_spread_and_start_with_the_generic_choice():
    """Greedy cover: the geometric-mean winner first, then the tile that most helps the shapes it serves worst; only
    small-M buckets, only (kernel, tile) pairs timed on every shape."""
    spread = [results(int8_gemm=[(1, 10, 16), (1, 11, 32), (1, 30, 64), (512, 50, 64)], splitk_gemm=[(1, 20, 1)]),
              results(int8_gemm=[(1, 10, 16), (1, 11, 32), (1, 30, 64), (512, 50, 64)], splitk_gemm=[(1, 20, 1)]),
              results(int8_gemm=[(1, 30, 16), (1, 11, 32), (1, 30, 64), (512, 50, 64)], splitk_gemm=[(1, 5, 1)])]
    alternates = tune.generic_alternates(spread, count=2)
    assert list(alternates) == ["1"]  # 512 > ALTERNATES_UP_TO_M
    # tile 32 wins the geometric mean (11 / 11 / 11; tile 16: 10 / 10 / 30, split-K 20 / 20 / 5); split-K then
    # rescues the third shape (11 -> 5) more than tile 16 helps the first two (11 -> 10)
    assert alternates["1"] == [["int8_gemm", tile(32)], ["splitk_gemm", tile(1)]]
    assert tune.generic_alternates(spread, count=1)["1"] == [["int8_gemm", tile(32)]]


def test_load_time_pick_serves_an_untuned_shape_from_the_fastest_alternative(user_table, monkeypatch):
    from vllm_outliertune.kernels import load_pick

    generic = {"int8_gemm": {"default": {"1": tile(16), "16": tile(16), "1024": tile(128)}},
               "splitk_gemm": {"default": {"1": tile(1)}}, "int8_gemm_tma": {"default": {"1024": tile(128)}}}
    tuned = {"int8_gemm": {"N=4112,K=4096": {"1": tile(32), "16": tile(32)}}}
    tune.write_table(user_table, "NVIDIA H800", generic, "sm90",
                     alternates={"1": [["int8_gemm", tile(64)], ["int8_gemm", tile(32)]],
                                 "16": [["int8_gemm", tile(16)], ["splitk_gemm", tile(16)]]})
    tune.write_table(user_table, "NVIDIA H800", tuned)
    configs.clear_caches()
    assert configs.alternates(H800_KEYS)["16"][1] == ["splitk_gemm", tile(16)]
    times = {("splitk_gemm", 1, 1): 9.0, ("int8_gemm", 1, 64): 7.0, ("int8_gemm", 1, 16): 8.0,  # 64 wins at 1
             ("int8_gemm", 16, 16): 5.0, ("splitk_gemm", 16, 16): 6.0}  # the current choice stays at 16
    timed = []

    def fake_timer(kernel, config, m):
        timed.append((kernel, m, config["BLOCK_M"]))
        return times.get((kernel, m, config["BLOCK_M"]))

    entries, picked = load_pick.pick_entries(5008, 4000, H800_KEYS, fake_timer)
    assert picked == {"1": "int8_gemm", "16": "int8_gemm"}
    # at M = 1 the generic split-K ran before: timed too (first), beaten, its bucket dropped
    assert timed[0] == ("splitk_gemm", 1, 1) and entries["splitk_gemm"] == {}
    assert entries["int8_gemm"] == {"1": tile(64), "16": tile(16), "1024": tile(128)}
    assert entries["int8_gemm_tma"] == {"1024": tile(128)}  # large M: as the generic entries run it
    configs.add_shape_entries("NVIDIA H800", 5008, 4000, entries)
    yes = lambda *_: True  # noqa: E731
    assert linear._pick_kernel(1, 5008, 4000, H800_KEYS, yes, yes) == "int8_gemm"
    assert configs.get_config("int8_gemm", 1, 5008, 4000, H800_KEYS) == tile(64)
    assert configs.tile_source(5008, 4000, H800_KEYS) is None  # served as tuned here from now on
    # a picked split-K owns its bucket (the fallback keeps a tile there for where split-K cannot run)
    times[("splitk_gemm", 16, 16)] = 1.0
    entries, picked = load_pick.pick_entries(6000, 4000, H800_KEYS, fake_timer)
    assert picked["16"] == "splitk_gemm" and entries["splitk_gemm"] == {"16": tile(16)}
    assert entries["int8_gemm"]["16"] == tile(16)
    assert load_pick.pick_entries(6000, 4000, H800_KEYS, lambda *_: None) is None  # nothing runs: no change
    # every option runs once (compiles) before any is timed for the pick: a first timing does not decide
    runs = []

    def fast_first_run(kernel, config, m):
        runs.append((kernel, m, config["BLOCK_M"]))
        if (kernel, m, config["BLOCK_M"]) == ("int8_gemm", 1, 32):
            return 1.0 if runs.count(("int8_gemm", 1, 32)) == 1 else 50.0
        return times.get((kernel, m, config["BLOCK_M"]))

    entries, _ = load_pick.pick_entries(7000, 4000, H800_KEYS, fast_first_run)
    assert entries["int8_gemm"]["1"] == tile(64) and runs.count(("int8_gemm", 1, 32)) == 2
    # a split-K alternative deeper than the shape's K is also timed with BLOCK_K cut to K's power of two
    deep = dict(tile(1), BLOCK_K=4096)
    tune.write_table(user_table, "NVIDIA H800", generic, "sm90", alternates={"1": [["splitk_gemm", deep]]})
    configs.clear_caches()
    depths = []

    def shallow_wins(kernel, config, m):
        depths.append(config["BLOCK_K"])
        return 1.0 if config["BLOCK_K"] == 2048 else 9.0

    entries, picked = load_pick.pick_entries(4096, 2000, H800_KEYS, shallow_wins)
    assert picked == {"1": "splitk_gemm"} and entries["splitk_gemm"]["1"] == dict(deep, BLOCK_K=2048)
    assert load_pick.fitted_to_depth("splitk_gemm", deep, 4096) == []  # shapes of the tuned depth time it as it is
    assert load_pick.fitted_to_depth("int8_gemm", deep, 2000) == []
    # deeper than the tuned depth: also timed with SPLIT_K scaled by K / TUNED_DEPTH (a power of two), so that each
    # program's K loop keeps its length (H200, 4096x14336 at M = 4: SPLIT_K 4 of the alternative's tile ran 27.9 µs
    # against 33.2 with SPLIT_K 1)
    tensor_core = dict(tile(16), SPLIT_K=1, BLOCK_K=256)
    assert load_pick.fitted_to_depth("splitk_gemm", tensor_core, 14336) == \
        [["splitk_gemm", dict(tensor_core, SPLIT_K=4)]]
    assert load_pick.fitted_to_depth("splitk_gemm", dict(tensor_core, SPLIT_K=2), 7168) == \
        [["splitk_gemm", dict(tensor_core, SPLIT_K=4)]]
    assert load_pick.fitted_to_depth("splitk_gemm", dict(tensor_core, SPLIT_K=0), 14336) == []  # automatic split
    tune.write_table(user_table, "NVIDIA H800", generic, "sm90", alternates={"4": [["splitk_gemm", tensor_core]]})
    configs.clear_caches()
    entries, picked = load_pick.pick_entries(4096, 14336, H800_KEYS,
                                             lambda kernel, config, m: 1.0 if config.get("SPLIT_K") == 4 else 9.0)
    assert picked == {"4": "splitk_gemm"} and entries["splitk_gemm"]["4"] == dict(tensor_core, SPLIT_K=4)
    # a tuned shape, a CPU tensor and OUTLIERTUNE_LOAD_PICK=0 are left alone
    monkeypatch.setattr(configs, "table_keys", lambda device: H800_KEYS)
    cuda = SimpleNamespace(type="cuda")
    assert load_pick.pick_untuned_shape(4112, 4096, cuda) is None
    assert load_pick.pick_untuned_shape(6000, 4000, torch.device("cpu")) is None
    monkeypatch.setenv(load_pick.LOAD_PICK_ENV, "0")
    assert load_pick.pick_untuned_shape(6000, 4000, cuda) is None


def test_shipped_table_has_a_fallback_tile_for_every_shape_and_m():
    """Each weight format's fallback (int8_gemm, w4a8_gemm) runs wherever the bucket's winner cannot, so on every
    device of the shipped table that has the format it must list tiles for the shape-generic entry, and any shape
    entry of it must list some (an empty one has no tile for any M). Alternates name known kernels."""
    table = configs.load_table()
    for device, kernels in table["devices"].items():
        for fallback, order in configs.DISPATCH_ORDER.items():
            if not any(kernel in kernels for kernel in (fallback, *order)):
                continue
            assert kernels.get(fallback, {}).get("default"), (device, fallback)
            assert all(kernels[fallback].values()), (device, fallback)
    known = set(configs.KERNELS + configs.EXTERNAL_KERNELS + configs.W4A8_KERNELS)
    for per_bucket in table["alternates"].values():
        assert all(kernel in known for options in per_bucket.values() for kernel, _ in options)


def test_shipped_shapes_leave_large_m_to_the_large_m_kernels(user_table):
    """A shape entry lists the kernels of its format that serve it (the others are not used there), so one that
    lists only the small-M split-K kernel would run split-K tiles on every prefill (the H200's TP 2 W4A8 entries
    did until session 15). Every shipped shape, and the shape-generic entry, dispatches M >= 256 elsewhere; a W4A8
    WGMMA tile (kernels/w4a8_wgmma.py, a tensor-core tile of up to 128 rows, timed there: session 32) may serve the
    256 bucket (129-256 rows, vLLM's largest decode batch by default), nothing larger."""
    table = configs.load_table()
    for device, kernels in table["devices"].items():
        keys = (device, "default") if device != "default" else ("default",)
        for fallback, order in configs.DISPATCH_ORDER.items():
            for shape in {shape for kernel in (fallback, *order) for shape in kernels.get(kernel, {})}:
                n, k = (5008, 4000) if shape == "default" else (int(part.split("=")[1]) for part in shape.split(","))
                for m in (256, 1024, 16384):
                    running = next(iter(configs.kernels_for(m, n, k, keys, fallback)), fallback)
                    wgmma = running == "w4a8_splitk" and configs.get_config(running, m, n, k, keys).get("WGMMA")
                    assert running not in ("splitk_gemm", "w4a8_splitk") or (m == 256 and wgmma), (
                        device, shape, m, running)


def test_partial_tunes_are_completed_from_the_generic_tiles(user_table):
    """`tune --only w4a8_splitk --buckets 1` on a shape no table lists: the written entry keeps the tuned split-K
    tile at M = 1 and takes the rest of the format's dispatch from what the shape ran before (here the H200's
    generic W4A8 tiles, of the H800's chip family), so large M runs the widening pass, not split-K. A complete
    entry is written as tuned."""
    shape = "N=5008,K=4000"
    partial = {"w4a8_splitk": {shape: {"1": tile(1)}}, "w4a8_gemm": {shape: {"1": tile(16)}}}
    written = tune.complete_entries(json.loads(json.dumps(partial)), H800_KEYS)
    tune.write_table(user_table, "NVIDIA H800", written, "sm90")
    configs.clear_caches()
    assert configs.get_config("w4a8_splitk", 1, 5008, 4000, H800_KEYS) == tile(1)
    assert configs.kernels_for(1, 5008, 4000, H800_KEYS, "w4a8_gemm") == ("w4a8_splitk",)
    for m in (256, 8192):
        assert configs.kernels_for(m, 5008, 4000, H800_KEYS, "w4a8_gemm") == ("w4a8_unpack",)
    generic_unpack = configs.load_table()["devices"][H200]["w4a8_unpack"]["default"]
    assert written["w4a8_unpack"][shape] == generic_unpack  # (it lists no bucket the tune timed)
    complete = {"int8_gemm": {"N=4112,K=4096": {str(m): tile(16) for m in tune.KERNEL_BUCKETS["int8_gemm"]}}}
    assert tune.complete_entries(json.loads(json.dumps(complete)), H800_KEYS) == complete
    # the tuner's write after such a run (`tune --only w4a8_splitk --buckets 4` on another new shape) does the same
    state = tune.TuneState.load(user_table.with_name("state.jsonl"))
    state.add(("NVIDIA H800", "w4a8_splitk", 6000, 4000, 4), "quick", [(5.0, tile(4))])
    state.add(("NVIDIA H800", "w4a8_gemm", 6000, 4000, 4), "table", [(9.0, tile(16))])
    options = tune.TuneOptions(shapes=[(6000, 4000)], kernels=("w4a8_splitk",), buckets=[4], out=user_table)
    tune._write(options, state, "NVIDIA H800", "sm90")
    assert configs.get_config("w4a8_splitk", 4, 6000, 4000, H800_KEYS) == tile(4)
    assert configs.kernels_for(8192, 6000, 4000, H800_KEYS, "w4a8_gemm") == ("w4a8_unpack",)


def test_alternates_of_each_weight_format(tmp_path):
    """Packed 4-bit weights get alternates of their own kernels, chosen over the shapes their kernels were searched
    on, in the same per-bucket lists as the int8 ones (the load pick times those of the layer's format)."""
    spread = [results(w4a8_gemm=[(1, 40, 16)], w4a8_splitk=[(1, 10, 1), (1, 12, 4)]),
              results(w4a8_gemm=[(1, 40, 16)], w4a8_splitk=[(1, 30, 1), (1, 12, 4)])]
    assert tune.generic_alternates(spread, count=2, fallback="w4a8_gemm")["1"] == [
        ["w4a8_splitk", tile(4)], ["w4a8_splitk", tile(1)]]
    assert tune.generic_alternates(spread, count=2) == {}  # no int8 kernel timed
    state = tune.TuneState.load(tmp_path / "state.jsonl")
    for n, times in ((64, (10, 30, 9)), (128, (30, 10, 9))):
        state.add(("GPU", "int8_gemm", n, 64, 1), "full", [(times[0], tile(16)), (times[1], tile(32))])
        state.add(("GPU", "w4a8_gemm", n, 64, 1), "full", [(40, tile(16))])
        state.add(("GPU", "w4a8_splitk", n, 64, 1), "full", [(times[2], tile(1))])
    alternates = tune.device_alternates(state, "GPU")
    assert alternates["1"] == [["int8_gemm", tile(16)], ["int8_gemm", tile(32)], ["w4a8_splitk", tile(1)],
                               ["w4a8_gemm", tile(16)]]


def test_load_time_pick_of_packed_weights_times_their_kernels(user_table, monkeypatch):
    """A packed 4-bit weight's shape that no table tuned: the pick times the W4A8 alternatives and the W4A8 kernel
    the lookup runs now (never the int8 options of the same bucket), then serves the shape from the fastest; the
    plugin's warm-up asks for it with the layer's group size."""
    from vllm_outliertune import linear as plugin_linear
    from vllm_outliertune.kernels import load_pick

    generic = {"int8_gemm": {"default": {"1": tile(16)}},
               "w4a8_gemm": {"default": {"1": tile(16), "64": tile(64)}}, "w4a8_splitk": {"default": {"1": tile(1)}}}
    tune.write_table(user_table, "NVIDIA H800", generic, "sm90",
                     alternates={"1": [["int8_gemm", tile(32)], ["w4a8_splitk", tile(4)], ["w4a8_gemm", tile(32)]]})
    configs.clear_caches()
    timed = []

    def fake_timer(kernel, config, m):
        timed.append((kernel, config["BLOCK_M"]))
        times = {("w4a8_splitk", 1): 9.0, ("w4a8_splitk", 4): 5.0, ("w4a8_gemm", 32): 7.0}
        return times.get((kernel, config["BLOCK_M"]))

    entries, picked = load_pick.pick_entries(5008, 4000, H800_KEYS, fake_timer, load_pick.W4A8_KERNELS)
    assert picked == {"1": "w4a8_splitk"} and entries["w4a8_splitk"] == {"1": tile(4)}
    assert sorted(set(timed)) == [("w4a8_gemm", 32), ("w4a8_splitk", 1), ("w4a8_splitk", 4)]
    assert entries["w4a8_gemm"] == {"1": tile(16), "64": tile(64)} and entries["w4a8_unpack"] == {}
    timed.clear()
    int8_entries, _ = load_pick.pick_entries(5008, 4000, H800_KEYS, lambda kernel, config, m: 1.0)
    assert int8_entries["int8_gemm"]["1"] == tile(16) and "w4a8_gemm" not in int8_entries
    # the warm-up of a packed layer asks with the weight's logical shape [N, K] and its group size
    asked = []
    monkeypatch.setattr(plugin_linear, "pick_untuned_shape", lambda *args: asked.append(args))
    monkeypatch.setattr(plugin_linear, "_WARMED_UP", set())
    monkeypatch.setattr(plugin_linear.kernel_ops, "warm_up", lambda *args: 0)
    layer = SimpleNamespace(weight=torch.zeros(16, 2, dtype=torch.int32), weight_scale=torch.ones(16),
                            output_bias=torch.zeros(16), params_dtype=torch.bfloat16, max_rows=4)
    packed = linear.PackedGroups(torch.ones(16, 1, dtype=torch.uint8), torch.zeros(16, 1, dtype=torch.uint8), 16, 16)
    plugin_linear.OutlierTuneLinearMethod._warm_up(layer, packed)
    assert asked == [(16, 16, torch.device("cpu"), 16)]


def test_load_time_pick_operands_and_failures_do_not_stop_a_load(monkeypatch, caplog):
    """vLLM loads a model with a bf16 default dtype: the timing operands' vectors stay float32 there (the kernels
    refuse others). And a failing pick only logs: the shape runs its generic tiles."""
    from vllm_outliertune import linear as plugin_linear

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        p = tune.make_inputs(3, 16, 8, device="cpu")
    finally:
        torch.set_default_dtype(default)
    assert {p[name].dtype for name in ("inv_scale", "shift", "w_scale", "bias")} == {torch.float32}

    def broken(*_):
        raise RuntimeError("no GPU time today")

    monkeypatch.setattr(plugin_linear, "pick_untuned_shape", broken)
    monkeypatch.setattr(plugin_linear, "_WARMED_UP", set())
    layer = SimpleNamespace(weight=torch.zeros(16, 8, dtype=torch.int8), weight_scale=torch.ones(16),
                            output_bias=torch.zeros(16), params_dtype=torch.bfloat16, max_rows=4)
    with caplog.at_level("WARNING", logger="vllm.outliertune"):
        plugin_linear.OutlierTuneLinearMethod._warm_up(layer)
    assert "weight [16, 8]: the load-time tile choice failed (RuntimeError: no GPU time today)" in caplog.text


def _fake_timers(monkeypatch, times: dict, broken: dict | None = None) -> list:
    """Stub the tuner's GPU work: runners return their config, both timers look its BLOCK_M up in ``times``;
    returns the list of (timing, config) timed."""
    timed = []

    def fake_time(timing, config):
        if config == broken:
            raise RuntimeError("out of shared memory")
        timed.append((timing, config))
        return times[config["BLOCK_M"]]

    monkeypatch.setattr(tune, "graph_time_us", lambda fn, rep_ms: fake_time("graph", fn()))
    monkeypatch.setattr(tune, "stream_time_us", lambda launches: fake_time("stream", launches[0]()))
    monkeypatch.setattr(tune, "weight_copies", lambda args: [args, args])
    monkeypatch.setattr(tune, "runner", lambda kernel, args: lambda config: config)
    for name, stub in (("gemm_args", lambda *a: ()), ("kernel_applies", lambda *a: True), ("warm_gpu", lambda: None),
                       ("precompile", lambda *a: True)):
        monkeypatch.setattr(tune, name, stub)
    return timed


@pytest.mark.parametrize("m,timing", [(16, "stream"), (128, "graph")])
def test_full_search_resume_times_only_new_candidates_and_races_the_old_best(tmp_path, monkeypatch, m, timing):
    """A state from a tuner with fewer candidates (e.g. before a loop variant existed): a full search times the new
    tiles and the record's best again, keeps the other old times, and remembers tiles that failed to run. Decode
    buckets are timed streaming weight copies, larger ones as graph replays."""
    old, new_tile, broken = tile(16), tile(32), tile(64)
    monkeypatch.setattr(tune, "full_candidates", lambda kernel, m: [old, tile(128), new_tile, broken])
    timed = _fake_timers(monkeypatch, {16: 3.0, 32: 2.0}, broken)
    path = tmp_path / "state.jsonl"
    state = tune.TuneState.load(path)
    key = ("GPU", "int8_gemm", 64, 64, m)
    state.add(key, "full", [(1.0, old), (5.0, tile(128))], timing=timing)
    options = tune.TuneOptions(shapes=[(64, 64)], kernels=("int8_gemm",), buckets=[m], search="full", workers=0)
    bar = SimpleNamespace(update=lambda n: None, write=lambda text: None)

    tune._tune_shape(64, 64, [(64, 64, m, "int8_gemm")], options, "full", ("GPU", "sm90", "default"), state, None,
                     bar)
    assert timed == [(timing, old), (timing, new_tile)]  # the old best re-timed (3.0 now), the new tile (2.0) wins
    record = tune.TuneState.load(path).records[key]
    assert record["timings"] == [[2.0, new_tile], [3.0, old], [5.0, tile(128)]] and record["failed"] == [broken]
    assert record["timing"] == timing
    tune._tune_shape(64, 64, [(64, 64, m, "int8_gemm")], options, "full", ("GPU", "sm90", "default"),
                     tune.TuneState.load(path), None, bar)
    assert timed == [(timing, old), (timing, new_tile)]  # resumed again: nothing new, the failed tile not retried


def test_a_decode_bucket_timed_after_an_l2_flush_is_timed_again_streaming(tmp_path, monkeypatch):
    """States written before stream timing hold graph timings (no "timing" field) for decode buckets: resumed, those
    buckets are timed again, every candidate, so that kernels compared at one M were timed the same way."""
    timed = _fake_timers(monkeypatch, {16: 3.0, 32: 2.0})
    monkeypatch.setattr(tune, "full_candidates", lambda kernel, m: [tile(16), tile(32)])
    path = tmp_path / "state.jsonl"
    old_line = {"device": "GPU", "kernel": "int8_gemm", "n": 64, "k": 64, "m": 16, "search": "full",
                "timings": [[1.0, tile(16)], [5.0, tile(32)]]}
    path.write_text(json.dumps(old_line) + "\n")
    state = tune.TuneState.load(path)
    key = ("GPU", "int8_gemm", 64, 64, 16)
    assert state.has(key, "full", "graph") and not state.has(key, "full", "stream")
    options = tune.TuneOptions(shapes=[(64, 64)], kernels=("int8_gemm",), buckets=[16], search="full", workers=0)
    bar = SimpleNamespace(update=lambda n: None, write=lambda text: None)
    tune._tune_shape(64, 64, [(64, 64, 16, "int8_gemm")], options, "full", ("GPU", "sm90", "default"), state, None,
                     bar)
    assert timed == [("stream", tile(16)), ("stream", tile(32))]
    assert tune.TuneState.load(path).records[key]["timings"] == [[2.0, tile(32)], [3.0, tile(16)]]
    assert [tune.timing_method(m) for m in (1, 64, 128)] == ["stream", "stream", "graph"]


def test_quick_candidates_are_the_family_tiles_plus_the_spread_best(tmp_path, user_table):
    state = tune.TuneState(None)
    state.add(("NVIDIA H800", "int8_gemm", 64, 64, 16), "full", [(1.0, tile(16)), (2.0, tile(32))])
    quick = tune.quick_candidates("int8_gemm", 16, 4112, 4096, H800_KEYS, state, "NVIDIA H800")
    shipped = configs.load_table()["devices"]
    family_tiles = [per_m["16"] for device in (H100, H200) for per_m in shipped[device]["int8_gemm"].values()
                    if "16" in per_m]
    expected = {json.dumps(c, sort_keys=True) for c in family_tiles + [tile(16), tile(32)]}
    assert {json.dumps(c, sort_keys=True) for c in quick} == expected  # the family's tiles + the spread's
    # nothing known about this chip family: the full list (the portable default tile alone is no choice)
    assert tune.quick_candidates("splitk_gemm", 1, 8, 8, L40S_KEYS, tune.TuneState(None), "NVIDIA L40S") == \
        tune.splitk_candidates(1)


def test_tasks_time_int8_gemm_as_the_baseline_of_one_kernel():
    options = tune.TuneOptions(shapes=[(64, 64)], kernels=("splitk_gemm",), buckets=[1, 4, 16])
    assert tune._tasks(options) == [(64, 64, 1, "int8_gemm"), (64, 64, 1, "splitk_gemm"), (64, 64, 4, "int8_gemm"),
                                    (64, 64, 4, "splitk_gemm"), (64, 64, 16, "int8_gemm"),
                                    (64, 64, 16, "splitk_gemm")]
    every = tune._tasks(tune.TuneOptions(shapes=[(64, 64)]))
    assert {kernel for *_, kernel in every} == set(configs.KERNELS + configs.EXTERNAL_KERNELS)
    # a W4A8 kernel is timed against the W4A8 fallback, not the int8 GEMM
    w4 = tune._tasks(tune.TuneOptions(shapes=[(64, 64)], kernels=("w4a8_splitk",), buckets=[1, 256]))
    assert w4 == [(64, 64, 1, "w4a8_splitk"), (64, 64, 1, "w4a8_gemm")]
    for kernel in configs.W4A8_KERNELS:
        keys = {"BLOCK_N", "BLOCK_K", "num_warps"} if kernel == "w4a8_unpack" else tune.W4A8_TILE_KEYS
        for m in (1, 16, 4096):
            tiles = tune.full_candidates(kernel, m)
            assert tiles and all(set(c) <= keys and c["BLOCK_K"] % 2 == 0 for c in tiles)


def test_w4a8_winners_and_dispatch_per_format(user_table):
    """Each weight format's kernels compete among themselves; the W4A8 dispatch runs w4a8_splitk where it is listed
    at M's bucket, else w4a8_gemm."""
    r = results(int8_gemm=[(1, 5, 16), (16, 5, 16)], splitk_gemm=[(1, 4, 1)],
                w4a8_gemm=[(1, 30, 16), (16, 20, 16), (64, 25, 64)], w4a8_splitk=[(1, 10, 1), (16, 21, 16),
                                                                                 (64, 24, 16)])
    entries = tune.table_entries(r)
    assert list(entries["splitk_gemm"]) == ["1"] and set(entries["int8_gemm"]) == {"1", "16"}
    assert list(entries["w4a8_splitk"]) == ["1", "64"] and set(entries["w4a8_gemm"]) == {"1", "16", "64"}
    assert "w4a8_splitk" not in tune.table_entries(results(int8_gemm=[(1, 5, 16)]))
    tune.write_table(user_table, "NVIDIA H800", {kernel: {"N=4112,K=4096": per_m} for kernel, per_m in entries.items()},
                     "sm90")
    configs.clear_caches()
    picked = {m: next(iter(configs.kernels_for(m, 4112, 4096, H800_KEYS, "w4a8_gemm")), "w4a8_gemm")
              for m in (1, 2, 16, 17, 64, 100)}
    assert picked == {1: "w4a8_splitk", 2: "w4a8_gemm", 16: "w4a8_gemm", 17: "w4a8_splitk", 64: "w4a8_splitk",
                      100: "w4a8_splitk"}
    # from the bucket where widening to int8 levels first wins, the W4A8 dispatch runs it
    r["w4a8_unpack"] = {256: [(40.0, {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4})]}
    r["w4a8_gemm"][256] = [(90.0, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8))]
    entries = tune.table_entries(r)
    assert list(entries["w4a8_unpack"]) == ["256"]
    tune.write_table(user_table, "NVIDIA H800", {kernel: {"N=4112,K=4096": per_m} for kernel, per_m in entries.items()},
                     "sm90")
    configs.clear_caches()
    assert [next(iter(configs.kernels_for(m, 4112, 4096, H800_KEYS, "w4a8_gemm")), "w4a8_gemm")
            for m in (1, 200, 4096)] == ["w4a8_splitk", "w4a8_unpack", "w4a8_unpack"]
    assert configs.kernels_for(1, 4112, 4096, H800_KEYS) == ("splitk_gemm",)  # the int8 table is its own


def test_per_rank_shapes_of_a_model(tmp_path):
    assert list(linear_shapes(LLAMA3_8B, 1).values()) == [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    # the TP=2 shapes the issue found in no table
    assert list(linear_shapes(LLAMA3_8B, 2).values()) == [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]
    # 8 KV heads on 16 ranks: one (replicated) KV head per rank; explicit head_dim wins over hidden / heads
    assert linear_shapes({**LLAMA3_8B, "num_attention_heads": 32, "head_dim": 64}, 16)["qkv_proj"] == (256, 4096)
    # --lm-head int8 checkpoints: lm_head too, its vocabulary padded to 64 (as vLLM does) and split
    head = {**LLAMA3_8B, "vocab_size": 49155, "quantization_config": {"lm_head": "int8"}}
    assert linear_shapes(head, 2)["lm_head"] == (24608, 4096) and "lm_head" not in linear_shapes(LLAMA3_8B, 1)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "num_attention_heads": 28,
                                                      "num_key_value_heads": 4}))
    per_tp, notes = model_shapes(tmp_path, [1, 8])
    assert list(per_tp) == [1] and "tensor-parallel size 8" in notes[0] and "28 attention heads" in notes[0]
    with pytest.raises(ShapeError, match="tensor-parallel size 8"):
        model_shapes(tmp_path, [8])
    with pytest.raises(ShapeError, match="not found"):
        model_shapes(tmp_path / "absent", [1])
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ShapeError, match="no 'intermediate_size'"):
        model_shapes(tmp_path, [1])
    assert parse_shapes("6144x4096, 4096X4096") == [(6144, 4096), (4096, 4096)]
    for bad in ("6144", "0x4", "axb", ""):
        with pytest.raises(ShapeError, match="NxK"):
            parse_shapes(bad)


def test_untuned_shapes_are_reported_once_in_one_line(user_table, monkeypatch, caplog):
    from vllm_outliertune import linear as plugin_linear

    monkeypatch.setattr(configs, "table_keys", lambda device: H800_KEYS)
    tune.write_table(user_table, "NVIDIA H800", {"int8_gemm": {"N=4112,K=4096": {"16": tile(16)}}}, "sm90")
    configs.clear_caches()
    int8 = [(4112, 4096, "int8_gemm"), (6144, 4096, "int8_gemm"), (5008, 4000, "int8_gemm")]
    monkeypatch.setattr(plugin_linear, "_NEW_SHAPES", dict.fromkeys(int8))
    monkeypatch.setattr(plugin_linear, "_TUNE_HINT", [("/models/llama", 2)])
    line = plugin_linear.report_untuned_shapes(SimpleNamespace(type="cuda"))
    assert line == (f"outliertune: no GEMM tiles tuned on NVIDIA H800 for weight shapes [6144, 4096] (tiles tuned on "
                    f"{H100!r}), [5008, 4000] (the shape-generic tiles of {H100!r}); tune them on this GPU "
                    "(minutes) with `outliertune tune /models/llama --tp 2` (until then each runs the fastest of a few "
                    "generic tiles per small M, timed at load)")
    assert plugin_linear.report_untuned_shapes(SimpleNamespace(type="cuda")) is None  # reported once
    # packed 4-bit weights are looked up in their own kernels' entries: the int8-tuned shape is untuned for them
    monkeypatch.setattr(plugin_linear, "_NEW_SHAPES", {(4112, 4096, "w4a8_gemm"): None})
    line = plugin_linear.report_untuned_shapes(SimpleNamespace(type="cuda"))
    assert "[4112, 4096] (4-bit) (the shape-generic tiles of" in line and "--tp 2 --w4a8`" in line
    assert plugin_linear.report_untuned_shapes(torch.device("cpu")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA GPU")
def test_tune_without_cuda_fails_with_one_clear_line(tmp_path, capsys):
    from vllm_outliertune.cli import main as cli_main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert cli_main(["tune", str(tmp_path), "--tp", "1,2", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("outliertune tune: error: no CUDA GPU here"), err
    assert not (tmp_path / "t.json").exists()
    assert cli_main(["tune", str(tmp_path / "absent")]) == 2
    assert "config.json" in capsys.readouterr().err


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_linear(m: int, k: int, n: int, seed: int) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randint(-127, 128, (m, k), generator=g, device="cuda", dtype=torch.int8),
            torch.randint(-127, 128, (n, k), generator=g, device="cuda", dtype=torch.int8),
            torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-4, torch.randn(n, generator=g, device="cuda"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k,n", [(1024, 4096, 6144), (4096, 14336, 4096), (77, 4096, 1024), (8192, 2048, 4096)])
def test_gpu_cutlass_backend_matches_reference(m, k, n, user_table, monkeypatch):
    """vLLM's CUTLASS GEMM through our contract: against the exact int32 product with the fp32 epilogue it may
    differ only by the bf16 rounding of its output and bias; the dispatch sends a listed (shape, M) there."""
    from vllm_outliertune import cutlass
    from vllm_outliertune.kernels import torch_ref

    monkeypatch.setattr(linear, "_EXTERNAL_GEMMS", {})  # registered for this test only
    if not cutlass.register():
        pytest.skip("vLLM's CUDA build with cutlass_scaled_mm is not installed")
    a_q, w_q, w_scale, bias = random_linear(m, k, n, seed=m + k)
    reference = torch_ref.int8_gemm_ref(a_q, w_q, w_scale, bias, torch.float32)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    out.copy_(cutlass.cutlass_gemm(a_q, w_q, w_scale, bias, torch.bfloat16))
    assert not out.isnan().any()
    assert ((out.float() - reference).norm() / reference.norm()).item() < 3e-3
    device_key, family, _ = configs.table_keys(a_q.device)
    tune.write_table(user_table, device_key, {"cutlass_scaled_mm": {configs.shape_key(n, k): {
        str(2 ** e): {} for e in range(6, 15)}}}, family)
    configs.clear_caches()
    assert linear._pick_kernel(m, n, k, configs.table_keys(a_q.device), lambda: True,
                               lambda name: True) == "cutlass_scaled_mm"
    assert torch.equal(linear.int8_gemm(a_q, w_q, w_scale, bias, torch.bfloat16), out)


@pytest.mark.gpu
@gpu
def test_gpu_tune_writes_a_table_the_dispatch_uses_and_resumes(tmp_path, user_table):
    from vllm_outliertune.kernels import torch_ref

    options = tune.TuneOptions(shapes=[(256, 512)], buckets=[1, 16, 256], search="quick", out=user_table,
                               rep_ms=2.0, workers=2)
    tune.run_tune(options)
    state_file = user_table.with_name(user_table.name + ".state.jsonl")
    lines = state_file.read_text().splitlines()
    device_key, family, _ = configs.table_keys(torch.device("cuda"))
    table = json.loads(user_table.read_text())
    assert table["families"][device_key] == family
    assert set(table["devices"][device_key]["int8_gemm"]["N=256,K=512"]) == {"1", "16", "256"}
    assert configs.tile_source(256, 512, configs.table_keys(torch.device("cuda"))) is None
    tune.run_tune(options)  # resumed: everything is in the state already
    assert state_file.read_text().splitlines() == lines
    for m in (1, 16, 200):
        a_q, w_q, w_scale, bias = random_linear(m, 512, 256, seed=m)
        assert torch.equal(linear.int8_gemm(a_q, w_q, w_scale, bias, torch.bfloat16),
                           torch_ref.int8_gemm_ref(a_q, w_q, w_scale, bias, torch.bfloat16))


def test_weight_copies_hold_other_weights_past_the_l2():
    codes, w_q = torch.zeros(1, 64, dtype=torch.int8), torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    args = (codes, w_q, torch.ones(32), None)
    copies = tune.weight_copies(args, total_bytes=32 * 64 * 20)
    assert len(copies) == 20 and copies[0] is args
    assert all(c[0] is codes and c[2] is args[2] and c[1].shape == w_q.shape and c[1].dtype == torch.int8
               for c in copies)
    assert not torch.equal(copies[1][1], w_q)  # a weight of its own, so that it is read from memory again
    assert len(tune.weight_copies(args, total_bytes=1.0)) == 8  # at least 8
    words = torch.zeros(32, 8, dtype=torch.int32)  # a packed W4A8 weight: its copies are other random words
    packed = tune.weight_copies((codes, words, "scales", "zeros", 128, None, None), total_bytes=32 * 8 * 4 * 9)
    assert len(packed) == 9 and all(c[1].dtype == torch.int32 and c[2:] == ("scales", "zeros", 128, None, None)
                                    for c in packed) and packed[1][1].any()
