"""Higher-order primitives: their inner jaxprs are interpreted on pairs, recursively.

* ``scan``: a ``lax.scan`` whose body interprets the body jaxpr; carries that become varying
  in the body are varying from the start (a fixed point of the varying flags); a varying
  value is scanned as its two halves.
* ``while`` with a trip count that does not depend on the inputs: the count is computed once
  (the loop run on the constant part of the carry), then the body runs under ``lax.scan``
  (reverse-mode autodiff, which the multipliers are, cannot go through a ``while_loop``).
* ``cond``: the branch index must be the same in both halves (checked), then ``lax.switch``
  over the interpreted branches.
* ``jit`` / ``pjit`` / ``closed_call`` / ``core_call`` / ``remat2`` (``jax.checkpoint``) /
  ``custom_jvp_call`` / ``custom_vjp_call``: the inner (primal) jaxpr, inline.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxpr_as_fun

from reference_jax.transform.errors import unsupported
from reference_jax.transform.pairs import Val, flatten, promote, unflatten

__all__ = ["CALLS", "cond_rule", "inner_call", "scan_rule", "while_rule"]

Interpret = Callable  # (jaxpr, consts, vals) -> list[Val]


def _flags(interpret: Interpret, closed, in_vals: list[Val]) -> list[bool]:
    """The varying flags of ``closed``'s outputs for inputs shaped and flagged as
    ``in_vals`` (an abstract evaluation of the interpreter: nothing runs)."""
    result = []
    in_flags = [v.varying for v in in_vals]

    def probe(arrays):
        outs = interpret(closed.jaxpr, closed.consts, unflatten(arrays, in_flags))
        result[:] = [o.varying for o in outs]
        return flatten(outs)

    specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flatten(in_vals)]
    jax.eval_shape(probe, specs)
    return result


def _carry_flags(interpret, body, consts: list[Val], carry: list[Val], rest: list[Val], n_carry: int) -> list[bool]:
    """Fixed point of the carries' varying flags through ``body``."""
    flags = [c.varying for c in carry]
    while True:
        ins = consts + [promote(c, f) for c, f in zip(carry, flags, strict=True)] + rest
        out = _flags(interpret, body, ins)[:n_carry]
        new = [a or b for a, b in zip(flags, out, strict=True)]
        if new == flags:
            return flags
        flags = new


def _scan(interpret, body, consts: list[Val], carry: list[Val], xs: list[Val], flags, length, reverse, unroll):
    """``lax.scan`` of the interpreted ``body`` (inputs: consts, carry, xs); returns Vals."""
    carry = [promote(c, f) for c, f in zip(carry, flags, strict=True)]
    n_carry = len(carry)
    x_flags = [x.varying for x in xs]
    y_flags: list[bool] = []

    def step(carry_arrays, x_arrays):
        ins = consts + unflatten(carry_arrays, flags) + unflatten(x_arrays, x_flags)
        outs = interpret(body.jaxpr, body.consts, ins)
        new_carry = [promote(o, f) for o, f in zip(outs[:n_carry], flags, strict=True)]
        y_flags[:] = [o.varying for o in outs[n_carry:]]
        return flatten(new_carry), flatten(outs[n_carry:])

    carry_out, ys = jax.lax.scan(step, flatten(carry), flatten(xs), length=length, reverse=reverse, unroll=unroll)
    return unflatten(carry_out, flags) + unflatten(ys, y_flags)


def _scan_counts(params) -> tuple[int, int]:
    """``(n_consts, n_carry)`` of a ``scan`` equation, whose operands are consts, then carry,
    then xs.

    jax 0.10 states the counts as ``num_consts`` / ``num_carry``. jax 0.12 replaced both by
    ``ft_in``, a flat tree (``FTTuple``) of the operands grouped as ``(consts, carry, xs)``:
    ``len`` and indexing of ``ft_in`` itself count leaves, so the counts are the lengths of
    its three groups (``unpack()``, as jax's own ``_scan_impl`` reads them). Its ``ft_out``
    (carry, then the ys the body returns; ys that only forward an xs are pruned from the
    equation and the body alike) is not needed: the equation's outputs are the body's.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)


def scan_rule(interpret, eqn, vals: list[Val]) -> list[Val]:
    p = eqn.params
    n_consts, n_carry = _scan_counts(p)
    consts, carry, xs = vals[:n_consts], vals[n_consts : n_consts + n_carry], vals[n_consts + n_carry :]
    x_slices = [Val(jnp.zeros(v.aval.shape[1:], v.aval.dtype)) for v in eqn.invars[n_consts + n_carry :]]
    x_slices = [promote(s, x.varying) for s, x in zip(x_slices, xs, strict=True)]
    flags = _carry_flags(interpret, p["jaxpr"], consts, carry, x_slices, n_carry)
    return _scan(interpret, p["jaxpr"], consts, carry, xs, flags, p["length"], p["reverse"], p["unroll"])


def _trip_count(eqn, vals: list[Val], flags) -> int:
    """The number of iterations of a ``while`` whose predicate depends only on the constant
    part of the carry, run once on that part (varying parts as zeros: they cannot affect it)."""
    p = eqn.params
    try:
        concrete = [np.zeros(jnp.shape(v.a), jnp.result_type(v.a)) if v.varying else np.asarray(v.a) for v in vals]
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise unsupported(
            eqn, "the trip count of this while loop is not known when the transformation traces it "
            "(its bounds are traced values, e.g. arguments of a jit)",
            "Give the loop static bounds (lax.fori_loop with Python ints becomes a scan) or use lax.scan",
        ) from None
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = concrete[:nc], concrete[nc : nc + nb], concrete[nc + nb :]
    cond, body = jaxpr_as_fun(p["cond_jaxpr"]), jaxpr_as_fun(p["body_jaxpr"])

    def counted(state):
        count, carry = state
        return count + 1, body(*body_consts, *carry)

    with jax.ensure_compile_time_eval():
        count, _ = jax.lax.while_loop(lambda s: cond(*cond_consts, *s[1])[0], counted, (0, init))
    return int(count)


def while_rule(interpret, eqn, vals: list[Val]) -> list[Val]:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = vals[:nc], vals[nc : nc + nb], vals[nc + nb :]
    flags = _carry_flags(interpret, p["body_jaxpr"], body_consts, carry, [], len(carry))
    pred = _flags(interpret, p["cond_jaxpr"], cond_consts + [promote(c, f) for c, f in zip(carry, flags, strict=True)])
    if pred[0]:
        raise unsupported(
            eqn, "the number of iterations of this while loop depends on the explained inputs, so the "
            "actual input and the reference may loop a different number of times",
            "Make the loop's bounds independent of the inputs (lax.fori_loop / lax.scan)",
        )
    length = _trip_count(eqn, vals, flags)
    outs = _scan(interpret, p["body_jaxpr"], body_consts, carry, [], flags, length, False, 1)
    return outs


def cond_rule(interpret, eqn, vals: list[Val]) -> list[Val]:
    """``cond``: the index (made constant by the interpreter's equal-halves check)."""
    index, operands = vals[0], vals[1:]
    branches = eqn.params["branches"]
    out_flags = [False] * len(eqn.outvars)
    for branch in branches:
        out_flags = [a or b for a, b in zip(out_flags, _flags(interpret, branch, operands), strict=True)]
    in_flags = [v.varying for v in operands]

    def run(branch):
        def fn(*arrays):
            outs = interpret(branch.jaxpr, branch.consts, unflatten(arrays, in_flags))
            return flatten([promote(o, f) for o, f in zip(outs, out_flags, strict=True)])

        return fn

    outs = jax.lax.switch(index.a, [run(b) for b in branches], *flatten(operands))
    return unflatten(outs, out_flags)


def inner_call(interpret, eqn, vals: list[Val]) -> list[Val]:
    """Call-like primitives: interpret the inner (primal) jaxpr inline."""
    p = eqn.params
    inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
    if hasattr(inner, "jaxpr"):  # ClosedJaxpr
        return interpret(inner.jaxpr, inner.consts, vals)
    return interpret(inner, (), vals)


#: call-like primitive names -> rule
CALLS: dict[str, Callable] = {
    name: inner_call
    # remat2: jax.checkpoint's primitive on jax 0.10 and 0.12 alike ("remat" / "checkpoint" are older names)
    for name in ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "remat2", "custom_jvp_call",
                 "custom_vjp_call", "custom_vjp_call_jaxpr")
}
CALLS.update(scan=scan_rule, cond=cond_rule)
CALLS["while"] = while_rule
