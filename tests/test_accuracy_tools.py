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
from vllm_outliertune.offline.symmetrize import ChannelPlan
from vllm_outliertune.format import QuantizationConfig
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
def test_static_plan_emulation_equals_checkpoint_arithmetic(bits):
    """StaticPlanLinear on x gives what the checkpoint's integer linear gives on the folded input x / fold."""
    generator = torch.Generator().manual_seed(1)
    in_features, out_features = 70, 24  # K not a multiple of 64
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    x = torch.randn(9, in_features, generator=generator) * (torch.rand(in_features, generator=generator) * 5)
    x[:, 3] += 40.0  # a shifted outlier channel
    step = x.abs().amax(0) / 60 + 1e-3
    shift = torch.round(x.mean(0) / step)
    plan = ChannelPlan(fold=step, inv_scale=None, shift=shift)
    config = QuantizationConfig(bits, bits)
    folded = FoldedLinear(weight=linear.weight.detach() * step, bias=linear.bias.detach().clone(), row_bias=None,
                          inv_scale=None, input_shift=shift, correction_shift=shift)
    quantized = quantize_rtn(folded.weight, WeightFormat.of(config), clip=torch.full((out_features,), 0.9))
    emulated = StaticPlanLinear(linear, plan, quantized, bits)(x)
    reference = ReferenceQuantLinear(checkpoint_tensors(folded, quantized, torch.float32), config)(x / step)
    assert torch.allclose(emulated, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(emulated, linear(x), rtol=1e-3, atol=1e-3)  # it does quantize


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
                   QuantizeOptions(samples=8, seq_len=128, progress=False, keep_fp16="0.qkv,1.down"),
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
    of them together; clipping shares are fractions; --layers 1 quantizes only layer 0."""
    out = tmp_path / "diagnose.json"
    assert cli_main(["diagnose", str(tiny_llama["fp32"]), "--calib", str(calib_text), "--text", str(calib_text),
                     "--samples", "4", "--seq-len", "64", "--max-windows", "2", "--keep-top", "1",
                     "--out", str(out)]) == 0, capsys.readouterr().err
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
