"""Argument checks for the public boundary (private helpers).

Every check is a ``chex`` assertion (an ``AssertionError`` at trace time; shapes and
dtypes are static, so these cost nothing inside ``jit``) whose message names the
argument at fault and what it must match, e.g.
``x must have shape (I,)=(3,) to match params.w_ih, got (4,)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp


def _fmt(symbols: Sequence[str]) -> str:
    return "(" + ", ".join(symbols) + ("," if len(symbols) == 1 else "") + ")"


def array(name: str, value, dtype=None) -> jax.Array:
    """``value`` as a jax array of a floating dtype (``dtype`` if given)."""
    if value is None:
        raise AssertionError(f"{name} must be an array, got None")
    value = jnp.asarray(value)
    chex.assert_type(
        value,
        float,
        custom_message=f"{name} must have a floating dtype, got {value.dtype}",
    )
    if dtype is not None:
        chex.assert_type(
            value,
            dtype,
            custom_message=(
                f"{name} must have dtype {jnp.dtype(dtype).name} (the dtype of params), "
                f"got {value.dtype}"
            ),
        )
    return value


def shape(name: str, value: jax.Array, symbols: Sequence[str], dims: Sequence[int], what: str):
    """Assert ``value.shape == dims``; ``symbols`` name the dims, ``what`` the source."""
    dims = tuple(int(d) for d in dims)
    chex.assert_shape(
        value,
        dims,
        custom_message=(
            f"{name} must have shape {_fmt(symbols)}={dims} to match {what}, "
            f"got {tuple(value.shape)}"
        ),
    )


def rank(name: str, value: jax.Array, expected: int, symbols: Sequence[str]):
    """Assert ``value.ndim == expected``."""
    chex.assert_rank(
        value,
        expected,
        custom_message=(
            f"{name} must have rank {expected}, shape {_fmt(symbols)}, got shape "
            f"{tuple(value.shape)}"
        ),
    )


def rows_divisible(name: str, value: jax.Array, gates: int, what: str):
    """Assert the leading dim of ``value`` is a positive multiple of ``gates``."""
    n = value.shape[0] if value.ndim else 0
    if n == 0 or n % gates:
        raise AssertionError(
            f"{name} must have {gates}*H rows ({what}), got shape {tuple(value.shape)}"
        )


def batch(names_values: Sequence[tuple[str, object]]) -> int:
    """Assert every leaf of every ``(name, pytree)`` has one common leading axis ``B``."""
    size, first = None, None
    for name, tree in names_values:
        leaves = jax.tree_util.tree_leaves(tree)
        for i, leaf in enumerate(leaves):
            label = name if len(leaves) == 1 else f"{name}[{i}]"
            leaf_shape = tuple(jnp.shape(leaf))
            if not leaf_shape:
                raise AssertionError(
                    f"{label} must have a leading batch axis B, got a scalar"
                )
            if size is None:
                size, first = leaf_shape[0], label
            elif leaf_shape[0] != size:
                raise AssertionError(
                    f"{label} must have batch size B={size} (the leading axis of {first}), "
                    f"got shape {leaf_shape}"
                )
    return int(size or 0)


#: XLA options of the exported ``batched_*`` functions. The oracle's graphs are small and
#: compiled once per shape, so compile time dominates: LLVM's optimisation passes are
#: skipped (about 3x faster compiles; IEEE float semantics are the same either way).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def batched(fn, arg_names: Sequence[str], doc: str, static_argnames: Sequence[str] = ()):
    """``jax.jit(jax.vmap(fn))`` over every argument after ``params`` (params shared),
    compiled with :data:`COMPILER_OPTIONS`.

    The batch axis is the leading axis of every data leaf; ``static_argnames`` (e.g.
    ``nonlinearity``) follow the data arguments, by position or keyword, unbatched and
    static under ``jit``, with the defaults of ``fn``.
    """
    arg_names, static_argnames = tuple(arg_names), tuple(static_argnames)
    fn_params = inspect.signature(fn).parameters

    def impl(params, *data, **static):
        static.update(zip(static_argnames, data[len(arg_names):], strict=False))
        data = data[: len(arg_names)]
        if len(data) != len(arg_names):
            raise TypeError(
                f"batched_{fn.__name__} takes params and {len(arg_names)} data "
                f"arguments {arg_names}, got {len(data)}"
            )
        batch(list(zip(arg_names, data, strict=True)))
        per_example = functools.partial(fn, **static)
        return jax.vmap(per_example, in_axes=(None,) + (0,) * len(data))(params, *data)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    impl.__signature__ = inspect.Signature(
        [inspect.Parameter(name, positional) for name in ("params", *arg_names)]
        + [inspect.Parameter(name, positional, default=fn_params[name].default)
           for name in static_argnames]
    )
    impl.__name__ = f"batched_{fn.__name__}"
    impl.__qualname__ = impl.__name__
    impl.__doc__ = doc
    return jax.jit(impl, static_argnames=static_argnames, compiler_options=COMPILER_OPTIONS)


def state(name: str, value, names: Sequence[str]) -> tuple:
    """Assert ``value`` is a tuple (or list) of ``len(names)`` arrays, as every cell's state
    and output multipliers are (``(h,)`` for GRU / RNN, ``(h, c)`` for LSTM)."""
    if not isinstance(value, tuple | list) or len(value) != len(names):
        got = f"a {type(value).__name__} of length {len(value)}" if isinstance(value, tuple | list) else (
            f"a {type(value).__name__}")
        raise AssertionError(
            f"{name} must be a tuple ({', '.join(names)}{',' if len(names) == 1 else ''}), got {got}"
        )
    return tuple(value)
