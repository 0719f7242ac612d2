"""Brute-force Shapley values of a function of at most 16 players (the exactness yardstick).

Players are the elements of ``x`` (flattened, C order). The game is the single-reference
game ``v(S) = f(x on S, x_ref elsewhere)``, evaluated on all ``2**n`` coalitions at once
with ``jax.vmap``; then ``φ_i = Σ_{S ∌ i} |S|! (n−|S|−1)! / n! · (v(S ∪ {i}) − v(S))``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from reference_jax import _checks
from reference_jax._checks import COMPILER_OPTIONS

__all__ = ["MAX_PLAYERS", "exact_shapley"]

#: The largest number of players :func:`exact_shapley` accepts (2**16 evaluations of f).
MAX_PLAYERS = 16


def _coalition_masks(n: int) -> np.ndarray:
    """``(2**n, n)`` bool: row ``s`` is the coalition whose bit ``i`` of ``s`` is set."""
    s = np.arange(2**n, dtype=np.int64)[:, None]
    return ((s >> np.arange(n, dtype=np.int64)) & 1).astype(bool)


def _marginal_indices(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each player ``i``: the coalitions ``S`` without ``i``, ``S ∪ {i}``, and the
    Shapley weight of ``S``; each of shape ``(n, 2**(n-1))``."""
    s = np.arange(2**n, dtype=np.int64)
    sizes = np.array([bin(v).count("1") for v in range(2**n)], dtype=np.int64)
    weight_of_size = np.array(
        [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    )
    without, with_i, weights = [], [], []
    for i in range(n):
        bit = 1 << i
        w = s[(s & bit) == 0]
        without.append(w)
        with_i.append(w | bit)
        weights.append(weight_of_size[sizes[w]])
    return np.stack(without), np.stack(with_i), np.stack(weights)


def exact_shapley(
    f: Callable[[jax.Array], jax.Array], x: jax.Array, x_ref: jax.Array
) -> jax.Array:
    """Exact Shapley values of ``f`` at ``x`` against the single reference ``x_ref``.

    Args:
      f: maps an array shaped like ``x`` to a scalar or a 1-D array of ``K`` outputs;
        must be traceable by ``jax.vmap``.
      x: actual input, any shape with at most :data:`MAX_PLAYERS` elements, floating.
      x_ref: reference input, same shape as ``x``.

    Returns:
      ``φ`` shaped ``x.shape`` (scalar ``f``) or ``(K, *x.shape)``. Efficiency:
      ``φ.sum() == f(x) − f(x_ref)`` (per output).

    Raises:
      ValueError: more than :data:`MAX_PLAYERS` players, or ``f`` returns rank > 1.
    """
    x = _checks.array("x", x)
    x_ref = _checks.array("x_ref", x_ref, x.dtype)
    chex.assert_shape(
        x_ref, x.shape,
        custom_message=f"x_ref must have the shape of x, {x.shape}, got {x_ref.shape}",
    )
    n = int(x.size)
    if n > MAX_PLAYERS:
        raise ValueError(
            f"exact_shapley enumerates 2**n coalitions and supports at most "
            f"{MAX_PLAYERS} players; x has {n} elements (players)"
        )
    out = jax.eval_shape(f, x)
    if len(out.shape) > 1:
        raise ValueError(
            f"f must return a scalar or a 1-D array, got shape {tuple(out.shape)}"
        )
    if n == 0:
        return jnp.zeros(tuple(out.shape) + x.shape, x.dtype)

    without, with_i, weights = _marginal_indices(n)
    run = jax.jit(functools.partial(_shapley, f), compiler_options=COMPILER_OPTIONS)
    return run(x, x_ref, _coalition_masks(n), without, with_i, weights.astype(x.dtype))


def _shapley(f, x, x_ref, masks, without, with_i, weights):
    """Evaluate the game on every coalition (vmap) and sum the weighted marginals."""
    flat_a, flat_r = x.reshape(-1), x_ref.reshape(-1)

    def value(mask):
        return f(jnp.where(mask, flat_a, flat_r).reshape(x.shape))

    v = jax.vmap(value)(masks)  # (2**n,) or (2**n, K)
    marginals = v[with_i] - v[without]  # (n, 2**(n-1)[, K])
    if v.ndim == 1:
        return jnp.sum(weights * marginals, axis=-1).reshape(x.shape)
    phi = jnp.einsum("is,isk->ki", weights.astype(v.dtype), marginals)  # (K, n)
    return phi.reshape((v.shape[1], *x.shape))
