"""amax / max over one dim: the change routed through the arg-maxima of both halves."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _amax(x, dim, keepdim=False):
    return jnp.max(x, axis=dim, keepdims=keepdim)


def _amax_rule(m, actual, reference, dim, keepdim=False):
    """Two routes: the arg-max ``j*`` of the actual and ``k*`` of the reference (first
    index on ties). ``j* == k*``: ``m_{j*} = m``. Otherwise each route carries half of
    ``Δy``: ``m_{j*} = m (Δy/2)/Δx_{j*}``, ``m_{k*} = m (Δy/2)/Δx_{k*}``; a route with
    ``Δx = 0`` hands its half to the other. All other entries get 0."""
    (x_a,), (x_r,) = actual, reference
    if not isinstance(dim, int):
        raise AssertionError(f"amax supports one int dim, got {dim!r}")
    j = jnp.argmax(x_a, axis=dim, keepdims=True)
    k = jnp.argmax(x_r, axis=dim, keepdims=True)
    m = m if keepdim else jnp.expand_dims(m, dim)
    dy = jnp.max(x_a, axis=dim, keepdims=True) - jnp.max(x_r, axis=dim, keepdims=True)
    dx_j = jnp.take_along_axis(x_a - x_r, j, axis=dim)
    dx_k = jnp.take_along_axis(x_a - x_r, k, axis=dim)
    share_j = jnp.where(dx_k == 0, 1.0, 0.5)
    share_k = jnp.where(dx_j == 0, 1.0, 0.5)
    coef_j = jnp.where(dx_j == 0, 0.0, share_j * dy / jnp.where(dx_j == 0, 1.0, dx_j))
    coef_k = jnp.where(dx_k == 0, 0.0, share_k * dy / jnp.where(dx_k == 0, 1.0, dx_k))
    coef_j = jnp.where(j == k, 1.0, coef_j)
    coef_k = jnp.where(j == k, 0.0, coef_k)
    positions = jax.lax.broadcasted_iota(jnp.int32, x_a.shape, x_a.ndim + dim if dim < 0 else dim)
    return (m * (jnp.where(positions == j, coef_j, 0.0) + jnp.where(positions == k, coef_k, 0.0)),)
