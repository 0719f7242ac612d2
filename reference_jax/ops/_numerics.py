"""Cancellation-free difference quotients ``(f(a) − f(r))/(a − r)`` shared by the op rules
(elementwise, float64; the derivative where ``a == r``), and the Gaussian CDF pieces of gelu."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

Array = jax.Array


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
