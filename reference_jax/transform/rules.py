"""The DeepLIFT rules of single primitives with varying operands, as ``jax.custom_vjp``
functions on pairs: the forward applies the primitive to each half, the backward returns the
rule's multipliers (the same factor for both halves, so both halves keep equal multipliers).

Each rule comes from the one place it is written in :mod:`reference_jax`:

* Rescale of unary elementwise primitives: :func:`reference_jax.ops.unary_rescale_factor`
  (sigmoid / tanh through :func:`reference_jax.rescale.rescale`); a binary primitive with one
  constant operand is a unary function of the other: its partial quotient from
  :func:`reference_jax.ops.binary_quotients` at equal halves of the constant.
* Two varying operands of an elementwise binary: :func:`reference_jax.ops.binary_quotients`.
* ``dot_general`` of two varying operands: the bilinear rule of ``ops.OP_SPECS["einsum"]``.

The one rule written here, because :mod:`reference_jax.ops` has none yet: Rescale of ``erf``
(:func:`erf_quotient`; ``erfc = 1 − erf`` uses its negative).
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc

from reference_jax import ops
from reference_jax.transform.pairs import Val, bind, per_half

__all__ = [
    "BINARY_OPS",
    "UNARY_FACTORS",
    "bilinear",
    "clamp_factor",
    "einsum_equation",
    "erf_quotient",
    "pair_rule",
    "rescaled",
    "shapley_binary",
]


# --------------------------------------------------------------------------- the custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pair_rule(forward: Callable, residual: Callable, backward: Callable, varying: tuple, shared: tuple):
    """``forward(varying, shared)`` with the backward ``backward(residual(varying, shared), g)``.

    ``varying``: tuple of pairs ``(2, ...)``; ``shared``: tuple of constants (no multiplier);
    ``backward`` returns one cotangent per varying operand, linear in ``g``.
    """
    return forward(varying, shared)


def _pair_rule_fwd(forward, residual, backward, varying, shared):
    return forward(varying, shared), (residual(varying, shared), shared)


def _pair_rule_bwd(forward, residual, backward, saved, g):
    res, shared = saved
    return tuple(backward(res, g)), jax.tree.map(jnp.zeros_like, shared)


pair_rule.defvjp(_pair_rule_fwd, _pair_rule_bwd)


# --------------------------------------------------------------------------- Rescale


def rescaled(eqn, vals: list[Val], index: int, factor: Callable) -> Val:
    """Rescale of ``eqn`` in its one varying operand ``vals[index]``: ``m_x = m · R`` with
    ``R = factor(x_a, x_r, *others)``, ``others`` the constant operands in order."""

    def forward(varying, shared):
        ops_ = list(shared)
        ops_.insert(index, varying[0])
        return per_half(lambda *xs: bind(eqn, xs)[0], [Val(v, k == index) for k, v in enumerate(ops_)])

    def residual(varying, shared):
        x = varying[0]
        return factor(x[0], x[1], *shared)

    def backward(r, g):
        return (_sum_to(g * r, varying_shape),)

    varying_shape = jnp.shape(vals[index].value)
    shared = tuple(v.value for k, v in enumerate(vals) if k != index)
    return Val(pair_rule(forward, residual, backward, (vals[index].value,), shared), True)


def _sum_to(m, shape):
    """``m`` summed down to ``shape`` (a scalar operand broadcast against an array)."""
    if m.shape == tuple(shape):
        return m
    extra = m.ndim - len(shape)
    m = jnp.sum(m, axis=tuple(range(1, 1 + extra))) if extra else m
    axes = tuple(i for i, (a, b) in enumerate(zip(m.shape, shape, strict=True)) if a != b)
    return jnp.sum(m, axis=axes, keepdims=True) if axes else m


# --------------------------------------------------------------------------- erf (new rule)

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def erf_quotient(a, r):
    """``(erf(a) − erf(r))/(a − r)`` (``erf'(a)`` at ``a == r``) without cancellation.

    Where ``|Δ|·(1 + |m|) ≤ 0.02`` (``m`` the midpoint): the midpoint series
    ``erf'(m)[1 + (4m² − 2)Δ²/24 + (16m⁴ − 48m² + 12)Δ⁴/1920]`` (the next term is below
    float64 rounding there). Beyond: the difference of the tail functions on the tail's side
    (``erfc(r) − erfc(a)`` for both ``≥ 0``, ``erfc(−a) − erfc(−r)`` for both ``≤ 0``), the
    plain difference across 0 (no cancellation: ``|Δ|`` is at least either magnitude)."""
    d = a - r
    mid = 0.5 * (a + r)
    small = jnp.abs(d) * (1.0 + jnp.abs(mid)) <= 0.02
    m2, d2 = mid * mid, d * d
    series = 1.0 + (4.0 * m2 - 2.0) * d2 / 24.0 + (16.0 * m2 * m2 - 48.0 * m2 + 12.0) * d2 * d2 / 1920.0
    near = _TWO_OVER_SQRT_PI * jnp.exp(-m2) * series
    upper = (a >= 0) & (r >= 0)
    lower = (a <= 0) & (r <= 0)
    diff = jnp.where(
        upper, erfc(r) - erfc(a), jnp.where(lower, erfc(-a) - erfc(-r), jax.lax.erf(a) - jax.lax.erf(r))
    )
    return jnp.where(small, near, diff / jnp.where(small, 1.0, d))


# --------------------------------------------------------------------------- tables


def _unary(name: str) -> Callable:
    return lambda a, r: ops.unary_rescale_factor(name, a, r)


def _integer_pow(eqn) -> Callable:
    y = eqn.params["y"]
    if y == 2:
        return _unary("square")
    return lambda a, r: ops.unary_rescale_factor("pow_scalar", a, r, exponent=float(y))


def _abs_factor(a, r):
    # |x| = relu(x) + relu(−x), and d relu(−x)/dx = −relu'(−x): both from the relu rule (0 at a == r == 0, as torch).
    return ops.unary_rescale_factor("relu", a, r) - ops.unary_rescale_factor("relu", -a, -r)


def clamp_factor(a, r, lo, hi):
    """Rescale factor of ``lax.clamp(lo, x, hi)`` in ``x`` (constant bounds)."""
    return ops.unary_rescale_factor("clamp", a, r, min=lo, max=hi)


#: primitive name -> ``eqn -> factor(a, r)`` for unary elementwise primitives (Rescale).
UNARY_FACTORS: dict[str, Callable] = {
    "logistic": lambda eqn: _unary("sigmoid"),
    "tanh": lambda eqn: _unary("tanh"),
    "exp": lambda eqn: _unary("exp"),
    "expm1": lambda eqn: _unary("exp"),  # e^a − 1 − (e^r − 1): the exp quotient
    "exp2": lambda eqn: lambda a, r: ops.binary_quotients("pow", 2.0, 2.0, a, r)[1],
    "log": lambda eqn: _unary("log"),
    "log1p": lambda eqn: lambda a, r: ops.unary_rescale_factor("log", 1.0 + a, 1.0 + r),
    "sqrt": lambda eqn: _unary("sqrt"),
    "rsqrt": lambda eqn: _unary("rsqrt"),
    "square": lambda eqn: _unary("square"),
    "integer_pow": _integer_pow,
    "abs": lambda eqn: _abs_factor,
    "erf": lambda eqn: erf_quotient,
    "erfc": lambda eqn: lambda a, r: -erf_quotient(a, r),
}

#: primitive name -> the name of its rule in ``ops.binary_quotients`` (two-player Shapley;
#: with one constant operand, the other's partial quotient: Rescale).
BINARY_OPS: dict[str, str] = {
    "mul": "mul",
    "div": "div",
    "max": "maximum",
    "min": "minimum",
    "pow": "pow",
    "atan2": "atan2",
}


def binary_rescaled(eqn, vals: list[Val]) -> Val:
    """A binary elementwise primitive with one varying operand: Rescale by the partial
    quotient of :func:`reference_jax.ops.binary_quotients` at equal halves of the other."""
    name = BINARY_OPS[eqn.primitive.name]
    index = 0 if vals[0].varying else 1

    def factor(a, r, c):
        c = jnp.asarray(c, jnp.result_type(a))
        if index == 0:
            return ops.binary_quotients(name, a, r, c, c)[0]
        return ops.binary_quotients(name, c, c, a, r)[1]

    return rescaled(eqn, vals, index, factor)


def _broadcast_pair(pair, shape):
    """A pair ``(2, *s)`` broadcast to ``(2, *shape)`` (``s`` is ``shape`` or a scalar's ``()``)."""
    lead = (1,) * (len(shape) - (pair.ndim - 1))
    return jnp.broadcast_to(pair.reshape((2, *lead, *pair.shape[1:])), (2, *shape))


def shapley_binary(eqn, vals: list[Val]) -> Val:
    """A binary elementwise primitive of two varying operands (broadcast to one shape first):
    the two-player Shapley rule of :func:`reference_jax.ops.binary_quotients`."""
    name = BINARY_OPS[eqn.primitive.name]
    shape = eqn.outvars[0].aval.shape
    u, v = (_broadcast_pair(x.value, shape) for x in vals)

    def forward(varying, shared):
        return jax.vmap(lambda a, b: bind(eqn, (a, b))[0])(*varying)

    def residual(varying, shared):
        (u, v) = varying
        return ops.binary_quotients(name, u[0], u[1], v[0], v[1])

    def backward(q, g):
        return g * q[0], g * q[1]

    return Val(pair_rule(forward, residual, backward, (u, v), ()), True)


# --------------------------------------------------------------------------- bilinear


def einsum_equation(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> str:
    """The einsum equation of a ``dot_general`` (output: batch, lhs free, rhs free dims)."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(string.ascii_letters)
    lhs = [next(letters) for _ in range(lhs_ndim)]
    rhs = [None] * rhs_ndim
    for i, j in zip(lc, rc, strict=True):
        rhs[j] = lhs[i]
    for i, j in zip(lb, rb, strict=True):
        rhs[j] = lhs[i]
    rhs = [c if c is not None else next(letters) for c in rhs]
    out = [lhs[i] for i in lb]
    out += [c for i, c in enumerate(lhs) if i not in lc and i not in lb]
    out += [c for j, c in enumerate(rhs) if j not in rc and j not in rb]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def bilinear(eqn, vals: list[Val]) -> Val:
    """``dot_general`` of two varying operands: the bilinear rule (each operand's multiplier
    is the VJP at the other operand's mean), ``ops.OP_SPECS["einsum"].rule``."""
    u, v = vals
    equation = einsum_equation(eqn.params["dimension_numbers"], u.value.ndim - 1, v.value.ndim - 1)
    rule = ops.OP_SPECS["einsum"].rule

    def forward(varying, shared):
        return jax.vmap(lambda a, b: bind(eqn, (a, b))[0])(*varying)

    def residual(varying, shared):
        return varying

    def backward(res, g):
        (u, v) = res
        one = lambda m: rule(m, (u[0], v[0]), (u[1], v[1]), equation=equation)  # noqa: E731
        m_u, m_v = jax.vmap(one)(g)
        return m_u.astype(u.dtype), m_v.astype(v.dtype)

    return Val(pair_rule(forward, residual, backward, (u.value, v.value), ()), True)
