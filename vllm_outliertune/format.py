"""The OutlierTune checkpoint format, described once.

The offline writer (``vllm_outliertune.offline``) and the vLLM loader (``vllm_outliertune.linear``) both import
this module, so the two cannot drift apart. docs/format.md shows the same facts as a table.

A quantized linear ``P`` (a Hugging Face module name such as ``model.layers.0.self_attn.q_proj``) computes

    q = clamp(round(x * P.input_inv_scale - P.input_shift), qmin, qmax)          # int8 storage
    y = P.weight_scale * (q @ P.weight.T) + P.output_bias [+ P.bias]

``input_inv_scale`` is absent where the activation scale was folded upstream (RMSNorm gamma, v_proj rows,
up_proj rows); ``input_shift`` is absent where there is no shift. Everything else of the model (embeddings,
norms, lm_head, ignored layers) is stored as in a Hugging Face checkpoint, in the model's dtype.

Format 2 adds packed 4-bit weights (``weight_bits`` 4): two unsigned 4-bit codes per byte and, per group of
``group_size`` input channels, a small integer scale and zero point, so that the int8 weight the GEMM multiplies is

    level[n, k] = (code[n, k] - P.weight_group_zero[n, g]) * P.weight_group_scale[n, g],    g = k // group_size

(QServe-style progressive quantization: the levels are an int8 quantization of the row with the float
``weight_scale``; the groups refine it with integer scales, so the K loop stays in integer arithmetic). Other bit
widths keep format 1's tensors; format 1 checkpoints (W4A8 as int4 values in int8 storage, one scale per row) load.
A packed checkpoint may list modules in ``int8_weights``: those keep format 1's int8 weight per output row (the
same integer GEMM and epilogue, one byte per weight), where 4 bits lose the most.

``lm_head: "int8"`` (format 2, `outliertune quantize --lm-head int8`): ``lm_head`` is a quantized linear too, with
int8 weights per output row whatever ``weight_bits`` (its input step folded into the final norm), and the
config has ``tie_word_embeddings`` false (the embedding matrix stays in the model's dtype). Without the key lm_head
is stored as in a Hugging Face checkpoint and listed in ``ignore``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch

QUANT_METHOD = "outliertune"
FORMAT_VERSION = 2
# Format 3 is format 2 plus `token_guard` (below); it is written only for guarded checkpoints, so that a plugin
# that does not know the guard refuses them instead of running them without it, and unguarded ones stay format 2.
TOKEN_GUARD_FORMAT_VERSION = 3
# Format 4 is format 3 plus `token_guard_floor` below 1 (t may then fall below 1: finer steps for tokens that use
# less than the plan's range); written only then, so that a format-3 reader refuses it instead of clamping t at 1.
TOKEN_GUARD_FLOOR_FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4)
# (weight_bits, activation_bits) pairs the kernels implement; int6/int4 activation codes live in int8 storage, and
# so did format 1's int4 weights (format 2 packs them). W4A4 is an accuracy mode: the W4A8 kernels run its codes.
SUPPORTED_BITS = ((8, 8), (6, 6), (4, 8), (4, 4))
SUPPORTED_BITS_V1 = ((8, 8), (6, 6), (4, 8))
DEFAULT_GROUP_SIZE = 128
GROUP_SIZE_MULTIPLE = 16  # group sizes are 0 (one group per row) or a multiple of this (tile-aligned groups)
PACKED_CODE_MAX = 15  # unsigned 4-bit codes
LM_HEAD = "lm_head"  # the output projection's module name (Hugging Face and vLLM)
LM_HEAD_FORMATS = ("none", "int8")  # quantization_config.lm_head


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    suffix: str
    dtype: torch.dtype
    # "out" ([N]), "in" ([K]), "out,in" ([N, K]), "out,packed" ([N, K/2]), "out,groups" ([N, groups]), "exact"
    # ([exact_channels]) or "out,exact" ([N, exact_channels])
    dim: str
    required: bool
    meaning: str

    def shape(self, out_features: int, in_features: int, groups: int = 1, exact: int = 0) -> tuple[int, ...]:
        return {"out": (out_features,), "in": (in_features,), "out,in": (out_features, in_features),
                "out,packed": (out_features, in_features // 2), "out,groups": (out_features, groups),
                "exact": (exact,), "out,exact": (out_features, exact)}[self.dim]


_OUTPUT_BIAS = TensorSpec("output_bias", torch.float32, "out", True,
                          "additive epilogue term from folding: dequant(weight) @ input_shift "
                          "(+ -shift of folded rows)")
_INPUT_VECTORS = (
    TensorSpec("input_inv_scale", torch.float32, "in", False,
               "1/s per input channel, applied before rounding; absent when s is folded upstream"),
    TensorSpec("input_shift", torch.float32, "in", False,
               "shift per input channel in quantized units, subtracted before rounding; absent when zero"),
)
LINEAR_TENSORS = (
    TensorSpec("weight", torch.int8, "out,in", True,
               "W * diag(s) quantized per output row, values in the signed range of weight_bits"),
    TensorSpec("weight_scale", torch.float32, "out", True, "per-output-row scale of `weight`"),
    _OUTPUT_BIAS, *_INPUT_VECTORS,
)
PACKED_LINEAR_TENSORS = (
    TensorSpec("weight", torch.uint8, "out,packed", True,
               "W * diag(s) as unsigned 4-bit codes, two per byte: input channel 2j in the low nibble, 2j+1 high"),
    TensorSpec("weight_scale", torch.float32, "out", True, "per-output-row float scale of the int8 levels"),
    TensorSpec("weight_group_scale", torch.uint8, "out,groups", True,
               "integer scale (>= 1) of each group of group_size input channels: level = (code - zero) * scale"),
    TensorSpec("weight_group_zero", torch.uint8, "out,groups", True, "integer zero point (0..15) of each group"),
    _OUTPUT_BIAS, *_INPUT_VECTORS,
)
# quantization_config.exact_channels = k > 0: every quantized linear also computes k input channels in floating
# point, y += x[:, exact_index] @ exact_weight.T (unused slots: index 0 with a zero weight column); the int8 weight
# columns of those channels are zero.
EXACT_TENSORS = (
    TensorSpec("exact_index", torch.int32, "exact", True,
               "input channels computed in floating point (their int8 weight columns are zero)"),
    TensorSpec("exact_weight", torch.float32, "out,exact", True,
               "the weight columns of exact_index, applied to those input channels unquantized"),
)
LINEAR_TENSOR_SUFFIXES = tuple(dict.fromkeys(spec.suffix for spec in LINEAR_TENSORS + PACKED_LINEAR_TENSORS
                                             + EXACT_TENSORS))


def group_count(in_features: int, group_size: int) -> int:
    """Groups of a row of ``in_features`` channels (the last one may be short); group_size 0: one per row."""
    return 1 if group_size == 0 else -(-in_features // group_size)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of ``bits`` (activations use the full range: [-2^(b-1), 2^(b-1)-1])."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def guard_limits(bits: int) -> tuple[float, float]:
    """token_guard: the most negative and the largest x * input_inv_scale - input_shift a token may have in every
    channel and keep t = 1: qmin - 1/2 and qmax + 1/2, the outer edges of the last rounding intervals (u / t then
    rounds at most half a step from its value, the clamp to [qmin, qmax] included)."""
    qmin, qmax = qrange(bits)
    return qmin - 0.5, qmax + 0.5


def guard_divisors(units: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """guard_limits as 0-dim tensors of ``units``' dtype and device, to divide units by: CUDA divides by a Python
    number as a multiply by its reciprocal, an ulp off the quotient the CPU and the kernels compute."""
    low, high = (torch.full((), limit, dtype=units.dtype, device=units.device) for limit in guard_limits(bits))
    return low, high


def guard_scale(units: torch.Tensor, bits: int, floor: float = 1.0) -> torch.Tensor:
    """token_guard's t of each token (row) of the unrounded codes ``units`` (x * input_inv_scale - input_shift):
    max(floor, its largest unit / (qmax + 1/2), its most negative unit / (qmin - 1/2)), shape [..., 1] (floor:
    token_guard_floor, 1 unless given). Each side has its own limit so that the unit that sets t lands on its limit,
    which rounds and clamps to qmax (qmin) from either side: a single limit (qmax + 1/2 for both signs) puts a
    token's most negative unit at -(qmax + 1/2), a rounding tie between qmin and qmin + 1 that float noise of an ulp
    decides (different engines rounded the largest channel of guarded tokens differently)."""
    low, high = guard_divisors(units, bits)
    return torch.maximum(units.amax(dim=-1, keepdim=True) / high,
                         units.amin(dim=-1, keepdim=True) / low).clamp(min=floor)


def weight_qmax(bits: int) -> int:
    """Weights are symmetric: [-qmax, qmax]."""
    return (1 << (bits - 1)) - 1


class FormatError(ValueError):
    """A checkpoint does not follow the OutlierTune format; the message names the file/tensor and the fix."""


_REDO = "re-run `outliertune quantize` to rewrite the checkpoint"


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """The ``quantization_config`` block of config.json."""

    weight_bits: int = 8
    activation_bits: int = 8
    ignore: tuple[str, ...] = ("lm_head",)
    method: str = "outliertune"
    format_version: int = FORMAT_VERSION
    # The hub model quantized, {"repo_id": "ORG/NAME", "revision": commit hash}; None for a local directory.
    source: Mapping[str, str] | None = dataclasses.field(default=None, compare=False)
    group_size: int = DEFAULT_GROUP_SIZE  # packed weights only
    exact_channels: int = 0  # input channel slots per linear computed in floating point (EXACT_TENSORS)
    # Packed checkpoints: modules whose weights are int8 per output row (LINEAR_TENSORS) instead of packed.
    int8_weights: tuple[str, ...] = ()
    lm_head: str = "none"  # "int8": lm_head is quantized, int8 weights per output row (LM_HEAD_FORMATS)
    # Per-token overflow guard (format 3): each token's codes are round(u / t), t = guard_scale(u) (max(1,
    # max_k u_k / (qmax + 1/2), min_k u_k / (qmin - 1/2))), u = x * input_inv_scale - input_shift, and the GEMM term
    # of its output (before output_bias) is multiplied by t.
    token_guard: bool = False
    # With token_guard, the least t (format 4 when below 1): guard_scale's max(1, ...) becomes max(token_guard_floor,
    # ...), so a token whose codes span less than the range gets a finer step too (the W6A6 default, 1/16).
    token_guard_floor: float = 1.0

    @property
    def packed(self) -> bool:
        """4-bit weights packed two per byte with group scales (format 2); format 1 kept them in int8."""
        return self.weight_bits == 4 and self.format_version >= 2

    @property
    def linear_tensors(self) -> tuple[TensorSpec, ...]:
        return (PACKED_LINEAR_TENSORS if self.packed else LINEAR_TENSORS) + (EXACT_TENSORS if self.exact_channels
                                                                             else ())

    def groups(self, in_features: int) -> int:
        return group_count(in_features, self.group_size) if self.packed else 1

    def for_module(self, module_name: str) -> "QuantizationConfig":
        """The config that describes module ``module_name``'s tensors: int8 weights (weight_bits 8, same
        activations) for a module listed in ``int8_weights`` and for a quantized lm_head, else this one."""
        if not (_listed(module_name, self.int8_weights) or (self.quantized_lm_head and _listed(module_name,
                                                                                              (LM_HEAD,)))):
            return self
        return dataclasses.replace(self, weight_bits=8, int8_weights=())

    @property
    def quantized_lm_head(self) -> bool:
        return self.lm_head != "none"

    def to_dict(self) -> dict[str, Any]:
        config = {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "ignore": list(self.ignore),
            "method": self.method,
        }
        if self.packed:
            config["group_size"] = self.group_size
        if self.exact_channels:
            config["exact_channels"] = self.exact_channels
        if self.int8_weights:
            config["int8_weights"] = list(self.int8_weights)
        if self.quantized_lm_head:
            config["lm_head"] = self.lm_head
        if self.token_guard:
            config["token_guard"] = True
        if self.token_guard_floor != 1.0:
            config["token_guard_floor"] = self.token_guard_floor
        return config if self.source is None else dict(config, source=dict(self.source))

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
        supported = SUPPORTED_BITS_V1 if version == 1 else SUPPORTED_BITS
        if bits not in supported:
            raise FormatError(f"{where}: weight_bits/activation_bits {bits} not supported in format_version "
                              f"{version}; supported pairs: {list(supported)}")
        group_size = config.get("group_size", DEFAULT_GROUP_SIZE)
        if bits[0] == 4 and version >= 2:
            group_size = config.get("group_size")
            if not isinstance(group_size, int) or group_size < 0 or group_size % GROUP_SIZE_MULTIPLE:
                raise FormatError(f"{where}: group_size {group_size!r} is invalid for packed 4-bit weights: 0 (one "
                                  f"group per output row) or a positive multiple of {GROUP_SIZE_MULTIPLE}; {_REDO}")
        exact_channels = config.get("exact_channels", 0)
        if not isinstance(exact_channels, int) or exact_channels < 0:
            raise FormatError(f"{where}: exact_channels {exact_channels!r} must be an integer >= 0; {_REDO}")
        ignore = config.get("ignore", [])
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(name, str) for name in ignore):
            raise FormatError(f"{where}: `ignore` must be a list of module names, got {ignore!r}")
        int8_weights = config.get("int8_weights", [])
        if not isinstance(int8_weights, (list, tuple)) or not all(isinstance(name, str) for name in int8_weights):
            raise FormatError(f"{where}: `int8_weights` must be a list of module names, got {int8_weights!r}")
        if int8_weights and not (bits[0] == 4 and version >= 2):
            raise FormatError(f"{where}: `int8_weights` is only valid with packed 4-bit weights (weight_bits 4, "
                              f"format_version 2), got weight_bits {bits[0]}; {_REDO}")
        lm_head = config.get("lm_head", "none")
        if lm_head not in LM_HEAD_FORMATS or (lm_head != "none" and version < 2):
            raise FormatError(f"{where}: lm_head {lm_head!r} is not supported in format_version {version}; "
                              f"supported: {list(LM_HEAD_FORMATS) if version >= 2 else ['none']}; {_REDO}")
        if lm_head != "none" and _listed(LM_HEAD, tuple(ignore)):
            raise FormatError(f"{where}: lm_head is {lm_head!r} but `ignore` lists lm_head; {_REDO}")
        token_guard = config.get("token_guard", False)
        if not isinstance(token_guard, bool) or (token_guard and version < TOKEN_GUARD_FORMAT_VERSION):
            raise FormatError(f"{where}: token_guard {token_guard!r} is not supported in format_version {version} "
                              f"(true needs format_version {TOKEN_GUARD_FORMAT_VERSION}, false may be left out); "
                              f"{_REDO}")
        if token_guard and exact_channels:
            raise FormatError(f"{where}: token_guard is not implemented with exact_channels (got exact_channels "
                              f"{exact_channels}); re-run `outliertune quantize` without --token-guard or without "
                              f"--exact-channels")
        floor = config.get("token_guard_floor", 1.0)
        if (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1
                or (floor != 1 and (not token_guard or version < TOKEN_GUARD_FLOOR_FORMAT_VERSION))):
            raise FormatError(f"{where}: token_guard_floor {floor!r} is not supported with token_guard {token_guard} "
                              f"in format_version {version} (a number in (0, 1]; below 1 it needs token_guard true "
                              f"and format_version {TOKEN_GUARD_FLOOR_FORMAT_VERSION}); {_REDO}")
        source = config.get("source")
        if source is not None and not isinstance(source, dict):
            raise FormatError(f"{where}: `source` must be an object {{\"repo_id\", \"revision\"}}, got {source!r}")
        return cls(weight_bits=bits[0], activation_bits=bits[1], ignore=tuple(ignore),
                   method=str(config.get("method", "outliertune")), format_version=version, source=source,
                   group_size=group_size, exact_channels=exact_channels, int8_weights=tuple(int8_weights),
                   lm_head=lm_head, token_guard=token_guard, token_guard_floor=float(floor))

    def is_ignored(self, module_name: str) -> bool:
        """A module is ignored when its name equals, or ends with ``.``+, an entry of ``ignore``."""
        return _listed(module_name, self.ignore)


def _listed(module_name: str, names: tuple[str, ...]) -> bool:
    """``module_name`` equals, or ends with ``.``+, an entry of ``names``."""
    return any(module_name == name or module_name.endswith("." + name) for name in names)


def validate_linear(prefix: str, tensors: Mapping[str, torch.Tensor], out_features: int, in_features: int,
                    config: QuantizationConfig, source: str = "checkpoint", whole_in_features: int | None = None,
                    ) -> None:
    """Check one quantized linear's tensors (keys are suffixes) against the spec; raise FormatError naming the
    tensor, what was expected and what to do. ``whole_in_features``: the input size before a tensor-parallel split
    (exact_index names channels of the whole input); default ``in_features``."""
    layout = {suffix: (tensor.dtype, tuple(tensor.shape)) for suffix, tensor in tensors.items()}
    check_linear_layout(prefix, layout, out_features, in_features, config, source)
    check_linear_values(prefix, tensors, config, source)
    check_exact_index(prefix, tensors, whole_in_features or in_features, source)


def check_exact_index(prefix: str, tensors: Mapping[str, torch.Tensor], in_features: int, source: str) -> None:
    """exact_index (when given) names input channels of a linear of ``in_features`` (all of them, before any
    tensor-parallel split)."""
    index = tensors.get("exact_index")
    if index is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= in_features):
        raise FormatError(f"{source}: tensor {prefix}.exact_index has entries outside [0, {in_features}); {_REDO}")


def check_linear_layout(prefix: str, layout: Mapping[str, tuple[torch.dtype | str, tuple[int, ...]]],
                        out_features: int, in_features: int, config: QuantizationConfig, source: str,
                        file_of: Mapping[str, Path] | None = None) -> None:
    """Presence, dtype and shape of one quantized linear's tensors, given as {suffix: (dtype, shape)} (from tensors
    or from a safetensors header), against the config's tensor list. Errors name ``source``, or for a tensor present
    with the wrong layout the file ``file_of`` gives for its suffix."""
    if config.packed and in_features % 2:
        raise FormatError(f"{source}: {prefix} has {in_features} input channels; packed 4-bit weights need an even "
                          f"number (two codes per byte)")
    for spec in config.linear_tensors:
        name = f"{prefix}.{spec.suffix}"
        if spec.suffix not in layout:
            if spec.required:
                raise FormatError(f"{source}: tensor {name} is missing ({spec.meaning}); {_REDO}")
            continue
        dtype, shape = layout[spec.suffix]
        expected = spec.shape(out_features, in_features, config.groups(in_features), config.exact_channels)
        if tuple(shape) != expected or dtype != spec.dtype:
            where = (file_of or {}).get(spec.suffix, source)
            raise FormatError(f"{where}: tensor {name} is {dtype} {list(shape)}, expected {spec.dtype} "
                              f"{list(expected)}; {_REDO}")


def check_linear_values(prefix: str, tensors: Mapping[str, torch.Tensor], config: QuantizationConfig,
                        source: str = "checkpoint") -> None:
    """Value checks on whichever of a linear's tensors are given: finite vectors, positive scales, weight values
    inside the signed range of weight_bits (packed: group scales >= 1, zero points <= 15, and every int8 level
    (code - zero) * scale inside [-128, 127], which the integer K loop relies on)."""
    for suffix, tensor in tensors.items():
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            raise FormatError(f"{source}: tensor {prefix}.{suffix} holds NaN or Inf; {_REDO}")
    for suffix in ("weight_scale", "input_inv_scale", "weight_group_scale"):
        if suffix in tensors and not (tensors[suffix] > 0).all():
            raise FormatError(f"{source}: tensor {prefix}.{suffix} has zero or negative entries; {_REDO}")
    zero = tensors.get("weight_group_zero")
    if zero is not None and zero.numel() and int(zero.max()) > PACKED_CODE_MAX:
        raise FormatError(f"{source}: tensor {prefix}.weight_group_zero has values above {PACKED_CODE_MAX}; {_REDO}")
    weight = tensors.get("weight")
    if weight is None or not weight.numel():
        return
    if config.packed:
        if zero is not None and "weight_group_scale" in tensors:
            levels = packed_levels(weight, tensors["weight_group_scale"], zero, config.group_size)
            low, high = int(levels.min()), int(levels.max())
            if low < -128 or high > 127:
                raise FormatError(f"{source}: tensors {prefix}.weight / weight_group_scale / weight_group_zero give "
                                  f"int8 levels in [{low}, {high}], outside [-128, 127]; {_REDO}")
        return
    qmax = weight_qmax(config.weight_bits)
    if int(weight.abs().max()) > qmax:
        raise FormatError(f"{source}: tensor {prefix}.weight has values outside ±{qmax} "
                          f"(weight_bits={config.weight_bits}); {_REDO}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> uint8 [N, ceil(K/2)]: channel 2j in the low nibble of byte j, 2j+1 in the high
    one (an odd K leaves the last high nibble 0)."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """pack_int4's inverse: uint8 [N, P] -> uint8 codes [N, in_features] (default 2P)."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return codes[:, :in_features] if in_features is not None else codes


def packed_levels(packed: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor, group_size: int,
                  in_features: int | None = None) -> torch.Tensor:
    """The int8 weight levels a packed weight stands for: (code - zero[g]) * scale[g], g = k // group_size,
    as int16 [N, K] (not clamped, so that a validator can see overflow)."""
    return code_levels(unpack_int4(packed, in_features), group_scale, group_zero, group_size)


def levels_fit_bytes(packed: torch.Tensor, group_scale: torch.Tensor, group_size: int,
                     in_features: int | None = None) -> bool:
    """Whether every code times its group scale is at most 255, as the GPU kernels' SCALED_LEVELS loop needs (it
    scales four codes in one 32-bit multiply). True for what `outliertune quantize` writes (it keeps codes at most
    255 / scale); the format allows any level inside int8 (a large scale with codes up to 15, as another writer may
    produce): such a layer runs the other loops."""
    codes = unpack_int4(packed, in_features).to(torch.int16)
    k = codes.shape[1]
    size = k if group_size == 0 else group_size
    index = torch.arange(k, device=codes.device) // size
    return bool((codes * group_scale.to(torch.int16)[:, index] <= 255).all())


def code_levels(codes: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """packed_levels of codes already unpacked: uint8 [N, K] -> int16 [N, K]."""
    codes = codes.to(torch.int16)
    k = codes.shape[1]
    size = k if group_size == 0 else group_size
    index = torch.arange(k, device=codes.device) // size
    return (codes - group_zero.to(torch.int16)[:, index]) * group_scale.to(torch.int16)[:, index]


_SAFETENSORS_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64,
                       "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool}


def read_safetensors_layout(path: Path, redo: str = "copy the checkpoint again or re-run `outliertune quantize`",
                            ) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's header alone (no tensor data is read); raises
    FormatError, ending with ``redo``, if the header is unreadable or the file is shorter than the header promises
    (a truncated copy)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        length_bytes = file.read(8)
        header_length = int.from_bytes(length_bytes, "little") if len(length_bytes) == 8 else -1
        if header_length < 0 or header_length > size - 8:
            raise FormatError(f"{path}: not a complete safetensors file (no readable header); {redo}")
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: corrupt safetensors header ({exc}); {redo}") from exc
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_length + data_end > size:
        raise FormatError(f"{path}: file is truncated ({size} bytes, its header describes "
                          f"{8 + header_length + data_end}); {redo}")
    return {name: (_SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]), tuple(entry["shape"]))
            for name, entry in header.items()}


def _check_lm_head(model_dir: Path, config: QuantizationConfig, prefixes: list[str]) -> None:
    """A quantized lm_head (quantization_config.lm_head) has its tensors (their layout is checked with the other
    linears) and untied embeddings; an unquantized one has none of them."""
    quantized = [prefix for prefix in prefixes if _listed(prefix, (LM_HEAD,))]
    if not config.quantized_lm_head:
        if quantized:
            raise FormatError(f"{model_dir}: tensor {quantized[0]}.weight_scale is there but config.json "
                              f"quantization_config has no lm_head entry (lm_head unquantized); {_REDO}")
        return
    if not quantized:
        raise FormatError(f"{model_dir}: quantization_config.lm_head is {config.lm_head!r} but no safetensors file "
                          f"has tensor {LM_HEAD}.weight_scale (or an int8 {LM_HEAD}.weight); {_REDO}")
    hf_config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    if hf_config.get("tie_word_embeddings", False):
        raise FormatError(f"{model_dir}/config.json: tie_word_embeddings is true, but a quantized lm_head "
                          f"(quantization_config.lm_head) needs its own tensors: set it to false or {_REDO}")


def validate_checkpoint_dir(model_dir: Path, config: QuantizationConfig) -> int:
    """Check an OutlierTune checkpoint directory before any weight is loaded: every safetensors file complete,
    every quantized linear's tensors present with the right dtype and shapes, small vectors finite and scales
    positive. Returns the number of quantized linears. Weight value ranges are checked after loading."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir}: no *.safetensors files; OutlierTune checkpoints are safetensors only "
                          f"(re-run `outliertune quantize`)")
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        missing_files = sorted({file for file in json.loads(index_path.read_text())["weight_map"].values()
                                if not (model_dir / file).exists()})
        if missing_files:
            raise FormatError(f"{index_path}: lists {missing_files}, which are not in {model_dir}; copy the whole "
                              f"checkpoint directory")
    layout, file_of = {}, {}
    for path in files:
        for name, entry in read_safetensors_layout(path).items():
            layout[name], file_of[name] = entry, path
    weight_dtype = config.linear_tensors[0].dtype
    prefixes = sorted({name.rsplit(".", 1)[0] for name in layout if name.endswith(".weight_scale")
                       or (name.endswith(".weight") and layout[name][0] == weight_dtype)})
    _check_lm_head(model_dir, config, prefixes)
    for prefix in prefixes:
        config_of_module = config.for_module(prefix)
        weight_dtype = config_of_module.linear_tensors[0].dtype
        weight = layout.get(f"{prefix}.weight")
        if weight is None or len(weight[1]) != 2:
            raise FormatError(f"{model_dir}: tensor {prefix}.weight ({weight_dtype} [out, in]) is missing or not "
                              f"2-D; re-run `outliertune quantize`")
        out_features, in_features = weight[1][0], weight[1][1] * (2 if config_of_module.packed else 1)
        names = {suffix: f"{prefix}.{suffix}" for suffix in LINEAR_TENSOR_SUFFIXES if f"{prefix}.{suffix}" in layout}
        check_linear_layout(prefix, {suffix: layout[name] for suffix, name in names.items()}, out_features,
                            in_features, config_of_module, source=str(model_dir),
                            file_of={suffix: file_of[name] for suffix, name in names.items()})
        vectors = {}  # the small tensors are value-checked now, the [N, K] weights after loading
        for spec in config_of_module.linear_tensors:
            if spec.suffix in names and spec.dim in ("out", "in", "exact"):
                with safe_open(str(file_of[names[spec.suffix]]), framework="pt") as file:
                    vectors[spec.suffix] = file.get_tensor(names[spec.suffix])
        check_linear_values(prefix, vectors, config_of_module, source=str(model_dir))
        check_exact_index(prefix, vectors, in_features, source=str(model_dir))
    return len(prefixes)
