"""The paired interpreter: evaluates a jaxpr with every input-dependent value held as a pair
``(2, ...)`` (actual, reference) and every nonlinear primitive replaced by its DeepLIFT rule
(a ``custom_vjp``), so that reverse-mode autodiff of the result gives the multipliers.

Dispatch per equation, in order:

1. No varying operand: the primitive itself.
2. Only non-float outputs (comparisons, integer arithmetic, argmax, ...): each half; they
   carry no multiplier.
3. A varying non-float operand of a float-producing equation (a ``select_n`` predicate, an
   index, a ``cond`` branch index, an int cast to float) must be equal in both halves
   (checked, :func:`~reference_jax.transform.errors.equal_halves`); it is then constant.
4. Units (:mod:`~reference_jax.transform.units`), higher-order primitives
   (:mod:`~reference_jax.transform.control`), linear primitives (each half), elementwise
   nonlinear ones and ``dot_general`` (:mod:`~reference_jax.transform.rules`).
5. Anything else: :class:`~reference_jax.transform.errors.DeepLiftError` naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from jax.extend.core import Literal

from reference_jax.transform import control, rules, units
from reference_jax.transform.errors import equal_halves, unsupported
from reference_jax.transform.pairs import Val, bind, bind_per_half, is_float

__all__ = ["LINEAR", "covered_primitives", "interpret"]

#: Primitives linear in their varying operands jointly (any constant operands fixed):
#: the chain rule, applied to each half.
LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "dynamic_slice", "dynamic_update_slice", "gather", "scatter-add",
    "scatter", "concatenate", "pad", "reduce_sum", "rev", "copy",
    "select_n", "cumsum", "reduce_precision", "sharding_constraint", "split", "real", "conj",
    "convert_element_type", "optimization_barrier", "psum", "mesh_cast", "stack", "unstack", "tile",
})

#: Linear in each operand, bilinear in two: ``dot_general`` (two varying: the bilinear rule).
_ONE_VARYING_LINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})


def _rounds_below_float32(eqn, val: Val) -> bool:
    """Whether a cast or reduce_precision rounds a float to fewer significant bits than float32
    has (float16, bfloat16, fp8): the torch handler refuses those dtypes too."""
    source = jnp.result_type(val.a)
    if not jnp.issubdtype(source, jnp.floating):
        return False
    if eqn.primitive.name == "reduce_precision":
        return eqn.params["mantissa_bits"] < min(23, jnp.finfo(source).nmant)
    target = eqn.params["new_dtype"]
    return (jnp.issubdtype(target, jnp.floating) and jnp.finfo(target).nmant < 23
            and jnp.finfo(target).nmant < jnp.finfo(source).nmant)


def covered_primitives() -> list[str]:
    """Every primitive name the interpreter has a rule for (documentation and tests)."""
    names = set(LINEAR) | _ONE_VARYING_LINEAR | set(rules.UNARY_FACTORS) | set(rules.BINARY_OPS)
    names |= set(control.CALLS) | {"reduce_max", "reduce_min", "clamp", "stop_gradient"}
    return sorted(names)


def interpret(jaxpr, consts: Sequence, args: Sequence[Val]) -> list[Val]:
    """Evaluate ``jaxpr`` on paired values; returns one :class:`Val` per output."""
    env: dict = {}

    def read(v) -> Val:
        return Val(v.val) if isinstance(v, Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = Val(value)
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    found = units.find_units(jaxpr)
    skipped = set().union(*(u.covered for u in found.values())) if found else set()
    for i, eqn in enumerate(jaxpr.eqns):
        if i in skipped:
            continue
        if all(type(v).__name__ == "DropVar" for v in eqn.outvars) and not eqn.effects:
            continue
        if i in found:
            unit = found[i]
            outs = [units.unit_value(unit.kind, env[unit.x], unit.axes, units.group_forward(unit.kind, unit.axes))]
        else:
            outs = _equation(eqn, [read(v) for v in eqn.invars])
        for var, out in zip(eqn.outvars, outs, strict=True):
            env[var] = out
    return [read(v) for v in jaxpr.outvars]


def _equation(eqn, vals: list[Val]) -> list[Val]:
    if not any(v.varying for v in vals):
        return [Val(o) for o in bind(eqn, [v.a for v in vals])]
    if not any(is_float(v.aval) for v in eqn.outvars):
        return bind_per_half(eqn, vals)
    vals = [
        Val(equal_halves(v.a, v.r, eqn, f"operand {k} ({var.aval.str_short()})"))
        if v.varying and not is_float(var.aval) else v
        for k, (v, var) in enumerate(zip(vals, eqn.invars, strict=True))
    ]
    if not any(v.varying for v in vals):
        return [Val(o) for o in bind(eqn, [v.a for v in vals])]
    return _rule(eqn, vals)


def _rule(eqn, vals: list[Val]) -> list[Val]:
    name = eqn.primitive.name
    named = units.named_unit(eqn, vals)
    if named is not None:
        return [units.named_value(eqn, *named, vals)]
    if name in control.CALLS:
        return control.CALLS[name](interpret, eqn, vals)
    if name == "stop_gradient":
        fix = ("stop_gradient would drop this value's share of the difference from the attributions; "
               "remove it from the explained function (jax.nn.softmax / logsumexp's own are recognised)")
        return [Val(equal_halves(vals[0].a, vals[0].r, eqn, "value under stop_gradient", fix))]
    n_varying = sum(v.varying for v in vals)
    if name in ("convert_element_type", "reduce_precision") and n_varying and _rounds_below_float32(eqn, vals[0]):
        raise unsupported(
            eqn, f"'{name}' rounds an input-dependent value to fewer than float32's 24 significant bits, a "
            "step function whose rounding (up to 4e-3 of the value in bfloat16) no DeepLIFT rule can share "
            "out exactly",
            "Compute the explained function in float32 or float64 (flax: dtype=jnp.float32; no .astype to "
            "bfloat16 / float16)",
        )
    if name in LINEAR or (name in _ONE_VARYING_LINEAR and n_varying == 1):
        return bind_per_half(eqn, vals)
    if name == "div" and not vals[1].varying:
        return bind_per_half(eqn, vals)  # x / c: linear
    if name in rules.UNARY_FACTORS:
        return [rules.rescaled(eqn, vals, 0, rules.UNARY_FACTORS[name](eqn))]
    if name in rules.BINARY_OPS:
        if n_varying == 2:
            return [rules.shapley_binary(eqn, vals)]
        return [rules.binary_rescaled(eqn, vals)]
    if name == "dot_general":
        return [rules.bilinear(eqn, vals)]
    if name == "clamp" and n_varying == 1 and vals[1].varying:
        return [rules.rescaled(eqn, vals, 1, rules.clamp_factor)]
    if name in ("reduce_max", "reduce_min") and len(eqn.params["axes"]) == 1:
        return [units.reduce_extremum(eqn, vals[0])]
    raise unsupported(
        eqn, f"no DeepLIFT rule for '{name}' with {n_varying} input-dependent operand(s)",
        "Rewrite this step with primitives that have rules (reference_jax.transform.covered_primitives()), "
        "or keep it out of the explained function",
    )
