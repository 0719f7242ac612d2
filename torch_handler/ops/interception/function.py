"""The autograd Function every ruled op runs: a :class:`Plan` (what backward needs) and
:class:`RuleFunction`, whose backward splits the doubled batch into (actual, reference) halves where
the batch really is and returns the rule's multipliers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torch_handler.errors import DoubledBatchError
from torch_handler.ops.interception import batch_axis as ba
from torch_handler.ops.interception.batch_axis import Axis


def to_pairs(t: Tensor, axis: Axis) -> Tensor:
    """View ``t`` as (2, N', *s): actual half, reference half, batch factors moved to the front.

    N' = N; the batch dim's outer/inner factors stay in place as separate axes (dropped when 1).
    """
    shape = tuple(t.shape)
    d, size, inner = axis
    outer = ba.outer_of(shape, axis)
    split = t.reshape(*shape[:d], outer, size, inner, *shape[d + 1 :])
    moved = split.movedim(d + 1, 0)
    keep = [k for k, n in ((outer, outer), (inner, inner)) if n != 1]
    return moved.reshape(2, size // 2, *shape[:d], *keep, *shape[d + 1 :])


def from_pairs(p: Tensor, shape, axis: Axis) -> Tensor:
    """Inverse of :func:`to_pairs` for a tensor of shape ``shape``."""
    shape = tuple(shape)
    d, size, inner = axis
    outer = ba.outer_of(shape, axis)
    full = p.reshape(size, *shape[:d], outer, inner, *shape[d + 1 :])
    return full.movedim(0, d + 1).reshape(shape)


def pair_dim(k: int, shape, axis: Axis) -> int:
    """Original dim ``k`` as a negative dim of the per-pair shape (what rules receive)."""
    ndim = len(shape)
    k = k % ndim
    if k == axis.dim:
        raise DoubledBatchError(
            f"an op reduces over dim {k} of a tensor of shape {tuple(shape)}, which holds the "
            "doubled batch (inputs and references): it would mix rows of different pairs. "
            "Reduce over the other dims."
        )
    kept = (ba.outer_of(shape, axis) != 1) + (axis.inner != 1)  # batch factors left in place
    return k - ndim if k > axis.dim else k - (ndim - 1 + kept)


@dataclass
class Plan:
    """One intercepted call: what backward needs to apply the rule."""

    name: str  # the rule's name in OP_RULES
    kind: str  # "elementwise" | "single" | "batched" | "einsum"
    operands: list  # rule operands (detached tensors), constants included
    axes: list  # per operand: Axis or None (constant)
    out: Tensor  # torch's own output value
    out_axis: Axis
    params: dict = field(default_factory=dict)
    shapes: list = field(default_factory=list)  # per operand: its shape before any broadcast
    pair_axes: list | None = None  # per operand: where to split it (default: ``axes``)
    versions: list = field(default_factory=list)  # operands' version counters when saved
    rule: Callable | None = None  # OP_RULES[name], set when the Function runs (calls._run_rule)

    def __post_init__(self):
        self.versions = [op._version for op in self.operands]

    def check_unmodified(self) -> None:
        """Like autograd's saved tensors: an operand written in place after the op would make
        the rule read the wrong values."""
        for op, version in zip(self.operands, self.versions, strict=True):
            if op._version != version:
                raise RuntimeError(
                    f"an operand of `{self.name}` was modified by an in-place operation after the "
                    "op used it; its DeepLIFT rule needs the original values. Use the out-of-place "
                    "form (e.g. x = x + y instead of x += y) for that tensor."
                )


class RuleFunction(torch.autograd.Function):
    """``apply(plan, *varying) -> plan.out``; backward: the rule's multipliers per varying operand."""

    @staticmethod
    def forward(ctx, plan, *varying):
        ctx.plan = plan
        return plan.out

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        # The plan stays on ctx: shap differentiates once per model input over a retained graph,
        # and every pass needs it (it goes with the graph, as autograd's saved tensors do).
        multipliers = apply_rule(plan, grad)
        return (None, *(m for m, a in zip(multipliers, plan.axes, strict=True) if a is not None))


def apply_rule(plan: Plan, grad: Tensor) -> list:
    """Multipliers for every operand of ``plan`` (None for constants), in the operands' shapes."""
    plan.check_unmodified()
    rule = plan.rule
    m = to_pairs(grad, plan.out_axis)
    if plan.kind == "elementwise":
        shape = tuple(plan.out.shape)
        pairs = [to_pairs(op.expand(shape), plan.out_axis) for op in plan.operands]
        result = rule(m, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), **plan.params)
        return [
            None if a is None or r is None else from_pairs(r, shape, plan.out_axis).sum_to_size(s)
            for r, a, s in zip(result, plan.axes, plan.shapes, strict=True)
        ]
    pair_axes = plan.pair_axes or plan.axes
    pairs = [to_pairs(op, a) for op, a in zip(plan.operands, pair_axes, strict=True)]
    params = dict(plan.params)
    if params.get("attn_mask") is not None:
        # A constant mask, expanded to the scores' shape: one half of it, in the per-pair frame.
        params["attn_mask"] = to_pairs(params["attn_mask"], plan.out_axis)[0]
    result = rule(m, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), **params)
    out = []
    for r, op, a, pa, s in zip(result, plan.operands, plan.axes, pair_axes, plan.shapes, strict=True):
        out.append(None if a is None or r is None else from_pairs(r, op.shape, pa).sum_to_size(s))
    return out
