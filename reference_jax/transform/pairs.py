"""Values of the paired evaluation: an input-dependent ("varying") value is held as its actual
half ``a`` and its reference half ``r``; a value that does not depend on the inputs is held once
(``r is None``).

Only the actual half is differentiated: the reference half is computed from the references
under ``stop_gradient`` and each rule's backward gives the actual half the rule's multiplier
(the two halves' multipliers are equal by construction, so one is enough). Linear primitives
are applied to each half, so reverse-mode autodiff through them is the chain rule; nonlinear
primitives get their rule from :mod:`reference_jax.transform.rules`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

__all__ = ["Val", "bind", "bind_per_half", "flatten", "is_float", "promote", "unflatten"]


class Val(NamedTuple):
    """One jaxpr value: ``a`` (actual, or the constant) and ``r`` (reference; ``None`` for a
    value that does not depend on the inputs)."""

    a: Any
    r: Any = None

    @property
    def varying(self) -> bool:
        return self.r is not None

    @property
    def ref(self):
        """The reference half (the value itself for a constant)."""
        return self.a if self.r is None else self.r


def is_float(aval) -> bool:
    """Whether an abstract value is floating (carries a multiplier)."""
    return jnp.issubdtype(aval.dtype, jnp.floating)


def promote(val: Val, flag: bool = True) -> Val:
    """``val`` as a varying value (both halves equal) when ``flag`` asks for one."""
    if not flag or val.varying:
        return val
    return Val(val.a, val.a)


def bind(eqn, values: Sequence[Any]):
    """Apply ``eqn``'s primitive to plain operands; always returns a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # jax < 0.5: (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def bind_per_half(eqn, vals: Sequence[Val]) -> list[Val]:
    """``eqn`` applied to each half: the rule of every primitive linear in its varying
    operands (and of discrete ones, whose outputs carry no multiplier)."""
    outs_a = bind(eqn, [v.a for v in vals])
    outs_r = bind(eqn, [v.ref for v in vals])
    return [Val(a, r) for a, r in zip(outs_a, outs_r, strict=True)]


def flatten(vals: Sequence[Val]) -> list:
    """The arrays of ``vals``: ``a`` of each, then ``r`` of each varying one after it."""
    out = []
    for v in vals:
        out.extend((v.a, v.r) if v.varying else (v.a,))
    return out


def unflatten(arrays: Sequence, flags: Sequence[bool]) -> list[Val]:
    """Inverse of :func:`flatten` for the varying ``flags``."""
    it = iter(arrays)
    return [Val(next(it), next(it)) if f else Val(next(it)) for f in flags]
