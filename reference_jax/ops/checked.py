"""The table's rules behind checked signatures: :data:`OP_RULES` (one pair, arguments checked
with messages naming the argument at fault) and :func:`batched_op_multipliers` (a doubled
batch: ``vmap`` over pairs, then over the two halves, ``jit``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from reference_jax._checks import COMPILER_OPTIONS
from reference_jax.ops.table import OP_SPECS

Array = jax.Array
Operands = tuple[Array | None, ...]

# --------------------------------------------------------------------------- checks


def _operand_count_ok(name: str, n: int) -> bool:
    expected = len(OP_SPECS[name].operands)
    return n == expected or (name == "linear" and n == 2)


def _check_operands(name: str, actual, reference) -> tuple[Operands, Operands]:
    spec = OP_SPECS[name]
    for label, operands in (("actual", actual), ("reference", reference)):
        if not isinstance(operands, tuple | list) or not _operand_count_ok(name, len(operands)):
            raise AssertionError(
                f"{name}: {label} must be a tuple of its operands {spec.operands}, got "
                f"{type(operands).__name__} of length {len(operands) if isinstance(operands, tuple | list) else '-'}"
            )
    if len(actual) != len(reference):
        raise AssertionError(f"{name}: actual has {len(actual)} operands, reference {len(reference)}")
    out_a, out_r = [], []
    for operand, a, r in zip(spec.operands, actual, reference, strict=False):
        if a is None or r is None:
            if not (a is None and r is None and name == "linear" and operand == "b"):
                raise AssertionError(f"{name}: operand {operand} is None (only linear's b may be)")
            out_a.append(None)
            out_r.append(None)
            continue
        a, r = jnp.asarray(a), jnp.asarray(r)
        for label, value in (("actual", a), ("reference", r)):
            chex.assert_type(
                value, jnp.float64,
                custom_message=f"{name}: {label} {operand} must be float64 (the oracle's "
                f"precision; cast with .astype(numpy.float64)), got {value.dtype}",
            )
        chex.assert_equal_shape(
            [a, r],
            custom_message=f"{name}: reference {operand} must have the shape of actual "
            f"{tuple(a.shape)}, got {tuple(r.shape)}",
        )
        out_a.append(a)
        out_r.append(r)
    return tuple(out_a), tuple(out_r)


def _checked_rule(name: str) -> Callable[..., Operands]:
    spec = OP_SPECS[name]

    def rule(m, actual, reference, **params):
        actual, reference = _check_operands(name, actual, reference)
        m = jnp.asarray(m)
        chex.assert_type(m, jnp.float64, custom_message=f"{name}: m must be float64, got {m.dtype}")
        out = jax.eval_shape(functools.partial(spec.forward, **params), *actual)
        chex.assert_shape(
            m, out.shape,
            custom_message=f"{name}: m must have the output's shape {tuple(out.shape)}, "
            f"got {tuple(m.shape)}",
        )
        return tuple(spec.rule(m, actual, reference, **params))

    rule.__name__ = name
    rule.__qualname__ = f"OP_RULES[{name!r}]"
    rule.__doc__ = (
        f"Multipliers of the operands {spec.operands} of {name} for one pair "
        f"(see the module docstring).\n\n{spec.rule.__doc__ or ''}"
    )
    return rule


#: name -> checked ``rule(m, actual, reference, **params) -> tuple`` for one pair, float64.
OP_RULES: dict[str, Callable[..., Operands]] = {name: _checked_rule(name) for name in OP_SPECS}


# --------------------------------------------------------------------------- batched


def _is_array_param(value) -> bool:
    return isinstance(value, jax.Array | np.ndarray)


def _freeze(value):
    """Hashable static parameter (lists -> tuples), for the jit cache."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@functools.cache
def _batched_rule(name: str, static: tuple):
    rule = OP_RULES[name]
    static_params = dict(static)

    def one_half(m_half, actual, reference, arrays):
        def one_pair(m_pair, a, r):
            return rule(m_pair, a, r, **static_params, **arrays)

        return jax.vmap(one_pair)(m_half, actual, reference)

    return jax.jit(jax.vmap(one_half, in_axes=(0, None, None, None)), compiler_options=COMPILER_OPTIONS)


def batched_op_multipliers(name: str, m, actual, reference, **params) -> Operands:
    """Run ``OP_RULES[name]`` on a doubled batch: ``vmap`` over the ``N`` pairs, then over
    the two halves of ``m`` (one ``jit`` compilation per op, shapes and static params).

    Args:
      name: a key of :data:`OP_RULES`.
      m: ``(2, N, *s_out)`` float64 multipliers of the output, for both halves.
      actual, reference: tuples of ``(N, *s_k)`` float64 operands (``None`` for
        ``linear``'s absent bias).
      **params: the op's parameters; array-valued ones (``weight``, ``bias``,
        ``attn_mask``) are shared by all pairs, the others are static.

    Returns:
      One ``(2, N, *s_k)`` float64 multiplier per operand (``None`` for an absent one).
    """
    if name not in OP_RULES:
        raise ValueError(f"op must be one of {sorted(OP_RULES)}, got {name!r}")
    m = jnp.asarray(m)
    if m.ndim < 2 or m.shape[0] != 2:
        raise AssertionError(f"{name}: m must have shape (2, N, ...) (both halves), got {tuple(m.shape)}")
    for label, operands in (("actual", actual), ("reference", reference)):
        for i, value in enumerate(operands):
            if value is not None and (jnp.ndim(value) < 1 or jnp.shape(value)[0] != m.shape[1]):
                raise AssertionError(
                    f"{name}: {label}[{i}] must have the pair axis N={m.shape[1]} of m first, "
                    f"got shape {tuple(jnp.shape(value))}"
                )
    arrays = {k: jnp.asarray(v) for k, v in params.items() if _is_array_param(v)}
    static = tuple(sorted((k, _freeze(v)) for k, v in params.items() if not _is_array_param(v)))
    actual = tuple(None if a is None else jnp.asarray(a) for a in actual)
    reference = tuple(None if r is None else jnp.asarray(r) for r in reference)
    return _batched_rule(name, static)(m, actual, reference, arrays)
