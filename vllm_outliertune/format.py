"""The OutlierTune checkpoint format, described once.

The offline writer (``vllm_outliertune.offline``) and the vLLM loader (``vllm_outliertune.linear``) both import
this module, so the two cannot drift apart. docs/format.md shows the same facts as a table.

A quantized linear ``P`` (a Hugging Face module name such as ``model.layers.0.self_attn.q_proj``) computes

    q = clamp(round(x * P.input_inv_scale - P.input_shift), qmin, qmax)          # int8 storage
    y = P.weight_scale * (q @ P.weight.T) + P.output_bias [+ P.bias]

``input_inv_scale`` is absent where the activation scale was folded upstream (RMSNorm gamma, v_proj rows,
up_proj rows); ``input_shift`` is absent where there is no shift. Everything else of the model (embeddings,
norms, lm_head, ignored layers) is stored as in a Hugging Face checkpoint, in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

QUANT_METHOD = "outliertune"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
# (weight_bits, activation_bits) pairs the kernels implement; int6/int4 values live in int8 storage.
SUPPORTED_BITS = ((8, 8), (6, 6), (4, 8))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    suffix: str
    dtype: torch.dtype
    dim: str  # "out" ([N]), "in" ([K]) or "out,in" ([N, K])
    required: bool
    meaning: str

    def shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        return {"out": (out_features,), "in": (in_features,), "out,in": (out_features, in_features)}[self.dim]


LINEAR_TENSORS = (
    TensorSpec("weight", torch.int8, "out,in", True,
               "W * diag(s) quantized per output row, values in the signed range of weight_bits"),
    TensorSpec("weight_scale", torch.float32, "out", True, "per-output-row scale of `weight`"),
    TensorSpec("output_bias", torch.float32, "out", True,
               "additive epilogue term from folding: weight_scale*weight @ input_shift (+ -shift of folded rows)"),
    TensorSpec("input_inv_scale", torch.float32, "in", False,
               "1/s per input channel, applied before rounding; absent when s is folded upstream"),
    TensorSpec("input_shift", torch.float32, "in", False,
               "shift per input channel in quantized units, subtracted before rounding; absent when zero"),
)
LINEAR_TENSOR_SUFFIXES = tuple(spec.suffix for spec in LINEAR_TENSORS)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits`` (activations use the full range: [-2^(b-1), 2^(b-1)-1])."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def weight_qmax(bits: int) -> int:
    """Weights are symmetric: [-qmax, qmax]."""
    return (1 << (bits - 1)) - 1


class FormatError(ValueError):
    """A checkpoint does not follow the OutlierTune format; the message names the file/tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """The ``quantization_config`` block of config.json."""

    weight_bits: int = 8
    activation_bits: int = 8
    ignore: tuple[str, ...] = ("lm_head",)
    method: str = "outliertune"
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "ignore": list(self.ignore),
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "config.json") -> "QuantizationConfig":
        where = f"{source} quantization_config"
        if config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise FormatError(f"{where}: quant_method is {config.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        version = config.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"{where}: format_version {version!r} is not supported by this vllm-outliertune "
                f"(supports {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade vllm-outliertune or re-run `outliertune quantize`")
        bits = (config.get("weight_bits"), config.get("activation_bits"))
        if bits not in SUPPORTED_BITS:
            raise FormatError(
                f"{where}: weight_bits/activation_bits {bits} not supported; supported pairs: {list(SUPPORTED_BITS)}")
        ignore = config.get("ignore", [])
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(name, str) for name in ignore):
            raise FormatError(f"{where}: `ignore` must be a list of module names, got {ignore!r}")
        return cls(weight_bits=bits[0], activation_bits=bits[1], ignore=tuple(ignore),
                   method=str(config.get("method", "outliertune")), format_version=version)

    def is_ignored(self, module_name: str) -> bool:
        """A module is ignored when its name equals, or ends with ``.``+, an entry of ``ignore``."""
        return any(module_name == name or module_name.endswith("." + name) for name in self.ignore)


def validate_linear(prefix: str, tensors: Mapping[str, torch.Tensor], out_features: int, in_features: int,
                    config: QuantizationConfig, source: str = "checkpoint") -> None:
    """Check one quantized linear's tensors (keys are suffixes) against the spec; raise FormatError naming the
    tensor, what was expected and what to do."""
    redo = "re-run `outliertune quantize` to rewrite the checkpoint"
    for spec in LINEAR_TENSORS:
        name = f"{prefix}.{spec.suffix}"
        tensor = tensors.get(spec.suffix)
        if tensor is None:
            if spec.required:
                raise FormatError(f"{source}: tensor {name} is missing ({spec.meaning}); {redo}")
            continue
        expected = spec.shape(out_features, in_features)
        if tuple(tensor.shape) != expected or tensor.dtype != spec.dtype:
            raise FormatError(f"{source}: tensor {name} is {tensor.dtype} {list(tensor.shape)}, expected "
                              f"{spec.dtype} {list(expected)}; {redo}")
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            raise FormatError(f"{source}: tensor {name} holds NaN or Inf; {redo}")
    scale = tensors["weight_scale"]
    if not (scale > 0).all():
        raise FormatError(f"{source}: tensor {prefix}.weight_scale has zero or negative entries; {redo}")
    qmax = weight_qmax(config.weight_bits)
    weight = tensors["weight"]
    if weight.numel() and int(weight.abs().max()) > qmax:
        raise FormatError(f"{source}: tensor {prefix}.weight has values outside ±{qmax} "
                          f"(weight_bits={config.weight_bits}); {redo}")
    inv_scale = tensors.get("input_inv_scale")
    if inv_scale is not None and not (inv_scale > 0).all():
        raise FormatError(f"{source}: tensor {prefix}.input_inv_scale has zero or negative entries; {redo}")

