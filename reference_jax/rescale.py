"""The two elementary DeepLIFT rules: Rescale for ``y = φ(z)`` and the Shapley product.

Every quantity has an actual value ``a`` and a reference value ``r``; ``Δ = a − r``.
Multipliers ``m`` play the role of gradients (contribution = ``m · Δinput``) and a rule
is exact when ``Σ m_in Δin = Σ m_out Δout``.

* Rescale, ``y = φ(z)`` elementwise: ``m_z = m_y · (φ(z_a) − φ(z_r)) / (z_a − z_r)``;
  where ``|Δz|`` is at most :func:`rescale_threshold`, the quotient is evaluated by its
  expansion about the midpoint ``m = (z_a + z_r)/2``: ``φ'(m) + φ'''(m) Δz² / 24``.
* Product of two varying operands, ``y = u ⊙ v`` (the Shapley value of the two-player
  game): ``m_u = m_y · (v_a + v_r) / 2`` and ``m_v = m_y · (u_a + u_r) / 2``; then
  ``m_u Δu + m_v Δv = u_a v_a − u_r v_r`` exactly.

All functions are elementwise, pure, and work for any shape (scalars included) and any
floating dtype; nothing here divides by an input Δ except the Rescale quotient itself,
which is evaluated on a "safe" Δz so that no NaN or inf is ever produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Nonlinearity = Literal["sigmoid", "tanh", "relu"]

__all__ = [
    "NONLINEARITIES",
    "Activation",
    "Nonlinearity",
    "activation",
    "average",
    "product_multipliers",
    "rescale",
    "rescale_threshold",
    "sigmoid_quotient",
    "tanh_quotient",
]


class Activation(NamedTuple):
    """An elementwise nonlinearity with the derivatives the Rescale rule needs."""

    fn: Callable[[jax.Array], jax.Array]  # φ
    d1: Callable[[jax.Array], jax.Array]  # φ'
    d3: Callable[[jax.Array], jax.Array]  # φ'''
    smooth: bool  # False: piecewise linear, so Δφ has no cancellation


def _sigmoid_d1(z: jax.Array) -> jax.Array:
    # σ(z) σ(−z), not σ(1 − σ): no cancellation in 1 − σ for large z.
    return jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)


def _sigmoid_d3(z: jax.Array) -> jax.Array:
    d1 = _sigmoid_d1(z)  # φ''' = φ' (1 − 6 φ')
    return d1 * (1.0 - 6.0 * d1)


def _tanh_d1(z: jax.Array) -> jax.Array:
    # sech²(z), not 1 − tanh²(z): no cancellation for large |z| (cosh → inf gives 0).
    return jnp.square(1.0 / jnp.cosh(z))


def _tanh_d3(z: jax.Array) -> jax.Array:
    t2 = jnp.square(jnp.tanh(z))  # φ''' = −2 φ' (1 − 3 t²)
    return -2.0 * _tanh_d1(z) * (1.0 - 3.0 * t2)


def _relu_d1(z: jax.Array) -> jax.Array:
    # The midpoint derivative of relu: 1 where the midpoint is > 0, else 0.
    return (z > 0).astype(z.dtype)


def _zeros(z: jax.Array) -> jax.Array:
    return jnp.zeros_like(z)


#: name -> :class:`Activation`; the keys are what every ``nonlinearity`` argument accepts.
NONLINEARITIES: dict[str, Activation] = {
    "sigmoid": Activation(jax.nn.sigmoid, _sigmoid_d1, _sigmoid_d3, True),
    "tanh": Activation(jnp.tanh, _tanh_d1, _tanh_d3, True),
    "relu": Activation(jax.nn.relu, _relu_d1, _zeros, False),
}


def _lookup(nonlinearity: str) -> Activation:
    try:
        return NONLINEARITIES[nonlinearity]
    except (KeyError, TypeError):
        raise ValueError(
            f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {nonlinearity!r}"
        ) from None


def activation(nonlinearity: Nonlinearity, z: jax.Array) -> jax.Array:
    """``φ(z)`` for ``φ`` named by ``nonlinearity`` (any shape, floating dtype kept)."""
    return _lookup(nonlinearity).fn(z)


def rescale_threshold(nonlinearity: Nonlinearity, dtype) -> float:
    """The ``|Δz|`` at or below which :func:`rescale` uses the midpoint expansion.

    For the smooth nonlinearities (``sigmoid``, ``tanh``) this is
    ``τ = (24 · eps) ** (1/3)`` with ``eps = finfo(dtype).eps`` (≈ 1.7e-5 in float64,
    ≈ 1.5e-2 in float32). It balances the two errors of the multiplier:

    * the difference quotient ``(φ(z_a) − φ(z_r)) / Δz`` loses about ``eps / |Δz|``
      (relative) to cancellation in its numerator, which grows as ``Δz → 0``;
    * the midpoint derivative ``φ'(m)`` differs from the quotient by
      ``φ'''(m) Δz² / 24``, which grows with ``Δz``.

    Equating ``eps / τ = τ² / 24`` gives ``τ³ = 24 eps``. :func:`rescale` moreover adds
    that ``φ'''(m) Δz² / 24`` term to the midpoint derivative, which leaves
    ``φ⁽⁵⁾(m) Δz⁴ / 1920`` (below 1e-22 relative in float64 under ``τ``): the midpoint
    branch is then as accurate as the quotient, and contributions still sum to Δ to
    float64 rounding. (With ``φ'(m)`` alone the sum would be off by up to ~2e-11
    relative just under ``τ``, e.g. for ``tanh`` near 0 where ``φ'''/φ' = −2``.)

    ``relu`` is piecewise linear: its numerator ``relu(z_a) − relu(z_r)`` is computed
    without cancellation (it is ``Δz`` itself, ``0``, ``z_a`` or ``−z_r``), so the quotient
    is accurate to a few ulps for every non-zero ``Δz``, and the midpoint rule
    (derivative 1 if the midpoint is > 0, else 0) is needed only at ``Δz == 0``: its
    threshold is ``0.0``. (A threshold ``τ`` would make relu inexact, by up to ``τ/2``
    per contribution, whenever ``z_a`` and ``z_r`` straddle 0 within ``τ``.)

    Args:
      nonlinearity: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
      dtype: a floating dtype.

    Returns:
      A Python float.
    """
    if not _lookup(nonlinearity).smooth:
        return 0.0
    eps = float(jnp.finfo(dtype).eps)
    return (24.0 * eps) ** (1.0 / 3.0)


def rescale(
    nonlinearity: Nonlinearity,
    z_a: jax.Array,
    z_r: jax.Array,
    y_a: jax.Array | None = None,
    y_r: jax.Array | None = None,
) -> jax.Array:
    """The Rescale factor ``R`` of ``y = φ(z)``, so that ``m_z = m_y · R`` elementwise.

    ``R = (φ(z_a) − φ(z_r)) / (z_a − z_r)`` where ``|z_a − z_r| > τ``; elsewhere the
    same quotient expanded about the midpoint ``m = (z_a + z_r)/2``:
    ``R = φ'(m) + φ'''(m) Δz² / 24`` (``τ`` and the error analysis in
    :func:`rescale_threshold`). One value serves both halves of a doubled batch. The
    quotient is evaluated on a safe denominator (``1`` where the midpoint branch is
    taken), so the result is finite for all finite inputs.

    Args:
      nonlinearity: ``"sigmoid"``, ``"tanh"`` or ``"relu"`` (static).
      z_a: actual pre-activation, any shape, floating dtype.
      z_r: reference pre-activation, same shape and dtype as ``z_a``.
      y_a, y_r: optionally the already computed ``φ(z_a)``, ``φ(z_r)`` (the forward
        values), the numerator of relu's quotient; sigmoid and tanh use a
        cancellation-free closed form instead (``_smooth_quotient``).

    Returns:
      ``R``, same shape and dtype as ``z_a``.
    """
    act = _lookup(nonlinearity)
    tau = rescale_threshold(nonlinearity, jnp.result_type(z_a))
    dz = z_a - z_r
    small = jnp.abs(dz) <= tau
    safe_dz = jnp.where(small, jnp.ones_like(dz), dz)
    mid = 0.5 * (z_a + z_r)
    near = act.d1(mid)
    y_a = act.fn(z_a) if y_a is None else y_a
    y_r = act.fn(z_r) if y_r is None else y_r
    far = (y_a - y_r) / safe_dz
    if act.smooth:
        near = near + act.d3(mid) * (dz * dz / 24.0)
        # φ(z_a) − φ(z_r) cancels wherever Δz is small against φ's scale: in saturation
        # (both round to ±1 or 0) and also across 0 just above τ (a relative error
        # ~eps/|Δz|, 1e-11 at τ). The cancellation-free closed form holds for any signs;
        # only across 0 with |Δz| > 1 is the plain difference (no cancellation there) the
        # more accurate of the two.
        closed = (z_a * z_r > 0) | (jnp.abs(dz) <= 1.0)
        far = jnp.where(closed, _smooth_quotient(nonlinearity, z_a, z_r, safe_dz), far)
    return jnp.where(small, near, far)


def _log_cosh(z: jax.Array) -> jax.Array:
    """log cosh z without overflow: |z| + log1p(e^{−2|z|}) − log 2."""
    a = jnp.abs(z)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - jnp.log(2.0)


def _log_sinhc(d: jax.Array) -> jax.Array:
    """log(sinh(d) / d) for d >= 0 (the value 0 at d = 0), without overflow."""
    d = jnp.abs(d)
    small = d < 1.0
    d_small = jnp.where(small, jnp.where(d == 0, 1.0, d), 1.0)
    d_large = jnp.where(small, 1.0, d)
    near = jnp.where(d == 0, 0.0, jnp.log(jnp.sinh(d_small) / d_small))
    far = d_large + jnp.log1p(-jnp.exp(-2.0 * d_large)) - jnp.log(2.0 * d_large)
    return jnp.where(small, near, far)


def _smooth_quotient(nonlinearity: str, z_a: jax.Array, z_r: jax.Array, dz: jax.Array) -> jax.Array:
    """``(φ(z_a) − φ(z_r)) / Δz`` for tanh and sigmoid, from closed forms in log space.

    ``tanh a − tanh b = sinh(a − b) / (cosh a · cosh b)``, so the quotient is
    ``exp(log sinhc(Δz) − log cosh a − log cosh b)``; and ``σ(z) = (1 + tanh(z/2)) / 2``
    gives the sigmoid quotient as a quarter of the tanh quotient at ``(a/2, b/2)``. Every
    term is accurate to a few ulps for any finite inputs (no overflow: logs of cosh/sinh).
    ``dz`` is the (safe) ``z_a − z_r``.
    """
    if nonlinearity == "sigmoid":
        return 0.25 * _smooth_quotient("tanh", 0.5 * z_a, 0.5 * z_r, 0.5 * dz)
    # Direct form (a few ulps) while cosh and sinh cannot overflow; the log form otherwise
    # (its exponent carries an absolute rounding error ~eps·|z|, acceptable only out there).
    finite = jnp.maximum(jnp.abs(z_a), jnp.abs(z_r)) < _DIRECT_LIMIT
    za_d = jnp.where(finite, z_a, 0.0)
    zr_d = jnp.where(finite, z_r, 0.0)
    dz_d = jnp.where(finite, dz, 1.0)
    direct = jnp.sinh(dz_d) / dz_d / (jnp.cosh(za_d) * jnp.cosh(zr_d))
    logged = jnp.exp(_log_sinhc(dz) - _log_cosh(z_a) - _log_cosh(z_r))
    return jnp.where(finite, direct, logged)


# |z| below which cosh(z)² and sinh(2z) stay finite in float32 (and a fortiori float64).
_DIRECT_LIMIT = 40.0


# (1 − e^−d)/d = Σ_k (−d)^k/(k+1)!, coefficients from d^12 down to d^0: below d = 1/4 the
# first omitted term, d^13/14!, is under 2e-19 of the value (~1e-3 ulp).
_ONE_MINUS_EXP_NEG_SERIES = tuple((-1.0) ** k / math.factorial(k + 1) for k in range(12, -1, -1))


def _one_minus_exp_neg_over(d: jax.Array) -> jax.Array:
    """``(1 − e^−d)/d`` for ``d ≥ 0`` (``1`` at ``d = 0``), within a few ulps, with no
    cancellation: the Taylor series below ``d = 1/4``, the quotient above (where
    ``e^−d < 0.78``, so ``1 − e^−d`` loses at most ~2 bits)."""
    small = d < 0.25
    series = jnp.full_like(d, _ONE_MINUS_EXP_NEG_SERIES[0])
    for c in _ONE_MINUS_EXP_NEG_SERIES[1:]:
        series = series * d + c
    safe = jnp.where(small, 1.0, d)
    return jnp.where(small, series, (1.0 - jnp.exp(-safe)) / safe)


def sigmoid_quotient(z_a: jax.Array, z_r: jax.Array) -> jax.Array:
    """``(σ(z_a) − σ(z_r))/(z_a − z_r)`` (``σ'(z)`` at ``z_a == z_r``) for any finite inputs,
    within a few ulps and with no threshold on ``Δz``: the closed form

    ``σ(hi) − σ(lo) = σ(hi) · σ(−lo) · (1 − e^{−d})``, ``hi = max``, ``lo = min``, ``d = hi − lo``,

    every factor of which is free of cancellation: ``σ(±x)`` from one ``t = e^{−|x|} ≤ 1``
    (``1/(1+t)`` and ``t/(1+t)``, never ``1 − σ``), ``(1 − e^{−d})/d`` by its series below
    ``d = 1/4``. Three exponentials per element (against about fifteen transcendentals in
    :func:`rescale`'s log-space forms), the same value to rounding: the transformation's
    Rescale of ``logistic``. Any shape, floating dtype kept.
    """
    hi = jnp.maximum(z_a, z_r)
    lo = jnp.minimum(z_a, z_r)
    t_hi = jnp.exp(-jnp.abs(hi))
    t_lo = jnp.exp(-jnp.abs(lo))
    sigmoid_hi = jnp.where(hi >= 0, 1.0, t_hi) / (1.0 + t_hi)  # σ(hi)
    sigmoid_neg_lo = jnp.where(lo >= 0, t_lo, 1.0) / (1.0 + t_lo)  # σ(−lo) = 1 − σ(lo)
    d = jnp.where(hi == lo, 0.0, hi - lo)  # 0, not inf − inf, where both overflowed to inf
    return sigmoid_hi * sigmoid_neg_lo * _one_minus_exp_neg_over(d)


def tanh_quotient(z_a: jax.Array, z_r: jax.Array) -> jax.Array:
    """``(tanh z_a − tanh z_r)/(z_a − z_r)`` (``tanh' z`` at ``z_a == z_r``): ``tanh z =
    2σ(2z) − 1`` makes it ``4 · sigmoid_quotient(2 z_a, 2 z_r)`` (the doubling is exact), with
    :func:`sigmoid_quotient`'s accuracy. Any shape, floating dtype kept."""
    return 4.0 * sigmoid_quotient(2.0 * z_a, 2.0 * z_r)


def average(a: jax.Array, r: jax.Array) -> jax.Array:
    """``(a + r) / 2``: the multiplier an operand passes to its partner in a product."""
    return 0.5 * (a + r)


def product_multipliers(
    m_y: jax.Array, u_a: jax.Array, u_r: jax.Array, v_a: jax.Array, v_r: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Shapley multipliers of the two operands of ``y = u ⊙ v`` (elementwise).

    ``m_u = m_y · (v_a + v_r)/2`` and ``m_v = m_y · (u_a + u_r)/2``, so that
    ``m_u Δu + m_v Δv = m_y (u_a v_a − u_r v_r)``: the Shapley values of the two-player
    game ``S ↦ u_S v_S`` (efficiency, symmetry and dummy hold).

    Args:
      m_y: multiplier of the product; all arguments broadcast together, floating dtype.
      u_a, u_r: actual and reference value of the first operand.
      v_a, v_r: actual and reference value of the second operand.

    Returns:
      ``(m_u, m_v)``, each of the broadcast shape.
    """
    return m_y * average(v_a, v_r), m_y * average(u_a, u_r)
