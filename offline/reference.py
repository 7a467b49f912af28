"""Torch reference of a quantized OutlierTune checkpoint: the Hugging Face model with each quantized linear replaced
by integer math from vllm_outliertune.kernels.torch_ref (the same formula as the vLLM path; no vLLM needed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vllm_outliertune.format import LINEAR_TENSOR_SUFFIXES, QuantizationConfig, packed_levels, validate_linear
from vllm_outliertune.kernels.torch_ref import (
    add_exact_channels, int8_gemm_ref, quantize_activation_guarded_ref, quantize_activation_ref)
from vllm_outliertune.offline.architectures import architecture_of
from vllm_outliertune.offline.model_io import UserError, is_outliertune_checkpoint


class ReferenceQuantLinear(torch.nn.Module):
    """q = clamp(round(x * input_inv_scale - input_shift)); y = weight_scale * (q @ weight.T) + output_bias (+ bias),
    with the int8 levels of a packed 4-bit weight in place of ``weight`` (unpacked once, here); with the
    checkpoint's token_guard, q = clamp(round((x * input_inv_scale - input_shift) / t)) and the GEMM term is
    multiplied by each token's t (kernels/torch_ref.quantize_activation_guarded_ref). ``k_shards``: the number of
    ranks a row-parallel layer's K is split over under tensor parallelism; with the guard each rank takes t over
    its own part of K (as vLLM runs it), so the result is the sum of the parts' guarded products."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: QuantizationConfig, k_shards: int = 1):
        super().__init__()
        self.activation_bits = config.activation_bits
        self.token_guard, self.guard_floor = config.token_guard, config.token_guard_floor
        self.k_shards = k_shards
        weight = tensors["weight"]
        if config.packed:
            weight = packed_levels(weight, tensors["weight_group_scale"], tensors["weight_group_zero"],
                                   config.group_size).to(torch.int8)
        epilogue = tensors["output_bias"].float()
        if "bias" in tensors:  # one epilogue vector, as in the vLLM path
            epilogue = epilogue + tensors["bias"].float()
        buffers = {"weight": weight, "weight_scale": tensors["weight_scale"], "epilogue_bias": epilogue,
                   "input_inv_scale": tensors.get("input_inv_scale"), "input_shift": tensors.get("input_shift"),
                   "exact_index": None if "exact_index" not in tensors else tensors["exact_index"].long(),
                   "exact_weight": tensors.get("exact_weight")}
        for name, tensor in buffers.items():  # not persistent: they are loaded here, not through load_state_dict
            self.register_buffer(name, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if self.token_guard:
            # one guarded product per rank's part of K; the epilogue's bias once (vLLM adds it on rank 0 only)
            part = x2d.shape[-1] // self.k_shards
            y = sum(self._guarded_product(x2d, slice(r * part, (r + 1) * part), with_bias=r == 0)
                    for r in range(self.k_shards))
        else:
            q = quantize_activation_ref(x2d, self.input_inv_scale, self.input_shift, self.activation_bits)
            y = int8_gemm_ref(q, self.weight, self.weight_scale, self.epilogue_bias, x.dtype)
        y = add_exact_channels(y, x2d, self.exact_index, self.exact_weight)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _guarded_product(self, x2d: torch.Tensor, columns: slice, with_bias: bool) -> torch.Tensor:
        q, t = quantize_activation_guarded_ref(x2d[:, columns], _part(self.input_inv_scale, columns),
                                               _part(self.input_shift, columns), self.activation_bits,
                                               self.guard_floor)
        return int8_gemm_ref(q, self.weight[:, columns], self.weight_scale, self.epilogue_bias if with_bias else None,
                             x2d.dtype, row_scale=t)


def _part(vector: torch.Tensor | None, columns: slice) -> torch.Tensor | None:
    return None if vector is None else vector[columns]


def load_checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors files; re-run `outliertune quantize`")
    tensors = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
            raise UserError(f"{path} cannot be read ({exc}); the file is damaged, re-run `outliertune quantize`") \
                from None
    return tensors


def load_reference_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         trust_remote_code: bool = False, tensor_parallel_size: int = 1):
    """The quantized model of an OutlierTune checkpoint as a torch module (HF structure, integer linears); the
    checkpoint's custom model code (auto_map) runs only with ``trust_remote_code``. ``tensor_parallel_size``: compute
    what vLLM computes at that size where it differs from one GPU (the token guard of row-parallel o_proj /
    down_proj takes t per rank's part of K)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    raw_config = json.loads((model_dir / "config.json").read_text())
    if not is_outliertune_checkpoint(raw_config):
        raise UserError(f"{model_dir}/config.json has no outliertune quantization_config; not an OutlierTune "
                        f"checkpoint (use the plain model with the fp engine, or run `outliertune quantize`)")
    quant = QuantizationConfig.from_dict(raw_config["quantization_config"], f"{model_dir}/config.json")
    hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    hf_config.quantization_config = None
    del hf_config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    tensors = load_checkpoint_tensors(model_dir)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    plain = {}
    for name, tensor in tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in LINEAR_TENSOR_SUFFIXES + ("bias",) and f"{module}.weight_scale" in tensors:
            by_module.setdefault(module, {})[suffix] = tensor
        else:
            plain[name] = tensor
    arch = architecture_of(model)
    row_parallel = (f".{arch.o_proj}", f".{arch.down_proj}")
    for module_name, parts in by_module.items():
        linear = model.get_submodule(module_name)
        module_quant = quant.for_module(module_name)
        validate_linear(module_name, parts, linear.out_features, linear.in_features, module_quant,
                        source=str(model_dir))
        parent, _, child = module_name.rpartition(".")
        k_shards = tensor_parallel_size if module_name.endswith(row_parallel) else 1
        if linear.in_features % k_shards:
            raise UserError(f"{module_name} has {linear.in_features} input channels, which tensor_parallel_size "
                            f"{k_shards} does not divide (vLLM refuses that split too); pick a size that does")
        setattr(model.get_submodule(parent), child, ReferenceQuantLinear(parts, module_quant, k_shards))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in plain.items()}, strict=False,
                                                assign=True)
    if unexpected:
        raise UserError(f"{model_dir}: unexpected tensors {sorted(unexpected)[:5]}; re-run `outliertune quantize`")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing:
        raise UserError(f"{model_dir}: tensors missing from the checkpoint: {sorted(missing)[:5]}; "
                        f"re-run `outliertune quantize`")
    _initialize_unsaved_buffers(model)
    return model.to(device).eval()


def _initialize_unsaved_buffers(model) -> None:
    """Buffers that checkpoints do not hold (rotary tables, Gemma's embedding scale) were created on the meta
    device: let transformers' own initialization compute them, with every loaded tensor marked as initialized so
    that it stays untouched."""
    unsaved = []
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.empty_like(buffer, device="cpu"))
            unsaved.append(name)
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        tensor._is_hf_initialized = name not in unsaved
    model.initialize_weights()
    still_meta = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
                  if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors without values after loading the reference model: {still_meta[:5]}")
