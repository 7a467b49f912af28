"""The checkpoint validator that runs before vLLM loads anything: each kind of damage gets an error that names the
file or tensor. Checkpoints are the tiny W8A8 ones of conftest, copied and damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_outliertune import format as fmt

LINEAR = "model.layers.1.self_attn.k_proj"


@pytest.fixture
def checkpoint(tiny_llama, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_llama["w8a8"], copy)
    return copy


def _weights_file(checkpoint: Path) -> Path:
    files = sorted(checkpoint.glob("*.safetensors"))
    return next(path for path in files if f"{LINEAR}.weight" in load_file(path))


def _edit_tensors(checkpoint: Path, edit) -> None:
    path = _weights_file(checkpoint)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _validate(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    return fmt.validate_checkpoint_dir(checkpoint, fmt.QuantizationConfig.from_dict(config))


def test_written_checkpoint_is_valid(checkpoint):
    assert _validate(checkpoint) == 2 * 7  # every decoder linear of both layers is quantized


@pytest.mark.parametrize("suffix", ["weight_scale", "output_bias"])
def test_missing_tensor_named(checkpoint, suffix):
    _edit_tensors(checkpoint, lambda tensors: tensors.pop(f"{LINEAR}.{suffix}"))
    with pytest.raises(fmt.FormatError, match=rf"{LINEAR}\.{suffix} is missing"):
        _validate(checkpoint)


def test_wrong_dtype_named(checkpoint):
    def to_fp16(tensors):
        tensors[f"{LINEAR}.weight_scale"] = tensors[f"{LINEAR}.weight_scale"].half()

    _edit_tensors(checkpoint, to_fp16)
    with pytest.raises(fmt.FormatError, match=rf"{LINEAR}\.weight_scale is torch.float16 \[\d+\], expected torch.float32"):
        _validate(checkpoint)


def test_wrong_shape_named(checkpoint):
    def shorten(tensors):
        tensors[f"{LINEAR}.output_bias"] = tensors[f"{LINEAR}.output_bias"][:-1].clone()

    _edit_tensors(checkpoint, shorten)
    with pytest.raises(fmt.FormatError, match=rf"{LINEAR}\.output_bias is .* expected torch.float32"):
        _validate(checkpoint)


@pytest.mark.parametrize("bad_value, message", [(float("nan"), "NaN or Inf"), (0.0, "zero or negative")])
def test_bad_weight_scale_values(checkpoint, bad_value, message):
    def poison(tensors):
        tensors[f"{LINEAR}.weight_scale"][3] = bad_value

    _edit_tensors(checkpoint, poison)
    with pytest.raises(fmt.FormatError, match=rf"{LINEAR}\.weight_scale .*{message}"):
        _validate(checkpoint)


def test_truncated_file_named(checkpoint):
    path = _weights_file(checkpoint)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(fmt.FormatError, match=rf"{path.name}: file is truncated"):
        _validate(checkpoint)


def test_missing_shard_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(fmt.FormatError, match="model-00002-of-00002.safetensors"):
        _validate(checkpoint)


@pytest.mark.parametrize("change, message", [
    ({"format_version": 99}, "format_version 99 is not supported"),
    ({"format_version": None}, "format_version None is not supported"),
    ({"weight_bits": 3}, r"weight_bits/activation_bits \(3, 8\) not supported"),
    ({"ignore": "lm_head"}, "must be a list of module names"),
])
def test_bad_quantization_config(change, message):
    config = {**fmt.QuantizationConfig().to_dict(), **change}
    with pytest.raises(fmt.FormatError, match=message):
        fmt.QuantizationConfig.from_dict(config)


def test_weight_values_outside_bits():
    weight = torch.full((4, 8), 40, dtype=torch.int8)
    tensors = {"weight": weight, "weight_scale": torch.ones(4), "output_bias": torch.zeros(4)}
    fmt.validate_linear("layer", tensors, 4, 8, fmt.QuantizationConfig(weight_bits=8, activation_bits=8))
    with pytest.raises(fmt.FormatError, match=r"layer\.weight has values outside ±31"):
        fmt.validate_linear("layer", tensors, 4, 8, fmt.QuantizationConfig(weight_bits=6, activation_bits=6))


@pytest.mark.parametrize("damage", ["missing", "dtype", "shape"])
def test_header_and_tensor_checks_agree(checkpoint, damage):
    """The same layout check serves validate_checkpoint_dir (safetensors headers) and validate_linear (loaded
    tensors): the same damage gives the same message, naming the shard file where the tensor is in one."""
    def edit(tensors):
        name = f"{LINEAR}.output_bias"
        tensors[name] = {"missing": None, "dtype": tensors[name].half(), "shape": tensors[name][:-1].clone()}[damage]
        if tensors[name] is None:
            del tensors[name]

    _edit_tensors(checkpoint, edit)
    path = _weights_file(checkpoint)
    tensors = {name.rsplit(".", 1)[1]: tensor for name, tensor in load_file(path).items()
               if name.startswith(f"{LINEAR}.")}
    out_features, in_features = tensors["weight"].shape
    with pytest.raises(fmt.FormatError) as from_tensors:
        fmt.validate_linear(LINEAR, tensors, out_features, in_features, fmt.QuantizationConfig(), source="SOURCE")
    with pytest.raises(fmt.FormatError) as from_header:
        _validate(checkpoint)
    where = str(checkpoint) if damage == "missing" else str(path)
    assert str(from_header.value) == str(from_tensors.value).replace("SOURCE", where, 1)
