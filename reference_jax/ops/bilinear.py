"""Bilinear ops of two varying operands (matmul, bmm, mm, einsum, baddbmm, linear with a
varying weight): each operand's multiplier is the vector–Jacobian product at the other
operand's mean, exact because ``B(u_a, v_a) − B(u_r, v_r) = B(Δu, mean(v)) + B(mean(u), Δv)``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from reference_jax.rescale import average

Array = jax.Array

# --------------------------------------------------------------------------- bilinear


def _bilinear_multipliers(form, m, u_a, u_r, v_a, v_r):
    """``(m_u, m_v)`` of ``y = form(u, v)`` (bilinear): each the vector–Jacobian product
    at the other operand's mean."""
    _, vjp_u = jax.vjp(lambda u: form(u, average(v_a, v_r)), u_a)
    _, vjp_v = jax.vjp(lambda v: form(average(u_a, u_r), v), v_a)
    return vjp_u(m)[0], vjp_v(m)[0]


def _matmul(u, v):
    return jnp.matmul(u, v, precision=jax.lax.Precision.HIGHEST)


def _check_rank(name: str, value: Array, rank: int | tuple[int, ...], what: str):
    ranks = (rank,) if isinstance(rank, int) else rank
    if value.ndim not in ranks:
        raise AssertionError(
            f"{name} must be {what} per pair (rank {' or '.join(map(str, ranks))}), "
            f"got shape {tuple(value.shape)}"
        )


def _matmul_rule(m, actual, reference):
    (u_a, v_a), (u_r, v_r) = actual, reference
    if u_a.ndim < 2 or v_a.ndim < 2:
        raise AssertionError(
            f"matmul operands must be at least 2-D per pair, got {tuple(u_a.shape)} and "
            f"{tuple(v_a.shape)}"
        )
    return _bilinear_multipliers(_matmul, m, u_a, u_r, v_a, v_r)


def _mm_rule(m, actual, reference):
    for i, value in enumerate(actual):
        _check_rank(f"mm operand {i}", value, 2, "a matrix (n, k) / (k, p)")
    return _matmul_rule(m, actual, reference)


def _bmm_rule(m, actual, reference):
    for i, value in enumerate(actual):
        _check_rank(f"bmm operand {i}", value, 3, "a batch of matrices (b, n, k) / (b, k, p)")
    return _matmul_rule(m, actual, reference)


def _einsum(u, v, equation):
    return jnp.einsum(equation, u, v, precision=jax.lax.Precision.HIGHEST)


def _einsum_rule(m, actual, reference, equation):
    (u_a, v_a), (u_r, v_r) = actual, reference
    return _bilinear_multipliers(functools.partial(_einsum, equation=equation), m, u_a, u_r, v_a, v_r)


def _baddbmm(c, u, v, beta=1.0, alpha=1.0):
    return beta * c + alpha * _matmul(u, v)


def _sum_to_shape(m: Array, shape: tuple[int, ...]) -> Array:
    """The VJP of broadcasting ``shape`` to ``m.shape``: ``m`` summed over the broadcast dims."""
    _, vjp = jax.vjp(lambda c: jnp.broadcast_to(c, m.shape), jnp.zeros(shape, m.dtype))
    return vjp(m)[0]


def _baddbmm_rule(m, actual, reference, beta=1.0, alpha=1.0):
    (c_a, u_a, v_a), (_, u_r, v_r) = actual, reference
    _check_rank("baddbmm batch1", u_a, 3, "a batch of matrices (b, n, k)")
    _check_rank("baddbmm batch2", v_a, 3, "a batch of matrices (b, k, p)")
    m_u, m_v = _bilinear_multipliers(_matmul, alpha * m, u_a, u_r, v_a, v_r)
    return beta * _sum_to_shape(m, c_a.shape), m_u, m_v


def _linear(x, w, b=None):
    y = _matmul(x, w.T)
    return y if b is None else y + b


def _linear_rule(m, actual, reference):
    x_a, w_a, *b_a = actual
    x_r, w_r, *_ = reference
    _check_rank("linear weight", w_a, 2, "a matrix (out, in)")
    m_x, m_w = _bilinear_multipliers(lambda x, w: _matmul(x, w.T), m, x_a, x_r, w_a, w_r)
    if not b_a:
        return m_x, m_w
    return m_x, m_w, None if b_a[0] is None else _sum_to_shape(m, b_a[0].shape)
