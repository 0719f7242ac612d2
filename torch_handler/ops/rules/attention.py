"""scaled_dot_product_attention: bilinear scores, a constant mask, the softmax rule, a bilinear product."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _f64, _pad_after_pair, _reduce_to
from torch_handler.ops.rules.bilinear import _matmul_multipliers
from torch_handler.ops.rules.softmax import _exp_sums, _softmax_input_multiplier


def scaled_dot_product_attention(
    m: Tensor, actual, reference, *, attn_mask=None, is_causal: bool = False, scale=None, dropout_p=0.0
) -> Multipliers:
    """y = softmax(S) @ v with S = (q @ kᵀ) · scale + mask (scale = 1/√E if None; a bool mask
    is −∞ where False, is_causal masks the upper triangle), composed of the bilinear rule
    (m_P = m @ mean(v)ᵀ, m_v = mean(P)ᵀ @ m), the softmax rule on S (dim −1) and the bilinear
    rule again (m_q = scale · m_S @ mean(k), m_k = scale · m_Sᵀ @ mean(q)).

    actual = (q_a, k_a, v_a): q (N, *b, L, E), k (N, *b, S, E), v (N, *b, S, Ev) (batch axes
    broadcast per pair); attn_mask constant, broadcastable to (*b, L, S);
    m (2, N, *b, L, Ev) -> (m_q, m_k, m_v). Computed in float64.
    """
    if dropout_p:
        raise ValueError(
            "scaled_dot_product_attention rule: dropout_p must be 0 while explaining (put the model in eval() mode)"
        )
    (q_a, k_a, v_a), (q_r, k_r, v_r) = actual, reference
    q_a64, k_a64, v_a64, q_r64, k_r64, v_r64 = map(_f64, (q_a, k_a, v_a, q_r, k_r, v_r))
    if scale is None:
        scale = 1.0 / math.sqrt(q_a.shape[-1])
    L, S = q_a.shape[-2], k_a.shape[-2]
    additive = None
    if is_causal or attn_mask is not None:
        additive = torch.zeros((L, S), dtype=torch.float64, device=q_a.device)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q_a.device).tril()
        additive = additive.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            additive = additive + torch.zeros_like(attn_mask, dtype=torch.float64).masked_fill(~attn_mask, -math.inf)
        else:
            additive = additive + _f64(attn_mask)

    def scores(q, k):
        ndim = max(q.ndim, k.ndim)
        s = torch.matmul(_pad_after_pair(q, ndim), _pad_after_pair(k, ndim).transpose(-1, -2)).mul_(scale)
        return s if additive is None else s.add_(additive)  # in place: no fresh float64 temporaries

    # Everything in float64: the products too (in float32 they would cost the sdpa rows of the
    # op crosscheck a factor 70 in accuracy, 5.6e-08 -> 4.0e-06, for a third of the rule's time).
    S_a, S_r = scores(q_a64, k_a64), scores(q_r64, k_r64)
    # The probabilities from the softmax rule's own exponentials (one exp pass, not three).
    sums = _exp_sums(S_a, S_r, (-1,))
    (_, _), (e_a, e_r), (sum_a, sum_r) = sums
    P_a, P_r = e_a / sum_a, e_r / sum_r
    m_P, m_v = _matmul_multipliers(_f64(m), P_a, P_r, v_a64, v_r64)
    m_S = _softmax_input_multiplier(m_P, S_a, S_r, (-1,), sums)
    m_q, m_kt = _matmul_multipliers(m_S, q_a64, q_r64, k_a64.transpose(-1, -2), k_r64.transpose(-1, -2), scale=scale)
    return (
        _reduce_to(m_q, q_a.shape).to(q_a.dtype),
        _reduce_to(m_kt.transpose(-1, -2), k_a.shape).to(k_a.dtype),
        _reduce_to(m_v, v_a.shape).to(v_a.dtype),
    )
