"""The DeepLIFT rules of single primitives with varying operands, as ``jax.custom_vjp``
functions on pairs: the forward applies the primitive to each half, the backward returns the
rule's multipliers (the same factor for both halves, so both halves keep equal multipliers).

Each rule comes from the one place it is written in :mod:`reference_jax`:

* Rescale of unary elementwise primitives: :func:`reference_jax.ops.unary_rescale_factor`
  (sigmoid / tanh by :func:`reference_jax.rescale.sigmoid_quotient` / ``tanh_quotient``, the
  one definition of those factors, which ``rescale.rescale`` also returns); a binary primitive
  with one
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
from reference_jax.rescale import sigmoid_quotient, tanh_quotient
from reference_jax.transform.pairs import Val, bind

__all__ = [
    "BINARY_OPS",
    "UNARY_FACTORS",
    "bilinear",
    "clamp_factor",
    "einsum_equation",
    "erf_quotient",
    "pair_rule",
    "rescaled",
    "ruled",
    "shapley_binary",
]


# --------------------------------------------------------------------------- the custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def pair_rule(forward: Callable, residual: Callable, backward: Callable, actual: tuple, reference: tuple,
              shared: tuple):
    """``forward(actual, shared)`` (the actual half's value) with the backward
    ``backward(residual(actual, reference, shared), g)``: one cotangent per actual operand,
    linear in ``g``. ``reference`` and ``shared`` (constants) get none.
    """
    return forward(actual, shared)


def _pair_rule_fwd(forward, residual, backward, actual, reference, shared):
    return forward(actual, shared), (residual(actual, reference, shared), reference, shared)


def _pair_rule_bwd(forward, residual, backward, saved, g):
    res, reference, shared = saved
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    return tuple(backward(res, g)), zeros(reference), zeros(shared)


pair_rule.defvjp(_pair_rule_fwd, _pair_rule_bwd)


def ruled(forward: Callable, residual: Callable, backward: Callable, vals: list[Val], shared: tuple = ()) -> Val:
    """The varying value of a rule: the actual half by :func:`pair_rule`, the reference half
    by ``forward`` alone (it is never differentiated)."""
    actual = tuple(v.a for v in vals)
    reference = tuple(v.r for v in vals)
    y_a = pair_rule(forward, residual, backward, actual, reference, shared)
    return Val(y_a, forward(reference, shared))


# --------------------------------------------------------------------------- Rescale


def rescaled(eqn, vals: list[Val], index: int, factor: Callable) -> Val:
    """Rescale of ``eqn`` in its one varying operand ``vals[index]``: ``m_x = m · R`` with
    ``R = factor(x_a, x_r, *others)``, ``others`` the constant operands in order."""
    shape = jnp.shape(vals[index].a)

    def forward(varying, shared):
        operands = list(shared)
        operands.insert(index, varying[0])
        return bind(eqn, operands)[0]

    def residual(actual, reference, shared):
        return factor(actual[0], reference[0], *shared)

    def backward(r, g):
        return (_sum_to(g * r, shape),)

    shared = tuple(v.a for k, v in enumerate(vals) if k != index)
    return ruled(forward, residual, backward, [vals[index]], shared)


def _sum_to(m, shape):
    """``m`` summed down to ``shape`` (an operand broadcast against a larger one)."""
    shape = tuple(shape)
    if m.shape == shape:
        return m
    m = jnp.sum(m, axis=tuple(range(m.ndim - len(shape))))
    axes = tuple(i for i, (a, b) in enumerate(zip(m.shape, shape, strict=True)) if b == 1 and a != 1)
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
    # the one definition of sigmoid's / tanh's factor (rescale.rescale and ops' sigmoid / tanh return it too)
    "logistic": lambda eqn: sigmoid_quotient,
    "tanh": lambda eqn: tanh_quotient,
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


def shapley_binary(eqn, vals: list[Val]) -> Val:
    """A binary elementwise primitive of two varying operands (broadcast to one shape first):
    the two-player Shapley rule of :func:`reference_jax.ops.binary_quotients`."""
    name = BINARY_OPS[eqn.primitive.name]
    shape = eqn.outvars[0].aval.shape
    vals = [Val(jnp.broadcast_to(v.a, shape), jnp.broadcast_to(v.r, shape)) for v in vals]

    def forward(varying, shared):
        return bind(eqn, varying)[0]

    def residual(actual, reference, shared):
        return ops.binary_quotients(name, actual[0], reference[0], actual[1], reference[1])

    def backward(q, g):
        return g * q[0], g * q[1]

    return ruled(forward, residual, backward, vals)


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
    equation = einsum_equation(eqn.params["dimension_numbers"], jnp.ndim(u.a), jnp.ndim(v.a))
    rule = ops.OP_SPECS["einsum"].rule

    def forward(varying, shared):
        return bind(eqn, varying)[0]

    def residual(actual, reference, shared):
        return actual, reference

    def backward(res, g):
        actual, reference = res
        m_u, m_v = rule(g, actual, reference, equation=equation)
        return m_u.astype(actual[0].dtype), m_v.astype(actual[1].dtype)

    return ruled(forward, residual, backward, vals)
