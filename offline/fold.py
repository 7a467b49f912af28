"""Fold activation plans into a decoder layer, exactly (before any rounding).

For each group of linears sharing an input, the plan's ``fold`` divides the input where the producer allows it:
    q/k/v      input_layernorm gamma  /= fold            (shift stays: RMSNorm has no beta)
    gate/up    post_attention_layernorm gamma /= fold    (shift stays)
    o_proj     v_proj rows (and bias) /= fold, and the shift joins v_proj's output (softmax rows sum to 1, so the
               attention output moves by exactly -shift); with GQA one v row serves several q-heads, so their
               fold and shift must agree (symmetrize.share_within_groups)
    down_proj  up_proj rows /= fold                      (shift stays: silu(gate) * up is not affine)
and every weight column is multiplied by the channel's step s = fold / inv_scale. What remains per linear is a
FoldedLinear: y = weight @ (x * inv_scale - input_shift) + weight @ correction_shift + row_bias + bias.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_outliertune.offline.model_io import DOWN_PROJ, GATE_UP, O_PROJ, QKV
from vllm_outliertune.offline.symmetrize import ChannelPlan


@dataclasses.dataclass
class FoldedLinear:
    weight: torch.Tensor                    # [N, K] float32: W * diag(step), not yet rounded
    bias: torch.Tensor | None               # [N] the model's own bias after row folding (float32)
    row_bias: torch.Tensor | None           # [N] float32 from a downstream shift folded into these rows (v_proj)
    inv_scale: torch.Tensor | None          # [K] stored input_inv_scale
    input_shift: torch.Tensor | None        # [K] shift applied in the activation-quant step
    correction_shift: torch.Tensor | None   # [K] total shift of the quantized input, compensated in output_bias

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


@torch.no_grad()
def fold_layer(layer: torch.nn.Module, plans: dict[str, ChannelPlan], group_size: int, head_dim: int,
               ) -> dict[str, FoldedLinear]:
    """Fold ``plans`` ({"qkv", "o", "gate_up", "down"}) into ``layer`` in place (norm gammas, v_proj and up_proj
    rows) and return the FoldedLinear of each of its seven linears (names relative to the layer)."""
    row_bias: dict[str, torch.Tensor] = {}
    input_shift = {name: plan.shift for names, plan in ((QKV, plans["qkv"]), (GATE_UP, plans["gate_up"]),
                                                       ((DOWN_PROJ,), plans["down"])) for name in names}

    # o_proj: fold into v_proj rows; its shift too, unless the plan keeps a stored inv_scale (applied after v_proj).
    v_proj = layer.get_submodule(QKV[2])
    o_plan = plans["o"]
    o_fold = _kv_vector(o_plan.fold, group_size, head_dim, "fold")
    v_proj.weight.div_(o_fold.to(v_proj.weight)[:, None])
    if v_proj.bias is not None:
        v_proj.bias.div_(o_fold.to(v_proj.bias))
    if o_plan.shift is not None and o_plan.inv_scale is None:
        row_bias[QKV[2]] = -_kv_vector(o_plan.shift, group_size, head_dim, "shift")
        input_shift[O_PROJ] = None
    else:
        input_shift[O_PROJ] = o_plan.shift

    # down_proj: fold into up_proj rows.
    up_proj = layer.get_submodule(GATE_UP[1])
    up_proj.weight.div_(plans["down"].fold.to(up_proj.weight)[:, None])
    if up_proj.bias is not None:
        up_proj.bias.div_(plans["down"].fold.to(up_proj.bias))

    # q/k/v and gate/up: fold into the RMSNorm gammas.
    layer.input_layernorm.weight.div_(plans["qkv"].fold.to(layer.input_layernorm.weight))
    layer.post_attention_layernorm.weight.div_(plans["gate_up"].fold.to(layer.post_attention_layernorm.weight))

    plan_of = {**{name: plans["qkv"] for name in QKV}, O_PROJ: o_plan,
               **{name: plans["gate_up"] for name in GATE_UP}, DOWN_PROJ: plans["down"]}
    folded = {}
    for name, plan in plan_of.items():
        linear = layer.get_submodule(name)
        step = plan.step.to(linear.weight.device, torch.float32)
        to = dict(device=linear.weight.device, dtype=torch.float32)
        folded[name] = FoldedLinear(
            weight=linear.weight.float() * step,
            bias=None if linear.bias is None else linear.bias.float().clone(),
            row_bias=row_bias[name].to(**to) if name in row_bias else None,
            inv_scale=None if plan.inv_scale is None else plan.inv_scale.to(**to),
            input_shift=None if input_shift[name] is None else input_shift[name].to(**to),
            correction_shift=None if plan.shift is None else plan.shift.to(**to))
    return folded
