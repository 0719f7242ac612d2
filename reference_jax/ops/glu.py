"""glu: ``y = a·σ(b)`` (sigmoid Rescale, then the Shapley product)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reference_jax.rescale import average, rescale


def _glu(x, dim=-1):
    a, b = jnp.split(x, 2, axis=dim)
    return a * jax.nn.sigmoid(b)


def _glu_rule(m, actual, reference, dim=-1):
    """``y = a·σ(b)``: ``m_a = m·mean(σ(b))``, ``m_b = m·mean(a)·R_σ(b)``."""
    (x_a,), (x_r,) = actual, reference
    if x_a.shape[dim] % 2:
        raise AssertionError(f"glu needs an even size along dim {dim}, got shape {tuple(x_a.shape)}")
    a_a, b_a = jnp.split(x_a, 2, axis=dim)
    a_r, b_r = jnp.split(x_r, 2, axis=dim)
    m_a = m * average(jax.nn.sigmoid(b_a), jax.nn.sigmoid(b_r))
    m_b = m * average(a_a, a_r) * rescale("sigmoid", b_a, b_r)
    return (jnp.concatenate([m_a, m_b], axis=dim),)
