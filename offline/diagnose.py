"""`outliertune diagnose`: where a static plan loses accuracy, with numbers.

Calibrates and plans as `outliertune quantize` does (same options, same --calib-cache), then on a test text, with
the plan emulated in fp32 (offline.fakequant.StaticPlanLinear: the checkpoint's arithmetic without folding):
- perplexity and mean KL divergence from the fp model with everything quantized, with one input group quantized
  at a time (qkv / o / gate_up / down over all layers), and with the worst (layer, group)s kept in fp;
- per layer and group: the calibration output error of the plan against that of dynamic per-token quantization,
  and on the test text the share of activation entries (and of their L1 mass) outside the calibrated per-channel
  range and outside the plan's representable range (what saturates);
- the tokens that carry the massive activations of the residual stream (position, token, magnitude).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vllm_outliertune.format import qrange
from vllm_outliertune.offline.architectures import architecture_of
from vllm_outliertune.offline.assets import calibration_file
from vllm_outliertune.offline.fakequant import StaticPlanLinear, replace_linears
from vllm_outliertune.offline.model_io import UserError, load_model, load_tokenizer
from vllm_outliertune.offline.quantize import QuantizeOptions, QuantizeRecord, check_options, quantize_loaded
from vllm_outliertune.offline.symmetrize import ChannelPlan
from vllm_outliertune.offline.text import read_text, token_windows

MASSIVE_FACTOR = 20.0  # a token's residual absmax this many times the layer's median token absmax is "massive"


@torch.no_grad()
def _score(model, windows: torch.Tensor, fp_logprobs: list[torch.Tensor] | None) -> tuple[dict, list]:
    """Perplexity over ``windows`` and, against ``fp_logprobs``, mean KL(fp || model) per token."""
    nll = kl = 0.0
    count = 0
    logprobs_out = []
    for index in range(windows.shape[0]):
        ids = windows[index:index + 1]
        logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        nll -= float(logprobs.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
        if fp_logprobs is None:
            logprobs_out.append(logprobs.half())
        else:
            fp = fp_logprobs[index].float()
            kl += float((fp.exp() * (fp - logprobs)).sum())
    result = {"perplexity": float(torch.exp(torch.tensor(nll / count))), "tokens": count}
    if fp_logprobs is not None:
        result["kl"] = kl / count
    return result, logprobs_out


def _representable(plan: ChannelPlan, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = qrange(bits)
    shift = torch.zeros_like(plan.step) if plan.shift is None else plan.shift
    return (qmin + shift) * plan.step, (qmax + shift) * plan.step


class _OutsideShare:
    """Share of entries and of L1 mass outside per-channel [lo, hi], accumulated over batches."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor):
        self.lo, self.hi = lo, hi
        self.outside = self.entries = 0
        self.excess = self.mass = 0.0

    def add(self, x: torch.Tensor) -> None:
        excess = (x - x.clamp(self.lo, self.hi)).abs()
        self.outside += int((excess > 0).sum())
        self.entries += x.numel()
        self.excess += float(excess.sum())
        self.mass += float(x.abs().sum())

    def result(self) -> dict:
        return {"entries": self.outside / max(self.entries, 1), "mass": self.excess / max(self.mass, 1e-30)}


class _WidestChannel:
    """The channel with the widest calibrated range of one linear input: how wide against the median channel, and
    on the test text, for every token but each window's first (which carries the massive activations), the share
    of its nonzero entries that the plan rounds to 0 and its step over their median magnitude."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, plan, a_bits: int):
        width = hi.clamp(min=0) - lo.clamp(max=0)
        self.channel = int(width.argmax())
        self.width_ratio = float(width[self.channel] / width.median().clamp(min=1e-30))
        self.plan, self.a_bits = plan, a_bits
        self.values: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:  # x: [window, tokens, K]
        self.values.append(x[..., 1:, self.channel].reshape(-1).float())

    def result(self) -> dict:
        values = torch.cat(self.values)
        values = values[values != 0]
        channel_plan = ChannelPlan(self.plan.fold[self.channel:self.channel + 1],
                                   None if self.plan.inv_scale is None else
                                   self.plan.inv_scale[self.channel:self.channel + 1],
                                   None if self.plan.shift is None else self.plan.shift[self.channel:self.channel + 1])
        exact = self.plan.exact is not None and self.channel in self.plan.exact.tolist()
        rounded = values if exact else channel_plan.fake_quantize(values[:, None], self.a_bits)[:, 0]
        return {"channel": self.channel, "range_over_median": self.width_ratio, "exact": exact,
                "step_over_median_magnitude": float(channel_plan.step[0] / values.abs().median().clamp(min=1e-30))
                if values.numel() else None,
                "rounds_to_zero": float((rounded == 0).float().mean()) if values.numel() else None}


def _add_all(shares: tuple, x: torch.Tensor) -> None:
    for share in shares[:2]:  # returns None: a forward pre-hook's return value would replace the input
        share.add(x.reshape(-1, x.shape[-1]).float())
    shares[2].add(x)


@torch.no_grad()
def _activation_pass(model, windows: torch.Tensor, record: QuantizeRecord, a_bits: int, tokenizer) -> tuple:
    """Clipping shares per layer and group, and the massive-activation tokens, on the fp model."""
    arch = architecture_of(model)
    layers = model.get_submodule(arch.layers)
    input_of = {names[0]: group for group, names in arch.groups.items()}  # one linear per shared input
    shares, hooks, token_max = {}, [], [[] for _ in layers]
    for index, layer in enumerate(layers):
        for name, group in input_of.items() if index < len(record.plans) else ():
            calibrated = _OutsideShare(*record.calib_ranges[index][group])
            saturated = _OutsideShare(*_representable(record.plans[index][group], a_bits))
            widest = _WidestChannel(*record.calib_ranges[index][group], record.plans[index][group], a_bits)
            shares[(index, group)] = (calibrated, saturated, widest)
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, triple=shares[(index, group)]: _add_all(triple, args[0])))
        hooks.append(layer.register_forward_hook(
            lambda _m, _args, out, store=token_max[index]: store.append(
                (out[0] if isinstance(out, (tuple, list)) else out)[0].float().abs().amax(-1))))
    try:
        for index in range(windows.shape[0]):
            model(input_ids=windows[index:index + 1], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    clipping = {}
    for (index, group), (calibrated, saturated, widest) in shares.items():
        widest_result = widest.result()
        quantized = record.weights.get(f"{index}.{arch.groups[group][0]}")  # None: kept in fp (--keep-fp16)
        if quantized is not None:
            widest_result["rows_with_their_max_there"] = float(
                (quantized.levels.abs().argmax(1) == widest.channel).float().mean())
        clipping[f"{index}.{group}"] = {"outside_calibrated": calibrated.result(), "saturated": saturated.result(),
                                        "widest_channel": widest_result}
    maxima = torch.stack([torch.cat(per_layer) for per_layer in token_max])  # [layers, tokens]
    positions = torch.arange(windows.shape[1]).repeat(windows.shape[0])
    ids = windows.reshape(-1)
    peak_layer = int(maxima.amax(1).argmax())
    peak = maxima[peak_layer]
    massive = peak > MASSIVE_FACTOR * peak.median()
    top = peak.argsort(descending=True)[:8]
    massive_tokens = {
        "layer": peak_layer, "median_token_absmax": float(peak.median()), "massive_tokens": int(massive.sum()),
        "tokens": int(peak.numel()), "massive_at_position_0": int((massive & (positions == 0)).sum()),
        "windows": windows.shape[0],
        "top": [{"position": int(positions[i]), "token": tokenizer.decode([int(ids[i])]), "absmax": float(peak[i])}
                for i in top],
        "absmax_per_layer_of_position_0": [float(maxima[layer][positions == 0].mean()) for layer in range(len(layers))],
        "absmax_per_layer_other_positions_max": [float(maxima[layer][positions != 0].max())
                                                 for layer in range(len(layers))]}
    return clipping, massive_tokens


def diagnose(model_dir: Path, calib: Path | str, text_path: Path, options: QuantizeOptions, max_windows: int = 8,
             keep_top: int = 4, layers: int | None = None, per_group: bool = True) -> dict:
    """With ``layers``, only the first that many decoder layers are calibrated and quantized (the rest stay fp):
    the cost of a look at the early layers, where massive activations arise. Without ``per_group``, no run quantizes
    one group at a time."""
    check_options(options)
    if options.lm_head != "none":  # its runs emulate the decoder linears only
        raise UserError(f"--lm-head {options.lm_head}: diagnose does not emulate a quantized lm_head; pass --lm-head "
                        f"none (measure its cost with `outliertune eval` on a checkpoint)")
    calib_path = calibration_file(calib)
    tokenizer = load_tokenizer(model_dir)
    calib = token_windows(tokenizer, read_text(calib_path, "--calib"), options.seq_len, options.samples,
                          source=f"--calib {calib_path}")
    test = token_windows(tokenizer, read_text(text_path), options.seq_len, max_windows, source=f"--text {text_path}")
    model, _ = load_model(Path(model_dir))
    arch = architecture_of(model)
    if layers is not None:
        model.set_submodule(arch.layers, model.get_submodule(arch.layers)[:layers])
    record = QuantizeRecord(weights={})
    quantize_loaded(model, calib, options, record)  # the checkpoint tensors are not needed
    del model
    model, _ = load_model(Path(model_dir), dtype=torch.float32)
    clipping, massive = _activation_pass(model, test, record, options.a_bits, tokenizer)
    group_of = {name: group for group, names in arch.groups.items() for name in names}
    original = {(index, name): layer.get_submodule(name)
                for index, layer in enumerate(model.get_submodule(arch.layers)) for name in arch.linears}
    emulated = {(index, name): StaticPlanLinear(linear, record.plans[index][group_of[name]],
                                                record.weights[f"{index}.{name}"], options.a_bits,
                                                record.row_divisors.get(f"{index}.{name}"), options.guard,
                                                options.floor)
                for (index, name), linear in original.items() if f"{index}.{name}" in record.weights}

    def run(quantized) -> dict:  # groups kept in fp by --keep-fp16 have no emulation: they stay original
        replace_linears(model, lambda index, name, linear: emulated.get((index, name), original[(index, name)])
                        if quantized(index, group_of[name]) else original[(index, name)])
        return _score(model, test, fp_logprobs)[0]

    fp, fp_logprobs = _score(model, test, None)
    results = {"fp": fp, "all": run(lambda index, group: True)}
    for group in arch.groups if per_group else ():
        results[f"only {group}"] = run(lambda index, g, group=group: g == group)
    ranked = sorted(((info["error"], index, group) for index, layer in enumerate(record.layers)
                     for group, info in layer["groups"].items() if "error" in info), reverse=True)
    for _, index, group in ranked[:keep_top]:
        results[f"all but {index}.{group}"] = run(lambda i, g, kept=(index, group): (i, g) != kept)
    if keep_top >= 2:
        kept = {(index, group) for _, index, group in ranked[:2]}
        results[f"all but {', '.join(f'{i}.{g}' for i, g in sorted(kept))}"] = run(lambda i, g: (i, g) not in kept)
    layers = [{group: dict(info, **clipping[f"{index}.{group}"]) for group, info in layer["groups"].items()}
              for index, layer in enumerate(record.layers)]
    return {"model": str(model_dir), "quantized_layers": len(record.plans), "calib": f"{calib_path}: {calib.shape[0]} x {calib.shape[1]}",
            "text": f"{text_path}: {test.shape[0]} x {test.shape[1]}", "bits": f"W{options.w_bits}A{options.a_bits}",
            "perplexity": results, "massive_activations": massive, "layers": layers}
