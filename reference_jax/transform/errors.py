"""Named errors of the DeepLIFT transformation, and the check that a value is the same in
both halves of a pair (where a rule needs it: a ``select_n`` predicate, an index, a ``cond``
branch, a ``stop_gradient``).

Every message names the primitive, where it is in the user's code (JAX's source info of the
equation) and what to do about it.
"""

from __future__ import annotations

import jax
import numpy as np

try:  # JAX's private helper is the only way to name a jaxpr equation's line; optional
    from jax._src import source_info_util
except ImportError:  # pragma: no cover - a JAX that moved it: messages say "an unknown place"
    source_info_util = None

__all__ = ["DeepLiftError", "checked_finite", "equal_halves", "unsupported", "where"]


class DeepLiftError(ValueError):
    """The function cannot be explained exactly: a primitive without a rule, a mask, branch or
    index that differs between the actual and the reference half, or a dropped difference."""


def where(eqn) -> str:
    """``"<primitive> at <file>:<line> (<function>)"`` for a jaxpr equation."""
    try:
        place = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - source info is best effort across JAX versions (or absent)
        place = "an unknown place"
    text = str(eqn).replace("\n", " ")
    if len(text) > 160:
        text = text[:157] + "..."
    return f"'{eqn.primitive.name}' at {place} (equation: {text})"


def unsupported(eqn, why: str, fix: str) -> DeepLiftError:
    """A :class:`DeepLiftError` naming ``eqn``, the reason and a fix."""
    return DeepLiftError(f"reference_jax.deeplift: {where(eqn)}: {why}. {fix}")


def _concrete(value):
    """``value`` as a numpy array when it is known now (not a tracer of a jit/vmap), else None."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


_MASK_FIX = (
    "Choose a reference on the same side of this branch/mask/index, or rewrite it with an op that has "
    "a rule (jnp.maximum / jnp.minimum / jax.nn.relu instead of jnp.where)"
)


def equal_halves(actual, reference, eqn, what: str, fix: str = _MASK_FIX):
    """``actual`` after checking that it equals ``reference`` (the two halves of one value).

    Known values are checked at once; traced ones (under ``jit`` / ``vmap``) by a host
    callback whose error surfaces as a ``JaxRuntimeError`` carrying the same message.
    """
    message = (
        f"reference_jax.deeplift: {where(eqn)}: the {what} differs between the actual input and "
        f"the reference, and no DeepLIFT rule applies to it. {fix}"
    )
    a, r = _concrete(actual), _concrete(reference)
    if a is not None and r is not None:
        if not np.array_equal(a, r):
            raise DeepLiftError(message)
        return actual

    def check(a, r):
        if not np.array_equal(np.asarray(a), np.asarray(r)):
            raise DeepLiftError(message)
        return np.asarray(a)

    shape = jax.ShapeDtypeStruct(jax.numpy.shape(actual), jax.numpy.result_type(actual))
    # A float value under the transformation's own grad is a tracer even when eager: the check
    # carries no derivative (the value is constant once both halves are equal).
    a, r = jax.lax.stop_gradient(actual), jax.lax.stop_gradient(reference)
    return jax.pure_callback(check, shape, a, r, vmap_method="broadcast_all")


_NON_FINITE_FIX = (
    "Check that the inputs and references are finite, and move the reference off the point where a rule is "
    "undefined in both halves (atan2 at (0, 0), log / rsqrt / a negative power at 0, x / y at y = 0), "
    "e.g. by a small offset of the reference"
)


def _non_finite_message(path: str, count: int, size: int) -> str:
    return (
        f"reference_jax.deeplift: {count} of the {size} multipliers of input leaf {path} are not finite "
        f"(NaN or inf), so its attributions would be meaningless. {_NON_FINITE_FIX}"
    )


def checked_finite(multipliers, path: str, actual=None, reference=None):
    """``multipliers`` after checking that every element is finite, and so are the input leaf
    ``actual`` and its ``reference`` where given (an inf input can meet a multiplier of 0, a
    saturated tanh: its attribution would be NaN). Known values are checked at once; traced
    ones (under ``jit`` / ``vmap``) by a host callback whose error surfaces as a
    ``JaxRuntimeError`` carrying the same :class:`DeepLiftError` message. The leaves' check
    counts their non-finite elements where they are: only the two counts reach the host."""
    leaves = () if actual is None else (actual, reference)
    size = int(np.size(actual)) if leaves else 0
    counts = tuple(size - jax.numpy.count_nonzero(jax.numpy.isfinite(jax.lax.stop_gradient(v))) for v in leaves)

    def check(m, *bad_leaves):
        m = np.asarray(m)
        for name, bad in zip(("input", "reference"), bad_leaves, strict=False):
            bad = np.asarray(bad)  # one count per pair under vmap
            if bad.any():
                raise DeepLiftError(
                    f"reference_jax.deeplift: the {name} leaf {path} holds {int(bad.sum())} NaN or inf element(s) "
                    f"of {size * bad.size}; its attributions would be NaN. {_NON_FINITE_FIX}"
                )
        bad = int(m.size - np.count_nonzero(np.isfinite(m)))
        if bad:
            raise DeepLiftError(_non_finite_message(path, bad, int(m.size)))
        return m

    known = [_concrete(v) for v in (multipliers, *counts)]
    if all(k is not None for k in known):
        check(*known)
        return multipliers
    shape = jax.ShapeDtypeStruct(jax.numpy.shape(multipliers), jax.numpy.result_type(multipliers))
    return jax.pure_callback(check, shape, multipliers, *counts, vmap_method="broadcast_all")
