"""Units: groups of primitives explained by one rule of :mod:`reference_jax.ops`, so that the
transformation and the torch handler agree on them (the torch side sees one op).

* ``jax.nn.softmax`` / ``jax.nn.logsumexp`` are inlined by JAX as the stable pattern
  ``reduce_max → (max −inf, select_n is_finite) → stop_gradient → sub → exp → reduce_sum →
  div / log + add``; ``jax.nn.log_softmax`` is a ``jit`` named ``log_softmax`` (or the same
  pattern ending ``log → sub``). :func:`find_units` recognises the pattern in a jaxpr; the
  whole group is then evaluated by its ``ops.OP_SPECS`` rule (softmax as ``exp ∘
  log_softmax``: bounded factors, no ``e^L`` cancellation) and the ``stop_gradient`` of the
  shift, which would otherwise drop part of Δ, is not evaluated at all.
* ``jax.nn.relu`` (a ``custom_jvp`` named relu): the relu rule (derivative 0 at 0, as torch).

Layer norm and RMS norm need no recognition: written as ``x − mean``, ``mean(xc²)``,
``xc · rsqrt(v + eps)`` their primitive-by-primitive rules *are* ``ops``' layer_norm /
rms_norm rules (mean and centring linear, square Rescale ``a + r``, rsqrt Rescale, Shapley
product with the broadcast scale). The variance written ``E[x²] − E[x]²`` (flax's
``LayerNorm``, ``jax.nn.standardize``) gets the same multiplier too: square's Rescale factor is
``a + r``, so ``m_var · ((x_a + x_r) − (μ_a + μ_r)) / n = m_var · (xc_a + xc_r) / n``, the
centred form's. Recognising it would change only the forward value (the user's own variance is
kept). The tests hold flax / equinox LayerNorm, ``jax.nn.standardize`` and flax RMSNorm to
``ops``' rules and to the torch handler.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax.extend.core import Literal, Var

from reference_jax import ops
from reference_jax.transform.pairs import Val, bind
from reference_jax.transform.rules import ruled

__all__ = ["Unit", "find_units", "group_forward", "named_unit", "named_value", "reduce_extremum", "unit_value"]

# Primitives allowed between reduce_max and the stop_gradient of the shift.
_SHIFT_CHAIN = {"broadcast_in_dim", "stop_gradient", "max", "select_n", "is_finite", "reshape",
                "expand_dims", "squeeze", "convert_element_type"}


class Unit(NamedTuple):
    """A recognised group: ``kind`` (an ``ops.OP_SPECS`` key), its input var ``x``, the
    reduced ``axes``, and the indices of the equations it replaces (the anchor excluded)."""

    kind: str
    x: Var
    axes: tuple[int, ...]
    covered: frozenset[int]


class _Graph(NamedTuple):
    producer: dict  # var -> equation index
    uses: dict  # var -> number of uses (equations and outputs)


def _graph(jaxpr) -> _Graph:
    producer, uses = {}, {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.outvars:
            producer[v] = i
        for v in eqn.invars:
            if isinstance(v, Var):
                uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if isinstance(v, Var):
            uses[v] = uses.get(v, 0) + 1
    return _Graph(producer, uses)


def _eqn_of(jaxpr, g: _Graph, var, name: str | None = None):
    if not isinstance(var, Var) or var not in g.producer:
        return None, None
    i = g.producer[var]
    eqn = jaxpr.eqns[i]
    if name is not None and eqn.primitive.name != name:
        return None, None
    return i, eqn


def _skip_broadcast(jaxpr, g, var):
    """Follow a ``broadcast_in_dim`` / ``reshape`` back to its operand; returns (var, indices)."""
    i, eqn = _eqn_of(jaxpr, g, var)
    if eqn is not None and eqn.primitive.name in ("broadcast_in_dim", "reshape", "expand_dims"):
        return eqn.invars[0], {i}
    return var, set()


def _shift_of(jaxpr, g, var, x):
    """Indices of the equations computing ``var`` as a shift of ``x`` (from reduce_max of x
    through :data:`_SHIFT_CHAIN` with literal-only side inputs), and its axes; else None."""
    covered, frontier, axes = set(), [var], None
    while frontier:
        v = frontier.pop()
        i, eqn = _eqn_of(jaxpr, g, v)
        if eqn is None:
            return None
        if i in covered:
            continue
        covered.add(i)
        if eqn.primitive.name == "reduce_max":
            if eqn.invars[0] is not x:
                return None
            axes = tuple(eqn.params["axes"])
            continue
        if eqn.primitive.name not in _SHIFT_CHAIN:
            return None
        for u in eqn.invars:
            if isinstance(u, Literal):
                continue
            j, producer = _eqn_of(jaxpr, g, u)
            if producer is not None and not any(isinstance(w, Var) for w in producer.invars) and (
                producer.primitive.name == "broadcast_in_dim"
            ):
                covered.add(j)  # a broadcast literal (e.g. the 0 of select_n)
                continue
            frontier.append(u)
    return (covered, axes) if axes is not None else None


def _exp_sum(jaxpr, g, e_var):
    """``e = exp(x − shift)``: returns (x, axes_of_shift, covered) or None."""
    i_exp, exp = _eqn_of(jaxpr, g, e_var, "exp")
    if exp is None:
        return None
    i_sub, sub = _eqn_of(jaxpr, g, exp.invars[0], "sub")
    if sub is None:
        return None
    x = sub.invars[0]
    shift_var, bcast = _skip_broadcast(jaxpr, g, sub.invars[1])
    found = _shift_of(jaxpr, g, shift_var, x)
    if found is None:
        return None
    covered, axes = found
    return x, axes, covered | bcast | {i_exp, i_sub}, sub.outvars[0]


def _sum_of(jaxpr, g, var, e_var, axes):
    """``var`` = (broadcast of) ``reduce_sum(e, axes)``: covered indices or None."""
    inner, bcast = _skip_broadcast(jaxpr, g, var)
    i, eqn = _eqn_of(jaxpr, g, inner, "reduce_sum")
    if eqn is None or eqn.invars[0] is not e_var or tuple(eqn.params["axes"]) != axes:
        return None
    return bcast | {i}


def _match(jaxpr, g, i, eqn):
    name = eqn.primitive.name
    if name == "div":  # softmax: e / broadcast(sum e)
        found = _exp_sum(jaxpr, g, eqn.invars[0])
        if found is None:
            return None
        x, axes, covered, _ = found
        total = _sum_of(jaxpr, g, eqn.invars[1], eqn.invars[0], axes)
        return None if total is None else Unit("softmax", x, axes, frozenset(covered | total))
    if name == "add":  # logsumexp: log(|sum e|) + shift
        i_log, log = _eqn_of(jaxpr, g, eqn.invars[0], "log")
        if log is None:
            return None
        arg = log.invars[0]
        i_abs, absolute = _eqn_of(jaxpr, g, arg, "abs")
        covered = {i_log}
        if absolute is not None:
            arg, covered = absolute.invars[0], covered | {i_abs}
        i_sum, total = _eqn_of(jaxpr, g, arg, "reduce_sum")
        if total is None:
            return None
        found = _exp_sum(jaxpr, g, total.invars[0])
        if found is None:
            return None
        x, axes, more, _ = found
        shift = _shift_of(jaxpr, g, eqn.invars[1], x)
        if shift is None or tuple(total.params["axes"]) != axes:
            return None
        covered |= more | shift[0] | {i_sum}
        # jax.nn.logsumexp also computes sign(sum) into a dropped output.
        for j, other in enumerate(jaxpr.eqns):
            if other.primitive.name == "sign" and other.invars[0] is arg:
                covered.add(j)
        return Unit("logsumexp", x, axes, frozenset(covered))
    if name == "sub":  # log_softmax: (x − shift) − log(broadcast(sum e))
        found_log = _skip_broadcast(jaxpr, g, eqn.invars[1])
        i_log, log = _eqn_of(jaxpr, g, found_log[0], "log")
        if log is None:
            return None
        e_sum = _skip_broadcast(jaxpr, g, log.invars[0])
        i_sum, total = _eqn_of(jaxpr, g, e_sum[0], "reduce_sum")
        if total is None:
            return None
        found = _exp_sum(jaxpr, g, total.invars[0])
        if found is None or found[3] is not eqn.invars[0]:
            return None
        x, axes, covered, _ = found
        if tuple(total.params["axes"]) != axes:
            return None
        return Unit("log_softmax", x, axes, frozenset(covered | found_log[1] | e_sum[1] | {i_log, i_sum}))
    return None


def _private(jaxpr, g, unit: Unit, anchor: int) -> bool:
    """Whether every value the unit computes inside is used only inside it (else the
    group cannot be replaced)."""
    inside = unit.covered | {anchor}
    for j in unit.covered:
        for v in jaxpr.eqns[j].outvars:
            if not isinstance(v, Var) or type(v).__name__ == "DropVar":
                continue
            users = sum(1 for k in inside for u in jaxpr.eqns[k].invars if u is v)
            if users != g.uses.get(v, 0):
                return False
    return True


@functools.lru_cache(maxsize=256)
def find_units(jaxpr) -> dict[int, Unit]:
    """Anchor equation index -> :class:`Unit` for every recognised group in ``jaxpr``."""
    g = _graph(jaxpr)
    units = {}
    for i, eqn in enumerate(jaxpr.eqns):
        unit = _match(jaxpr, g, i, eqn)
        if unit is not None and _private(jaxpr, g, unit, i):
            units[i] = unit
    return units


def _dim(axes: tuple[int, ...]):
    return axes[0] if len(axes) == 1 else axes


def unit_value(kind: str, x: Val, axes: tuple[int, ...], forward) -> Val:
    """The unit ``kind`` of ``ops.OP_SPECS`` on ``x``; ``forward(half)`` gives each half's
    value (the user's own computation)."""
    if not x.varying:
        return Val(forward(x.a))
    rule = ops.OP_SPECS[kind].rule
    params = {"dim": _dim(axes)}

    def backward(res, g):
        (x_a,), (x_r,) = res
        return (rule(g, (x_a,), (x_r,), **params)[0].astype(x_a.dtype),)

    return ruled(lambda v, _: forward(v[0]), lambda a, r, _: (a, r), backward, [x])


def group_forward(kind: str, axes: tuple[int, ...]):
    """The forward of a recognised group, as JAX computes it (one half)."""
    if kind == "softmax":
        return lambda x: jax.nn.softmax(x, axis=axes)
    if kind == "log_softmax":
        return lambda x: jax.nn.log_softmax(x, axis=axes)
    return lambda x: jax.nn.logsumexp(x, axis=axes)


def named_unit(eqn, vals: list[Val]):
    """``(kind, axes)`` when a ``jit`` / ``custom_jvp_call`` equation is a named unit, else None."""
    name = eqn.params.get("name")
    if eqn.primitive.name == "custom_jvp_call" and name == "relu" and len(vals) == 1:
        return "relu", ()
    if eqn.primitive.name in ("jit", "pjit") and name == "log_softmax" and len(vals) == 1:
        inner = eqn.params["jaxpr"].jaxpr
        for e in inner.eqns:
            if e.primitive.name == "reduce_max":
                return "log_softmax", tuple(e.params["axes"])
    return None


def relu_value(eqn, x: Val) -> Val:
    """``jax.nn.relu`` by the relu rule of ``ops`` (torch's derivative 0 at 0)."""

    def residual(actual, reference, shared):
        return ops.unary_rescale_factor("relu", actual[0], reference[0])

    return ruled(lambda v, _: bind(eqn, v)[0], residual, lambda r, g: (g * r,), [x])


def named_value(eqn, kind: str, axes, vals: list[Val]) -> Val:
    """The value of a named unit (see :func:`named_unit`) on its single operand."""
    if kind == "relu":
        return relu_value(eqn, vals[0])
    return unit_value(kind, vals[0], axes, lambda h: bind(eqn, (h,))[0])


def reduce_extremum(eqn, x: Val) -> Val:
    """``reduce_max`` / ``reduce_min`` over one axis by ``ops``' amax rule (the change routed
    through the two arg-maxima); the minimum as ``−max(−x)``."""
    (axis,) = eqn.params["axes"]
    sign = 1.0 if eqn.primitive.name == "reduce_max" else -1.0
    rule = ops.OP_SPECS["amax"].rule

    def backward(res, g):
        (x_a,), (x_r,) = res
        return (rule(g, (sign * x_a,), (sign * x_r,), dim=axis)[0].astype(x_a.dtype),)

    return ruled(lambda v, _: bind(eqn, v)[0], lambda a, r, _: (a, r), backward, [x])
