"""The vLLM LinearMethod for OutlierTune layers: parameters that go through vLLM's (tensor-parallel) weight loaders,
load-time validation against vllm_outliertune.format, and `apply` through the custom ops of kernels/linear.py."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)

from vllm_outliertune import format as fmt
from vllm_outliertune.kernels import configs
from vllm_outliertune.kernels import linear as kernel_ops
from vllm_outliertune.kernels.load_pick import pick_untuned_shape
from vllm_outliertune.kernels.torch_ref import (
    add_exact_channels, quantize_activation_guarded_traced, quantize_activation_ref)

_QKV_SHARD_INDEX = {"q": 0, "k": 1, "v": 2}
logger = logging.getLogger("vllm.outliertune")  # under vLLM's logger, so its handler prints our lines
# (weight shape, output dtype, device) whose GEMM kernels were compiled at load: once per process and shape.
_WARMED_UP: set[tuple] = set()
# Per-rank weight shapes created since the last load finished, with their format's fallback kernel (int8_gemm,
# w4a8_gemm), and (model, TP size) for the tuning hint.
_NEW_SHAPES: dict[tuple[int, int, str], None] = {}
_TUNE_HINT: list[tuple[str, int]] = []


def report_untuned_shapes(device: torch.device) -> str | None:
    """One log line naming the weight shapes created since the last call whose tiles were not tuned on this GPU
    (they run with tiles of another GPU of the chip family, or the shape-generic ones), and the command that tunes
    them. Called when the first layer finishes loading: every layer was created by then. Returns the line."""
    shapes = list(_NEW_SHAPES)
    _NEW_SHAPES.clear()
    if device.type != "cuda":
        return None
    keys = configs.table_keys(device)
    fallbacks = [((n, k, fallback), source) for n, k, fallback in shapes
                 if (source := configs.tile_source(n, k, keys, fallback))]
    if not fallbacks:
        return None
    model, tp = _TUNE_HINT[-1] if _TUNE_HINT else ("MODEL_DIR", 1)
    packed = " --w4a8" if any(fallback == "w4a8_gemm" for (_, _, fallback), _ in fallbacks) else ""
    line = (f"outliertune: no GEMM tiles tuned on {keys[0]} for weight shapes "
            + ", ".join(f"[{n}, {k}]{' (4-bit)' if fallback == 'w4a8_gemm' else ''} ({source})"
                        for (n, k, fallback), source in fallbacks)
            + f"; tune them on this GPU (minutes) with `outliertune tune {model} --tp {tp}{packed}` (until then "
            "each runs the fastest of a few generic tiles per small M, timed at load)")
    logger.warning(line)
    return line


class ReplicatedInputVector(BasevLLMParameter):
    """A per-input-channel vector of a column-parallel layer: every rank holds all of it, and the shards of a merged
    layer (q/k/v, gate/up) share one input, so each shard must carry the same vector."""

    def _load_shared(self, loaded_weight: torch.Tensor, **_) -> None:
        if getattr(self, "loaded_once", False):
            if not torch.equal(self.data, loaded_weight.to(self.data.device)):
                raise fmt.FormatError(
                    f"{self.checkpoint_name}: the shards of this merged layer share one input and must carry "
                    f"identical per-input-channel vectors, but they differ; re-run `outliertune quantize`")
            return
        self._assert_and_load(loaded_weight)
        self.loaded_once = True

    load_merged_column_weight = _load_shared
    load_qkv_weight = _load_shared
    load_column_parallel_weight = _load_shared


@register_weight_loader_v2_supported_method
class OutlierTuneLinearMethod(LinearMethodBase):
    """y = weight_scale * (q @ weight.T) + output_bias (+ bias); q = clamp(round(x * input_inv_scale - input_shift))."""

    def __init__(self, spec: fmt.QuantizationConfig, prefix: str, shard_names: list[str]):
        self.spec = spec  # this layer's format (OutlierTuneConfig.module_spec)
        self.prefix = prefix
        self.shard_names = shard_names

    def _shard_name(self, shard_id) -> str:
        """The checkpoint module a loaded tensor came from, for error messages."""
        index = self._shard_index(shard_id)
        return self.shard_names[index] if isinstance(index, int) and index < len(self.shard_names) else self.prefix

    def _checked_loader(self, suffix: str, dtype: torch.dtype, weight_loader: Callable) -> Callable:
        """Wrap vLLM's loader: refuse a wrong dtype (vLLM would silently cast it), turn shape asserts into errors
        that name the tensor, and record which shards arrived (vLLM does not report missing tensors of quantized
        models)."""

        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id=None) -> None:
            name = f"{self._shard_name(loaded_shard_id)}.{suffix}"
            param.checkpoint_name = name
            if loaded_weight.dtype != dtype:
                raise fmt.FormatError(f"checkpoint tensor {name} is {loaded_weight.dtype}, expected {dtype}; "
                                      f"re-run `outliertune quantize`")
            try:
                if loaded_shard_id is None and isinstance(param, ReplicatedInputVector):
                    # A linear fused in the checkpoint itself (Phi-3 qkv_proj / gate_up_proj): one input, one
                    # vector (vLLM would try to split it along an output dimension it does not have).
                    param._load_shared(loaded_weight)
                elif loaded_shard_id is None:
                    weight_loader(param, loaded_weight)
                else:
                    weight_loader(param, loaded_weight, loaded_shard_id)
            except AssertionError as exc:
                raise fmt.FormatError(
                    f"checkpoint tensor {name} has shape {list(loaded_weight.shape)}, which does not fit the model's "
                    f"layer {self.prefix} (parameter shard {list(param.shape)}); the checkpoint was made for another "
                    f"model config or is damaged: re-run `outliertune quantize`") from exc
            param.loaded_shards.add(loaded_shard_id)

        return load

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs["weight_loader"]
        out_features = sum(output_partition_sizes)
        layer.logical_widths = output_partition_sizes
        row_parallel = isinstance(layer, RowParallelLinear)

        def add(suffix: str, param_class, shape, fill: float | None = None, **dims) -> None:
            spec_dtype = next(spec.dtype for spec in self.spec.linear_tensors if spec.suffix == suffix)
            data = torch.empty(shape, dtype=spec_dtype) if fill is None else torch.full(shape, fill, dtype=spec_dtype)
            param = param_class(data=data, weight_loader=self._checked_loader(suffix, spec_dtype, weight_loader),
                                **dims)
            param.loaded_shards = set()
            layer.register_parameter(suffix, param)

        if self.spec.packed:
            self._check_packed_partition(row_parallel, input_size_per_partition, input_size)
            add("weight", ModelWeightParameter, (out_features, input_size_per_partition // 2), input_dim=1,
                output_dim=0)
            groups = self.spec.groups(input_size_per_partition)
            for suffix in ("weight_group_scale", "weight_group_zero"):
                if self.spec.group_size == 0:  # one group per row: every K shard uses the whole row's
                    add(suffix, ChannelQuantScaleParameter, (out_features, 1), output_dim=0)
                else:
                    add(suffix, GroupQuantScaleParameter, (out_features, groups), input_dim=1, output_dim=0)
        else:
            add("weight", ModelWeightParameter, (out_features, input_size_per_partition), input_dim=1, output_dim=0)
        add("weight_scale", ChannelQuantScaleParameter, (out_features,), output_dim=0)
        add("output_bias", ChannelQuantScaleParameter, (out_features,), output_dim=0)
        # Optional per-input-channel vectors start neutral; ones the checkpoint does not have are dropped after loading.
        input_vector = (RowvLLMParameter, {"input_dim": 0}) if row_parallel else (ReplicatedInputVector, {})
        add("input_inv_scale", input_vector[0], (input_size_per_partition,), fill=1.0, **input_vector[1])
        add("input_shift", input_vector[0], (input_size_per_partition,), fill=0.0, **input_vector[1])
        if self.spec.exact_channels:
            # Channel indices of the whole input (every rank loads all of them; row-parallel ranks keep theirs).
            add("exact_index", ReplicatedInputVector, (self.spec.exact_channels,))
            add("exact_weight", ChannelQuantScaleParameter, (out_features, self.spec.exact_channels), output_dim=0)
        layer.num_output_shards = len(output_partition_sizes)
        # The most rows one forward pass can send through this layer: the GEMMs are compiled up to it at load.
        vllm_config = get_current_vllm_config()
        layer.max_rows = vllm_config.scheduler_config.max_num_batched_tokens
        _NEW_SHAPES[(out_features, input_size_per_partition, "w4a8_gemm" if self.spec.packed else "int8_gemm")] = None
        _TUNE_HINT[:] = [(getattr(vllm_config.model_config, "model", "MODEL_DIR"),
                          vllm_config.parallel_config.tensor_parallel_size)]

    def _check_packed_partition(self, row_parallel: bool, k_per_partition: int, k: int) -> None:
        """Row-parallel layers split K across ranks: each rank's part must be whole bytes and whole groups (unsplit,
        K may end in a short group, e.g. SmolLM2's 576 at group size 128)."""
        group_size = self.spec.group_size
        split = row_parallel and k_per_partition != k
        if k_per_partition % 2 or (split and group_size and k_per_partition % group_size):
            raise fmt.FormatError(
                f"{self.prefix}: tensor parallelism splits its {k} input channels into parts of {k_per_partition}, "
                f"which do not align to the checkpoint's groups of {group_size} (packed 4-bit weights, "
                f"quantization_config.group_size); use a tensor-parallel size that divides {k} // {group_size} "
                f"= {k // group_size if group_size else k}, or re-run `outliertune quantize` with a --group-size that "
                f"divides {k_per_partition}")

    @staticmethod
    def _shard_index(shard_id) -> int:
        return 0 if shard_id is None else _QKV_SHARD_INDEX.get(shard_id, shard_id)

    def _check_loaded(self, layer: torch.nn.Module) -> None:
        """Every required tensor of every shard arrived; optional vectors arrived for all shards or none."""
        expected = 1 if isinstance(layer, RowParallelLinear) else layer.num_output_shards
        for spec in self.spec.linear_tensors:
            shards = getattr(layer, spec.suffix).loaded_shards
            # No shard id: the whole (possibly checkpoint-fused) layer arrived at once.
            arrived = set(range(expected)) if None in shards else {self._shard_index(shard) for shard in shards}
            if len(arrived) == expected or (not spec.required and not arrived):
                continue
            missing = [name for index, name in enumerate(self.shard_names[:expected]) if index not in arrived]
            raise fmt.FormatError(
                f"checkpoint is missing tensor(s) {', '.join(f'{name}.{spec.suffix}' for name in missing)} "
                f"({spec.meaning}); re-run `outliertune quantize`")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        self._check_loaded(layer)
        # A ParallelLMHead's shard ends in padding rows (vocab padded to a multiple of 64 per rank), which its
        # weight loader zero-fills: scale 0 and bias 0 give them logit 0, which vLLM discards; check the real rows.
        rows = getattr(layer, "num_org_embeddings_per_partition", layer.weight.shape[0])
        tensors = {spec.suffix: getattr(layer, spec.suffix).data[:rows] if spec.dim.startswith("out")
                   else getattr(layer, spec.suffix).data
                   for spec in self.spec.linear_tensors if getattr(layer, spec.suffix).loaded_shards}
        # In-features of this rank's part (a packed weight holds two per byte); one group per row stays one.
        in_features = layer.weight.shape[1] * (2 if self.spec.packed else 1)
        # (A ParallelLMHead of some vLLM versions has no input_size; its input is never split.)
        whole_in_features = getattr(layer, "input_size", in_features)
        fmt.validate_linear(self.prefix, tensors, rows, in_features, self.spec,
                            source="checkpoint (as loaded by vLLM)", whole_in_features=whole_in_features)
        output_bias = layer.output_bias.data
        bias = getattr(layer, "bias", None)
        if bias is not None and not getattr(layer, "skip_bias_add", False):  # (ParallelLMHead has no such flag)
            # One epilogue vector: the model's own bias joins output_bias.
            output_bias = output_bias + bias.data.float()
            layer.bias = None
        if isinstance(layer, RowParallelLinear) and layer.tp_rank > 0:
            # Row-parallel partial sums are all-reduced: the full additive term is added on rank 0 only.
            output_bias = torch.zeros_like(output_bias)
        # Plain tensors from here on: the loaders are no longer needed and custom ops take tensors.
        layer.weight = torch.nn.Parameter(layer.weight.data.contiguous(), requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(layer.weight_scale.data, requires_grad=False)
        layer.output_bias = torch.nn.Parameter(output_bias, requires_grad=False)
        for suffix in ("input_inv_scale", "input_shift"):
            param = getattr(layer, suffix)
            setattr(layer, suffix,
                    torch.nn.Parameter(param.data, requires_grad=False) if param.loaded_shards else None)
        self._localize_exact_channels(layer)
        if self.spec.packed and not layer.weight.is_cuda:
            # No W4A8 kernel off the GPU, and the reference would unpack the weight on every call: unpack it once
            # (int8 levels, twice the packed bytes) and run the int8 path, which computes the same integers.
            levels = fmt.packed_levels(layer.weight.data, layer.weight_group_scale.data, layer.weight_group_zero.data,
                                       self.spec.group_size, layer.input_size_per_partition)
            layer.weight = torch.nn.Parameter(levels.to(torch.int8), requires_grad=False)
            layer.weight_group_scale = layer.weight_group_zero = None
        elif self.spec.packed:  # as the W4A8 kernels read them: int32 words of 8 channels, everything N-major
            layer.levels_fit_bytes = fmt.levels_fit_bytes(layer.weight.data, layer.weight_group_scale.data,
                                                          self.spec.group_size, layer.input_size_per_partition)
            layer.weight = torch.nn.Parameter(
                kernel_ops.w4a8_gpu_words(layer.weight.data, layer.input_size_per_partition), requires_grad=False)
            for suffix in ("weight_group_scale", "weight_group_zero"):
                setattr(layer, suffix, torch.nn.Parameter(kernel_ops.w4a8_gpu_layout(getattr(layer, suffix).data),
                                                          requires_grad=False))
            self._warm_up(layer, kernel_ops.PackedGroups(layer.weight_group_scale, layer.weight_group_zero,
                                                         self.spec.group_size, layer.input_size_per_partition,
                                                         layer.levels_fit_bytes),
                          self.spec.token_guard)
            return
        if _NEW_SHAPES:
            report_untuned_shapes(layer.weight.device)
        self._warm_up(layer, guarded=self.spec.token_guard)

    def _localize_exact_channels(self, layer: torch.nn.Module) -> None:
        """exact_index names channels of the whole input; a row-parallel rank sees its part of K only, so it keeps
        the channels inside its part (as local indices) and zeroes the weight columns of the others (another rank
        adds them; the partial sums are all-reduced)."""
        if not self.spec.exact_channels:
            layer.exact_index = layer.exact_weight = None
            return
        index = layer.exact_index.data.long()
        weight = layer.exact_weight.data.clone()
        if isinstance(layer, RowParallelLinear):
            part = layer.input_size_per_partition
            index = index - layer.tp_rank * part
            outside = (index < 0) | (index >= part)
            weight[:, outside] = 0
            index[outside] = 0
        layer.exact_index = torch.nn.Parameter(index, requires_grad=False)
        layer.exact_weight = torch.nn.Parameter(weight, requires_grad=False)

    @staticmethod
    def _warm_up(layer: torch.nn.Module, packed: kernel_ops.PackedGroups | None = None,
                 guarded: bool = False) -> None:
        """Compile the Triton GEMMs this layer's shape can hit now rather than during the first requests, where a
        JIT compile stalls the whole batch (CUDA-graph capture covers only the decode sizes). ``packed``: the
        group tensors of a packed 4-bit weight; ``guarded``: the checkpoint's token guard (its own variants)."""
        key = (tuple(layer.weight.shape), layer.params_dtype, layer.weight.device,
               packed and (packed.group_size, packed.in_features), guarded)
        if key in _WARMED_UP:
            return
        _WARMED_UP.add(key)
        started = time.perf_counter()
        # tiles for a shape no table tuned (the warm-up below compiles them)
        shape = [layer.weight.shape[0], packed.in_features if packed else layer.weight.shape[1]]
        try:
            picked = pick_untuned_shape(*shape, layer.weight.device, packed.group_size if packed else None)
        except Exception as error:  # a speed-up only: never the reason a model does not load
            picked = None
            logger.warning("outliertune: weight %s: the load-time tile choice failed (%s: %s); it runs the "
                           "shape-generic tiles", shape, type(error).__name__, error)
        if picked:
            logger.info("outliertune: weight %s (untuned here): fastest of the generic alternatives at M <= "
                        "%s: %s (%.1f s)", shape, max(picked, key=int),
                        ", ".join(f"{m}: {kernel}" for m, kernel in picked.items()), time.perf_counter() - started)
        count = kernel_ops.warm_up(layer.weight, layer.weight_scale, layer.output_bias, layer.params_dtype,
                                   layer.max_rows, packed, guarded)
        if count:  # 0 where nothing is compiled (CPU)
            logger.info("outliertune: %d GEMM variants of weight %s ready for up to %d rows in %.1f s", count,
                        list(layer.weight.shape), layer.max_rows, time.perf_counter() - started)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x_2d = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            out = self._traced(layer, x_2d, x.dtype)
        else:
            out = self._eager(layer, x_2d, x.dtype)
        out = add_exact_channels(out, x_2d, layer.exact_index, layer.exact_weight)
        if bias is not None:  # only when the bias could not be merged (skip_bias_add layers never pass one)
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _traced(self, layer: torch.nn.Module, x_2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Traced (vLLM's default mode): the quantization as plain torch ops, which inductor fuses into the kernel
        that produced x (RMSNorm + residual add, SiLU-mul), so that kernel writes int8 codes instead of bf16
        activations and only the GEMM op remains here. The token guard's t and codes likewise (faster on an H200
        than our one-kernel op after an unfused producer, docs/benchmarks.md), whole or in parts; the GEMM's
        epilogue multiplies each row by its t."""
        if self.spec.token_guard:
            codes, t = self._traced_guard(layer, x_2d)
        else:
            codes, t = quantize_activation_ref(x_2d, layer.input_inv_scale, layer.input_shift,
                                               self.spec.activation_bits), None
        return self._codes_gemm(layer, codes, out_dtype, row_scale=t)

    def _eager(self, layer: torch.nn.Module, x_2d: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Eager: our fused ops (the guard's one kernel; quantization in the GEMM's prologue without the guard)."""
        if self.spec.token_guard:
            codes, t = kernel_ops.quantize_activation_guarded(x_2d, layer.input_inv_scale, layer.input_shift,
                                                              self.spec.activation_bits,
                                                              self.spec.token_guard_floor)
            return self._codes_gemm(layer, codes, out_dtype, row_scale=t)
        if layer.weight.dtype == torch.int32:  # packed 4-bit words (on a GPU; elsewhere unpacked at load)
            return kernel_ops.w4a8_linear(x_2d, layer.weight, layer.weight_group_scale, layer.weight_group_zero,
                                          self.spec.group_size, layer.weight_scale, layer.output_bias,
                                          layer.input_inv_scale, layer.input_shift, self.spec.activation_bits,
                                          out_dtype, layer.levels_fit_bytes)
        return kernel_ops.quantized_linear(x_2d, layer.weight, layer.weight_scale, layer.output_bias,
                                           layer.input_inv_scale, layer.input_shift, self.spec.activation_bits,
                                           out_dtype)

    def _traced_guard(self, layer: torch.nn.Module, x_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token guard's codes and t as traced: in parts (a second small kernel) where the input's rows are
        long and come from a pointwise producer (a row-parallel layer's: the MLP activation, attention's output),
        else fused whole into the producer (RMSNorm)."""
        args = (x_2d, layer.input_inv_scale, layer.input_shift, self.spec.activation_bits)
        if kernel_ops.traced_guard_in_parts(x_2d.shape[-1], self.spec.token_guard_floor,
                                            isinstance(layer, RowParallelLinear)):
            return kernel_ops.quantize_activation_guarded_in_parts(*args)
        return quantize_activation_guarded_traced(*args, self.spec.token_guard_floor)

    def _codes_gemm(self, layer: torch.nn.Module, codes: torch.Tensor, out_dtype: torch.dtype,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The GEMM op of this layer's weight format on int8 codes (row_scale: the token guard's t per row)."""
        if layer.weight.dtype == torch.int32:
            return kernel_ops.w4a8_gemm(codes, layer.weight, layer.weight_group_scale, layer.weight_group_zero,
                                        self.spec.group_size, layer.weight_scale, layer.output_bias, out_dtype,
                                        row_scale, layer.levels_fit_bytes)
        return kernel_ops.int8_gemm(codes, layer.weight, layer.weight_scale, layer.output_bias, out_dtype, row_scale)
