"""`outliertune quantize`: calibrate, plan, fold and quantize a model layer by layer, then write the checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import torch

from vllm_outliertune.format import (
    DEFAULT_GROUP_SIZE, FORMAT_VERSION, GROUP_SIZE_MULTIPLE, SUPPORTED_BITS, TOKEN_GUARD_FLOOR_FORMAT_VERSION,
    TOKEN_GUARD_FORMAT_VERSION, QuantizationConfig, validate_linear)
from vllm_outliertune.offline import symmetrize
from vllm_outliertune.offline.assets import DEFAULT_CALIB, calibration_file
from vllm_outliertune.offline.calibrate import HEAD, InputStats, cached_calibrate_layers, float32_on
from vllm_outliertune.offline.checkpoint import (DEFAULT_SHARD_BYTES, check_directory_option, check_output_dir,
                                                 write_checkpoint)
from vllm_outliertune.offline.fakequant import dynamic_output_error
from vllm_outliertune.offline.fold import FoldedLinear, fold_head, fold_layer, row_divisors
from vllm_outliertune.offline.report import PLOTTED_GROUPS, plotted_layers, range_record, write_report
from vllm_outliertune.offline.search import SIMPLE, SearchGrid, output_error, search_plan
from vllm_outliertune.offline.architectures import (
    INPUT_GROUPS, UNQUANTIZED_LM_HEAD, Architecture, architecture_of, attention_groups)
from vllm_outliertune.offline.reference import ReferenceQuantLinear
from vllm_outliertune.offline.model_io import (
    UserError, check_device, check_seq_len, load_model, load_tokenizer, read_config, resolve_model)
from vllm_outliertune.offline.symmetrize import ChannelPlan
from vllm_outliertune.offline.text import read_text, token_windows
from vllm_outliertune.offline.weights import (
    DEFAULT_GROUP_CLIP, GROUP_SEARCHES, QuantizedWeight, WeightFormat, best_row_clip, checkpoint_tensors,
    input_hessian, quantize_gptq, quantize_rtn)


@dataclasses.dataclass(frozen=True)
class RangeMargin:
    """--range-margin F[,GROUP=G,...]: every input group's calibrated per-channel ranges are widened by ``factor``
    before planning, the groups named in ``groups`` by their own G instead (e.g. ``1.5,down=2``)."""
    factor: float = 1.0
    groups: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> RangeMargin:
        """``text`` as --range-margin takes it; ValueError says what is wrong with it."""
        head, *items = text.split(",")
        try:
            factor = float(head)
        except ValueError:
            raise ValueError(f"{text!r} must start with the margin of every group, then GROUP=G exceptions "
                             f"(e.g. 1.5 or 1.5,down=2)") from None
        groups = []
        for item in items:
            group, _, value = item.partition("=")
            try:
                groups.append((group, float(value)))
            except ValueError:
                raise ValueError(f"{item!r} in {text!r} is not GROUP=G with G a number (e.g. down=2)") from None
        margin = cls(factor, tuple(groups))
        margin.check()
        return margin

    def check(self) -> None:
        """ValueError unless every factor is positive and every group an input group named once."""
        names = [group for group, _ in self.groups]
        unknown = sorted(set(names) - set(INPUT_GROUPS))
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"{self}: {'unknown group ' + ', '.join(unknown) if unknown else 'a group named twice'}; "
                             f"name each of "
                             f"{', '.join(INPUT_GROUPS)} at most once")
        if not all(value > 0 for value in (self.factor, *dict(self.groups).values())):
            raise ValueError(f"{self}: every margin must be positive (1: none)")

    def of(self, group: str) -> float:
        return dict(self.groups).get(group, self.factor)

    def __str__(self) -> str:
        return ",".join([f"{self.factor:g}", *(f"{group}={value:g}" for group, value in self.groups)])


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    w_bits: int = 8
    a_bits: int = 8
    samples: int = 128
    seq_len: int = 512
    method: str = "outliertune"
    device: str = "cpu"
    batch_size: int = 8
    seed: int = 0
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: bool = True
    calib_cache: Path | None = None  # directory keeping calibration statistics for reuse
    group_size: int = DEFAULT_GROUP_SIZE  # 4-bit weights: input channels per group scale (0: one per row)
    weight_rounding: str = "auto"  # "rtn", "gptq" or "auto" (the one measured better for w_bits)
    keep_fp16: str = "none"  # input groups left unquantized: "none", "auto" or "LAYER.GROUP,..." (e.g. "1.down")
    # Packed 4-bit weights: input groups whose linears keep int8 weights (W8A8 in the same checkpoint): "none",
    # "auto" (AUTO_INT8_GROUPS, AUTO_INT8_EDGE_GROUPS) or "LAYER.GROUP,...".
    int8_weights: str = "auto"
    # Per input group (not o_proj's), up to this many channels whose calibrated range is over outlier_factor times
    # the median channel range bypass quantization (a floating-point side GEMM over those weight columns).
    exact_channels: int = 0
    outlier_factor: float = 16.0
    act_clips: tuple[float, ...] | None = None  # activation range factors the search tries (None: the architecture's)
    # Calibrated per-channel ranges are widened by this factor (a RangeMargin: per input group) before planning:
    # headroom for activations beyond what the calibration text produced (another domain), paid for in resolution.
    # None: the architecture's, else AUTO_RANGE_MARGIN by bit widths (for_architecture resolves it).
    range_margin: RangeMargin | float | None = None
    # "none": lm_head stays in the model's dtype (tied embeddings stay tied); "int8": planned like a norm-fed linear
    # and written with int8 weights per output row, whatever w_bits (it is the most sensitive layer).
    lm_head: str = "none"
    # Calibrate each layer on the outputs of the previous layers as quantized (folded, weights and activations
    # rounded as the checkpoint computes them) instead of the float ones, as GPTQ originally does: the ranges, search
    # samples and Gram matrices of a layer then see the error accumulated before it. Not cached (--calib-cache).
    sequential_calibration: bool = False
    # Per-token overflow guard at run time (format 3, quantization_config.token_guard): a token whose codes would
    # leave the plan's range is quantized at a step t >= 1 times coarser and its GEMM output scaled by t. None: the
    # architecture's choice, else on for the bit widths in AUTO_TOKEN_GUARD without exact channels (guard below).
    token_guard: bool | None = None
    # With the guard, the least per-token t (quantization_config.token_guard_floor): below 1, tokens whose codes span
    # less than the plan's range get a finer step too. None: AUTO_GUARD_FLOOR by bit widths (floor below).
    token_guard_floor: float | None = None
    # GPTQ with packed 4-bit weights: how each group's integer scale and zero are chosen (weights.GROUP_SEARCHES).
    group_clip: str = DEFAULT_GROUP_CLIP

    @property
    def quant_config(self) -> QuantizationConfig:
        return QuantizationConfig(weight_bits=self.w_bits, activation_bits=self.a_bits,
                                  ignore=("lm_head",) if self.lm_head == "none" else (), method=self.method,
                                  group_size=self.group_size, exact_channels=self.exact_channels,
                                  lm_head=self.lm_head, token_guard=self.guard, token_guard_floor=self.floor,
                                  format_version=(TOKEN_GUARD_FLOOR_FORMAT_VERSION if self.floor != 1.0 else
                                                  TOKEN_GUARD_FORMAT_VERSION if self.guard else FORMAT_VERSION))

    @property
    def guard(self) -> bool:
        """Whether the token guard is used: --token-guard / --no-token-guard, else AUTO_TOKEN_GUARD for the bit
        widths, never with --exact-channels (for_architecture resolves an architecture's own choice first)."""
        if self.token_guard is not None:
            return self.token_guard
        return (self.w_bits, self.a_bits) in AUTO_TOKEN_GUARD and not self.exact_channels

    @property
    def floor(self) -> float:
        """The token guard's least t: --token-guard-floor, else AUTO_GUARD_FLOOR for the bit widths (1 without the
        guard)."""
        if not self.guard:
            return 1.0
        auto = AUTO_GUARD_FLOOR.get((self.w_bits, self.a_bits), 1.0)
        return auto if self.token_guard_floor is None else self.token_guard_floor

    @property
    def rounding(self) -> str:
        """The weight rounding used: --weight-rounding, with auto resolved by the weight bits."""
        return AUTO_ROUNDING[self.w_bits] if self.weight_rounding == "auto" else self.weight_rounding

    @property
    def margin(self) -> RangeMargin:
        """The range margin used: --range-margin, else none with the token guard (which handles tokens beyond the
        ranges at run time) and AUTO_RANGE_MARGIN for the bit widths without it."""
        auto = RangeMargin() if self.guard else AUTO_RANGE_MARGIN.get((self.w_bits, self.a_bits), RangeMargin())
        margin = auto if self.range_margin is None else self.range_margin
        return margin if isinstance(margin, RangeMargin) else RangeMargin(float(margin))

    def for_architecture(self, arch: Architecture) -> QuantizeOptions:
        """These options with --weight-rounding auto and the range margin resolved for ``arch`` where it has its own
        choice, and the token guard resolved (a bool)."""
        options = self
        if self.range_margin is None and arch.range_margin is not None:
            options = dataclasses.replace(options, range_margin=arch.range_margin)
        if self.token_guard is None:
            options = dataclasses.replace(options, token_guard=options.guard)
        if self.weight_rounding != "auto" or arch.gptq_bits is None:
            return options
        return dataclasses.replace(options, weight_rounding="gptq" if self.w_bits in arch.gptq_bits else "rtn")

    @property
    def weight_format(self) -> WeightFormat:
        return WeightFormat.of(self.quant_config)

    @property
    def with_int8_weights(self) -> "QuantizeOptions":
        """These options for a linear kept at int8 weights (per output row; --weight-rounding auto as at 8 bits),
        inside the same checkpoint: its token guard stays the checkpoint's."""
        return dataclasses.replace(self, w_bits=8, int8_weights="none", token_guard=self.guard,
                                   token_guard_floor=self.floor)


@dataclasses.dataclass
class GroupInput:
    """What a plan rule sees for one shared linear input: calibration stats and the group's stacked weights."""

    stats: InputStats
    weight: torch.Tensor  # [sum of N, K] float32, original (unfolded) weights of the linears sharing this input
    share: Callable[[torch.Tensor], torch.Tensor]  # makes per-channel steps equal where folding needs it (GQA)
    grid: SearchGrid = SearchGrid()  # what the search may choose (per architecture)
    exact: torch.Tensor | None = None  # channels left unquantized (symmetrize.outlier_channels)


PlanRule = Callable[[GroupInput, QuantizeOptions], tuple[ChannelPlan, dict]]  # (plan, what was chosen)


def _outliertune(group: GroupInput, options: QuantizeOptions) -> tuple[ChannelPlan, dict]:
    result = search_plan(group.stats, group.weight, options.weight_format, options.a_bits, group.grid, group.share,
                         exact=group.exact)
    return result.plan, dict(result.choice, simple_rule_error=result.simple_error)


def _per_channel(group: GroupInput, options: QuantizeOptions) -> tuple[ChannelPlan, dict]:
    plan = symmetrize.balanced(group.stats, group.weight, options.a_bits, **SIMPLE, share=group.share)
    return symmetrize.with_exact(plan, group.exact), dict(SIMPLE)


def _per_tensor(group: GroupInput, options: QuantizeOptions) -> tuple[ChannelPlan, dict]:
    return symmetrize.per_tensor(group.stats, options.a_bits), {}


def _smoothquant(group: GroupInput, options: QuantizeOptions) -> tuple[ChannelPlan, dict]:
    alpha = 0.5
    plan = symmetrize.smoothquant(group.stats, group.weight.abs().amax(0), options.a_bits, alpha, share=group.share)
    return plan, {"alpha": alpha}


# outliertune: searched per layer (the default); per-channel: its simple rule without search (per-channel steps,
# full range, integer shift); per-tensor and smoothquant: baselines with static per-tensor activation scales.
METHODS: dict[str, PlanRule] = {"outliertune": _outliertune, "per-channel": _per_channel,
                                "per-tensor": _per_tensor, "smoothquant": _smoothquant}


WEIGHT_ROUNDINGS = ("auto", "rtn", "gptq")
LM_HEAD_CHOICES = ("none", "int8")
# --weight-rounding auto: GPTQ for 4- and 6-bit weights (SmolLM2 on Brown, 10 windows: W4A8 g128 +17.7 % over fp16
# vs +33.3 % with RTN; W6A6 +15.5 % vs +21.1 %), RTN at 8 bits, where GPTQ gained little (W8A8: +1.6 % vs +2.1 %)
# for its Gram matrices (K x K per linear input, kept in the calibration cache). Architecture.gptq_bits overrides
# this per family (Gemma 3: GPTQ at 4 and 8 bits, RTN at 6).
AUTO_ROUNDING = {4: "gptq", 6: "gptq", 8: "rtn"}
# Range margin when --range-margin is not given, by (weight bits, activation bits) (1 for any pair not listed):
# every input group's calibrated ranges x1.5 for W8A8. The plan search then chose the lowest factor of its grid
# (0.75) in every group of Qwen2.5-Coder-0.5B and SmolLM2, so each range is 1.125x the calibrated one (with margin 1
# it chose 0.75-1.0: clipping or none). Held-out calibration windows rarely go past the ranges; text of another
# domain does (Qwen's down_proj inputs on JavaScript). W8A8 through vLLM (docs/accuracy.md, "Range headroom by
# default"): Qwen JavaScript +27.6 % -> +14.9 %, Brown +6.5 % -> +2.8 % (16 windows); SmolLM2 Brown 42.33 -> 42.31
# (40 windows). Not for W6A6 nor W4A8 (emulated, 10 windows): SmolLM2 Brown W6A6 +19.4 % -> +26.7 %, W4A8 g128
# +12.6 % -> +14.2 %. 1.5 with down_proj x2 (--range-margin 1.5,down=2) helped Qwen (JavaScript +14.5 %, Brown
# +2.4 %) and SmolLM2 JavaScript (+4.8 -> +3.5 %) but not SmolLM2 Brown (42.31 -> 42.48): not the default.
AUTO_RANGE_MARGIN = {(8, 8): RangeMargin(1.5)}
# --token-guard when neither it nor --no-token-guard is given, by (weight bits, activation bits); with the guard the
# range margin defaults to 1 (AUTO_RANGE_MARGIN is for checkpoints without it). W8A8, torch reference, fp32
# (docs/accuracy.md, "Per-token overflow guard"): Qwen2.5-Coder JavaScript +14.9 % -> +1.0 %, SmolLM2 Brown
# +2.1 % -> +1.1 %, JavaScript +4.8 % -> +1.2 % (16 / 40 windows), each under dynamic per-token W8A8. W4A8
# (packed 4-bit weights, int8 activations): SmolLM2 Brown 10 windows 55.56 -> 54.21, 40 through vLLM 46.59 -> 45.86,
# JavaScript 6.398 -> 6.144 (docs/accuracy.md, "The token guard with W4A8"). W6A6 with AUTO_GUARD_FLOOR only: with
# t >= 1 Qwen JavaScript went +65 % -> +146 % (31 levels: one token's t coarsens all its channels, where the plans
# clip), and a plan search that knows it gave SmolLM2 Brown +19.5 % -> +18.7 % only.
AUTO_TOKEN_GUARD = {(8, 8), (6, 6), (4, 8)}
# The guard's least t (--token-guard-floor) when not given, by bit widths (1 for any pair not listed). At 6 bits a
# token's codes usually span well under the plan's range (fitted to the largest calibrated values of every channel);
# t = max(1/16, ...) (format.guard_scale) gives each token the full 31 levels in its largest channel, on top of
# the static per-channel steps and shifts (the same run-time work as the guard: one max per token, t in the
# epilogue). SmolLM2 W6A6, torch fp32 (docs/accuracy.md, "W6A6: a per-token scale on the static plan"): Brown 40
# windows +19.5 % -> +12.0 %, JavaScript 16 windows +23.8 % -> +14.0 %. A floor of 1/4 or 1/2 was worse on the
# plan search's held-out error; W8A8 and W4A8 keep 1 (exactly the static codes for tokens inside the ranges).
AUTO_GUARD_FLOOR = {(6, 6): 1 / 16}
# With a guard floor below 1 (a per-token t in both directions), the plan search keeps every channel's step at least
# this fraction of the group's median step (SearchGrid.step_floor): a channel quiet in calibration would otherwise
# get a fine step, and text that makes it loud (another domain) would set its token's t and coarsen every other
# channel. W6A6 (docs/accuracy.md, "W6A6: a per-token scale on the static plan"): Qwen2.5-Coder JavaScript 16
# windows +19.2 % -> +17.7 % (dynamic W6A6 +18.8 %), Brown +9.5 % -> +8.9 %, SmolLM2 JavaScript +14.0 % -> +13.8 %,
# Brown 40 windows +12.0 % -> +12.6 %. Offline only: the checkpoint format and the run-time work are unchanged.
MEDIAN_STEP_FLOOR = 0.25
# --keep-fp16 auto keeps an input group unquantized where the plan's output error on the calibration sample is
# more than AUTO_KEEP_FACTOR times that of dynamic per-token quantization (and above AUTO_KEEP_MIN).
AUTO_KEEP_FACTOR = 4.0
AUTO_KEEP_MIN = 1e-3
# --int8-weights auto (the default with packed 4-bit weights) keeps q/k/v at int8 weights in every layer: their
# errors reach the attention logits, which the softmax amplifies. SmolLM2 W4A8 g128 GPTQ on Brown, 10 windows
# (docs/accuracy.md): int8 weights for all q/k/v take back 3.0 of the 8.7 perplexity points that 4-bit weights
# cost, with 16 % of the linear weights; down_proj 2.4 (25 %), gate/up 2.5 (50 %), o_proj 0.2 (9 %).
AUTO_INT8_GROUPS = ("qkv",)
# ... and down_proj of the first and the last layer (AUTO_INT8_EDGE_GROUPS): SmolLM2 W4A8, mixed calibration, 10
# windows: 56.57 -> 55.60 with 1.7 % more of the linear weights at int8 (docs/accuracy.md, fourth pass); on
# Llama-3-8B 2 x 58.7 M weights, 5.67 -> 5.73 GiB (the 5.8 GiB budget of issue 15).
AUTO_INT8_EDGE_GROUPS = ("down",)


def kept_groups(index: int, info: dict[str, dict], options: QuantizeOptions) -> set[str]:
    """The input groups of layer ``index`` that stay in the model's dtype (quantization_config.ignore)."""
    if options.keep_fp16 == "auto":
        return {group for group, values in info.items()
                if values["error"] > AUTO_KEEP_FACTOR * values["dynamic_error"] and values["error"] > AUTO_KEEP_MIN}
    return _listed_groups(index, options.keep_fp16)


def int8_weight_groups(index: int, num_layers: int, groups: Iterable[str], options: QuantizeOptions) -> set[str]:
    """The input groups of layer ``index`` of ``num_layers`` (of ``groups``) whose linears keep int8 weights in a
    packed 4-bit checkpoint (quantization_config.int8_weights)."""
    if not options.weight_format.packed:
        return set()
    if options.int8_weights == "auto":
        edge = AUTO_INT8_EDGE_GROUPS if index in (0, num_layers - 1) else ()
        return {*AUTO_INT8_GROUPS, *edge} & set(groups)
    return _listed_groups(index, options.int8_weights)


def _listed_groups(index: int, listing: str) -> set[str]:
    """The groups of layer ``index`` in a "LAYER.GROUP,..." option ("none": none)."""
    if listing == "none":
        return set()
    return {group for layer, _, group in (item.partition(".") for item in listing.split(",")) if int(layer) == index}


def keep_in_fp(plans: dict[str, ChannelPlan], kept: set[str]) -> dict[str, ChannelPlan]:
    """Plans with the kept groups unscaled (nothing folded for them). o_proj's shift normally joins v_proj's
    output; with q/k/v kept it stays a runtime input_shift of o_proj instead (v_proj may have no bias)."""
    plans = {group: (ChannelPlan(torch.ones_like(plan.step), None, None) if group in kept else plan)
             for group, plan in plans.items()}
    o_plan = plans["o"]
    if "qkv" in kept and "o" not in kept and o_plan.shift is not None and o_plan.inv_scale is None:
        plans["o"] = ChannelPlan(o_plan.fold, torch.ones_like(o_plan.fold), o_plan.shift)
    return plans


def check_options(options: QuantizeOptions) -> None:
    if (options.w_bits, options.a_bits) not in SUPPORTED_BITS:
        raise UserError(f"--w-bits {options.w_bits} --a-bits {options.a_bits} is not supported; supported pairs "
                        f"(w, a): {list(SUPPORTED_BITS)}")
    if options.group_size < 0 or options.group_size % GROUP_SIZE_MULTIPLE:
        raise UserError(f"--group-size {options.group_size}: use 0 (one group per output row) or a positive "
                        f"multiple of {GROUP_SIZE_MULTIPLE} (default {DEFAULT_GROUP_SIZE})")
    if options.weight_rounding not in WEIGHT_ROUNDINGS:
        raise UserError(f"--weight-rounding {options.weight_rounding!r} is unknown; choose one of {WEIGHT_ROUNDINGS}")
    if options.method not in METHODS:
        raise UserError(f"--method {options.method!r} is unknown; choose one of {sorted(METHODS)}")
    for option, value, least in (("--samples", options.samples, 1), ("--batch-size", options.batch_size, 1),
                                 ("--seq-len", options.seq_len, 2)):
        if value < least:
            raise UserError(f"{option} must be at least {least}, got {value}")
    for option, listing in (("--keep-fp16", options.keep_fp16), ("--int8-weights", options.int8_weights)):
        for item in [] if listing in ("none", "auto") else listing.split(","):
            layer, _, group = item.partition(".")
            if not layer.isdigit() or group not in INPUT_GROUPS:
                raise UserError(f"{option} {listing!r}: {item!r} is not LAYER.GROUP with GROUP one of "
                                f"{', '.join(INPUT_GROUPS)} (or pass none / auto)")
    try:
        options.margin.check()
    except ValueError as error:
        raise UserError(f"--range-margin {error}") from None
    if options.group_clip not in GROUP_SEARCHES:
        raise UserError(f"--group-clip {options.group_clip!r} is unknown; choose one of {', '.join(GROUP_SEARCHES)}")
    if options.lm_head not in LM_HEAD_CHOICES:
        raise UserError(f"--lm-head {options.lm_head!r} is unknown; choose one of {LM_HEAD_CHOICES}")
    if options.token_guard is True and options.exact_channels:
        raise UserError(f"--token-guard is not implemented with --exact-channels (got --exact-channels "
                        f"{options.exact_channels}); drop one of the two")
    check_guard_floor(options)
    if options.int8_weights not in ("none", "auto") and not options.weight_format.packed:
        raise UserError(f"--int8-weights {options.int8_weights}: only packed 4-bit weights (--w-bits 4) have "
                        f"linears to keep at int8; pass --int8-weights none")
    check_device(options.device)


def check_guard_floor(options: QuantizeOptions) -> None:
    """--token-guard-floor only in (0, 1] and with the guard (checked again once an architecture resolved it)."""
    floor = options.token_guard_floor
    if floor is not None and not (0 < floor <= 1 and options.guard):
        raise UserError(f"--token-guard-floor {floor}: give a number in (0, 1], and only with the token guard "
                        f"(--token-guard, or the default of W8A8, W6A6 and W4A8 without --exact-channels; not "
                        f"with --no-token-guard)")


# Activation range factors the plan search tries for packed 4-bit weights: the default grid's (SearchGrid.clips)
# with deeper clipping below its 0.75, the edge W4A8 chose in most layers (SmolLM2, docs/accuracy.md, third pass:
# with int8-planned q/k/v, 57.43 -> 56.49 on Brown, 10 windows), down to 0.3 (fourth pass: o_proj and gate/up chose
# 0.5, then the edge, in a third of the layers; 0.3-0.45 then won in 12 of 90 packed groups, 56.57 -> 56.24).
# W6A6 keeps the default grid: with it on the mixed calibration it gave 58.36 (10 windows), not measured against
# the default grid there.
LOW_BIT_CLIPS = (0.3, 0.4, 0.45, 0.5, 0.6, 0.65) + SearchGrid.clips


# Evened plans (symmetrize.evened) the search also tries for W4A8 (packed 4-bit weights, int8 activations): steps
# between per channel (0) and per tensor (1). Qwen2.5-Coder-0.5B W4A8: Brown 84.73 -> 83.44, JavaScript 2.989 -> 2.974;
# SmolLM2 Brown 45.54 -> 45.24 through vLLM (docs/accuracy.md, "Evened plans"). W4A4 keeps the grid without them
# (not measured there).
LOW_BIT_EVENNESS = (0.5, 0.75, 1.0)


def search_grid(options: QuantizeOptions, arch: Architecture) -> SearchGrid:
    """What the plan search of method outliertune may choose: --act-clips, else the architecture's clips, else
    LOW_BIT_CLIPS for packed 4-bit weights and the default grid otherwise; evened plans for W4A8;
    ranked by the per-token relative error where the architecture asks for it at these activation bits."""
    clips = options.act_clips or arch.activation_clips
    packed = options.weight_format.packed
    if clips is None and packed:
        clips = LOW_BIT_CLIPS
    return SearchGrid(per_token=options.a_bits in arch.per_token_bits, token_guard=options.guard,
                      guard_floor=options.floor, step_floor=MEDIAN_STEP_FLOOR if options.floor < 1 else 0.0,
                      evenness=LOW_BIT_EVENNESS if packed and options.a_bits == 8 else (),
                      **({} if clips is None else dict(clips=clips)))


def check_lm_head(config: dict, options: QuantizeOptions, model_dir: Path | str) -> None:
    """Refuse --lm-head int8 for an architecture whose lm_head vLLM would run unquantized anyway."""
    unsupported = [(name, UNQUANTIZED_LM_HEAD[name]) for name in config.get("architectures") or []
                   if name in UNQUANTIZED_LM_HEAD]
    if options.lm_head != "none" and unsupported:
        name, reason = unsupported[0]
        raise UserError(f"--lm-head {options.lm_head}: {model_dir} is a {name}, whose lm_head cannot be quantized "
                        f"({reason}); pass --lm-head none")


def plan_layer(layer: torch.nn.Module, stats: dict[str, InputStats], model_config, arch: Architecture,
               options: QuantizeOptions, int8_groups: Iterable[str] = ()) -> tuple[dict[str, ChannelPlan],
                                                                                  dict[str, dict]]:
    """The plan of each input group of ``layer`` by ``options.method``, and per group what was chosen plus the
    relative output error of its quantized linears on the calibration sample. Groups in ``int8_groups`` (int8
    weights inside a packed 4-bit checkpoint) are planned and measured with the int8 weights they get."""
    heads, kv_heads, head_dim = attention_groups(model_config)
    group_size = heads // kv_heads
    stats = dict(stats, o=symmetrize.share_within_groups(stats["o"], group_size, head_dim))
    margin = options.for_architecture(arch).margin
    stats = {group: widened(value, margin.of(group)) for group, value in stats.items()}
    plans, info = {}, {}
    for group, names in arch.groups.items():
        weight = torch.cat([layer.get_submodule(name).weight.detach().float() for name in names])
        share = (lambda step: symmetrize.group_max(step, group_size, head_dim)) if group == "o" else (lambda s: s)
        group_options = options.with_int8_weights if group in int8_groups else options
        # o_proj's steps are shared across q-heads (GQA): no exact channels for it
        plans[group], info[group] = plan_group(stats[group], weight, arch, group_options, share,
                                               exact_channels=group != "o")
    return plans, info


def widened(stats: InputStats, margin: float) -> InputStats:
    """``stats`` with every per-channel range (min, max) scaled by ``margin`` about zero."""
    return stats if margin == 1.0 else dataclasses.replace(stats, min=stats.min * margin, max=stats.max * margin)


def plan_group(stats: InputStats, weight: torch.Tensor, arch: Architecture, options: QuantizeOptions,
               share: Callable[[torch.Tensor], torch.Tensor] = lambda step: step, exact_channels: bool = True,
               ) -> tuple[ChannelPlan, dict]:
    """The plan of one input (``weight``: the float32 weights of the linears reading it, stacked) by
    ``options.method``, and what was chosen plus the relative output error of its quantized linears on the
    calibration sample (and that of dynamic per-token quantization)."""
    exact = None
    if options.exact_channels and exact_channels:
        exact = symmetrize.outlier_channels(stats, options.exact_channels, options.outlier_factor)
    plan, info = METHODS[options.method](GroupInput(stats, weight, share, search_grid(options, arch), exact), options)
    info["exact_channels"] = [] if plan.exact is None else plan.exact.tolist()
    sample = stats.sample[:SearchGrid.tokens].to(weight.device)
    info["error"] = output_error(sample, weight, plan, options.weight_format, options.a_bits,
                                 token_guard=options.guard, guard_floor=options.floor)
    info["dynamic_error"] = dynamic_output_error(sample, weight, options.weight_format, options.a_bits)
    return plan, info


@dataclasses.dataclass
class QuantizeRecord:
    """What the report shows: per layer the chosen parameters and errors, ranges of a few layers."""

    layers: list[dict] = dataclasses.field(default_factory=list)
    ranges: dict[str, dict] = dataclasses.field(default_factory=dict)
    # For diagnosis (offline.diagnose): per layer the plan of each group and the calibrated per-channel (min, max)
    # of each group's input; with ``weights`` a dict, per "index.name" the rounded folded weight and the divisor
    # of its rows (offline.fold.row_divisors) where it has one.
    plans: list[dict[str, ChannelPlan]] = dataclasses.field(default_factory=list)
    calib_ranges: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=list)
    weights: dict[str, QuantizedWeight] | None = None
    row_divisors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    head: dict | None = None  # --lm-head int8: what lm_head's plan chose, and its errors


def quantize_linear_weight(weight: torch.Tensor, stats: InputStats, step: torch.Tensor, options: QuantizeOptions,
                           exact: torch.Tensor | None = None) -> QuantizedWeight:
    """Round one folded weight (W * diag(step)) in the checkpoint's format: per-row clipping chosen by measured
    error (method outliertune, per-row formats), group scales weighted by the input power, then RTN or GPTQ. The
    columns of ``exact`` channels are rounded as zeros (they are computed apart, in floating point)."""
    weight_format = options.weight_format
    power = (stats.rms.to(weight) / step).pow(2)  # E[x^2] of the GEMM's input x / step
    if exact is not None:  # those columns go to the side GEMM: zero here, and no GPTQ error pushed onto them
        weight = weight.index_fill(1, exact.to(weight.device), 0.0)
        power = power.index_fill(0, exact.to(power.device), 0.0)
    clip = 1.0
    if options.method == "outliertune" and not weight_format.packed:
        clip = best_row_clip(weight, options.w_bits, power)
    if options.rounding == "gptq":
        hessian = input_hessian(stats.gram.to(weight.device), step)
        if exact is not None:
            hessian[exact, :] = hessian[:, exact] = 0
        return quantize_gptq(weight, hessian, weight_format, clip, group_clip=options.group_clip)
    return quantize_rtn(weight, weight_format, clip, power)


def quantize_loaded(model, windows: torch.Tensor, options: QuantizeOptions,
                    record: QuantizeRecord | None = None) -> dict[str, torch.Tensor]:
    """Quantize an in-memory HF model (modified in place: norms and rows folded) -> checkpoint tensors by name."""
    arch = architecture_of(model)
    options = options.for_architecture(arch)
    group_of = {name: group for group, names in arch.groups.items() for name in names}
    num_layers = len(model.get_submodule(arch.layers))
    model_dtype = model.dtype
    tensors: dict[str, torch.Tensor] = {}
    shown = plotted_layers(num_layers)
    gptq = options.rounding == "gptq"
    quantized_head = options.lm_head != "none"
    for index, layer, stats in cached_calibrate_layers(model, windows, options.calib_cache, options.device,
                                                       options.batch_size, SearchGrid.tokens, options.seed,
                                                       options.progress, gram=gptq, head=quantized_head,
                                                       sequential=options.sequential_calibration):
        if index == num_layers:  # the final norm, lm_head's input
            tensors.update(quantize_head(model, layer, stats[HEAD], arch, options, record))
            continue
        int8_groups = int8_weight_groups(index, num_layers, arch.groups, options)
        plans, info = plan_layer(layer, stats, model.config, arch, options, int8_groups)
        kept = kept_groups(index, info, options)
        plans = keep_in_fp(plans, kept)
        for group in kept:
            info[group]["kept_fp16"] = True
        int8_groups -= kept
        for group in int8_groups:
            info[group]["int8_weights"] = True
        if record is not None:
            record.layers.append({"groups": info})
            record.plans.append(plans)
            record.calib_ranges.append({group: (value.min, value.max) for group, value in stats.items()})
            if record.weights is not None:
                record.row_divisors.update({f"{index}.{name}": divisor for name, divisor
                                            in row_divisors(layer, plans, arch, model.config).items()})
            if index in shown:
                record.ranges.update({f"layer{index}_{group}": range_record(stats[group], plans[group])
                                      for group in PLOTTED_GROUPS})
        folded = fold_layer(layer, plans, arch, model.config)
        emulated: dict[str, torch.nn.Module] = {}  # what the checkpoint computes, per linear (sequential only)
        for name, linear in folded.items():
            prefix = f"{arch.layers}.{index}.{name}"
            group = group_of[name]
            if group in kept:
                parts = _unquantized_tensors(prefix, linear, model_dtype)
                tensors.update(parts)
                emulated[name] = _plain_linear(parts[f"{prefix}.weight"], parts.get(f"{prefix}.bias"))
                continue
            out_features, in_features = linear.weight.shape
            if options.weight_format.packed and in_features % 2:
                raise UserError(f"{prefix} has {in_features} input channels; packed 4-bit weights need an even "
                                f"number: use --w-bits 8 or 6 for this model")
            step = plans[group].step.to(linear.weight)
            linear_options = options.with_int8_weights if group in int8_groups else options
            quantized = quantize_linear_weight(linear.weight, stats[group], step, linear_options, linear.exact)
            if record is not None and record.weights is not None:
                record.weights[f"{index}.{name}"] = quantized
            parts = checkpoint_tensors(linear, quantized, model_dtype, options.exact_channels)
            validate_linear(prefix, parts, out_features, in_features, linear_options.quant_config,
                            source="quantize")
            tensors.update({f"{prefix}.{suffix}": tensor for suffix, tensor in parts.items()})
            if options.sequential_calibration:
                emulated[name] = ReferenceQuantLinear(parts, linear_options.quant_config)
        if options.sequential_calibration:  # cached_calibrate_layers runs the next layer on this layer's outputs
            emulate_checkpoint(layer, emulated, model_dtype)
    quantized = {f"{arch.layers}.{i}.{name}" for i in range(num_layers) for name in arch.linears}
    if quantized_head:
        quantized.add(HEAD_MODULE)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized or (name == f"{HEAD_MODULE}.weight" and model.config.tie_word_embeddings):
            continue
        tensors[name] = tensor.detach().cpu().clone().contiguous()
    return tensors


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


@torch.no_grad()
def emulate_checkpoint(layer: torch.nn.Module, linears: dict[str, torch.nn.Module], dtype: torch.dtype) -> None:
    """Make a folded ``layer`` (float32) compute what its checkpoint tensors compute: its linears replaced by
    ``linears`` (by name relative to the layer: ReferenceQuantLinear or the kept float weights) and its other
    parameters (the folded norms) rounded to the checkpoint's ``dtype``, all in float32 on the layer's device."""
    device = next(layer.parameters()).device
    for name, module in linears.items():
        layer.set_submodule(name, module.to(device))
    for parameter in layer.parameters():
        parameter.data = parameter.data.to(dtype).float()


HEAD_MODULE = "lm_head"  # the output embedding's module name in every supported architecture


def quantize_head(model, norm: torch.nn.Module, stats: InputStats, arch: Architecture, options: QuantizeOptions,
                  record: QuantizeRecord | None = None) -> dict[str, torch.Tensor]:
    """lm_head (--lm-head int8) -> its checkpoint tensors: planned like any norm-fed input, its step folded into
    the final ``norm`` (float32 on the calibration device; modified in place), int8 weights per output row. The
    model's lm_head is left as it is (with tied embeddings it is the embedding matrix, which stays unquantized)."""
    head = model.get_output_embeddings()
    head_options = options.with_int8_weights
    with float32_on([head], norm.weight.device):  # the search runs V x K GEMMs: on the calibration device
        plan, info = plan_group(stats, head.weight.detach(), arch, head_options)
        folded = fold_head(norm, head, plan, arch)
    if record is not None:
        record.head = info
    quantized = quantize_linear_weight(folded.weight, stats, plan.step.to(folded.weight), head_options, folded.exact)
    parts = checkpoint_tensors(folded, quantized, model.dtype, options.exact_channels)
    validate_linear(HEAD_MODULE, parts, *folded.weight.shape, head_options.quant_config, source="quantize")
    return {f"{HEAD_MODULE}.{suffix}": tensor for suffix, tensor in parts.items()}


def _unquantized_tensors(prefix: str, linear: FoldedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A kept linear as in a Hugging Face checkpoint (its weight may carry a fold from the next group)."""
    tensors = {f"{prefix}.weight": linear.weight.to(dtype)}
    if linear.bias is not None:
        tensors[f"{prefix}.bias"] = linear.bias.to(dtype)
    assert linear.row_bias is None and linear.input_shift is None and linear.inv_scale is None, prefix
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise FloatingPointError(f"{name} overflows {dtype} after folding the next group's scale into it; keep "
                                     f"the next group in fp16 too (--keep-fp16)")
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def kept_modules(tensors: dict[str, torch.Tensor], arch: Architecture, num_layers: int) -> list[str]:
    """The decoder linears written unquantized (no weight_scale)."""
    return [f"{arch.layers}.{i}.{name}" for i in range(num_layers) for name in arch.linears
            if f"{arch.layers}.{i}.{name}.weight_scale" not in tensors]


def int8_weight_modules(tensors: dict[str, torch.Tensor], arch: Architecture, num_layers: int) -> list[str]:
    """The decoder linears of a packed checkpoint written with int8 weights."""
    return [f"{arch.layers}.{i}.{name}" for i in range(num_layers) for name in arch.linears
            if f"{arch.layers}.{i}.{name}.weight_scale" in tensors
            and tensors[f"{arch.layers}.{i}.{name}.weight"].dtype == torch.int8]


def quantize(model: Path | str, out_dir: Path, calib: Path | str = DEFAULT_CALIB,
             options: QuantizeOptions = QuantizeOptions(),
             overwrite: bool = False, trust_remote_code: bool = False, report_dir: Path | None = None,
             revision: str | None = None) -> Path:
    """The whole `outliertune quantize` command: ``model`` is a model directory or a hub id ORG/NAME (at
    ``revision``); ``calib`` a text file or a text asset's name (offline/assets.calibration_file). Nothing is
    written to ``out_dir`` unless everything succeeds."""
    check_options(options)
    model_name = str(model)
    model_dir, source = resolve_model(model_name, revision)
    check_output_dir(out_dir, model_dir, overwrite)
    for option, path in (("--report", report_dir), ("--calib-cache", options.calib_cache)):
        if path is not None:
            check_directory_option(path, option)
    config = read_config(Path(model_dir))
    check_seq_len(config, options.seq_len, model_dir)  # before the (slow) model load
    check_lm_head(config, options, model_dir)
    calib_path = calibration_file(calib)
    model, hf_config = load_model(Path(model_dir), trust_remote_code)
    options = options.for_architecture(architecture_of(model))
    check_guard_floor(options)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    windows = token_windows(tokenizer, read_text(calib_path, "--calib"), options.seq_len, options.samples,
                            source=f"--calib {calib_path}")
    record = QuantizeRecord()
    tensors = quantize_loaded(model, windows, options, record)
    arch = architecture_of(model)
    num_layers = len(model.get_submodule(arch.layers))
    kept = kept_modules(tensors, arch, num_layers)
    int8_modules = int8_weight_modules(tensors, arch, num_layers) if options.weight_format.packed else []
    quant_config = dataclasses.replace(options.quant_config, source=source,
                                       ignore=(*options.quant_config.ignore, *kept), int8_weights=tuple(int8_modules))
    if options.lm_head != "none":  # lm_head gets its own tensors; the embeddings stay as they are
        hf_config = dict(hf_config, tie_word_embeddings=False)
    out = write_checkpoint(out_dir, model_dir, hf_config, quant_config, tensors, options.max_shard_bytes)
    if report_dir is not None:
        shown_model = model_name if source is None else f"{model_name} at {source['revision']}"
        summary = {"model": shown_model, "checkpoint": str(out), "calibration": f"{calib_path}: "
                   f"{windows.shape[0]} windows x {windows.shape[1]} tokens", "method": options.method,
                   "bits": f"W{options.w_bits}A{options.a_bits}", "weight_rounding": options.rounding,
                   "kept in the model's dtype": ", ".join(kept) or "none"}
        if options.weight_format.packed:
            summary["int8 weights"] = ", ".join(int8_modules) or "none"
        if options.weight_format.packed:
            summary["group_size"] = options.group_size
        if record.head is not None:  # what lm_head's search chose, its error and dynamic quantization's
            summary["lm_head"] = f"{options.lm_head}: " + ", ".join(
                f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                for key, value in record.head.items() if key != "exact_channels")
        write_report(report_dir, summary, record.layers, record.ranges)
    return out
