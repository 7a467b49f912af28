"""The decoder-layer structure of each supported architecture: which linears share an input, which norm produces
that input (and how its scale can be folded), and where the rows lie that o_proj's and down_proj's input steps
fold into. Everything else of the offline tool (calibration, folding, checkpoint names) reads it from here.

Folding is exact in real arithmetic for every entry below:
    attn / MLP norm   RMSNorm  x_hat * g          -> g / s
                      Gemma    x_hat * (1 + g)    -> (1 + g) / s - 1
                      LayerNorm x_hat * g + b     -> g / s and b / s - shift (the shift needs no runtime vector)
    o_proj input      v rows (softmax rows sum to 1: the attention output is linear in v, per kv head)
    down_proj input   up rows of a GLU (act(gate) * up is linear in up), or fc1 rows before a ReLU
                      (relu(x / s) = relu(x) / s for s > 0)
Sandwich norms (Gemma's post-attention / post-MLP norms) see o_proj / down_proj outputs, which folding leaves
unchanged; q_norm / k_norm (Qwen3, Gemma 3) act on q and k only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

# Llama-style module names, relative to a decoder layer.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

INPUT_GROUPS = ("qkv", "o", "gate_up", "down")  # linears sharing one input, in layer order
RowsOf = Callable[[torch.nn.Module, object], tuple[str, slice]]  # (layer, HF config) -> (linear name, its rows)


def _all_rows(name: str) -> RowsOf:
    return lambda layer, config: (name, slice(None))


def _fused_v_rows(layer: torch.nn.Module, config) -> tuple[str, slice]:
    """v rows of a fused qkv_proj: after num_heads q rows and num_kv_heads k rows (per head_dim)."""
    heads, kv_heads, head_dim = attention_groups(config)
    return "self_attn.qkv_proj", slice((heads + kv_heads) * head_dim, None)


def _fused_up_rows(layer: torch.nn.Module, config) -> tuple[str, slice]:
    """up rows of a fused gate_up_proj: its second half (transformers chunks gate, up)."""
    return "mlp.gate_up_proj", slice(layer.get_submodule("mlp.gate_up_proj").out_features // 2, None)


@dataclasses.dataclass(frozen=True)
class Architecture:
    classes: tuple[str, ...]            # config.json "architectures" / transformers class names
    layers: str = "model.layers"        # the decoder layers (ModuleList), from the causal-LM module
    qkv: tuple[str, ...] = QKV          # linears reading the attention norm's output
    o_proj: str = "self_attn.o_proj"
    gate_up: tuple[str, ...] = GATE_UP  # linears reading the MLP norm's output
    down_proj: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    final_norm: str = "model.norm"      # the norm in front of lm_head (--lm-head int8 folds lm_head's step into it)
    norm: str = "rms"                   # "rms" (x_hat * g), "rms_one_plus" (x_hat * (1 + g)), "layernorm"
    v_rows: RowsOf = _all_rows(QKV[2])
    up_rows: RowsOf = _all_rows(GATE_UP[1])
    check: Callable[[dict], str | None] = lambda config: None  # config.json -> why it cannot be folded exactly
    # Activation clipping ratios the plan search may choose (offline/search.py SearchGrid.clips); None: the grid's.
    activation_clips: tuple[float, ...] | None = None
    # Activation bits at which the plan search ranks candidates by the mean per-token relative output error
    # (SearchGrid.per_token) instead of the total.
    per_token_bits: tuple[int, ...] = ()
    # Weight bits at which --weight-rounding auto picks GPTQ (offline/quantize.py resolves it); None: the default
    # choice (quantize.AUTO_ROUNDING).
    gptq_bits: tuple[int, ...] | None = None
    # --range-margin (every group) when none is given; None: quantize.AUTO_RANGE_MARGIN by bit widths.
    range_margin: float | None = None

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Linears per shared input, by the names calibration statistics and plans use."""
        return dict(zip(INPUT_GROUPS, (self.qkv, (self.o_proj,), self.gate_up, (self.down_proj,))))

    @property
    def linears(self) -> tuple[str, ...]:
        return self.qkv + (self.o_proj,) + self.gate_up + (self.down_proj,)


def _opt_check(config: dict) -> str | None:
    if not config.get("do_layer_norm_before", True):
        return ("do_layer_norm_before is false (post-LayerNorm, as in OPT-350m): the norm sits on the residual "
                "stream, so activation steps cannot be folded into it")
    if config.get("activation_function", "relu") != "relu":
        return f"activation_function {config['activation_function']!r}: only relu lets fc2's steps fold into fc1 rows"
    if config.get("word_embed_proj_dim", config.get("hidden_size")) != config.get("hidden_size"):
        return "word_embed_proj_dim differs from hidden_size (project_in / project_out layers)"
    return None


LLAMA_LIKE = Architecture(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"))
# Gemma: no activation clipping. Its q/k norms and sandwich norms rescale each token's linear output to a fixed RMS,
# so the few values a clip cuts off (from rare tokens, which the search's token sample lacks) become a full-size
# error of that token. Gemma 3 270M W8A8, Brown test, fp32 reference, 2 windows: searched clips +7.7 % perplexity,
# no clipping +3.5 % (40 windows through vLLM: docs/accuracy.md).
# GPTQ weights at 8 bits too: Gemma passes the weight error on at full size (the norms again). Gemma 3 270M, Brown
# test, through vLLM, 40 windows: W8A8 RTN +3.8 %, GPTQ +3.0 %; W6A6 RTN +22.0 %, GPTQ +27.7 % (so not at 6 bits;
# docs/accuracy.md).
# At 8-bit activations the search ranks plans by the mean per-token relative error (the norms again: a small token's
# error counts as much as a large one's): it then keeps down_proj's finest activation steps (strength 0) in 7 of 18
# layers where the total error chose coarser ones. Gemma 3 270M W8A8, Brown test: +1.1 % instead of +3.0 % through
# vLLM (40 windows; dynamic per-token W8A8 +1.7 %), fp32 reference on 8 windows +1.8 % vs +4.1 %. Not at 6 bits:
# W6A6 +23.7 % vs +22.0 % (reference, 8 windows; docs/accuracy.md).
# No range margin (the figures above were measured without one). The token guard follows the package default
# (quantize.AUTO_TOKEN_GUARD, AUTO_GUARD_FLOOR). Gemma 3 270M, `mixed` calibration, fp32, 16 windows, no guard ->
# guard (docs/accuracy.md, "Gemma 3 with the token guard at every bit width"): W8A8 through vLLM JavaScript +4.4 % ->
# +1.7 %, Brown +3.7 % -> +0.6 % (dynamic per-token W8A8 +4.9 %, +3.9 %); W6A6 (floor 1/16) JavaScript +23.5 % ->
# +11.9 %, Brown +26.7 % -> +8.0 % (torch); W4A8 (the same weights: the run-time guard alone) JavaScript +35.6 % ->
# +30.8 %, Brown +22.4 % -> +23.4 % (torch; over 40 windows +24.8 % -> +24.1 %).
GEMMA = Architecture(("Gemma2ForCausalLM", "Gemma3ForCausalLM"), mlp_norm="pre_feedforward_layernorm",
                     norm="rms_one_plus", activation_clips=(1.0,), per_token_bits=(8,), gptq_bits=(4, 8),
                     range_margin=1.0)
PHI3 = Architecture(("Phi3ForCausalLM",), qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",),
                    v_rows=_fused_v_rows, up_rows=_fused_up_rows)
OPT = Architecture(("OPTForCausalLM",), layers="model.decoder.layers", o_proj="self_attn.out_proj",
                   gate_up=("fc1",), down_proj="fc2", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
                   final_norm="model.decoder.final_layer_norm", norm="layernorm", v_rows=_all_rows(QKV[2]),
                   up_rows=_all_rows("fc1"), check=_opt_check)

ARCHITECTURES = {name: arch for arch in (LLAMA_LIKE, GEMMA, PHI3, OPT) for name in arch.classes}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# Classes whose lm_head vLLM runs unquantized whatever the checkpoint holds: --lm-head int8 is
# refused for them.
UNQUANTIZED_LM_HEAD = {"Gemma2ForCausalLM": "vLLM computes its logits with the embedding matrix (always tied)",
                       "OPTForCausalLM": "vLLM builds its lm_head without the quantization config"}


def architecture_of(model) -> Architecture:
    """The structure of an in-memory transformers causal LM, by its class or the nearest supported class it derives
    from (custom model code from a model directory usually subclasses a transformers model)."""
    for cls in type(model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise ValueError(f"{type(model).__name__} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_submodule(architecture_of(model).layers)


def attention_groups(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of a transformers config object."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim
