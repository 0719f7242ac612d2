"""The two elementary DeepLIFT rules: Rescale for ``y = φ(z)`` and the Shapley product.

Every quantity has an actual value ``a`` and a reference value ``r``; ``Δ = a − r``.
Multipliers ``m`` play the role of gradients (contribution = ``m · Δinput``) and a rule
is exact when ``Σ m_in Δin = Σ m_out Δout``.

* Rescale, ``y = φ(z)`` elementwise: ``m_z = m_y · (φ(z_a) − φ(z_r)) / (z_a − z_r)``;
  for sigmoid and tanh by one cancellation-free closed form each (:func:`sigmoid_quotient`,
  :func:`tanh_quotient`), accurate for every ``Δz`` (``φ'`` at ``Δz = 0``), so no threshold
  and no midpoint expansion; for relu by the quotient of the values (exact), the midpoint
  derivative at ``Δz = 0``.
* Product of two varying operands, ``y = u ⊙ v`` (the Shapley value of the two-player
  game): ``m_u = m_y · (v_a + v_r) / 2`` and ``m_v = m_y · (u_a + u_r) / 2``; then
  ``m_u Δu + m_v Δv = u_a v_a − u_r v_r`` exactly.

All functions are elementwise, pure, and work for any shape (scalars included) and any
floating dtype; nothing here divides by an input Δ except the Rescale quotient itself,
which is evaluated on a "safe" Δz (relu) or free of any division by Δz (sigmoid, tanh), so
that no NaN or inf is ever produced.
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
    """An elementwise nonlinearity with its Rescale factor."""

    fn: Callable[[jax.Array], jax.Array]  # φ
    d1: Callable[[jax.Array], jax.Array]  # φ'
    # (z_a, z_r) -> (φ(z_a) − φ(z_r)) / (z_a − z_r), φ' where z_a == z_r, cancellation-free;
    # None for a piecewise linear φ, whose difference of values has no cancellation.
    quotient: Callable[[jax.Array, jax.Array], jax.Array] | None

    @property
    def smooth(self) -> bool:
        """False: piecewise linear, so Δφ has no cancellation."""
        return self.quotient is not None


def _sigmoid_d1(z: jax.Array) -> jax.Array:
    # σ(z) σ(−z), not σ(1 − σ): no cancellation in 1 − σ for large z.
    return jax.nn.sigmoid(z) * jax.nn.sigmoid(-z)


def _tanh_d1(z: jax.Array) -> jax.Array:
    # sech²(z), not 1 − tanh²(z): no cancellation for large |z| (cosh → inf gives 0).
    return jnp.square(1.0 / jnp.cosh(z))


def _relu_d1(z: jax.Array) -> jax.Array:
    # The midpoint derivative of relu: 1 where the midpoint is > 0, else 0.
    return (z > 0).astype(z.dtype)


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
    """The Rescale factor of sigmoid (the one definition: :func:`rescale`, the ops and
    ``deeplift``'s ``logistic`` all use it): ``(σ(z_a) − σ(z_r))/(z_a − z_r)`` (``σ'(z)`` at
    ``z_a == z_r``) for any finite inputs, within a few ulps and with no threshold on ``Δz``:
    the closed form

    ``σ(hi) − σ(lo) = σ(hi) · σ(−lo) · (1 − e^{−d})``, ``hi = max``, ``lo = min``, ``d = hi − lo``,

    every factor of which is free of cancellation: ``σ(±x)`` from one ``t = e^{−|x|} ≤ 1``
    (``1/(1+t)`` and ``t/(1+t)``, never ``1 − σ``), ``(1 − e^{−d})/d`` by its series below
    ``d = 1/4``. Three exponentials per element. Any shape, floating dtype kept.
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
    """The Rescale factor of tanh: ``(tanh z_a − tanh z_r)/(z_a − z_r)`` (``tanh' z`` at
    ``z_a == z_r``): ``tanh z = 2σ(2z) − 1`` makes it ``4 · sigmoid_quotient(2 z_a, 2 z_r)``
    (the doubling is exact), with :func:`sigmoid_quotient`'s accuracy. Any shape, floating
    dtype kept."""
    return 4.0 * sigmoid_quotient(2.0 * z_a, 2.0 * z_r)


#: name -> :class:`Activation`; the keys are what every ``nonlinearity`` argument accepts.
NONLINEARITIES: dict[str, Activation] = {
    "sigmoid": Activation(jax.nn.sigmoid, _sigmoid_d1, sigmoid_quotient),
    "tanh": Activation(jnp.tanh, _tanh_d1, tanh_quotient),
    "relu": Activation(jax.nn.relu, _relu_d1, None),
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
    """The ``|Δz|`` at or below which a plain difference quotient of ``φ``'s float values,
    ``(φ(z_a) − φ(z_r)) / Δz``, is no more accurate than ``φ``'s midpoint derivative.

    :func:`rescale` needs no threshold: sigmoid and tanh use cancellation-free closed forms
    (:func:`sigmoid_quotient`, :func:`tanh_quotient`) accurate for every ``Δz``. This bound
    is for code that compares against, or evaluates, the plain quotient (the tests size
    their tolerances by it).

    For the smooth nonlinearities (``sigmoid``, ``tanh``) this is
    ``τ = (24 · eps) ** (1/3)`` with ``eps = finfo(dtype).eps`` (≈ 1.7e-5 in float64,
    ≈ 1.5e-2 in float32). It balances two errors:

    * the plain quotient loses about ``eps / |Δz|`` (relative) to cancellation in its
      numerator, which grows as ``Δz → 0``;
    * the midpoint derivative ``φ'(m)``, ``m = (z_a + z_r)/2``, differs from the quotient
      by ``φ'''(m) Δz² / 24``, which grows with ``Δz``.

    Equating ``eps / τ = τ² / 24`` gives ``τ³ = 24 eps``.

    ``relu`` is piecewise linear: its numerator ``relu(z_a) − relu(z_r)`` is computed
    without cancellation (it is ``Δz`` itself, ``0``, ``z_a`` or ``−z_r``), so the quotient
    is accurate to a few ulps for every non-zero ``Δz``, and the midpoint rule
    (derivative 1 if the midpoint is > 0, else 0) is needed only at ``Δz == 0``: its
    threshold is ``0.0``.

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

    ``R = (φ(z_a) − φ(z_r)) / (z_a − z_r)``, ``φ'`` where ``z_a == z_r``. Sigmoid and tanh:
    :func:`sigmoid_quotient` / :func:`tanh_quotient`, within a few ulps of the exact
    quotient of the float inputs for every ``Δz`` (no threshold, no cancellation). Relu: the
    quotient of the values (exact: the numerator is ``Δz``, ``0``, ``z_a`` or ``−z_r``) on a
    safe denominator, the midpoint derivative at ``Δz == 0``. One value serves both halves of
    a doubled batch; the result is finite for all finite inputs.

    Args:
      nonlinearity: ``"sigmoid"``, ``"tanh"`` or ``"relu"`` (static).
      z_a: actual pre-activation, any shape, floating dtype.
      z_r: reference pre-activation, same shape and dtype as ``z_a``.
      y_a, y_r: optionally the already computed ``φ(z_a)``, ``φ(z_r)`` (the forward
        values), the numerator of relu's quotient; sigmoid and tanh do not need them.

    Returns:
      ``R``, same shape and dtype as ``z_a``.
    """
    act = _lookup(nonlinearity)
    if act.quotient is not None:
        return act.quotient(z_a, z_r)
    dz = z_a - z_r
    zero = dz == 0
    safe_dz = jnp.where(zero, jnp.ones_like(dz), dz)
    y_a = act.fn(z_a) if y_a is None else y_a
    y_r = act.fn(z_r) if y_r is None else y_r
    return jnp.where(zero, act.d1(0.5 * (z_a + z_r)), (y_a - y_r) / safe_dz)


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
