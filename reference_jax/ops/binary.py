"""Binary elementwise ops ``y = f(u, v)`` of two varying operands: forward and partial
quotients, combined by the two-player Shapley rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reference_jax.ops._numerics import _difference_quotient, _exp_base_quotient, _power_quotient, _safe_delta

Array = jax.Array

# Each op: forward f(u, v) and the partial quotients
#   Q_u(u_a, u_r, v) = (f(u_a, v) − f(u_r, v)) / Δu     (∂_u f(u_a, v) where Δu = 0)
#   Q_v(v_a, v_r, u) = (f(u, v_a) − f(u, v_r)) / Δv
# so that m_u = m · mean over v ∈ {v_r, v_a} of Q_u, and m_v likewise.


def _tie_half(a, b):
    """torch's maximum / minimum derivative: 1 where strictly winning, ½ at a tie."""
    return jnp.where(a == b, 0.5, 0.0).astype(a.dtype)


def _maximum_q(a, r, other):
    derivative = jnp.where(a > other, 1.0, _tie_half(a, other))
    return _difference_quotient(jnp.maximum(a, other), jnp.maximum(r, other), a, r, derivative)


def _minimum_q(a, r, other):
    derivative = jnp.where(a < other, 1.0, _tie_half(a, other))
    return _difference_quotient(jnp.minimum(a, other), jnp.minimum(r, other), a, r, derivative)


def _atan2_q_u(a, r, v):
    """``(atan2(a, v) − atan2(r, v))/Δ = atan2(Δ·v, v² + a r)/Δ`` (angle subtraction),
    valid unless ``v ≤ 0`` and ``a``, ``r`` are not of one sign (the branch cut of
    atan2 at ``u = 0, v < 0``), where the plain quotient (no cancellation) is used."""
    d, nonzero = _safe_delta(a, r)
    closed_ok = (v > 0) | (a * r > 0)
    closed = jnp.arctan2(d * v, v * v + a * r) / d
    plain = (jnp.arctan2(a, v) - jnp.arctan2(r, v)) / d
    derivative = v / (v * v + a * a)
    return jnp.where(nonzero, jnp.where(closed_ok, closed, plain), derivative)


def _atan2_q_v(a, r, u):
    """``(atan2(u, a) − atan2(u, r))/Δ = atan2(−u·Δ, a r + u²)/Δ`` for ``u ≠ 0`` (the
    angle then moves within one half-plane); the plain quotient at ``u = 0``."""
    d, nonzero = _safe_delta(a, r)
    closed = jnp.arctan2(-u * d, a * r + u * u) / d
    plain = (jnp.arctan2(u, a) - jnp.arctan2(u, r)) / d
    derivative = -u / (u * u + a * a)
    return jnp.where(nonzero, jnp.where(u != 0, closed, plain), derivative)


def _mul_q(a, r, other):
    return other


def _div_q_u(a, r, v):
    return 1.0 / v


def _div_q_v(a, r, u):
    return -u / (a * r)


def _pow_q_u(a, r, v):
    return _power_quotient(a, r, v)


def _pow_q_v(a, r, u):
    return _exp_base_quotient(a, r, u)
