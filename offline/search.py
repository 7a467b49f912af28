"""Per-layer search of the activation plan (OutlierTune, in the spirit of OS+): for each group of linears sharing
an input, try balanced plans over a grid of migration strength, exponent, clipping ratio and shift-or-not (and
where the grid lists them, evened plans: steps between per channel and per tensor), and keep the one with the
smallest output error of the quantized linears on the calibration token sample. The simple rule
(per-channel steps, full range, integer shift) is one of the candidates, so the result is never worse than it on
that sample.

The error is the sample's total squared error relative to the total squared output, or (``SearchGrid.per_token``,
per architecture) the mean over tokens of each token's squared error relative to that token's squared output: the
measure that counts where a norm after the linear rescales every token's output to the same size (Gemma), so a small
token's error counts as much as a large one's."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator

import torch

from vllm_outliertune.offline.calibrate import InputStats
from vllm_outliertune.offline.symmetrize import ChannelPlan, balanced, evened, with_exact
from vllm_outliertune.offline.weights import WeightFormat, fake_quantize


@dataclasses.dataclass(frozen=True)
class SearchGrid:
    strengths: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    alphas: tuple[float, ...] = (0.5,)
    # Activation range factors: below 1 clips the calibrated range, above 1 leaves headroom for values beyond it.
    # Scored on held-out calibration windows (offline/calibrate.py), so headroom can win where unseen text
    # saturates the fitted ranges.
    clips: tuple[float, ...] = (0.75, 0.9, 1.0, 1.25, 1.5, 2.0)
    shifts: tuple[bool, ...] = (True, False)
    tokens: int = 256  # calibration tokens the error is measured on (the search's cost is linear in it)
    per_token: bool = False  # rank by the mean per-token relative error instead of the total (relative_error)
    token_guard: bool = False  # score candidates as the per-token overflow guard computes them (--token-guard)
    guard_floor: float = 1.0  # ... with this least t (--token-guard-floor)
    # No channel's step below this fraction of the group's median step (0: none). With a per-token t (guard_floor
    # below 1) the channel with the largest |code| sets each token's step; a channel quiet in calibration has a fine
    # step, and where other text makes it loud it coarsens the whole token (quantize.MEDIAN_STEP_FLOOR).
    step_floor: float = 0.0
    # Also try symmetrize.evened plans (shifted, every clip) at these evenness values (none by default).
    evenness: tuple[float, ...] = ()


SIMPLE = dict(alpha=0.5, strength=0.0, clip=1.0, shift=True)


@dataclasses.dataclass
class SearchResult:
    plan: ChannelPlan
    choice: dict          # the chosen grid point
    error: float          # relative output error of the chosen plan
    simple_error: float   # ... and of the simple rule (strength 0, clip 1, shift)


def relative_error(approx: torch.Tensor, reference: torch.Tensor, per_token: bool = False) -> float:
    """||A - R||^2 / ||R||^2 over all tokens (rows), or with ``per_token`` the mean over rows of ||a - r||^2 / ||r||^2
    (a row's squared output counts as at least 1e-6 of the rows' mean: near-zero rows do not dominate)."""
    if not per_token:
        return float((approx - reference).pow(2).sum() / reference.pow(2).sum().clamp(min=1e-30))
    size = reference.pow(2).sum(1)
    size = size.clamp(min=max(1e-6 * float(size.mean()), 1e-30))
    return float(((approx - reference).pow(2).sum(1) / size).mean())


def output_error(sample: torch.Tensor, weight: torch.Tensor, plan: ChannelPlan, weight_format: WeightFormat,
                 a_bits: int, reference: torch.Tensor | None = None, per_token: bool = False,
                 token_guard: bool = False, guard_floor: float = 1.0) -> float:
    """relative_error of dequant(q) dequant(W s)^T against X W^T, with the checkpoint's arithmetic (weights rounded
    to nearest; ``token_guard``: activations as the per-token overflow guard rounds them, t at least
    ``guard_floor``)."""
    reference = sample @ weight.t() if reference is None else reference
    step = plan.step.to(sample)
    power = (sample / step).pow(2).mean(0)
    folded = weight * step
    if plan.exact is None:
        rounded = fake_quantize(folded, weight_format, power)
    else:  # exact channels: their columns leave the rounded weight (and its row scales) for the side GEMM
        rounded = fake_quantize(folded.index_fill(1, plan.exact.to(folded.device), 0.0), weight_format, power)
        rounded[:, plan.exact] = folded[:, plan.exact]
    approx = plan.fake_quantize(sample, a_bits, token_guard, guard_floor) / step @ rounded.t()
    return relative_error(approx, reference, per_token)


def _candidates(stats: InputStats, weight: torch.Tensor, a_bits: int, grid: SearchGrid,
                share: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[dict, ChannelPlan]]:
    """The grid's (choice, plan) pairs: balanced plans, then evened ones."""
    for alpha, strength, clip, shift in itertools.product(grid.alphas, grid.strengths, grid.clips, grid.shifts):
        yield dict(alpha=alpha, strength=strength, clip=clip, shift=shift), balanced(
            stats, weight, a_bits, alpha=alpha, strength=strength, clip=clip, shift=shift, share=share,
            median_floor=grid.step_floor)
    for evenness, clip in itertools.product(grid.evenness, grid.clips):
        yield dict(evenness=evenness, clip=clip, shift=True), evened(
            stats, a_bits, evenness, clip, shift=True, share=share, median_floor=grid.step_floor)


def search_plan(stats: InputStats, weight: torch.Tensor, weight_format: WeightFormat, a_bits: int,
                grid: SearchGrid = SearchGrid(),
                share: Callable[[torch.Tensor], torch.Tensor] = lambda step: step,
                exact: torch.Tensor | None = None) -> SearchResult:
    """The grid's best plan, every candidate with channels ``exact`` left unquantized."""
    weight = weight.detach().float()
    sample = stats.sample[:grid.tokens].to(weight.device, torch.float32)
    reference = sample @ weight.t()
    best = None
    simple_error = None
    for choice, plan in _candidates(stats, weight, a_bits, grid, share):
        plan = with_exact(plan, exact)
        error = output_error(sample, weight, plan, weight_format, a_bits, reference, grid.per_token,
                             grid.token_guard, grid.guard_floor)
        if choice == SIMPLE:
            simple_error = error
        if best is None or error < best[0]:
            best = (error, plan, choice)
    if simple_error is None:
        plan = with_exact(balanced(stats, weight, a_bits, **SIMPLE, share=share, median_floor=grid.step_floor),
                          exact)
        simple_error = output_error(sample, weight, plan, weight_format, a_bits, reference, grid.per_token,
                                    grid.token_guard, grid.guard_floor)
        if simple_error <= best[0]:
            best = (simple_error, plan, dict(SIMPLE))
    return SearchResult(best[1], best[2], best[0], simple_error)
