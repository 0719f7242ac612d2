"""The softmax family (softmax, log_softmax, logsumexp) from exp and log Rescale, with a
shift common to both halves (it cancels)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from reference_jax.ops._numerics import _exp_quotient, _log_quotient

Array = jax.Array



def _shift(x_a: Array, x_r: Array, dim) -> Array:
    """The common shift ``c``: the max over both halves along ``dim`` (kept), finite."""
    c = jnp.maximum(jnp.max(x_a, axis=dim, keepdims=True), jnp.max(x_r, axis=dim, keepdims=True))
    return jnp.where(jnp.isfinite(c), c, 0.0)


class _SoftmaxPieces(NamedTuple):
    """Forward values of ``z = x − c``, ``e = exp(z)``, ``S = Σ_dim e`` for both halves,
    and the Rescale factor of exp at ``(z_a, z_r)``."""

    z_a: Array
    z_r: Array
    e_a: Array
    e_r: Array
    s_a: Array  # S, kept dim
    s_r: Array
    r_exp: Array


def _softmax_pieces(x_a, x_r, dim) -> _SoftmaxPieces:
    c = _shift(x_a, x_r, dim)
    z_a, z_r = x_a - c, x_r - c
    e_a, e_r = jnp.exp(z_a), jnp.exp(z_r)
    return _SoftmaxPieces(
        z_a, z_r, e_a, e_r,
        jnp.sum(e_a, axis=dim, keepdims=True), jnp.sum(e_r, axis=dim, keepdims=True),
        _exp_quotient(z_a, z_r),
    )


def _log_softmax_backward(m, p: _SoftmaxPieces, dim):
    """``u = z − log S``: ``m_x = m + m_S·R_exp(z_a, z_r)`` with
    ``m_S = −(Σ_dim m)·R_log(S_a, S_r)`` (the ``z`` path is the identity; ``c`` cancels)."""
    m_big_s = -jnp.sum(m, axis=dim, keepdims=True) * _log_quotient(p.s_a, p.s_r)
    return m + m_big_s * p.r_exp


def _softmax_backward(m, x_a, x_r, dim):
    """softmax as ``exp ∘ log_softmax``: ``u = log_softmax(x)`` per half, ``y = exp(u)``;
    ``m_u = m·R_exp(u_a, u_r)``, then the log_softmax rule.

    Why not ``e · reciprocal(S)`` with a Shapley product: exact too, but its multipliers
    grow like ``e^L`` when the two halves' logits differ in level by ``L``, with
    contributions of that size that cancel (float64 misses 1e-10 summation from ``L ≈ 15``,
    float32 misses 1e-5 from ``L ≈ 7``). Through log_softmax every factor is bounded
    (``R_exp(u) ≤ max y``, ``R_log(S)·R_exp(z) ≤ max p``)."""
    p = _softmax_pieces(x_a, x_r, dim)
    u_a, u_r = p.z_a - jnp.log(p.s_a), p.z_r - jnp.log(p.s_r)
    return _log_softmax_backward(m * _exp_quotient(u_a, u_r), p, dim)


def _softmax(x, dim):
    return jax.nn.softmax(x, axis=dim)


def _softmax_rule(m, actual, reference, dim):
    (x_a,), (x_r,) = actual, reference
    return (_softmax_backward(m, x_a, x_r, dim),)


def _log_softmax(x, dim):
    return jax.nn.log_softmax(x, axis=dim)


def _log_softmax_rule(m, actual, reference, dim):
    """``y = (x − c) − log S``: ``m_x = m + m_S·R_exp`` with
    ``m_S = −(Σ_dim m)·R_log(S_a, S_r)``."""
    (x_a,), (x_r,) = actual, reference
    return (_log_softmax_backward(m, _softmax_pieces(x_a, x_r, dim), dim),)


def _logsumexp(x, dim, keepdim=False):
    return jax.nn.logsumexp(x, axis=dim, keepdims=keepdim)


def _logsumexp_rule(m, actual, reference, dim, keepdim=False):
    """``y = c + log S`` (``c`` cancels): ``m_x = m · R_log(S) · R_exp(x − c)``."""
    (x_a,), (x_r,) = actual, reference
    p = _softmax_pieces(x_a, x_r, dim)
    m = m if keepdim else jnp.expand_dims(m, dim)
    return (m * _log_quotient(p.s_a, p.s_r) * p.r_exp,)
