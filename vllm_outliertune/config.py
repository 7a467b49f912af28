"""The vLLM `QuantizationConfig` for OutlierTune checkpoints: parses `quantization_config`, picks a method per layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_outliertune import format as fmt


class OutlierTuneConfig(QuantizationConfig):
    """Static per-channel W8A8 / W6A6 (OutlierTune). Built from config.json's `quantization_config`."""

    def __init__(self, spec: fmt.QuantizationConfig):
        super().__init__()
        self.spec = spec

    def __repr__(self) -> str:
        return (f"OutlierTuneConfig(weight_bits={self.spec.weight_bits}, activation_bits={self.spec.activation_bits}, "
                f"ignore={list(self.spec.ignore)}, lm_head={self.spec.lm_head})")

    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # int8 tensor cores (Turing and newer)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "OutlierTuneConfig":
        return cls(fmt.QuantizationConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """vLLM calls this in the front-end process before any engine starts: check a local checkpoint's files and
        tensors here, so a damaged checkpoint fails fast with an error that names the file and tensor."""
        if Path(model_name).is_dir():
            fmt.validate_checkpoint_dir(Path(model_name), self.spec)

    def _shard_names(self, prefix: str) -> list[str]:
        """Checkpoint module names behind a vLLM layer: qkv_proj -> q_proj, k_proj, v_proj (packed_modules_mapping)."""
        parent, _, name = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(name)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]

    def is_layer_ignored(self, prefix: str) -> bool:
        ignored = [self.spec.is_ignored(name) for name in self._shard_names(prefix)]
        if any(ignored) and not all(ignored):
            raise fmt.FormatError(
                f"quantization_config.ignore lists only some of {self._shard_names(prefix)}, which vLLM runs as one "
                f"layer ({prefix}); ignore all of them or none and re-run `outliertune quantize`")
        return all(ignored)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # lm_head as vLLM's GPTQ/AWQ configs do (lm_head_quantized): our LinearMethod on the ParallelLMHead, whose
        # vocab-sharding weight loader pads every per-output tensor (padded rows: scale 0, bias 0 -> logit 0).
        quantized_head = isinstance(layer, ParallelLMHead) and self.spec.quantized_lm_head
        if not isinstance(layer, LinearBase) and not quantized_head:
            return None  # embeddings, an unquantized lm_head, attention
        if self.is_layer_ignored(prefix):
            return UnquantizedLinearMethod()
        from vllm_outliertune.linear import OutlierTuneLinearMethod

        return OutlierTuneLinearMethod(self.module_spec(prefix), prefix, self._shard_names(prefix))

    def module_spec(self, prefix: str) -> fmt.QuantizationConfig:
        """The format of vLLM layer ``prefix``: that of its checkpoint modules, which must agree (int8_weights)."""
        specs = {self.spec.for_module(name) for name in self._shard_names(prefix)}
        if len(specs) > 1:
            raise fmt.FormatError(
                f"quantization_config.int8_weights lists only some of {self._shard_names(prefix)}, which vLLM runs "
                f"as one layer ({prefix}); list all of them or none and re-run `outliertune quantize`")
        return specs.pop()


def register_with_vllm() -> None:
    """Register "outliertune" with vLLM (idempotent: vLLM calls plugins once per process it starts)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if fmt.QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(fmt.QUANT_METHOD)(OutlierTuneConfig)
