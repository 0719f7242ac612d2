"""Unary elementwise ops ``y = f(x)``: forward and Rescale factor ``R(a, r)`` with
``m_x = m · R``, equal to the derivative (torch's convention at kinks) where ``a == r``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from reference_jax.ops._numerics import (
    _difference_quotient,
    _exp_quotient,
    _normal_cdf,
    _normal_cdf_quotient,
    _power_quotient,
)
from reference_jax.rescale import average, rescale

Array = jax.Array

# --------------------------------------------------------------------------- unary ops
#
# Each entry: forward f(x, **params) and the Rescale factor R(a, r, **params) with
# m_x = m · R, equal to the derivative at a == r.


def _relu(x):
    return jnp.maximum(x, 0.0)


def _relu_factor(a, r):
    # torch: relu'(0) = 0.
    return _difference_quotient(_relu(a), _relu(r), a, r, (a > 0).astype(a.dtype))


def _leaky_relu(x, negative_slope=0.01):
    return jnp.where(x > 0, x, negative_slope * x)


def _leaky_relu_factor(a, r, negative_slope=0.01):
    # Both on the slope side: the factor is the slope itself (s·a − s·r would cancel).
    # torch: derivative at 0 is the slope.
    slope = jnp.asarray(negative_slope, a.dtype)
    plain = _difference_quotient(
        _leaky_relu(a, negative_slope), _leaky_relu(r, negative_slope), a, r,
        jnp.where(a > 0, 1.0, slope),
    )
    return jnp.where((a <= 0) & (r <= 0), slope, plain)


def _clamp(x, min=None, max=None):  # noqa: A002 - torch's names
    lo = -jnp.inf if min is None else min
    hi = jnp.inf if max is None else max
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _clamp_factor(a, r, min=None, max=None):  # noqa: A002
    # Slopes 0 and 1 only: the plain quotient is exact. torch: derivative 1 on the closed
    # interval [min, max] (clamp's backward keeps the gradient at the bounds).
    lo = -jnp.inf if min is None else min
    hi = jnp.inf if max is None else max
    inside = ((a >= lo) & (a <= hi)).astype(a.dtype)
    return _difference_quotient(_clamp(a, min, max), _clamp(r, min, max), a, r, inside)


def _abs_factor(a, r):
    # Slopes −1 and 1 only: the plain quotient is exact. torch: derivative sign(x), 0 at 0.
    return _difference_quotient(jnp.abs(a), jnp.abs(r), a, r, jnp.sign(a))


def _relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def _relu6_factor(a, r):
    # torch (hardtanh): derivative 0 at the kinks 0 and 6.
    inside = ((a > 0) & (a < 6)).astype(a.dtype)
    return _difference_quotient(_relu6(a), _relu6(r), a, r, inside)


def _elu(x, alpha=1.0):
    return jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0)))


def _elu_factor(a, r, alpha=1.0):
    # Both ≤ 0: α (e^a − e^r)/Δ by the exp quotient. torch: derivative α e^x for x ≤ 0.
    negative = (a <= 0) & (r <= 0)
    plain = _difference_quotient(_elu(a, alpha), _elu(r, alpha), a, r, jnp.where(a > 0, 1.0, alpha * jnp.exp(a)))
    exp_side = alpha * _exp_quotient(jnp.minimum(a, 0.0), jnp.minimum(r, 0.0))
    return jnp.where(negative, exp_side, plain)


def _softplus(x, beta=1.0, threshold=20.0):
    # torch: linear where beta·x > threshold.
    bx = beta * x
    return jnp.where(bx > threshold, x, jax.nn.softplus(bx) / beta)


def _softplus_factor(a, r, beta=1.0, threshold=20.0):
    """Both on the log side: ``β(sp(hi) − sp(lo)) = log1p(σ(β lo)·expm1(β(hi − lo)))``,
    cancellation-free for ``β|Δ| ≤ 1``; otherwise the plain quotient. Derivative σ(βx)
    (1 on the linear side), as torch."""
    linear_a, linear_r = beta * a > threshold, beta * r > threshold
    derivative = jnp.where(linear_a, 1.0, jax.nn.sigmoid(beta * a))
    plain = _difference_quotient(
        _softplus(a, beta, threshold), _softplus(r, beta, threshold), a, r, derivative
    )
    lo, hi = jnp.minimum(a, r), jnp.maximum(a, r)
    spread = beta * (hi - lo)
    near = ~linear_a & ~linear_r & (spread <= 1.0) & (spread > 0)
    spread_near = jnp.where(near, spread, 1.0)
    closed = jnp.log1p(jax.nn.sigmoid(beta * lo) * jnp.expm1(spread_near)) / spread_near
    return jnp.where(near, closed, plain)


def _product_identity(g_a, g_r, a, r, g_quotient):
    """Rescale factor of ``f(x) = x·g(x)``: ``(a g_a − r g_r)/Δ = mean(g) + mean(x)·Δg/Δ``
    (the Shapley product identity), given ``g_quotient = (g_a − g_r)/Δ``."""
    return average(g_a, g_r) + average(a, r) * g_quotient


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _silu_factor(a, r):
    return _product_identity(jax.nn.sigmoid(a), jax.nn.sigmoid(r), a, r, rescale("sigmoid", a, r))


_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + jnp.tanh(_GELU_K * (x + _GELU_C * x**3)))
    return x * _normal_cdf(x)


def _gelu_factor(a, r, approximate="none"):
    """``gelu = x·g(x)``: ``g = Φ`` (exact) or ``g = σ(2u)``, ``u = k(x + c x³)`` (tanh).
    For tanh, ``Δg/Δ = R_σ(2u_a, 2u_r) · 2k(1 + c(a² + a r + r²))`` (``Δu`` factored)."""
    if approximate == "tanh":
        z_a = 2.0 * _GELU_K * (a + _GELU_C * a**3)
        z_r = 2.0 * _GELU_K * (r + _GELU_C * r**3)
        dz_per_dx = 2.0 * _GELU_K * (1.0 + _GELU_C * (a * a + a * r + r * r))
        g_quotient = rescale("sigmoid", z_a, z_r) * dz_per_dx
        return _product_identity(jax.nn.sigmoid(z_a), jax.nn.sigmoid(z_r), a, r, g_quotient)
    if approximate != "none":
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _product_identity(_normal_cdf(a), _normal_cdf(r), a, r, _normal_cdf_quotient(a, r))


def _power_scalar_factor(a, r, exponent):
    return _power_quotient(a, r, exponent)


def _sigmoid_factor(a, r):
    return rescale("sigmoid", a, r)


def _tanh_factor(a, r):
    return rescale("tanh", a, r)


def _sqrt_factor(a, r):
    return 1.0 / (jnp.sqrt(a) + jnp.sqrt(r))


def _rsqrt_factor(a, r):
    return -1.0 / (jnp.sqrt(a) * jnp.sqrt(r) * (jnp.sqrt(a) + jnp.sqrt(r)))


def _reciprocal(x):
    return 1.0 / x


def _reciprocal_factor(a, r):
    return -1.0 / (a * r)


def _square_factor(a, r):
    return a + r


def _pow_scalar(x, exponent):
    return jnp.power(x, exponent)
