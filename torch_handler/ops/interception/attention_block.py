"""``F.multi_head_attention_forward`` in its plain form as one intercepted call.

Stepping into the composite (``torch.overrides.redispatch_function``) sees some forty torch calls
per forward: the in-projection, a dozen views and transposes that split the heads, the
attention, the merge, the out-projection. Each passes through the function mode, and together
they cost more than the attention rule itself (measured on the 2-core VM: 0.6-0.9 ms of the
forward of a GRU -> MultiheadAttention model, 32 pairs). In the plain form (self- or
cross-attention without masks, extra key/value biases, zero attention, dropout or attention
weights, the batch in dim 1 as the composite takes it) the composite runs natively here, and
its backward applies what stepping in would apply: the projections are linear (their
multipliers are the gradient), the attention is the op table's ``scaled_dot_product_attention``
rule (the bilinear rule, the softmax rule, the bilinear rule, as the calls inside compose),
on the projections torch's own functions compute. Any other form is stepped into as before.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from torch_handler.ops.interception._shared import UNKNOWN, arg
from torch_handler.ops.interception.batch_axis import Axis

# The composite's parameters after (query, key, value), by position; the ones read below.
_PARAMETERS = (
    "embed_dim_to_check num_heads in_proj_weight in_proj_bias bias_k bias_v add_zero_attn dropout_p "
    "out_proj_weight out_proj_bias training key_padding_mask need_weights attn_mask use_separate_proj_weight "
    "q_proj_weight k_proj_weight v_proj_weight static_k static_v average_attn_weights is_causal"
).split()
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None, "is_causal": False}

# torch's own in-projections (private, present since torch 1.9): the rule's operands are the
# values the forward used, computed by the same calls.
_IN_PROJECTION = getattr(functional, "_in_projection", None)
_IN_PROJECTION_PACKED = getattr(functional, "_in_projection_packed", None)


def read(mode, func, args, kwargs) -> tuple | None:
    """The composite's result with the attention block's Function in the graph, or None where
    the call is not in the plain form (the caller then steps into it)."""
    if len(args) < 3 or _IN_PROJECTION is None or _IN_PROJECTION_PACKED is None:
        return None
    p = {name: arg(args, kwargs, 3 + i, name, _DEFAULTS.get(name)) for i, name in enumerate(_PARAMETERS)}
    query, key, value = args[0], args[1], args[2]
    plain = (
        not p["need_weights"] and p["attn_mask"] is None and p["key_padding_mask"] is None and not p["is_causal"]
        and p["bias_k"] is None and p["bias_v"] is None and not p["add_zero_attn"]
        and p["static_k"] is None and p["static_v"] is None and not (p["training"] and p["dropout_p"])
    )
    if not plain or not all(isinstance(t, Tensor) and t.dim() == 3 for t in (query, key, value)):
        return None
    if not _consistent(query, key, value, p):
        return None  # stepped into, torch's composite raises its own error
    weights = [p[name] for name in ("in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
                                     "q_proj_weight", "k_proj_weight", "v_proj_weight")]
    if any(isinstance(w, Tensor) and mode.axis_of(w) is not None for w in weights):
        return None  # input-dependent weights: the projections are not linear
    axes = [mode.axis_of(t) for t in (query, key, value)]
    batch = query.shape[1]
    if any(a is None or a is UNKNOWN or a != Axis(1, batch) for a in axes):
        return None  # a constant key or value, or the batch elsewhere: the calls inside handle it
    if query.dtype not in (torch.float32, torch.float64):
        return None
    block = _Block(mode.rules["scaled_dot_product_attention"], query.detach(), key.detach(), value.detach(), p)
    result = _AttentionBlock.apply(block, query, key, value)
    mode.mark(result, Axis(1, batch))
    return result, None


def _consistent(query: Tensor, key: Tensor, value: Tensor, p: dict) -> bool:
    """The shape checks torch's composite makes before computing (the block computes by its own
    calls): the embedding size, the heads dividing it, key and value alike, one batch size."""
    embed, heads = p["embed_dim_to_check"], p["num_heads"]
    if not isinstance(embed, int) or not isinstance(heads, int) or heads <= 0 or embed % heads:
        return False
    if query.shape[2] != embed or not query.shape[1] == key.shape[1] == value.shape[1]:
        return False
    if not isinstance(p["out_proj_weight"], Tensor):
        return False
    if p["use_separate_proj_weight"]:
        return key.shape[0] == value.shape[0] and all(
            isinstance(p[name], Tensor) for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    return key.shape == value.shape and isinstance(p["in_proj_weight"], Tensor)


def _heads(t: Tensor, heads: int) -> Tensor:
    """(T, B, E) -> (B, heads, T, E / heads), a view: the composite's head split."""
    T, B, E = t.shape
    return t.view(T, B * heads, E // heads).transpose(0, 1).view(B, heads, T, E // heads)


class _Block:
    """One plain call: its forward by the composite's own calls, keeping the projections (the
    attention rule's operands) for its backward."""

    def __init__(self, rule, query: Tensor, key: Tensor, value: Tensor, params: dict):
        self.rule, self.inputs, self.params = rule, (query, key, value), params
        self.versions = [t._version for t in self.inputs]
        with torch.no_grad():
            self.q, self.k, self.v = self.projections()
            L, B, E = query.shape
            heads = params["num_heads"]
            # torch's composite, call for call (need_weights=False, no mask, no dropout): the same
            # value as torch's (tests/test_attention_block.py compares them bit for bit).
            qh, kh, vh = (_heads(t, heads) for t in (self.q, self.k, self.v))
            attended = functional.scaled_dot_product_attention(qh, kh, vh, None, 0.0, False)
            attended = attended.permute(2, 0, 1, 3).reshape(B * L, E)
            out = functional.linear(attended, params["out_proj_weight"], params["out_proj_bias"])
            self.out = out.view(L, B, out.size(1))

    def projections(self) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (L|S, B, E) by torch's own in-projection calls."""
        p, (query, key, value) = self.params, self.inputs
        if not p["use_separate_proj_weight"]:
            return _IN_PROJECTION_PACKED(query, key, value, p["in_proj_weight"], p["in_proj_bias"])
        bias = p["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        return _IN_PROJECTION(query, key, value, p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"],
                              b_q, b_k, b_v)

    def multipliers(self, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The multipliers of query, key and value for the output's ``grad`` (L, B, E)."""
        for t, version in zip(self.inputs, self.versions, strict=True):
            if t._version != version:
                raise RuntimeError(
                    "an input of nn.MultiheadAttention was modified by an in-place operation after the "
                    "attention used it; its DeepLIFT rule needs the original values. Use the out-of-place "
                    "form (e.g. x = x + y instead of x += y) for that tensor."
                )
        p, heads = self.params, self.params["num_heads"]
        L, B, E = self.out.shape
        N, d = B // 2, E // heads

        def split(t: Tensor) -> Tensor:
            """(T, B, E) -> (2, N, heads, T, d): the composite's head split, in pairs (a view)."""
            return _heads(t, heads).view(2, N, heads, t.shape[0], d)

        def merge(m: Tensor) -> Tensor:
            """(2, N, heads, T, d) -> (T * B, E), the inverse of ``split`` (a view where the rule
            wrote the multipliers in the operands' layout, as the compiled rule does)."""
            return m.reshape(B * heads, m.shape[-2], d).transpose(0, 1).reshape(m.shape[-2] * B, E)

        with torch.no_grad():
            q, k, v = split(self.q), split(self.k), split(self.v)
            m_out = split(grad.matmul(p["out_proj_weight"]))  # the out-projection: linear
            m_q, m_k, m_v = self.rule(m_out, (q[0], k[0], v[0]), (q[1], k[1], v[1]))
            if p["use_separate_proj_weight"]:  # the in-projections: linear
                w_q, w_k, w_v = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
            else:
                w_q, w_k, w_v = p["in_proj_weight"].chunk(3)
            query, key, value = self.inputs
            m_query = merge(m_q).matmul(w_q)
            if query is key is value:  # self-attention: one sum (autograd would add three results)
                m_query.addmm_(merge(m_k), w_k).addmm_(merge(m_v), w_v)
                return m_query.view(query.shape), None, None
            shapes = (query.shape, key.shape, value.shape)
            return tuple(m.view(s) for m, s in zip((m_query, merge(m_k).matmul(w_k), merge(m_v).matmul(w_v)), shapes,
                                                    strict=True))


class _AttentionBlock(torch.autograd.Function):
    """``apply(block, query, key, value) -> block.out``; backward: the block's multipliers."""

    @staticmethod
    def forward(ctx, block, query, key, value):
        ctx.block = block
        return block.out

    @staticmethod
    def backward(ctx, grad):
        # The block stays on ctx: shap differentiates once per model input over a retained graph.
        return (None, *ctx.block.multipliers(grad))
