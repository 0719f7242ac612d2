"""scaled_dot_product_attention: bilinear scores, a constant mask, the softmax rule, a bilinear
product with the values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from reference_jax.ops.bilinear import _bilinear_multipliers, _matmul
from reference_jax.ops.softmax import _softmax_backward


def _attention_bias(length_q: int, length_k: int, attn_mask, is_causal: bool, dtype):
    """The additive mask of the scores: a float mask as is, a bool mask as ``−inf``
    where False, causal as ``−inf`` above the diagonal (torch's conventions)."""
    bias = jnp.zeros((length_q, length_k), dtype)
    if is_causal:
        keep = jnp.tril(jnp.ones((length_q, length_k), bool))
        bias = jnp.where(keep, bias, -jnp.inf)
    if attn_mask is not None:
        attn_mask = jnp.asarray(attn_mask)
        if attn_mask.dtype == jnp.bool_:
            bias = bias + jnp.where(attn_mask, 0.0, -jnp.inf).astype(dtype)
        else:
            bias = bias + attn_mask.astype(dtype)
    return bias


def _attention_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _scores(q, k, scale):
    return _matmul(q, jnp.swapaxes(k, -1, -2)) * scale


def _sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    s = _scores(q, k, _attention_scale(q, scale))
    s = s + _attention_bias(q.shape[-2], k.shape[-2], attn_mask, is_causal, q.dtype)
    return _matmul(jax.nn.softmax(s, axis=-1), v)


def _sdpa_rule(m, actual, reference, attn_mask=None, is_causal=False, scale=None):
    """``S = (q k^T)·scale`` (bilinear), ``+ mask`` (constant), ``P = softmax(S)``
    (composite rule; masked entries pass 0), ``y = P v`` (bilinear)."""
    (q_a, k_a, v_a), (q_r, k_r, v_r) = actual, reference
    for name, value in (("q", q_a), ("k", k_a), ("v", v_a)):
        if value.ndim < 2:
            raise AssertionError(f"{name} must be at least 2-D (..., L, E) per pair, got {tuple(value.shape)}")
    scale = _attention_scale(q_a, scale)
    bias = _attention_bias(q_a.shape[-2], k_a.shape[-2], attn_mask, is_causal, q_a.dtype)
    s_a, s_r = _scores(q_a, k_a, scale) + bias, _scores(q_r, k_r, scale) + bias
    p_a, p_r = jax.nn.softmax(s_a, axis=-1), jax.nn.softmax(s_r, axis=-1)
    m_p, m_v = _bilinear_multipliers(_matmul, m, p_a, p_r, v_a, v_r)
    m_s = _softmax_backward(m_p, s_a, s_r, -1)
    m_q, m_k = _bilinear_multipliers(lambda q, k: _scores(q, k, scale), m_s, q_a, q_r, k_a, k_r)
    return m_q, m_k, m_v
