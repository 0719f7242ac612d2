"""Exact DeepLIFT / DeepSHAP multipliers of the tensor ops around recurrent layers, in
float64, for ONE (actual, reference) pair at a time: the oracle twin of the op rules.

Protocol (shared with the torch engine, which is written independently)::

    rule(m, actual, reference, **params) -> tuple[multiplier | None, ...]

* ``actual``, ``reference``: tuples of the op's operands for one pair (no pair axis),
  float64; an operand that does not depend on the explained input is the same array in
  both. Elementwise operands are already broadcast to the output's shape.
* ``m``: the multiplier of the output, shape of the output.
* The result holds one multiplier per operand, shaped like it (``None`` for an absent
  operand, e.g. ``linear`` without bias).

Every rule is linear in ``m`` and exact: ``Σ_k Σ m_k (actual_k − reference_k) ==
Σ m (f(actual) − f(reference))`` to rounding. At ``actual == reference`` the multiplier
is the derivative there (torch's convention at kinks, stated per op).

The rules (``Δ = a − r``, ``mean(u) = (u_a + u_r)/2``):

* Unary elementwise ``y = f(x)`` (Rescale): ``m_x = m · (f(x_a) − f(x_r)) / Δx``.
* Binary elementwise ``y = f(u, v)`` (two-player Shapley):
  ``φ_u = ½ [f(u_a, v_r) − f(u_r, v_r) + f(u_a, v_a) − f(u_r, v_a)]`` and
  ``m_u = m · φ_u / Δu``, i.e. the mean over ``v ∈ {v_r, v_a}`` of the partial quotient
  ``Q_u(u_a, u_r; v) = (f(u_a, v) − f(u_r, v)) / Δu``; symmetric for ``v``.
* Bilinear ``y = B(u, v)``: ``m_u`` is the vector–Jacobian product of ``u ↦ B(u, mean(v))``
  at ``m`` (and vice versa); exact because ``B(u_a, v_a) − B(u_r, v_r) =
  B(Δu, mean(v)) + B(mean(u), Δv)``.
* Composites (softmax, log_softmax, logsumexp, layer_norm, rms_norm, vector_norm, glu,
  scaled_dot_product_attention) are the stated compositions of the rules above, applied
  backwards by the chain rule (softmax as ``exp ∘ log_softmax``, see
  :func:`_softmax_backward`); amax routes its change through the two arg-maxima.

Accuracy for tiny ``Δ``: no quotient is formed from two rounded function values when they
cancel. Each Rescale factor has a cancellation-free closed form (``sqrt``:
``1/(√a + √r)``; ``exp``: ``e^r expm1(Δ)/Δ``; ``log``: ``log1p(Δ/r)/Δ``; ``x·g(x)``
functions through the product identity ``(a g_a − r g_r)/Δ = mean(g) + mean(x)·Δg/Δ``;
sigmoid / tanh through :func:`reference_jax.rescale.rescale`) or, for the Gaussian CDF of
gelu, a midpoint series for small ``Δ``.

:data:`OP_RULES` maps each op name to its rule, :data:`OP_FORWARDS` to its forward ``f``;
:func:`batched_op_multipliers` runs a rule on ``(2, N, ...)`` multipliers of both halves of
a doubled batch and ``(N, ...)`` operands (``vmap`` over pairs, then over halves, ``jit``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc

from reference_jax._checks import COMPILER_OPTIONS
from reference_jax.rescale import average, rescale

__all__ = [
    "OP_FORWARDS",
    "OP_RULES",
    "OP_SPECS",
    "OpSpec",
    "batched_op_multipliers",
    "binary_quotients",
    "unary_rescale_factor",
]

Array = jax.Array
Operands = tuple[Array | None, ...]

# --------------------------------------------------------------------------- small helpers


def _safe_delta(a: Array, r: Array) -> tuple[Array, Array]:
    """``(Δ with 1 where Δ == 0, Δ != 0)``: a denominator that never divides by zero."""
    d = a - r
    nonzero = d != 0
    return jnp.where(nonzero, d, 1.0), nonzero


def _difference_quotient(f_a: Array, f_r: Array, a: Array, r: Array, derivative: Array) -> Array:
    """``(f_a − f_r)/(a − r)``, and ``derivative`` where ``a == r``.

    Exact for piecewise linear ``f`` with slopes 0 and 1 (both values from one branch give
    ``Δ/Δ`` or ``0``); elsewhere used only where ``f_a − f_r`` does not cancel."""
    d, nonzero = _safe_delta(a, r)
    return jnp.where(nonzero, (f_a - f_r) / d, derivative)


def _exp_quotient(a: Array, r: Array) -> Array:
    """``(e^a − e^r)/(a − r)`` without cancellation: ``e^r · expm1(Δ)/Δ`` for ``|Δ| ≤ 1``
    (``e^a`` at ``Δ = 0``), the plain quotient beyond (no cancellation there, no overflow
    of ``expm1``); ``0`` where both are ``−inf`` (a masked score: ``e = 0`` either way)."""
    masked = (a == -jnp.inf) & (r == -jnp.inf)
    a = jnp.where(masked, 0.0, a)
    r = jnp.where(masked, 0.0, r)
    d, nonzero = _safe_delta(a, r)
    near = jnp.abs(d) <= 1.0
    d_near = jnp.where(near, d, 1.0)
    closed = jnp.exp(r) * (jnp.expm1(d_near) / d_near)
    plain = (jnp.exp(a) - jnp.exp(r)) / jnp.where(near, 1.0, d)
    value = jnp.where(nonzero, jnp.where(near, closed, plain), jnp.exp(a))
    return jnp.where(masked, 0.0, value)


def _log_quotient(a: Array, r: Array) -> Array:
    """``(log a − log r)/(a − r)`` for ``a, r > 0``: ``log1p(Δ/r)/Δ`` while ``|Δ/r| ≤ ½``
    (``1/a`` at ``Δ = 0``), the plain quotient beyond (``|log a − log r| ≥ 0.4`` there)."""
    d, nonzero = _safe_delta(a, r)
    u = d / r
    near = jnp.abs(u) <= 0.5
    closed = jnp.log1p(jnp.where(near, u, 0.0)) / d
    plain = (jnp.log(a) - jnp.log(r)) / d
    return jnp.where(nonzero, jnp.where(near, closed, plain), 1.0 / a)


def _power_quotient(a: Array, r: Array, p: Array) -> Array:
    """``(a^p − r^p)/(a − r)`` (``p·a^(p−1)`` at ``a == r``), ``p`` real (array or scalar).

    Same sign (both ``> 0``, or both ``< 0`` for integer ``p``): with ``u = Δ/r``,
    ``r^(p−1) · expm1(p·log1p(u))/u`` on magnitudes (sign ``(−1)^(p−1)`` for negatives),
    cancellation-free while ``|u| ≤ ½``; otherwise the plain quotient, whose numerator does
    not cancel (opposite signs: ``|Δ| ≥ max(|a|, |r|)``; ``|u| > ½``: the powers differ by
    a factor). Non-integer ``p`` at negative ``x`` is NaN, as in torch."""
    p = jnp.asarray(p, jnp.result_type(a))
    d, nonzero = _safe_delta(a, r)
    same_sign = a * r > 0
    mag_a, mag_r = jnp.abs(a), jnp.abs(r)
    u = jnp.where(same_sign, (mag_a - mag_r) / jnp.where(same_sign, mag_r, 1.0), 1.0)
    near = same_sign & (jnp.abs(u) <= 0.5) & (u != 0)
    u_near = jnp.where(near, u, 1.0)
    magnitude = jnp.power(jnp.where(near, mag_r, 1.0), p - 1.0) * (
        jnp.expm1(p * jnp.log1p(u_near)) / u_near
    )
    # (−1)^(p−1): d/dx of x^p for x < 0 and integer p; NaN (as torch) for other p.
    odd = jnp.mod(p - 1.0, 2.0) == 1.0
    sign = jnp.where(a > 0, 1.0, jnp.where(jnp.floor(p) == p, jnp.where(odd, -1.0, 1.0), jnp.nan))
    closed = sign * magnitude
    plain = (jnp.power(a, p) - jnp.power(r, p)) / d
    derivative = p * jnp.power(a, p - 1.0)
    return jnp.where(nonzero, jnp.where(near, closed, plain), derivative)


def _exp_base_quotient(a: Array, r: Array, base: Array) -> Array:
    """``(base^a − base^r)/(a − r)`` for ``base > 0`` (``base^a · log base`` at ``a == r``):
    ``base^r · expm1(Δ·L)/Δ`` with ``L = log base`` while ``|Δ·L| ≤ 1``, plain beyond."""
    log_base = jnp.log(base)
    d, nonzero = _safe_delta(a, r)
    near = jnp.abs(d * log_base) <= 1.0
    closed = jnp.power(base, r) * jnp.expm1(d * log_base) / d
    plain = (jnp.power(base, a) - jnp.power(base, r)) / d
    return jnp.where(nonzero, jnp.where(near, closed, plain), jnp.power(base, a) * log_base)


# --------------------------------------------------------------------------- Gaussian CDF

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(x: Array) -> Array:
    """``Φ(x) = erfc(−x/√2)/2``: accurate (relative) in the lower tail."""
    return 0.5 * erfc(-x * _SQRT_HALF)


def _normal_sf(x: Array) -> Array:
    """``1 − Φ(x) = erfc(x/√2)/2``: accurate (relative) in the upper tail."""
    return 0.5 * erfc(x * _SQRT_HALF)


def _normal_pdf(x: Array) -> Array:
    return _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)


def _normal_cdf_quotient(a: Array, r: Array) -> Array:
    """``(Φ(a) − Φ(r))/(a − r)``.

    Where ``|Δ|·(1 + |m|) ≤ 0.02`` (``m`` the midpoint): the midpoint series
    ``φ(m)[1 + (m² − 1)Δ²/24 + (m⁴ − 6m² + 3)Δ⁴/1920]`` (the even derivatives of ``φ``
    over ``φ`` are Hermite polynomials; the next term, ``~(1 + |m|)⁶Δ⁶/3e5``, is below
    float64 rounding). Beyond: the difference of tail functions, ``sf(r) − sf(a)`` when
    both are ``≥ 0`` and ``cdf(a) − cdf(r)`` otherwise, each keeping its relative accuracy
    in its tail; the cancellation left costs at most ``~eps/0.02`` relative."""
    d = a - r
    mid = 0.5 * (a + r)
    small = jnp.abs(d) * (1.0 + jnp.abs(mid)) <= 0.02
    m2, d2 = mid * mid, d * d
    series = 1.0 + (m2 - 1.0) * d2 / 24.0 + (m2 * m2 - 6.0 * m2 + 3.0) * d2 * d2 / 1920.0
    near = _normal_pdf(mid) * series
    upper = (a >= 0) & (r >= 0)
    diff = jnp.where(upper, _normal_sf(r) - _normal_sf(a), _normal_cdf(a) - _normal_cdf(r))
    far = diff / jnp.where(small, 1.0, d)
    return jnp.where(small, near, far)


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


class _Unary(NamedTuple):
    forward: Callable[..., Array]
    factor: Callable[..., Array]


UNARY: dict[str, _Unary] = {
    "relu": _Unary(_relu, _relu_factor),
    "leaky_relu": _Unary(_leaky_relu, _leaky_relu_factor),
    "relu6": _Unary(_relu6, _relu6_factor),
    "elu": _Unary(_elu, _elu_factor),
    "gelu": _Unary(_gelu, _gelu_factor),
    "silu": _Unary(_silu, _silu_factor),
    "softplus": _Unary(_softplus, _softplus_factor),
    "sigmoid": _Unary(jax.nn.sigmoid, lambda a, r: rescale("sigmoid", a, r)),
    "tanh": _Unary(jnp.tanh, lambda a, r: rescale("tanh", a, r)),
    "exp": _Unary(jnp.exp, _exp_quotient),
    "log": _Unary(jnp.log, _log_quotient),
    "sqrt": _Unary(jnp.sqrt, lambda a, r: 1.0 / (jnp.sqrt(a) + jnp.sqrt(r))),
    "rsqrt": _Unary(
        jax.lax.rsqrt,
        lambda a, r: -1.0 / (jnp.sqrt(a) * jnp.sqrt(r) * (jnp.sqrt(a) + jnp.sqrt(r))),
    ),
    "reciprocal": _Unary(lambda x: 1.0 / x, lambda a, r: -1.0 / (a * r)),
    "square": _Unary(jnp.square, lambda a, r: a + r),
    "clamp": _Unary(_clamp, _clamp_factor),
    "pow_scalar": _Unary(lambda x, exponent: jnp.power(x, exponent), _power_scalar_factor),
}


def unary_rescale_factor(name: str, a: Array, r: Array, **params) -> Array:
    """The Rescale factor ``R = (f(a) − f(r))/(a − r)`` of unary op ``name`` (the
    derivative where ``a == r``), elementwise; ``a``, ``r`` of one shape, float64."""
    try:
        unary = UNARY[name]
    except KeyError:
        raise ValueError(f"unary op must be one of {sorted(UNARY)}, got {name!r}") from None
    return unary.factor(a, r, **params)


# --------------------------------------------------------------------------- binary ops
#
# Each entry: forward f(u, v) and the partial quotients
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


class _Binary(NamedTuple):
    forward: Callable[[Array, Array], Array]
    q_u: Callable[[Array, Array, Array], Array]  # (u_a, u_r, v)
    q_v: Callable[[Array, Array, Array], Array]  # (v_a, v_r, u)


BINARY: dict[str, _Binary] = {
    "mul": _Binary(jnp.multiply, lambda a, r, v: v, lambda a, r, u: u),
    "div": _Binary(jnp.divide, lambda a, r, v: 1.0 / v, lambda a, r, u: -u / (a * r)),
    "maximum": _Binary(jnp.maximum, _maximum_q, _maximum_q),
    "minimum": _Binary(jnp.minimum, _minimum_q, _minimum_q),
    "pow": _Binary(
        jnp.power,
        lambda a, r, v: _power_quotient(a, r, v),
        lambda a, r, u: _exp_base_quotient(a, r, u),
    ),
    "atan2": _Binary(jnp.arctan2, _atan2_q_u, _atan2_q_v),
}


def binary_quotients(name: str, u_a, u_r, v_a, v_r) -> tuple[Array, Array]:
    """Shapley factors ``(m_u/m, m_v/m)`` of binary op ``name`` (elementwise, one shape):
    ``½ [Q_u(u_a, u_r; v_r) + Q_u(u_a, u_r; v_a)]`` and the same for ``v``."""
    try:
        op = BINARY[name]
    except KeyError:
        raise ValueError(f"binary op must be one of {sorted(BINARY)}, got {name!r}") from None
    return (
        average(op.q_u(u_a, u_r, v_r), op.q_u(u_a, u_r, v_a)),
        average(op.q_v(v_a, v_r, u_r), op.q_v(v_a, v_r, u_a)),
    )


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


# --------------------------------------------------------------------------- composites


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


def _norm_axes(normalized_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    k = len(tuple(normalized_shape))
    if k == 0 or k > ndim:
        raise AssertionError(
            f"normalized_shape {tuple(normalized_shape)} must name 1 to {ndim} trailing dims"
        )
    return tuple(range(-k, 0))


def _check_trailing(name: str, value: Array, normalized_shape, x: Array):
    if value is not None:
        chex.assert_shape(
            value, tuple(normalized_shape),
            custom_message=f"{name} must have the normalized_shape {tuple(normalized_shape)}, "
            f"got {tuple(jnp.shape(value))}",
        )
        if tuple(x.shape[-len(tuple(normalized_shape)):]) != tuple(normalized_shape):
            raise AssertionError(
                f"the input's trailing dims {tuple(x.shape)} must equal normalized_shape "
                f"{tuple(normalized_shape)}"
            )


def _affine(y0, weight, bias):
    y = y0 if weight is None else y0 * weight
    return y if bias is None else y + bias


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = _norm_axes(normalized_shape, x.ndim)
    xc = x - jnp.mean(x, axis=axes, keepdims=True)
    v = jnp.mean(xc * xc, axis=axes, keepdims=True)
    return _affine(xc * jax.lax.rsqrt(v + eps), weight, bias)


def _scaled_product_backward(m_y0, xc_a, xc_r, v_a, v_r, eps, axes):
    """``y0 = xc · s``, ``s = rsqrt(v + eps)``, ``v = mean(xc²)``, backwards to ``xc``:
    product Shapley (``s`` broadcast: its multiplier summed over ``axes``), rsqrt and
    square Rescale (``R_sq = xc_a + xc_r``), mean (``1/n``)."""
    n = math.prod(xc_a.shape[i] for i in axes)
    s_a, s_r = jax.lax.rsqrt(v_a + eps), jax.lax.rsqrt(v_r + eps)
    m_xc = m_y0 * average(s_a, s_r)
    m_s = jnp.sum(m_y0 * average(xc_a, xc_r), axis=axes, keepdims=True)
    q_a, q_r = jnp.sqrt(v_a + eps), jnp.sqrt(v_r + eps)
    m_v = m_s * (-1.0 / (q_a * q_r * (q_a + q_r)))
    return m_xc + (m_v / n) * (xc_a + xc_r)


def _layer_norm_rule(m, actual, reference, normalized_shape, weight=None, bias=None, eps=1e-5):
    """mean and centring (linear), then :func:`_scaled_product_backward`, affine constants
    ``m_y0 = m·weight``; the centring's VJP is ``m_xc − mean(m_xc)``."""
    (x_a,), (x_r,) = actual, reference
    axes = _norm_axes(normalized_shape, x_a.ndim)
    _check_trailing("weight", weight, normalized_shape, x_a)
    _check_trailing("bias", bias, normalized_shape, x_a)
    xc_a = x_a - jnp.mean(x_a, axis=axes, keepdims=True)
    xc_r = x_r - jnp.mean(x_r, axis=axes, keepdims=True)
    v_a = jnp.mean(xc_a * xc_a, axis=axes, keepdims=True)
    v_r = jnp.mean(xc_r * xc_r, axis=axes, keepdims=True)
    m_y0 = m if weight is None else m * weight
    m_xc = _scaled_product_backward(m_y0, xc_a, xc_r, v_a, v_r, eps, axes)
    return (m_xc - jnp.mean(m_xc, axis=axes, keepdims=True),)


def _rms_eps(eps):
    # torch's default (eps=None): machine eps of the input dtype; the oracle is float64,
    # so a float32 twin must pass eps=torch.finfo(torch.float32).eps explicitly.
    return float(jnp.finfo(jnp.float64).eps) if eps is None else eps


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    axes = _norm_axes(normalized_shape, x.ndim)
    v = jnp.mean(x * x, axis=axes, keepdims=True)
    return _affine(x * jax.lax.rsqrt(v + _rms_eps(eps)), weight, None)


def _rms_norm_rule(m, actual, reference, normalized_shape, weight=None, eps=None):
    (x_a,), (x_r,) = actual, reference
    axes = _norm_axes(normalized_shape, x_a.ndim)
    _check_trailing("weight", weight, normalized_shape, x_a)
    v_a = jnp.mean(x_a * x_a, axis=axes, keepdims=True)
    v_r = jnp.mean(x_r * x_r, axis=axes, keepdims=True)
    m_y0 = m if weight is None else m * weight
    return (_scaled_product_backward(m_y0, x_a, x_r, v_a, v_r, _rms_eps(eps), axes),)


def _dims(dim) -> tuple[int, ...] | None:
    if dim is None:
        return None
    return tuple(dim) if isinstance(dim, Sequence) else (dim,)


def _vector_norm(x, dim=None, keepdim=False):
    return jnp.sqrt(jnp.sum(x * x, axis=_dims(dim), keepdims=keepdim))


def _vector_norm_rule(m, actual, reference, dim=None, keepdim=False):
    """``sqrt(Σ_dim x²)``: ``m_x = m · R_sqrt(Q_a, Q_r) · (x_a + x_r)`` with
    ``R_sqrt = 1/(√Q_a + √Q_r)``."""
    (x_a,), (x_r,) = actual, reference
    axes = _dims(dim)
    axes_all = tuple(range(x_a.ndim)) if axes is None else axes
    n_a = jnp.sqrt(jnp.sum(x_a * x_a, axis=axes_all, keepdims=True))
    n_r = jnp.sqrt(jnp.sum(x_r * x_r, axis=axes_all, keepdims=True))
    m = m if keepdim else jnp.expand_dims(m, axes_all)
    return (m / (n_a + n_r) * (x_a + x_r),)


def _glu(x, dim=-1):
    a, b = jnp.split(x, 2, axis=dim)
    return a * jax.nn.sigmoid(b)


def _glu_rule(m, actual, reference, dim=-1):
    """``y = a·σ(b)``: ``m_a = m·mean(σ(b))``, ``m_b = m·mean(a)·R_σ(b)``."""
    (x_a,), (x_r,) = actual, reference
    if x_a.shape[dim] % 2:
        raise AssertionError(f"glu needs an even size along dim {dim}, got shape {tuple(x_a.shape)}")
    a_a, b_a = jnp.split(x_a, 2, axis=dim)
    a_r, b_r = jnp.split(x_r, 2, axis=dim)
    m_a = m * average(jax.nn.sigmoid(b_a), jax.nn.sigmoid(b_r))
    m_b = m * average(a_a, a_r) * rescale("sigmoid", b_a, b_r)
    return (jnp.concatenate([m_a, m_b], axis=dim),)


def _amax(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim)


def _amax_rule(m, actual, reference, dim, keepdim=False):
    """Two routes: the arg-max ``j*`` of the actual and ``k*`` of the reference (first
    index on ties). ``j* == k*``: ``m_{j*} = m``. Otherwise each route carries half of
    ``Δy``: ``m_{j*} = m (Δy/2)/Δx_{j*}``, ``m_{k*} = m (Δy/2)/Δx_{k*}``; a route with
    ``Δx = 0`` hands its half to the other. All other entries get 0."""
    (x_a,), (x_r,) = actual, reference
    if not isinstance(dim, int):
        raise AssertionError(f"amax supports one int dim, got {dim!r}")
    j = jnp.argmax(x_a, axis=dim, keepdims=True)
    k = jnp.argmax(x_r, axis=dim, keepdims=True)
    m = m if keepdim else jnp.expand_dims(m, dim)
    dy = jnp.max(x_a, axis=dim, keepdims=True) - jnp.max(x_r, axis=dim, keepdims=True)
    dx_j = jnp.take_along_axis(x_a - x_r, j, axis=dim)
    dx_k = jnp.take_along_axis(x_a - x_r, k, axis=dim)
    share_j = jnp.where(dx_k == 0, 1.0, 0.5)
    share_k = jnp.where(dx_j == 0, 1.0, 0.5)
    coef_j = jnp.where(dx_j == 0, 0.0, share_j * dy / jnp.where(dx_j == 0, 1.0, dx_j))
    coef_k = jnp.where(dx_k == 0, 0.0, share_k * dy / jnp.where(dx_k == 0, 1.0, dx_k))
    coef_j = jnp.where(j == k, 1.0, coef_j)
    coef_k = jnp.where(j == k, 0.0, coef_k)
    positions = jax.lax.broadcasted_iota(jnp.int32, x_a.shape, x_a.ndim + dim if dim < 0 else dim)
    return (m * (jnp.where(positions == j, coef_j, 0.0) + jnp.where(positions == k, coef_k, 0.0)),)


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


# --------------------------------------------------------------------------- the table


class OpSpec(NamedTuple):
    """One op of the table.

    Attributes:
      operands: names of the tensor operands, in order (``linear``'s bias may be absent).
      forward: ``f(*operands, **params)`` for one pair (what the rule is exact for).
      rule: ``rule(m, actual, reference, **params)`` (unchecked; see :data:`OP_RULES`).
    """

    operands: tuple[str, ...]
    forward: Callable[..., Array]
    rule: Callable[..., Operands]


def _unary_spec(name: str, unary: _Unary) -> OpSpec:
    def rule(m, actual, reference, **params):
        (x_a,), (x_r,) = actual, reference
        return (m * unary.factor(x_a, x_r, **params),)

    rule.__doc__ = f"Rescale rule of {name}: ``m_x = m · (f(x_a) − f(x_r))/Δx``."
    return OpSpec(("x",), unary.forward, rule)


def _binary_spec(name: str, binary: _Binary) -> OpSpec:
    def rule(m, actual, reference):
        (u_a, v_a), (u_r, v_r) = actual, reference
        factor_u, factor_v = binary_quotients(name, u_a, u_r, v_a, v_r)
        return m * factor_u, m * factor_v

    rule.__doc__ = f"Two-player Shapley rule of {name}(u, v)."
    return OpSpec(("u", "v"), binary.forward, rule)


OP_SPECS: dict[str, OpSpec] = {
    **{name: _unary_spec(name, unary) for name, unary in UNARY.items()},
    **{name: _binary_spec(name, binary) for name, binary in BINARY.items()},
    "matmul": OpSpec(("u", "v"), _matmul, _matmul_rule),
    "bmm": OpSpec(("u", "v"), _matmul, _bmm_rule),
    "mm": OpSpec(("u", "v"), _matmul, _mm_rule),
    "einsum": OpSpec(("u", "v"), lambda u, v, equation: _einsum(u, v, equation), _einsum_rule),
    "baddbmm": OpSpec(("c", "u", "v"), _baddbmm, _baddbmm_rule),
    "linear": OpSpec(("x", "w", "b"), _linear, _linear_rule),
    "softmax": OpSpec(("x",), _softmax, _softmax_rule),
    "log_softmax": OpSpec(("x",), _log_softmax, _log_softmax_rule),
    "logsumexp": OpSpec(("x",), _logsumexp, _logsumexp_rule),
    "layer_norm": OpSpec(("x",), _layer_norm, _layer_norm_rule),
    "rms_norm": OpSpec(("x",), _rms_norm, _rms_norm_rule),
    "vector_norm": OpSpec(("x",), _vector_norm, _vector_norm_rule),
    "glu": OpSpec(("x",), _glu, _glu_rule),
    "amax": OpSpec(("x",), _amax, _amax_rule),
    "scaled_dot_product_attention": OpSpec(("q", "k", "v"), _sdpa, _sdpa_rule),
}

#: name -> ``f(*operands, **params)`` for one pair.
OP_FORWARDS: dict[str, Callable[..., Array]] = {name: spec.forward for name, spec in OP_SPECS.items()}


# --------------------------------------------------------------------------- checks


def _operand_count_ok(name: str, n: int) -> bool:
    expected = len(OP_SPECS[name].operands)
    return n == expected or (name == "linear" and n == 2)


def _check_operands(name: str, actual, reference) -> tuple[Operands, Operands]:
    spec = OP_SPECS[name]
    for label, operands in (("actual", actual), ("reference", reference)):
        if not isinstance(operands, tuple | list) or not _operand_count_ok(name, len(operands)):
            raise AssertionError(
                f"{name}: {label} must be a tuple of its operands {spec.operands}, got "
                f"{type(operands).__name__} of length {len(operands) if isinstance(operands, tuple | list) else '-'}"
            )
    if len(actual) != len(reference):
        raise AssertionError(f"{name}: actual has {len(actual)} operands, reference {len(reference)}")
    out_a, out_r = [], []
    for operand, a, r in zip(spec.operands, actual, reference, strict=False):
        if a is None or r is None:
            if not (a is None and r is None and name == "linear" and operand == "b"):
                raise AssertionError(f"{name}: operand {operand} is None (only linear's b may be)")
            out_a.append(None)
            out_r.append(None)
            continue
        a, r = jnp.asarray(a), jnp.asarray(r)
        for label, value in (("actual", a), ("reference", r)):
            chex.assert_type(
                value, jnp.float64,
                custom_message=f"{name}: {label} {operand} must be float64 (the oracle's "
                f"precision; cast with .astype(numpy.float64)), got {value.dtype}",
            )
        chex.assert_equal_shape(
            [a, r],
            custom_message=f"{name}: reference {operand} must have the shape of actual "
            f"{tuple(a.shape)}, got {tuple(r.shape)}",
        )
        out_a.append(a)
        out_r.append(r)
    return tuple(out_a), tuple(out_r)


def _checked_rule(name: str) -> Callable[..., Operands]:
    spec = OP_SPECS[name]

    def rule(m, actual, reference, **params):
        actual, reference = _check_operands(name, actual, reference)
        m = jnp.asarray(m)
        chex.assert_type(m, jnp.float64, custom_message=f"{name}: m must be float64, got {m.dtype}")
        out = jax.eval_shape(functools.partial(spec.forward, **params), *actual)
        chex.assert_shape(
            m, out.shape,
            custom_message=f"{name}: m must have the output's shape {tuple(out.shape)}, "
            f"got {tuple(m.shape)}",
        )
        return tuple(spec.rule(m, actual, reference, **params))

    rule.__name__ = name
    rule.__qualname__ = f"OP_RULES[{name!r}]"
    rule.__doc__ = (
        f"Multipliers of the operands {spec.operands} of {name} for one pair "
        f"(see the module docstring).\n\n{spec.rule.__doc__ or ''}"
    )
    return rule


#: name -> checked ``rule(m, actual, reference, **params) -> tuple`` for one pair, float64.
OP_RULES: dict[str, Callable[..., Operands]] = {name: _checked_rule(name) for name in OP_SPECS}


# --------------------------------------------------------------------------- batched


def _is_array_param(value) -> bool:
    return isinstance(value, jax.Array | np.ndarray)


def _freeze(value):
    """Hashable static parameter (lists -> tuples), for the jit cache."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@functools.cache
def _batched_rule(name: str, static: tuple):
    rule = OP_RULES[name]
    static_params = dict(static)

    def one_half(m_half, actual, reference, arrays):
        def one_pair(m_pair, a, r):
            return rule(m_pair, a, r, **static_params, **arrays)

        return jax.vmap(one_pair)(m_half, actual, reference)

    return jax.jit(jax.vmap(one_half, in_axes=(0, None, None, None)), compiler_options=COMPILER_OPTIONS)


def batched_op_multipliers(name: str, m, actual, reference, **params) -> Operands:
    """Run ``OP_RULES[name]`` on a doubled batch: ``vmap`` over the ``N`` pairs, then over
    the two halves of ``m`` (one ``jit`` compilation per op, shapes and static params).

    Args:
      name: a key of :data:`OP_RULES`.
      m: ``(2, N, *s_out)`` float64 multipliers of the output, for both halves.
      actual, reference: tuples of ``(N, *s_k)`` float64 operands (``None`` for
        ``linear``'s absent bias).
      **params: the op's parameters; array-valued ones (``weight``, ``bias``,
        ``attn_mask``) are shared by all pairs, the others are static.

    Returns:
      One ``(2, N, *s_k)`` float64 multiplier per operand (``None`` for an absent one).
    """
    if name not in OP_RULES:
        raise ValueError(f"op must be one of {sorted(OP_RULES)}, got {name!r}")
    m = jnp.asarray(m)
    if m.ndim < 2 or m.shape[0] != 2:
        raise AssertionError(f"{name}: m must have shape (2, N, ...) (both halves), got {tuple(m.shape)}")
    for label, operands in (("actual", actual), ("reference", reference)):
        for i, value in enumerate(operands):
            if value is not None and (jnp.ndim(value) < 1 or jnp.shape(value)[0] != m.shape[1]):
                raise AssertionError(
                    f"{name}: {label}[{i}] must have the pair axis N={m.shape[1]} of m first, "
                    f"got shape {tuple(jnp.shape(value))}"
                )
    arrays = {k: jnp.asarray(v) for k, v in params.items() if _is_array_param(v)}
    static = tuple(sorted((k, _freeze(v)) for k, v in params.items() if not _is_array_param(v)))
    actual = tuple(None if a is None else jnp.asarray(a) for a in actual)
    reference = tuple(None if r is None else jnp.asarray(r) for r in reference)
    return _batched_rule(name, static)(m, actual, reference, arrays)
