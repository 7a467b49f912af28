"""Layer-by-layer calibration: per-input-channel statistics of every decoder linear's input.

Only one decoder layer is on the compute device at a time, with the hidden states of all calibration windows (kept
on the CPU between layers), so device memory is about one layer plus the activations of one batch. Each layer is
run on the outputs of the unquantized previous layer, or, with ``sequential``, of the previous layer as the caller
left it (folded, with its linears replaced by their quantized emulation), as GPTQ originally propagates.

Every HOLD_OUT_EVERY-th window is held out: its tokens do not set the calibrated per-channel ranges, they are the
token sample the plan search scores its candidates on. So range factors (clipping below 1, headroom above 1) are
chosen on text the ranges were not fitted on, as unseen text will meet them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from vllm_outliertune.offline.architectures import architecture_of, decoder_layers

HOLD_OUT_EVERY = 8  # one calibration window in this many is held out of the ranges (the search scores on it)
HEAD = "head"  # the statistics key of lm_head's input (the final norm's output)


@dataclasses.dataclass
class InputStats:
    """Per-channel statistics of one linear input over all calibration tokens, plus a token sample for searches."""

    min: torch.Tensor          # [K] float32, over the windows that are not held out
    max: torch.Tensor          # [K]
    sum_sq: torch.Tensor       # [K] float64, over all tokens
    count: int
    sample: torch.Tensor       # [T, K] float32, a fixed random subset of the held-out windows' tokens
    gram: torch.Tensor | None = None  # [K, K] float32 sum of x x^T over all tokens (kept for GPTQ only)

    @property
    def rms(self) -> torch.Tensor:
        return (self.sum_sq / max(self.count, 1)).sqrt().float()


class _Accumulator:
    def __init__(self, name: str, keep_per_batch: int, generator: torch.Generator, gram: bool):
        self.name, self.keep_per_batch, self.generator = name, keep_per_batch, generator
        self.min = self.max = self.sum_sq = None
        self.gram = 0 if gram else None
        self.count = 0
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, fitted: torch.Tensor, sampled: torch.Tensor) -> None:
        """One batch of inputs [windows, tokens, K]: the ``fitted`` windows set the ranges, the search sample comes
        from the ``sampled`` ones (bool masks over the batch's windows)."""
        x = x.detach().float().reshape(fitted.numel(), -1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"calibration produced NaN/Inf activations at the input of {self.name} "
                                     f"(layers run in float32): the model's weights up to there contain NaN/Inf or "
                                     f"overflow; check the model files (re-download or re-convert them)")
        if fitted.any():
            rows = x[fitted.to(x.device)].reshape(-1, x.shape[-1])
            lo, hi = rows.amin(0), rows.amax(0)
            self.min = lo if self.min is None else torch.minimum(self.min, lo)
            self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if sampled.any():
            rows = x[sampled.to(x.device)].reshape(-1, x.shape[-1])
            pick = torch.randperm(rows.shape[0], generator=self.generator)[:self.keep_per_batch].to(x.device)
            self.samples.append(rows[pick].cpu())
        x = x.reshape(-1, x.shape[-1])
        sq = x.double().pow(2).sum(0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += x.shape[0]
        if self.gram is not None:
            self.gram = self.gram + (x.t() @ x).double().cpu()

    def result(self) -> InputStats:
        gram = None if self.gram is None else self.gram.float()
        return InputStats(self.min.cpu(), self.max.cpu(), self.sum_sq.cpu(), self.count, torch.cat(self.samples), gram)


class _StopForward(Exception):
    pass


def _outside_layers(module: torch.nn.Module, layers: torch.nn.ModuleList) -> Iterator[torch.nn.Module]:
    """The largest submodules of ``module`` that do not contain ``layers`` (embeddings, positions, rotary tables,
    final norm): what a forward pass up to the first decoder layer may use."""
    for child in module.children():
        if child is layers:
            continue
        if any(sub is layers for sub in child.modules()):
            yield from _outside_layers(child, layers)
        else:
            yield child


@contextlib.contextmanager
def float32_on(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """``modules`` in float32 on ``device`` for the duration; afterwards on the CPU with every parameter and buffer
    in its own previous dtype (rotary tables stay float32 in an fp16 model)."""
    dtypes = [{name: t.dtype for name, t in itertools.chain(m.named_parameters(), m.named_buffers())}
              for m in modules]
    for module in modules:
        module.to(device, torch.float32)
    try:
        yield
    finally:
        for module, saved in zip(modules, dtypes):
            module.to("cpu")
            for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
                if tensor.dtype != saved[name]:
                    tensor.data = tensor.data.to(saved[name])


@torch.no_grad()
def _capture_layer_inputs(model, windows: torch.Tensor, batch_size: int, device: torch.device):
    """Hidden states entering decoder layer 0 (CPU, float32), and per batch the keyword arguments the model gave
    each decoder layer (masks and position tables differ between sliding and full attention layers)."""
    layers = decoder_layers(model)
    originals = list(layers)
    hidden, kwargs_per_batch = [], []

    class Recorder(torch.nn.Module):
        """Stands in for decoder layer ``index``: records what it is given, passes the hidden states on."""

        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.attention_type = getattr(originals[index], "attention_type", "full_attention")

        def forward(self, hidden_states, *args, **kwargs):
            if self.index == 0:
                hidden.append(hidden_states.float().cpu())
                kwargs_per_batch.append([])
            kwargs_per_batch[-1].append(kwargs)
            if self.index == len(originals) - 1:
                raise _StopForward
            return hidden_states

    for index in range(len(layers)):
        layers[index] = Recorder(index)
    base = model.base_model  # the transformer without the LM head (runs embeddings, masks, positions)
    try:
        with float32_on(list(_outside_layers(base, layers)), device):
            for start in range(0, windows.shape[0], batch_size):
                try:
                    base(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return hidden, kwargs_per_batch


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def window_roles(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitted, sampled), bool [count] each: every HOLD_OUT_EVERY-th window (the last one when there are fewer) is
    held out, sampled and not fitted; a single window is both."""
    held = torch.arange(count) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    if count > 1 and not held.any():
        held[-1] = True
    if not held.any():
        return torch.ones(count, dtype=torch.bool), torch.ones(count, dtype=torch.bool)
    return ~held, held


@torch.no_grad()
def calibrate_layers(model, windows: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 8,
                     sample_tokens: int = 2048, seed: int = 0, progress: bool = True, gram: bool = False,
                     head: bool = False, sequential: bool = False,
                     ) -> Iterator[tuple[int, torch.nn.Module, dict[str, InputStats]]]:
    """For each decoder layer: (index, the layer in float32 on ``device``, {"qkv"|"o"|"gate_up"|"down": stats});
    with ``gram`` the stats include each input's Gram matrix (for GPTQ; K x K per input). The ranges come from the
    windows that are not held out, the sample from those that are (window_roles). With ``head``, then one more item:
    (number of layers, the final norm in float32 on ``device``, {HEAD: stats of its output, lm_head's input}).

    The caller may modify the yielded layer (folding): the next layer's inputs were computed before the yield, or,
    with ``sequential``, after the caller resumes, by the layer as the caller left it (one more forward pass per
    layer). After that the layer goes back to the CPU in the model's dtype."""
    device = torch.device(device)
    dtype = model.dtype
    hidden, kwargs_per_batch = _capture_layer_inputs(model, windows, batch_size, device)
    fitted, sampled = (mask.split(batch_size) for mask in window_roles(windows.shape[0]))
    keep_per_batch = max(1, -(-sample_tokens // sum(1 for mask in sampled if mask.any())))
    layers = decoder_layers(model)
    arch = architecture_of(model)
    # One statistics record per distinct linear input (q/k/v share one, gate/up share one).
    input_of = {names[0]: group for group, names in arch.groups.items()}
    for index in tqdm(range(len(layers)), desc="calibrating layers", disable=not progress):
        layer = layers[index].to(device, torch.float32)
        generator = torch.Generator().manual_seed(seed + index)
        accumulators = {short: _Accumulator(f"{arch.layers}.{index}.{name}", keep_per_batch, generator, gram)
                        for name, short in input_of.items()}
        batch = 0
        hooks = [layer.get_submodule(name).register_forward_pre_hook(
                     lambda _module, args, acc=accumulators[short]: acc.add(args[0], fitted[batch], sampled[batch]))
                 for name, short in input_of.items()]

        def run(keep: bool) -> None:
            nonlocal batch
            for batch in range(len(hidden)):
                out = layer(hidden[batch].to(device), **_to_device(kwargs_per_batch[batch][index], device))
                out = out[0] if isinstance(out, (tuple, list)) else out
                if not torch.isfinite(out).all():
                    raise FloatingPointError(f"calibration produced NaN/Inf at the output of {arch.layers}.{index}")
                if keep:
                    hidden[batch] = out.float().cpu()

        try:
            run(keep=not sequential)
        finally:
            for hook in hooks:
                hook.remove()
        yield index, layer, {short: acc.result() for short, acc in accumulators.items()}
        if sequential:
            run(keep=True)
        layers[index] = layer.to("cpu", dtype)
    if head:
        norm = model.get_submodule(arch.final_norm)
        accumulator = _Accumulator(arch.final_norm, keep_per_batch, torch.Generator().manual_seed(seed + len(layers)),
                                   gram)
        with float32_on([norm], device):
            for batch, states in enumerate(hidden):
                accumulator.add(norm(states.to(device)), fitted[batch], sampled[batch])
            yield len(layers), norm, {HEAD: accumulator.result()}


def _fingerprint(model, windows: torch.Tensor, settings: tuple) -> str:
    """Identifies a calibration: model config and weights (a checksum per tensor), token windows, settings."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    digest.update(windows.numpy().tobytes())
    digest.update(repr(settings).encode())
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.state_dict().values()])
    digest.update(sums.numpy().tobytes())
    return digest.hexdigest()[:24]


def cached_calibrate_layers(model, windows: torch.Tensor, cache_dir: Path | None, device: str | torch.device = "cpu",
                            batch_size: int = 8, sample_tokens: int = 2048, seed: int = 0, progress: bool = True,
                            gram: bool = False, head: bool = False, sequential: bool = False,
                            ) -> Iterator[tuple[int, torch.nn.Module, dict[str, InputStats]]]:
    """calibrate_layers, with the statistics kept in ``cache_dir`` (safe torch.load, tensors only) so quantizing
    the same model on the same text again (another method or bit width) skips the forward passes. A new cache also
    keeps lm_head's input (cheap), so it serves runs with and without ``head``; an older one without it is
    recalibrated (and rewritten) for a run with ``head``. A ``sequential`` calibration is never cached: past the
    first layer its statistics depend on how the caller quantized the layers before."""
    if cache_dir is None or sequential:
        yield from calibrate_layers(model, windows, device, batch_size, sample_tokens, seed, progress, gram, head,
                                    sequential)
        return
    # Caches without Gram matrices keep their key; one with them also serves runs that do not need them.
    keys = [(sample_tokens, seed, HOLD_OUT_EVERY, "gram")] + ([] if gram else [(sample_tokens, seed,
                                                                                HOLD_OUT_EVERY)])
    paths = [Path(cache_dir) / f"calib-{_fingerprint(model, windows, key)}.pt" for key in keys]
    layers = decoder_layers(model)
    for path in (path for path in paths if path.is_file()):
        cached = torch.load(path, weights_only=True)
        if head and len(cached) == len(layers):  # written before --lm-head: no lm_head input
            continue
        dtype = model.dtype
        for index in range(len(layers)):
            layer = layers[index].to(device, torch.float32)
            yield index, layer, {short: InputStats(**fields) for short, fields in cached[index].items()}
            layers[index] = layer.to("cpu", dtype)
        if head:
            norm = model.get_submodule(architecture_of(model).final_norm)
            with float32_on([norm], device):
                yield len(layers), norm, {HEAD: InputStats(**cached[len(layers)][HEAD])}
        return
    collected = []
    for index, layer, stats in calibrate_layers(model, windows, device, batch_size, sample_tokens, seed, progress,
                                                gram, head=True):
        collected.append({short: dataclasses.asdict(value) for short, value in stats.items()})
        if index < len(layers) or head:
            yield index, layer, stats
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = paths[-1]  # the key of what was computed (with or without Gram matrices)
    tmp = path.with_suffix(".tmp")
    torch.save(collected, tmp)
    tmp.replace(path)
