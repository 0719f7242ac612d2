"""``deeplift(fn)`` and ``deep_shap(fn, inputs, references)``: the public transformation."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from reference_jax.transform.errors import checked_finite
from reference_jax.transform.interpreter import interpret
from reference_jax.transform.pairs import Val

__all__ = ["deep_shap", "deeplift"]


def _check_pair(inputs, references):
    """Flattened leaves of both pytrees after checking that they match (structure, shapes,
    floating dtypes)."""
    leaves, tree = jax.tree.flatten(inputs)
    ref_leaves, ref_tree = jax.tree.flatten(references)
    if tree != ref_tree:
        raise ValueError(
            f"reference_jax.deeplift: references must have the pytree structure of inputs: {tree} vs "
            f"{ref_tree}. Pass one reference per input leaf (e.g. jax.tree.map(jnp.zeros_like, inputs))"
        )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(inputs)[0]]
    out_x, out_r = [], []
    for path, x, r in zip(paths, leaves, ref_leaves, strict=True):
        x, r = jnp.asarray(x), jnp.asarray(r)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"reference_jax.deeplift: input leaf {path or '<root>'} has dtype {x.dtype}; the explained "
                f"inputs must be floating. Close over integer inputs (token ids, lengths) in fn instead"
            )
        if x.shape != r.shape or x.dtype != r.dtype:
            raise ValueError(
                f"reference_jax.deeplift: reference leaf {path or '<root>'} is {r.dtype}{list(r.shape)}, the "
                f"input is {x.dtype}{list(x.shape)}; they must match (cast/broadcast the reference)"
            )
        out_x.append(x)
        out_r.append(r)
    return out_x, out_r, tree, paths


def deeplift(fn: Callable) -> Callable:
    """DeepLIFT multipliers of ``fn`` as a function transformation, in the manner of ``jax.grad``.

    ``fn`` maps one pytree of floating arrays to a scalar. ``deeplift(fn)(inputs, references)``
    returns the multipliers ``m`` with the pytree structure of ``inputs``, such that the
    attributions ``(inputs − references) · m`` sum, over all leaves and elements, to
    ``fn(inputs) − fn(references)`` to floating-point rounding. It composes with ``jax.jit``
    and ``jax.vmap`` (over pairs; over outputs through a selecting lambda) and works inside them.

    Raises :class:`~reference_jax.transform.DeepLiftError` for a primitive without a rule, a
    mask / branch / index that differs between the two halves, a ``stop_gradient`` of an
    input-dependent value (the message names the primitive and the line of ``fn``), or a
    multiplier that is not finite (a NaN / inf input, or a rule undefined in both halves such
    as ``atan2`` at ``(0, 0)``; the message names the input leaf).
    """

    @functools.wraps(fn)
    def multipliers(inputs, references):
        xs, rs, tree, paths = _check_pair(inputs, references)
        closed = jax.make_jaxpr(lambda *leaves: fn(jax.tree.unflatten(tree, leaves)))(*xs)
        (out,) = closed.out_avals if len(closed.out_avals) == 1 else (None,)
        if out is None or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(
                f"reference_jax.deeplift: fn must return one floating scalar, got {closed.out_avals}. "
                f"Explain one output at a time: deeplift(lambda x: fn(x)[k]), vmapped over k for all"
            )

        # Only the actual half is differentiated (the references are constants of the
        # derivative); every rule hands it the multiplier the reference half would get too.
        references = [jax.lax.stop_gradient(r) for r in rs]

        def actual_output(actual):
            args = [Val(a, r) for a, r in zip(actual, references, strict=True)]
            (y,) = interpret(closed.jaxpr, closed.consts, args)
            return y.a if y.varying else jnp.zeros((), out.dtype)

        grads = jax.grad(actual_output)(xs)
        return jax.tree.unflatten(tree, [checked_finite(m, p or "<root>", x, r)
                                         for m, p, x, r in zip(grads, paths, xs, rs, strict=True)])

    return multipliers


def deep_shap(fn: Callable, inputs, references):
    """DeepSHAP attributions: the DeepLIFT attributions ``(x − r_b) · m_b`` averaged over the
    references ``r_b`` (every leaf of ``references`` has a leading axis of references).

    They sum to ``fn(inputs) − mean_b fn(r_b)``; returns the pytree structure of ``inputs``.
    """
    explain = deeplift(fn)

    def one(reference):
        m = explain(inputs, reference)
        return jax.tree.map(lambda x, r, mm: (x - r) * mm, inputs, reference, m)

    per_reference = jax.vmap(one)(references)
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), per_reference)
