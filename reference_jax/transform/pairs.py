"""Values of the paired evaluation: an input-dependent ("varying") value is held as a stacked
pair ``(2, ...)`` (actual, reference); a value that does not depend on the inputs is held once.

Every linear primitive is applied to each half (``vmap`` over the pair axis), so reverse-mode
autodiff through it is the chain rule; nonlinear primitives get their rule from
:mod:`reference_jax.transform.rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Val", "bind", "bind_per_half", "is_float", "per_half", "promote"]


class Val(NamedTuple):
    """One jaxpr value: ``value`` is ``(2, *shape)`` when ``varying`` (actual, reference),
    else ``shape`` itself."""

    value: Any
    varying: bool


def is_float(aval) -> bool:
    """Whether an abstract value is floating (carries a multiplier)."""
    return jnp.issubdtype(aval.dtype, jnp.floating)


def promote(val: Val, flag: bool = True) -> Val:
    """``val`` as a pair (both halves equal) when ``flag`` asks for a varying value."""
    if not flag or val.varying:
        return val
    value = jnp.asarray(val.value)
    return Val(jnp.broadcast_to(value, (2, *value.shape)), True)


def bind(eqn, values: Sequence[Any]):
    """Apply ``eqn``'s primitive to unpaired operands; always returns a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = ()
    if isinstance(params, tuple):  # jax < 0.5: (subfuns, params)
        subfuns, params = params
    out = eqn.primitive.bind(*subfuns, *values, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def per_half(fn: Callable[..., Any], vals: Sequence[Val]):
    """``fn`` applied to each half of the varying operands (the others shared): ``vmap``."""
    axes = [0 if v.varying else None for v in vals]
    return jax.vmap(fn, in_axes=axes)(*[v.value for v in vals])


def bind_per_half(eqn, vals: Sequence[Val]) -> list[Val]:
    """``eqn`` applied to each half: the rule of every primitive linear in its varying
    operands (and of discrete ones, whose outputs carry no multiplier)."""
    outs = per_half(lambda *xs: bind(eqn, xs), vals)
    return [Val(o, True) for o in outs]
