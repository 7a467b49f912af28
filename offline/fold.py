"""Fold activation plans into a decoder layer, exactly (before any rounding).

For each group of linears sharing an input, the plan's ``fold`` divides the input where the producer allows it
(offline/architectures.py says where that is for each architecture):
    q/k/v      attention norm /= fold                    (RMSNorm: shift stays; LayerNorm: beta takes the shift)
    gate/up    MLP norm /= fold                          (likewise)
    o_proj     v rows (and bias) /= fold, and the shift joins v_proj's output (softmax rows sum to 1, so the
               attention output moves by exactly -shift); with GQA one v row serves several q-heads, so their
               fold and shift must agree (symmetrize.share_within_groups)
    down_proj  up rows /= fold                           (shift stays: act(gate) * up and relu are not affine)
and every weight column is multiplied by the channel's step s = fold / inv_scale. What remains per linear is a
FoldedLinear: y = weight @ (x * inv_scale - input_shift) + weight @ correction_shift + row_bias + bias.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_outliertune.offline.architectures import Architecture, attention_groups
from vllm_outliertune.offline.symmetrize import ChannelPlan


@dataclasses.dataclass
class FoldedLinear:
    weight: torch.Tensor                    # [N, K] float32: W * diag(step), not yet rounded
    bias: torch.Tensor | None               # [N] the model's own bias after row folding (float32)
    row_bias: torch.Tensor | None           # [N] float32 from a downstream shift folded into these rows (v_proj)
    inv_scale: torch.Tensor | None          # [K] stored input_inv_scale
    input_shift: torch.Tensor | None        # [K] shift applied in the activation-quant step
    correction_shift: torch.Tensor | None   # [K] total shift of the quantized input, compensated in output_bias
    exact: torch.Tensor | None = None       # [k] input channels computed by a floating-point side GEMM

    def forward_unrounded(self, x: torch.Tensor) -> torch.Tensor:
        """The folded linear without any rounding (equals the original linear on the folded model's inputs)."""
        x = x.float()
        if self.inv_scale is not None:
            x = x * self.inv_scale
        if self.input_shift is not None:
            x = x - self.input_shift
        y = x @ self.weight.t()
        if self.correction_shift is not None:
            y = y + self.weight @ self.correction_shift
        for extra in (self.row_bias, self.bias):
            if extra is not None:
                y = y + extra
        return y


def _kv_vector(vector: torch.Tensor, group_size: int, head_dim: int, what: str) -> torch.Tensor:
    """o_proj per-channel vector [heads*head_dim] -> the per-v-row vector [kv_heads*head_dim]; all q-heads of a
    group must agree."""
    grouped = vector.view(-1, group_size, head_dim)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError(f"o_proj {what} differs between q-heads that share a kv head; it cannot fold into v_proj "
                         f"(build the plan from symmetrize.share_within_groups stats)")
    return grouped[:, 0].reshape(-1)


def _divide_rows(linear: torch.nn.Linear, divisor: torch.Tensor) -> None:
    linear.weight.div_(divisor.to(linear.weight)[:, None])
    if linear.bias is not None:
        linear.bias.div_(divisor.to(linear.bias))


def _fold_into_norm(norm: torch.nn.Module, kind: str, plan: ChannelPlan) -> bool:
    """Divide the norm's output by ``plan.fold``; a LayerNorm also takes the plan's shift into its bias. Returns
    whether the shift was taken (then the linears reading this norm need no runtime shift)."""
    fold = plan.fold.to(norm.weight)
    if kind == "rms_one_plus":  # Gemma: x_hat * (1 + g)
        norm.weight.copy_((1 + norm.weight) / fold - 1)
        return False
    norm.weight.div_(fold)
    if kind != "layernorm":
        return False
    norm.bias.div_(fold)
    if plan.shift is None:
        return False
    # round(y * inv_scale - shift) = round((y - shift / inv_scale) * inv_scale)
    inv_scale = 1.0 if plan.inv_scale is None else plan.inv_scale.to(norm.bias)
    norm.bias.sub_(plan.shift.to(norm.bias) / inv_scale)
    return True


def row_divisors(layer: torch.nn.Module, plans: dict[str, ChannelPlan], arch: Architecture, config,
                 ) -> dict[str, torch.Tensor]:
    """Per linear whose output rows take the fold of a later input (v rows: o_proj's, up rows: down_proj's), the
    divisor [N] of each of its rows (ones for rows that take none)."""
    heads, kv_heads, head_dim = attention_groups(config)
    divisors = {}
    for (name, rows), fold in ((arch.v_rows(layer, config), _kv_vector(plans["o"].fold, heads // kv_heads, head_dim,
                                                                         "fold")),
                               (arch.up_rows(layer, config), plans["down"].fold)):
        linear = layer.get_submodule(name)
        divisors[name] = torch.ones(linear.out_features, device=linear.weight.device)
        divisors[name][rows] = fold.to(divisors[name])
    return divisors


@torch.no_grad()
def fold_layer(layer: torch.nn.Module, plans: dict[str, ChannelPlan], arch: Architecture, config,
               ) -> dict[str, FoldedLinear]:
    """Fold ``plans`` ({"qkv", "o", "gate_up", "down"}) into ``layer`` (of ``arch``, transformers ``config``) in
    place (norms, v rows, up rows) and return the FoldedLinear of each of its linears (names relative to the
    layer)."""
    heads, kv_heads, head_dim = attention_groups(config)
    group_size = heads // kv_heads
    plan_of = {name: plans[group] for group, names in arch.groups.items() for name in names}
    input_shift = {name: plan.shift for name, plan in plan_of.items()}
    row_bias: dict[str, torch.Tensor] = {}

    # o_proj's fold into v rows, down_proj's into up rows.
    for name, divisor in row_divisors(layer, plans, arch, config).items():
        _divide_rows(layer.get_submodule(name), divisor)
    # o_proj's shift joins v_proj's output, unless the plan keeps a stored inv_scale (applied after v_proj).
    o_plan = plans["o"]
    v_name, v_rows = arch.v_rows(layer, config)
    v_linear = layer.get_submodule(v_name)
    if o_plan.shift is not None and o_plan.inv_scale is None:
        row_bias[v_name] = torch.zeros(v_linear.out_features, device=v_linear.weight.device)
        row_bias[v_name][v_rows] = -_kv_vector(o_plan.shift, group_size, head_dim, "shift").to(row_bias[v_name])
        input_shift[arch.o_proj] = None

    # q/k/v and gate/up: fold into the norms that produce their input.
    for group, norm_name in (("qkv", arch.attn_norm), ("gate_up", arch.mlp_norm)):
        if _fold_into_norm(layer.get_submodule(norm_name), arch.norm, plans[group]):
            input_shift.update(dict.fromkeys(arch.groups[group]))

    return {name: _folded(layer.get_submodule(name), plan, input_shift[name], row_bias.get(name))
            for name, plan in plan_of.items()}


def _folded(linear: torch.nn.Linear, plan: ChannelPlan, input_shift: torch.Tensor | None,
            row_bias: torch.Tensor | None = None) -> FoldedLinear:
    """The FoldedLinear of ``linear`` under its input's ``plan`` (its producer already folded), on the weight's
    device; ``input_shift``: the shift left for run time (None where the producer took it)."""
    to = dict(device=linear.weight.device, dtype=torch.float32)

    def optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(**to)

    return FoldedLinear(weight=linear.weight.float() * plan.step.to(**to),
                        bias=None if linear.bias is None else linear.bias.float().clone(),
                        row_bias=optional(row_bias), inv_scale=optional(plan.inv_scale),
                        input_shift=optional(input_shift), correction_shift=optional(plan.shift), exact=plan.exact)


@torch.no_grad()
def fold_head(norm: torch.nn.Module, head: torch.nn.Linear, plan: ChannelPlan, arch: Architecture) -> FoldedLinear:
    """Fold lm_head's input ``plan`` into the final ``norm`` in place, as q/k/v's into the attention norm, and return
    lm_head's FoldedLinear (``head`` itself is not modified: with tied embeddings it is the embedding matrix)."""
    shift_taken = _fold_into_norm(norm, arch.norm, plan)
    return _folded(head, plan, None if shift_taken else plan.shift)
