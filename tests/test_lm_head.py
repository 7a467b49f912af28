"""`outliertune quantize --lm-head int8` without vLLM: the checkpoint contract (untied config, int8 lm_head tensors,
the rest as without the option), the torch reference, the calibration cache, and the errors. vLLM runs quantized
lm_heads in tests/test_architectures.py (qwen3 and gemma3 checkpoints, TP 1 and 2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny_models
from tests.test_offline import sqnr_db
from vllm_outliertune import format as fmt
from vllm_outliertune.cli import main as cli_main
from vllm_outliertune.offline.quantize import QuantizeOptions, quantize
from vllm_outliertune.offline.reference import load_checkpoint_tensors, load_reference_model

FAST = dict(samples=8, seq_len=64, progress=False)


@pytest.fixture(scope="module")
def head_checkpoints(tiny_llama, calib_text, tmp_path_factory):
    """The trained tiny Llama (tied embeddings) quantized W8A8 without and with --lm-head int8, and W4A8 with it,
    the three from one calibration cache."""
    root = tmp_path_factory.mktemp("lm-head")
    cache = root / "cache"
    return {name: quantize(tiny_llama["fp32"], root / name, calib_text,
                           QuantizeOptions(calib_cache=cache, lm_head=head, **bits, **FAST))
            for name, head, bits in (("none", "none", {}), ("int8", "int8", {}),
                                     ("w4a8-int8", "int8", dict(w_bits=4, group_size=32)))}


def _config(checkpoint) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


@pytest.mark.parametrize("name", ["int8", "w4a8-int8"])
def test_lm_head_checkpoint_contract(head_checkpoints, tiny_llama, name):
    """lm_head gets int8 weights per output row (also beside packed 4-bit weights), its step goes into the final
    norm, the config is untied, and nothing else differs from the checkpoint without the option."""
    checkpoint = head_checkpoints[name]
    config = _config(checkpoint)
    assert _config(tiny_llama["fp32"])["tie_word_embeddings"] is True and config["tie_word_embeddings"] is False
    quant = fmt.QuantizationConfig.from_dict(config["quantization_config"])
    assert quant.lm_head == "int8" and not quant.is_ignored("lm_head") and "lm_head" not in quant.int8_weights
    assert fmt.validate_checkpoint_dir(checkpoint, quant) == 2 * 7 + 1
    tensors = load_checkpoint_tensors(checkpoint)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    parts = {suffix: tensors[f"lm_head.{suffix}"] for suffix in fmt.LINEAR_TENSOR_SUFFIXES
             if f"lm_head.{suffix}" in tensors}
    assert parts["weight"].dtype == torch.int8 and parts["weight"].shape == (vocab, hidden)
    fmt.validate_linear("lm_head", parts, vocab, hidden, quant.for_module("lm_head"))
    assert "input_inv_scale" not in parts  # the step is in the final norm
    fp = load_file(str(tiny_llama["fp32"] / "model.safetensors"))
    assert torch.equal(tensors["model.embed_tokens.weight"], fp["model.embed_tokens.weight"])
    assert not torch.equal(tensors["model.norm.weight"], fp["model.norm.weight"])
    if name == "int8":  # the decoder layers are those of the checkpoint without --lm-head
        without = load_checkpoint_tensors(head_checkpoints["none"])
        assert "lm_head.weight" not in without and _config(head_checkpoints["none"])["tie_word_embeddings"] is True
        assert "lm_head" not in _config(head_checkpoints["none"])["quantization_config"]
        different = {key for key in without if not torch.equal(without[key], tensors[key])}
        assert different == {"model.norm.weight"}
        assert set(tensors) - set(without) == {f"lm_head.{suffix}" for suffix in parts}


def test_reference_emulates_the_quantized_lm_head(head_checkpoints, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama["fp32"])
    ids = tokenizer(tiny_models.TINY_TEXT, return_tensors="pt").input_ids[:, :256]
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama["fp32"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = fp(ids).logits
        logits = {name: load_reference_model(head_checkpoints[name])(ids).logits for name in ("none", "int8")}
    sqnr = {name: sqnr_db(expected, value) for name, value in logits.items()}
    print(f"\nlogits SQNR against fp32: lm_head fp32 {sqnr['none']:.1f} dB, int8 {sqnr['int8']:.1f} dB")
    assert sqnr["int8"] >= 20.0 and sqnr["int8"] >= sqnr["none"] - 3.0
    # The head really is quantized: int8 weights with static int8 codes do not give the fp head's logits.
    assert not torch.allclose(logits["int8"], logits["none"], atol=1e-4)


def test_calibration_cache_keeps_the_lm_head_input(head_checkpoints, tiny_llama, calib_text, tmp_path):
    """A cache written without --lm-head already holds lm_head's input; a cache from before the option (one entry
    per layer) is recalibrated for a run with it, which gives the same checkpoint and rewrites the cache."""
    caches = {path: torch.load(path, weights_only=True)
              for path in (head_checkpoints["none"].parent / "cache").glob("calib-*.pt")}
    # the W8A8 runs' (the W4A8 one, with GPTQ, has Gram matrices under another key)
    ((cache_file, entries),) = [(path, entries) for path, entries in caches.items() if entries[0]["qkv"]["gram"] is None]
    assert len(entries) == _config(tiny_llama["fp32"])["num_hidden_layers"] + 1
    old_cache = tmp_path / "cache"
    old_cache.mkdir()
    torch.save(entries[:-1], old_cache / cache_file.name)
    out = quantize(tiny_llama["fp32"], tmp_path / "q", calib_text,
                   QuantizeOptions(calib_cache=old_cache, lm_head="int8", **FAST))
    assert len(torch.load(old_cache / cache_file.name, weights_only=True)) == len(entries)
    expected = load_checkpoint_tensors(head_checkpoints["int8"])
    actual = load_checkpoint_tensors(out)
    assert actual.keys() == expected.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.parametrize("change, message", [
    ({"lm_head": "int4"}, "lm_head 'int4' is not supported"),
    ({"lm_head": "int8", "ignore": ["lm_head"]}, "lm_head is 'int8' but `ignore` lists lm_head"),
    ({"lm_head": "int8", "format_version": 1}, "lm_head 'int8' is not supported in format_version 1"),
])
def test_bad_lm_head_entry(change, message):
    config = {**fmt.QuantizationConfig().to_dict(), **change}
    with pytest.raises(fmt.FormatError, match=message):
        fmt.QuantizationConfig.from_dict(config)


def test_lm_head_entry_round_trip():
    """Old configs (no entry) keep lm_head unquantized; the entry gives lm_head int8 weights at any weight bits."""
    assert fmt.QuantizationConfig.from_dict({"format_version": 2, "weight_bits": 8, "activation_bits": 8,
                                             "ignore": ["lm_head"]}).lm_head == "none"
    assert "lm_head" not in fmt.QuantizationConfig().to_dict()
    packed = fmt.QuantizationConfig(weight_bits=4, ignore=(), lm_head="int8")
    assert fmt.QuantizationConfig.from_dict(packed.to_dict()) == packed
    assert packed.for_module("lm_head").weight_bits == 8 and not packed.for_module("lm_head").packed
    assert packed.for_module("language_model.lm_head").weight_bits == 8  # vLLM prefixes of wrapped models
    assert packed.for_module("model.layers.0.mlp.down_proj").packed


def _damaged(checkpoint, tmp_path, edit_tensors=None, edit_config=None):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    if edit_tensors:
        tensors = load_file(str(copy / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = _config(copy)
        edit_config(config)
        (copy / "config.json").write_text(json.dumps(config))
    quant = fmt.QuantizationConfig.from_dict(_config(copy)["quantization_config"])
    return copy, quant


@pytest.mark.parametrize("damage, message", [
    (dict(edit_tensors=lambda t: [t.pop(f"lm_head.{s}") for s in ("weight", "weight_scale", "output_bias")]),
     r"no safetensors file has tensor lm_head\.weight_scale"),
    (dict(edit_tensors=lambda t: t.pop("lm_head.output_bias")), r"tensor lm_head\.output_bias is missing"),
    (dict(edit_tensors=lambda t: t.update({"lm_head.weight_scale": t["lm_head.weight_scale"][:-1].clone()})),
     r"model\.safetensors: tensor lm_head\.weight_scale is torch\.float32 \[\d+\], expected torch\.float32"),
    (dict(edit_config=lambda c: c.update(tie_word_embeddings=True)),
     r"config\.json: tie_word_embeddings is true, but a quantized lm_head"),
    (dict(edit_config=lambda c: c.update(quantization_config={**c["quantization_config"], "lm_head": "none",
                                                                "ignore": ["lm_head"]})),
     r"tensor lm_head\.weight_scale is there but config\.json quantization_config has no lm_head entry"),
])
def test_bad_lm_head_checkpoint_named(head_checkpoints, tmp_path, damage, message):
    checkpoint, quant = _damaged(head_checkpoints["int8"], tmp_path, **damage)
    with pytest.raises(fmt.FormatError, match=message):
        fmt.validate_checkpoint_dir(checkpoint, quant)


@pytest.mark.parametrize("arch", ["opt", "gemma2"])
def test_lm_head_refused_where_vllm_runs_it_unquantized(arch, tmp_path, calib_text, capsys):
    model = tiny_models.save_tiny_model(tmp_path / arch, arch)
    code = cli_main(["quantize", str(model), str(tmp_path / "q"), "--calib", str(calib_text), "--lm-head", "int8"])
    error = capsys.readouterr().err
    assert code == 2 and "--lm-head int8" in error and "--lm-head none" in error, error
    assert not (tmp_path / "q").exists()
