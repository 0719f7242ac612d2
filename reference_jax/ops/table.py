"""The op table: one entry per op, keyed by the op's name (the same name as the torch side's
``torch_handler`` op table), from which everything else about the op is derived.

An entry (:class:`OpSpec`) holds

* the twin: the op's ``forward`` for one pair and its ``rule`` (``Rescale`` factor for a
  unary op, the two partial quotients for a binary op, a rule function otherwise);
* how its operands and parameters map: ``operands`` names the tensor operands in the
  order the rule receives them (the torch side reads them from the call in this order;
  keyword parameters pass through under the same names);
* the cases its tests draw (:class:`Case`: a parameter setting and one or more operand
  shapes with value domains). ``tests/test_oracle_ops.py`` draws each case's last shape,
  ``crosscheck/test_crosscheck_ops.py`` every shape, in both dtypes;
* for unary ops, the 60-digit reference function and the grid of midpoints
  (:class:`MpCheck`) that ``tests/test_oracle_ops.py`` holds the Rescale factor to.

Adding an op on the JAX side: its forward and rule in the module of its family
(:mod:`~reference_jax.ops.unary`, :mod:`~reference_jax.ops.binary`, ...), and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from reference_jax.ops import amax, attention, bilinear, glu, norms, softmax
from reference_jax.ops import binary as b
from reference_jax.ops import unary as u
from reference_jax.ops._numerics import _exp_quotient, _log_quotient
from reference_jax.rescale import average

Array = jax.Array
Operands = tuple[Array | None, ...]

# --------------------------------------------------------------------------- entry types


class Operand(NamedTuple):
    """How a test draws one operand: its shape per pair and its value domain."""

    shape: tuple[int, ...]
    domain: str = "real"  # real | positive | away_from_zero | wide (4x real) | exponent (|v| small)


class Case(NamedTuple):
    """One parameter setting of an op and the operand shapes its tests draw.

    ``params`` holds static parameters and arrays shared by all pairs (numpy, float64 or bool).
    """

    id: str
    shapes: tuple[tuple[Operand, ...], ...]
    params: dict


class MpCheck(NamedTuple):
    """A grid on which a unary Rescale factor is held to a 60-digit quotient.

    ``mids``: midpoints; ``relative``: the half-width scales with ``|mid|`` (ops whose scale
    is set by ``x`` itself), else with ``max(1, |mid|)``; ``positive``: only ``x > 0``."""

    params: dict
    mids: tuple[float, ...]
    relative: bool = False
    positive: bool = False


class Unary(NamedTuple):
    """A unary op's twin: forward ``f(x, **params)`` and Rescale factor ``R(a, r, **params)``."""

    forward: Callable[..., Array]
    factor: Callable[..., Array]


class Binary(NamedTuple):
    """A binary op's twin: forward ``f(u, v)`` and partial quotients ``q_u(u_a, u_r, v)``,
    ``q_v(v_a, v_r, u)``."""

    forward: Callable[[Array, Array], Array]
    q_u: Callable[[Array, Array, Array], Array]
    q_v: Callable[[Array, Array, Array], Array]


class OpSpec(NamedTuple):
    """One op of the table.

    Attributes:
      operands: names of the tensor operands, in order (``linear``'s bias may be absent).
      forward: ``f(*operands, **params)`` for one pair (what the rule is exact for).
      rule: ``rule(m, actual, reference, **params)`` (unchecked; see ``OP_RULES``).
      family: unary | binary | bilinear | softmax | norm | reduction | attention.
      cases: what its tests draw.
      twin: the :class:`Unary` or :class:`Binary` parts (None for other families).
      mp_function: unary ops: ``(mpmath, params) -> f`` evaluating ``f`` in mpmath.
      mp_checks: unary ops: the grids of the 60-digit check.
    """

    operands: tuple[str, ...]
    forward: Callable[..., Array]
    rule: Callable[..., Operands]
    family: str
    cases: tuple[Case, ...]
    twin: Unary | Binary | None = None
    mp_function: Callable[[Any, dict], Callable] | None = None
    mp_checks: tuple[MpCheck, ...] = ()


# --------------------------------------------------------------------------- entry builders

ELEMENTWISE_SHAPES = ((4,), (3, 5))


def elementwise(id: str, domains: list[str], **params) -> Case:
    """A case of an elementwise op: one operand per domain, drawn at each of
    :data:`ELEMENTWISE_SHAPES`."""
    return Case(id, tuple(tuple(Operand(s, d) for d in domains) for s in ELEMENTWISE_SHAPES), params)


def shaped(id: str, *shapes, **params) -> Case:
    """A case with explicit operand shapes; an operand is a shape, or ``(shape, domain)``."""
    return Case(
        id,
        tuple(tuple(Operand(*o) if isinstance(o[0], tuple) else Operand(o) for o in s) for s in shapes),
        params,
    )


def _unary_rule(factor: Callable[..., Array]) -> Callable[..., Operands]:
    def rule(m, actual, reference, **params):
        (x_a,), (x_r,) = actual, reference
        return (m * factor(x_a, x_r, **params),)

    rule.__doc__ = "Rescale rule: ``m_x = m · (f(x_a) − f(x_r))/Δx``."
    return rule


def _binary_rule(twin: Binary) -> Callable[..., Operands]:
    def rule(m, actual, reference):
        (u_a, v_a), (u_r, v_r) = actual, reference
        factor_u, factor_v = _shapley_quotients(twin, u_a, u_r, v_a, v_r)
        return m * factor_u, m * factor_v

    rule.__doc__ = "Two-player Shapley rule of f(u, v)."
    return rule


def _shapley_quotients(twin: Binary, u_a, u_r, v_a, v_r) -> tuple[Array, Array]:
    return (
        average(twin.q_u(u_a, u_r, v_r), twin.q_u(u_a, u_r, v_a)),
        average(twin.q_v(v_a, v_r, u_r), twin.q_v(v_a, v_r, u_a)),
    )


def unary(forward, factor, cases, mp_function=None, mp_checks=()) -> OpSpec:
    """The entry of a unary elementwise op (Rescale)."""
    twin = Unary(forward, factor)
    return OpSpec(("x",), forward, _unary_rule(factor), "unary", tuple(cases), twin, mp_function, tuple(mp_checks))


def binary(forward, q_u, q_v, cases) -> OpSpec:
    """The entry of a binary elementwise op of two varying operands (two-player Shapley)."""
    twin = Binary(forward, q_u, q_v)
    return OpSpec(("u", "v"), forward, _binary_rule(twin), "binary", tuple(cases), twin)


def op(operands: tuple[str, ...], forward, rule, family: str, cases) -> OpSpec:
    """The entry of any other op: its own rule function."""
    return OpSpec(tuple(operands), forward, rule, family, tuple(cases))


def _mp_piecewise(f):
    """An mpmath reference that needs no mpmath function (piecewise linear ops)."""
    return lambda mp, params: (lambda x: f(x, **params))


def _mp_gelu(mp, params):
    if params.get("approximate") == "tanh":
        k = mp.sqrt(2 / mp.pi)
        return lambda x: x / 2 * (1 + mp.tanh(k * (x + mp.mpf("0.044715") * x**3)))
    return lambda x: x / 2 * (1 + mp.erf(x / mp.sqrt(2)))


def _mp_clamp(mp, params):
    lo = -mp.inf if params.get("min") is None else params["min"]
    hi = mp.inf if params.get("max") is None else params["max"]
    return lambda x: min(max(x, lo), hi)


def _mp_softplus(mp, params):
    beta, threshold = params["beta"], params["threshold"]
    return lambda x: x if beta * x > threshold else mp.log1p(mp.exp(beta * x)) / beta


# --------------------------------------------------------------------------- the table

# The arrays some cases share by all pairs, drawn once, in this order (the crosscheck's data
# derive from the case ids, so a case keeps its data when others are added).
_RNG = np.random.default_rng(12345)
_LN_WEIGHT, _LN_BIAS = _RNG.uniform(0.5, 2.0, 6), _RNG.standard_normal(6)
_RMS_WEIGHT = _RNG.uniform(-1.0, 2.0, 6)
_FLOAT_MASK = _RNG.standard_normal((3, 3))
_BOOL_MASK = np.array(
    [[True, False, True, True, False], [True, True, False, True, True], [False, False, True, False, False]]
)

OP_SPECS: dict[str, OpSpec] = {
    # -- unary (Rescale) ------------------------------------------------------------------
    "relu": unary(
        u._relu, u._relu_factor, [elementwise("relu", ["wide"])],
        _mp_piecewise(lambda x: max(x, 0)), [MpCheck({}, (-3.0, 0.0, 1e-7, 2.0))],
    ),
    "leaky_relu": unary(
        u._leaky_relu, u._leaky_relu_factor, [elementwise("leaky_relu", ["wide"], negative_slope=0.1)],
        _mp_piecewise(lambda x, negative_slope: x if x > 0 else negative_slope * x),
        [MpCheck({"negative_slope": 0.1}, (-3.0, 0.0, 2.0))],
    ),
    "relu6": unary(
        u._relu6, u._relu6_factor, [elementwise("relu6", ["wide"])],
        _mp_piecewise(lambda x: min(max(x, 0), 6)), [MpCheck({}, (-1.0, 0.0, 3.0, 6.0, 8.0))],
    ),
    "elu": unary(
        u._elu, u._elu_factor, [elementwise("elu", ["wide"], alpha=1.3)],
        lambda mp, p: lambda x: x if x > 0 else p["alpha"] * mp.expm1(x),
        [MpCheck({"alpha": 1.3}, (-30.0, -2.0, 0.0, 1.5))],
    ),
    "gelu": unary(
        u._gelu, u._gelu_factor,
        [elementwise("gelu", ["wide"]), elementwise("gelu_tanh", ["wide"], approximate="tanh")],
        _mp_gelu,
        [MpCheck({}, (-9.0, -2.5, -0.7, 0.0, 0.4, 3.0, 12.0)),
         MpCheck({"approximate": "tanh"}, (-6.0, -0.7, 0.0, 0.4, 3.0))],
    ),
    "silu": unary(
        u._silu, u._silu_factor, [elementwise("silu", ["wide"])],
        lambda mp, p: lambda x: x / (1 + mp.exp(-x)), [MpCheck({}, (-40.0, -3.0, 0.0, 0.5, 30.0))],
    ),
    "softplus": unary(
        u._softplus, u._softplus_factor,
        [elementwise("softplus", ["wide"]), elementwise("softplus_beta2_t3", ["wide"], beta=2.0, threshold=3.0)],
        _mp_softplus, [MpCheck({"beta": 1.5, "threshold": 20.0}, (-40.0, -2.0, 0.0, 3.0, 12.0))],
    ),
    "sigmoid": unary(
        jax.nn.sigmoid, u._sigmoid_factor, [elementwise("sigmoid", ["wide"])],
        lambda mp, p: lambda x: 1 / (1 + mp.exp(-x)), [MpCheck({}, (-30.0, -1.0, 0.0, 2.0))],
    ),
    "tanh": unary(
        jnp.tanh, u._tanh_factor, [elementwise("tanh", ["wide"])],
        lambda mp, p: mp.tanh, [MpCheck({}, (-19.0, -0.5, 0.0, 1.0))],
    ),
    "exp": unary(
        jnp.exp, _exp_quotient, [elementwise("exp", ["real"])],
        lambda mp, p: mp.exp, [MpCheck({}, (-50.0, -1.0, 0.0, 3.0, 40.0))],
    ),
    "log": unary(
        jnp.log, _log_quotient, [elementwise("log", ["positive"])],
        lambda mp, p: mp.log, [MpCheck({}, (1e-3, 0.5, 1.0, 7.0, 1e6), relative=True, positive=True)],
    ),
    "sqrt": unary(
        jnp.sqrt, u._sqrt_factor, [elementwise("sqrt", ["positive"])],
        lambda mp, p: mp.sqrt, [MpCheck({}, (1e-3, 1.0, 50.0), relative=True, positive=True)],
    ),
    "rsqrt": unary(
        jax.lax.rsqrt, u._rsqrt_factor, [elementwise("rsqrt", ["positive"])],
        lambda mp, p: lambda x: 1 / mp.sqrt(x), [MpCheck({}, (1e-3, 1.0, 50.0), relative=True, positive=True)],
    ),
    "reciprocal": unary(
        u._reciprocal, u._reciprocal_factor, [elementwise("reciprocal", ["away_from_zero"])],
        lambda mp, p: lambda x: 1 / x, [MpCheck({}, (-5.0, -0.1, 0.2, 3.0))],
    ),
    "square": unary(
        jnp.square, u._square_factor, [elementwise("square", ["wide"])],
        lambda mp, p: lambda x: x * x, [MpCheck({}, (-5.0, 0.0, 3.0))],
    ),
    "abs": unary(
        jnp.abs, u._abs_factor, [elementwise("abs", ["wide"])],
        _mp_piecewise(abs), [MpCheck({}, (-3.0, 0.0, 1e-7, 2.0))],
    ),
    "clamp": unary(
        u._clamp, u._clamp_factor,
        [elementwise("clamp", ["real"], min=-0.5, max=0.8), elementwise("clamp_max", ["real"], max=0.3),
         elementwise("clamp_min", ["real"], min=0.1)],
        _mp_clamp,
        [MpCheck({"min": -1.0, "max": 2.0}, (-3.0, -1.0, 0.5, 2.0, 4.0))],
    ),
    "pow_scalar": unary(
        u._pow_scalar, u._power_scalar_factor,
        [elementwise("pow_scalar_2.5", ["positive"], exponent=2.5), elementwise("pow_scalar_3", ["real"], exponent=3.0),
         elementwise("pow_scalar_-0.5", ["positive"], exponent=-0.5),
         elementwise("pow_scalar_-2", ["away_from_zero"], exponent=-2.0)],
        lambda mp, p: lambda x: mp.power(x, p["exponent"]),
        [MpCheck({"exponent": 0.3}, (0.01, 1.0, 9.0, 1e3), relative=True, positive=True),
         MpCheck({"exponent": 3.0}, (-7.0, -0.2, 0.5, 10.0), relative=True),
         MpCheck({"exponent": -1.5}, (0.05, 1.0, 30.0), relative=True, positive=True),
         MpCheck({"exponent": -2.0}, (-4.0, -0.5, 0.5, 4.0), relative=True)],
    ),
    # -- binary (two-player Shapley) ----------------------------------------------------------
    "mul": binary(jnp.multiply, b._mul_q, b._mul_q, [elementwise("mul", ["real", "real"])]),
    "div": binary(jnp.divide, b._div_q_u, b._div_q_v, [elementwise("div", ["real", "away_from_zero"])]),
    "maximum": binary(jnp.maximum, b._maximum_q, b._maximum_q, [elementwise("maximum", ["real", "real"])]),
    "minimum": binary(jnp.minimum, b._minimum_q, b._minimum_q, [elementwise("minimum", ["real", "real"])]),
    "pow": binary(jnp.power, b._pow_q_u, b._pow_q_v, [elementwise("pow", ["positive", "exponent"])]),
    "atan2": binary(jnp.arctan2, b._atan2_q_u, b._atan2_q_v, [elementwise("atan2", ["real", "real"])]),
    # -- bilinear -------------------------------------------------------------------------------
    "matmul": op(("u", "v"), bilinear._matmul, bilinear._matmul_rule, "bilinear",
                 [shaped("matmul", [(2, 3, 4), (4, 5)], [(3, 4), (2, 4, 2)])]),
    "bmm": op(("u", "v"), bilinear._matmul, bilinear._bmm_rule, "bilinear",
              [shaped("bmm", [(2, 3, 4), (2, 4, 5)], [(1, 2, 6), (1, 6, 3)])]),
    "mm": op(("u", "v"), bilinear._matmul, bilinear._mm_rule, "bilinear",
             [shaped("mm", [(3, 4), (4, 5)], [(1, 6), (6, 2)])]),
    "einsum": op(("u", "v"), bilinear._einsum, bilinear._einsum_rule, "bilinear",
                 [shaped("einsum", [(3, 4), (5, 4)], [(2, 4), (6, 4)], equation="tk,sk->ts")]),
    "baddbmm": op(("c", "u", "v"), bilinear._baddbmm, bilinear._baddbmm_rule, "bilinear",
                  [shaped("baddbmm", [(2, 3, 5), (2, 3, 4), (2, 4, 5)], [(1, 3, 2), (2, 3, 4), (2, 4, 2)],
                          beta=0.5, alpha=2.0)]),
    "linear": op(("x", "w", "b"), bilinear._linear, bilinear._linear_rule, "bilinear",
                 [shaped("linear", [(3, 4), (5, 4), (5,)], [(2, 3, 4), (2, 4), (2,)]),
                  shaped("linear_no_bias", [(3, 4), (5, 4)], [(6,), (2, 6)])]),
    # -- softmax family -----------------------------------------------------------------------
    "softmax": op(("x",), softmax._softmax, softmax._softmax_rule, "softmax",
                  [shaped("softmax", [((3, 5), "wide")], [((4, 2, 3), "wide")], dim=-1),
                   shaped("softmax_dim-2", [(3, 5)], [(4, 2, 3)], dim=-2)]),
    "log_softmax": op(("x",), softmax._log_softmax, softmax._log_softmax_rule, "softmax",
                      [shaped("log_softmax", [((3, 5), "wide")], [((4, 2, 3), "wide")], dim=-1)]),
    "logsumexp": op(("x",), softmax._logsumexp, softmax._logsumexp_rule, "softmax",
                    [shaped("logsumexp", [((3, 5), "wide")], [(4, 2, 3)], dim=-1),
                     shaped("logsumexp_keepdim", [(3, 5)], [(4, 2, 3)], dim=-2, keepdim=True)]),
    # -- norms ----------------------------------------------------------------------------------
    "layer_norm": op(("x",), norms._layer_norm, norms._layer_norm_rule, "norm",
                     [shaped("layer_norm", [(3, 6)], [(2, 3, 6)], normalized_shape=(6,),
                             weight=_LN_WEIGHT, bias=_LN_BIAS, eps=1e-5),
                      shaped("layer_norm_plain", [(3, 2, 4)], [(5, 2, 4)], normalized_shape=(2, 4))]),
    "rms_norm": op(("x",), norms._rms_norm, norms._rms_norm_rule, "norm",
                   [shaped("rms_norm", [(3, 6)], [(2, 3, 6)], normalized_shape=(6,), weight=_RMS_WEIGHT, eps=1e-6)]),
    "vector_norm": op(("x",), norms._vector_norm, norms._vector_norm_rule, "norm",
                      [shaped("vector_norm", [(3, 5)], [(4, 2, 3)], dim=-1),
                       shaped("vector_norm_all", [(3, 5)], [(4, 2, 3)], dim=None, keepdim=False),
                       shaped("vector_norm_two_dims_keepdim", [(3, 5)], [(4, 2, 3)], dim=(-2, -1), keepdim=True)]),
    "var": op(("x",), norms._var, norms._var_rule, "norm",
              [shaped("var", [(3, 5)], [(4, 2, 3)], dim=-1),
               shaped("var_biased_keepdim", [(2, 3, 5)], [(4, 2, 3)], dim=-2, correction=0, keepdim=True),
               shaped("var_two_dims", [(3, 5)], [(4, 2, 3)], dim=(-2, -1))]),
    "std": op(("x",), norms._std, norms._std_rule, "norm",
              [shaped("std", [(3, 5)], [(4, 2, 3)], dim=-1),
               shaped("std_biased_keepdim", [(2, 3, 5)], [(4, 2, 3)], dim=-2, correction=0, keepdim=True),
               shaped("std_two_dims", [(3, 5)], [(4, 2, 3)], dim=(-2, -1))]),
    # -- others ---------------------------------------------------------------------------------
    "glu": op(("x",), glu._glu, glu._glu_rule, "gate",
              [shaped("glu", [(3, 6)], [(4, 2, 2)], dim=-1), shaped("glu_dim-2", [(4, 3)], [(2, 6, 2)], dim=-2)]),
    "amax": op(("x",), amax._amax, amax._amax_rule, "reduction",
               [shaped("amax", [(3, 5)], [(4, 2, 3)], dim=-1),
                shaped("amax_keepdim", [(3, 5)], [(4, 2, 3)], dim=-2, keepdim=True)]),
    "scaled_dot_product_attention": op(
        ("q", "k", "v"), attention._sdpa, attention._sdpa_rule, "attention",
        [shaped("sdpa", [(2, 3, 4), (2, 5, 4), (2, 5, 6)], [(4, 4), (4, 4), (4, 3)]),
         shaped("sdpa_causal", [(2, 4, 3), (2, 4, 3), (2, 4, 2)], [(5, 2), (5, 2), (5, 4)], is_causal=True, scale=0.7),
         shaped("sdpa_bool_mask", [(3, 4), (5, 4), (5, 2)], [(3, 4), (5, 4), (5, 2)], attn_mask=_BOOL_MASK),
         shaped("sdpa_float_mask", [(2, 3, 4), (2, 3, 4), (2, 3, 2)], [(2, 3, 4), (2, 3, 4), (2, 3, 2)],
                attn_mask=_FLOAT_MASK)],
    ),
}

# --------------------------------------------------------------------------- derived views

#: name -> ``f(*operands, **params)`` for one pair.
OP_FORWARDS: dict[str, Callable[..., Array]] = {name: spec.forward for name, spec in OP_SPECS.items()}
#: The unary ops' twins (forward, Rescale factor).
UNARY: dict[str, Unary] = {name: spec.twin for name, spec in OP_SPECS.items() if spec.family == "unary"}
#: The binary ops' twins (forward, partial quotients).
BINARY: dict[str, Binary] = {name: spec.twin for name, spec in OP_SPECS.items() if spec.family == "binary"}


def unary_rescale_factor(name: str, a: Array, r: Array, **params) -> Array:
    """The Rescale factor ``R = (f(a) − f(r))/(a − r)`` of unary op ``name`` (the
    derivative where ``a == r``), elementwise; ``a``, ``r`` of one shape, float64."""
    try:
        twin = UNARY[name]
    except KeyError:
        raise ValueError(f"unary op must be one of {sorted(UNARY)}, got {name!r}") from None
    return twin.factor(a, r, **params)


def binary_quotients(name: str, u_a, u_r, v_a, v_r) -> tuple[Array, Array]:
    """Shapley factors ``(m_u/m, m_v/m)`` of binary op ``name`` (elementwise, one shape):
    ``½ [Q_u(u_a, u_r; v_r) + Q_u(u_a, u_r; v_a)]`` and the same for ``v``."""
    try:
        twin = BINARY[name]
    except KeyError:
        raise ValueError(f"binary op must be one of {sorted(BINARY)}, got {name!r}") from None
    return _shapley_quotients(twin, u_a, u_r, v_a, v_r)
