"""Tools behind docs/accuracy.md: the dynamic per-token baseline, the static-plan emulation (fake quant in fp32)
of `outliertune diagnose`, and --keep-fp16. CPU only, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_outliertune.cli import main as cli_main
from vllm_outliertune.offline.fakequant import StaticPlanLinear, per_token_fake_quantize
from vllm_outliertune.offline.fold import FoldedLinear
from vllm_outliertune.offline.model_io import UserError
from vllm_outliertune.offline.reference import ReferenceQuantLinear
from vllm_outliertune.format import QuantizationConfig, validate_linear
from vllm_outliertune.offline.calibrate import InputStats
from vllm_outliertune.offline.search import search_plan
from vllm_outliertune.offline.symmetrize import ChannelPlan, outlier_channels, with_exact
from vllm_outliertune.offline.weights import WeightFormat, checkpoint_tensors, quantize_rtn


def test_per_token_fake_quantize():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=generator) * torch.tensor([1.0, 10.0, 0.01, 100.0, 3.0])[:, None]
    for bits in (8, 6):
        qmax = 2 ** (bits - 1) - 1
        step = x.abs().amax(-1, keepdim=True) / qmax
        fq = per_token_fake_quantize(x, bits)
        assert torch.allclose(fq.abs().amax(-1), x.abs().amax(-1))  # each row's absmax is a grid point
        assert ((fq - x).abs() <= step / 2 + 1e-6 * step).all()
        assert torch.allclose(fq / step, torch.round(fq / step), atol=1e-4)


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("exact", [None, [3, 50]])
def test_static_plan_emulation_equals_checkpoint_arithmetic(bits, exact):
    """StaticPlanLinear on x gives what the checkpoint's integer linear gives on the folded input x / fold, also
    with exact channels (int8 columns zero, a floating-point side GEMM; 3 slots of which 2 used)."""
    generator = torch.Generator().manual_seed(1)
    in_features, out_features = 70, 24  # K not a multiple of 64
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    x = torch.randn(9, in_features, generator=generator) * (torch.rand(in_features, generator=generator) * 5)
    x[:, 3] += 40.0  # a shifted outlier channel
    x[0, 50] = 500.0  # a massive activation on the first token
    step = x.abs().amax(0) / 60 + 1e-3
    shift = torch.round(x.mean(0) / step)
    plan = with_exact(ChannelPlan(fold=step, inv_scale=None, shift=shift), exact and torch.tensor(exact))
    config = QuantizationConfig(bits, bits, exact_channels=3 if exact else 0)
    folded = FoldedLinear(weight=linear.weight.detach() * plan.step, bias=linear.bias.detach().clone(),
                          row_bias=None, inv_scale=None, input_shift=plan.shift, correction_shift=plan.shift,
                          exact=plan.exact)
    rounded = folded.weight if exact is None else folded.weight.index_fill(1, plan.exact, 0.0)
    quantized = quantize_rtn(rounded, WeightFormat.of(config), clip=torch.full((out_features,), 0.9))
    emulated = StaticPlanLinear(linear, plan, quantized, bits)(x)
    tensors = checkpoint_tensors(folded, quantized, torch.float32, config.exact_channels)
    validate_linear("test", tensors, out_features, in_features, config)
    reference = ReferenceQuantLinear(tensors, config)(x / plan.step)
    assert torch.allclose(emulated, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(emulated, linear(x), rtol=1e-3, atol=1e-3)  # it does quantize
    if exact:
        assert tensors["exact_index"].tolist() == [3, 50, 0] and not tensors["exact_weight"][:, 2].any()
        assert not tensors["weight"][:, exact].any()


def test_outlier_channels_are_the_widest_beyond_the_factor():
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(64, 40, generator=generator)
    sample[0, 7], sample[0, 30], sample[5, 12] = 900.0, -300.0, 9.0
    stats = InputStats(sample.amin(0), sample.amax(0), sample.double().pow(2).sum(0), 64, sample)
    assert outlier_channels(stats, 4, 16.0).tolist() == [7, 30]
    assert outlier_channels(stats, 1, 16.0).tolist() == [7]
    assert outlier_channels(stats, 4, 1000.0) is None
    plan = with_exact(ChannelPlan(torch.full((40,), 0.5), None, torch.ones(40)), torch.tensor([7, 30]))
    assert plan.step[[7, 30]].tolist() == [1.0, 1.0] and plan.shift[[7, 30]].tolist() == [0.0, 0.0]
    assert torch.equal(plan.fake_quantize(sample, 8)[:, [7, 30]], sample[:, [7, 30]])


@pytest.mark.parametrize("bits", [8, 6])
def test_exact_channels_remove_the_massive_token_error(bits):
    """A channel that is ~0 except for one massive token per window sets a static range that rounds everything
    else in it to zero and dominates its weight rows' scales; left exact, the output error falls well below the
    searched plan's."""
    generator = torch.Generator().manual_seed(3)
    tokens, k, n = 512, 96, 64
    sample = torch.randn(tokens, k, generator=generator)
    sample[:, 5] = torch.randn(tokens, generator=generator) * 0.5
    sample[::128, 5] = 400.0  # the first token of each 128-token window
    weight = torch.randn(n, k, generator=generator) * 0.05
    stats = InputStats(sample.amin(0), sample.amax(0), sample.double().pow(2).sum(0), tokens, sample)
    weight_format = WeightFormat.of(QuantizationConfig(bits, bits))
    exact = outlier_channels(stats, 4, 16.0)
    assert exact.tolist() == [5]
    plain = search_plan(stats, weight, weight_format, bits)
    with_side = search_plan(stats, weight, weight_format, bits, exact=exact)
    assert with_side.plan.exact.tolist() == [5]
    assert with_side.error < 0.5 * plain.error, (with_side.error, plain.error)


def test_exact_channels_checkpoint(tiny_llama, tmp_path, calib_text):
    """--exact-channels K writes K slots per quantized linear (quantization_config.exact_channels), the int8 columns
    of the chosen channels zero; the reference model loads it and stays close to the fp model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_offline import sqnr_db
    from tests.tiny_models import TINY_TEXT
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize
    from vllm_outliertune.offline.reference import load_checkpoint_tensors, load_reference_model
    from vllm_outliertune.offline.text import token_windows

    out = quantize(tiny_llama["fp32"], tmp_path / "exact", calib_text,
                   QuantizeOptions(samples=8, seq_len=128, progress=False, exact_channels=2, outlier_factor=2.0))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["exact_channels"] == 2
    tensors = load_checkpoint_tensors(out)
    used = 0
    for name in (name[:-len(".exact_index")] for name in tensors if name.endswith(".exact_index")):
        index, weight = tensors[f"{name}.exact_index"].long(), tensors[f"{name}.exact_weight"]
        live = weight.abs().sum(0) > 0
        used += int(live.sum())
        assert not tensors[f"{name}.weight"][:, index[live]].any()
    assert used > 0
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama["fp32"], dtype=torch.float32).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(tiny_llama["fp32"]), TINY_TEXT * 4, 96, 4)
    with torch.no_grad():
        assert sqnr_db(fp(windows).logits, load_reference_model(out)(windows).logits) >= 20.0


def test_eval_fake_quant_dynamic(tiny_llama, calib_text, capsys):
    """The dynamic per-token baseline runs on the fp model through the torch engine, close to fp32 at W8A8 and
    further at W6A6; it is refused with the vLLM engine and on a quantized checkpoint."""
    def run(model, *extra):
        code = cli_main(["eval", str(model), "--text", str(calib_text), "--json", "--seq-len", "64",
                         "--max-windows", "4", *extra])
        captured = capsys.readouterr()
        return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err)

    fp = run(tiny_llama["fp32"], "--engine", "torch")[1]["perplexity"]
    w8 = run(tiny_llama["fp32"], "--engine", "torch", "--fake-quant", "w8a8-dynamic")[1]
    w6 = run(tiny_llama["fp32"], "--engine", "torch", "--fake-quant", "w6a6-dynamic")[1]
    assert w8["fake_quant"] == "w8a8-dynamic"
    assert w8["perplexity"] != fp and abs(w8["perplexity"] / fp - 1) < 0.03
    assert abs(w6["perplexity"] / fp - 1) > abs(w8["perplexity"] / fp - 1)
    code, err = run(tiny_llama["fp32"], "--engine", "vllm", "--fake-quant", "w8a8-dynamic")
    assert code == 2 and "--engine torch" in err
    code, err = run(tiny_llama["w8a8"], "--engine", "torch", "--fake-quant", "w8a8-dynamic")
    assert code == 2 and "already an OutlierTune checkpoint" in err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_keep_fp16_groups(arch, request, tmp_path, calib_text):
    """--keep-fp16 LAYER.GROUP writes those linears unquantized and lists them in quantization_config.ignore; the
    checkpoint loads in our reference and is closer to the fp model than the fully quantized one. Keeping q/k/v
    while o_proj is quantized moves o_proj's shift into a runtime input_shift (v_proj may have no bias)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize
    from vllm_outliertune.offline.reference import load_checkpoint_tensors, load_reference_model
    from vllm_outliertune.offline.text import token_windows
    from tests.tiny_models import TINY_TEXT

    dirs = request.getfixturevalue(f"tiny_{arch}")
    kept = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.1.mlp.down_proj"]
    out = quantize(dirs["fp32"], tmp_path / "kept", calib_text,
                   # margin 1: layer 0's o_proj plan then has the shift this test moves (not at the W8A8 default 1.5)
                   QuantizeOptions(samples=8, seq_len=128, progress=False, keep_fp16="0.qkv,1.down", range_margin=1.0),
                   report_dir=tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.count("**kept fp16**") == 2 and ", ".join(kept) in report
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", *kept]
    tensors = load_checkpoint_tensors(out)
    assert all(tensors[f"{name}.weight"].dtype == torch.float32 and f"{name}.weight_scale" not in tensors
               for name in kept)
    assert "model.layers.0.self_attn.o_proj.input_shift" in tensors
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.int8

    fp = AutoModelForCausalLM.from_pretrained(dirs["fp32"], dtype=torch.float32).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(dirs["fp32"]), TINY_TEXT * 4, 96, 4)
    with torch.no_grad():
        reference = fp(windows).logits
        error_kept = (load_reference_model(out)(windows).logits - reference).pow(2).sum()
        error_all = (load_reference_model(dirs["w8a8"])(windows).logits - reference).pow(2).sum()
    assert error_kept < error_all


def test_keep_fp16_option_errors(tiny_llama, tmp_path, calib_text, capsys):
    code = cli_main(["quantize", str(tiny_llama["fp32"]), str(tmp_path / "out"), "--calib", str(calib_text),
                     "--keep-fp16", "1.mlp"])
    assert code == 2 and "--keep-fp16" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_diagnose_attributes_the_loss(tiny_llama, calib_text, tmp_path, capsys):
    """diagnose: the emulated static plan moves the model away from fp (KL > 0), each single group less than all
    of them together; clipping shares are fractions; --layers 1 quantizes only layer 0. The static plan without
    the token guard (the W8A8 default since session 12): with the guard's plans (clip 0.75 almost everywhere) one
    group alone moved this tiny model's KL past that of all four together, as group errors may cancel."""
    out = tmp_path / "diagnose.json"
    assert cli_main(["diagnose", str(tiny_llama["fp32"]), "--calib", str(calib_text), "--text", str(calib_text),
                     "--samples", "4", "--seq-len", "64", "--max-windows", "2", "--keep-top", "1",
                     "--no-token-guard", "--out", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    ppl = result["perplexity"]
    assert "kl" not in ppl["fp"] and ppl["all"]["kl"] > 0
    assert all(0 <= ppl[f"only {group}"]["kl"] < ppl["all"]["kl"] for group in ("qkv", "o", "gate_up", "down"))
    for layer in result["layers"]:
        for info in layer.values():
            assert 0 <= info["saturated"]["entries"] <= 1 and 0 <= info["outside_calibrated"]["mass"] <= 1
            assert info["error"] > 0 and info["dynamic_error"] > 0
    massive = result["massive_activations"]
    assert massive["tokens"] == 2 * 64 and len(massive["top"]) == 8
    assert cli_main(["diagnose", str(tiny_llama["fp32"]), "--calib", str(calib_text), "--text", str(calib_text),
                     "--samples", "4", "--seq-len", "64", "--max-windows", "1", "--keep-top", "1", "--layers", "1",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["quantized_layers"] == 1 and len(result["layers"]) == 1
