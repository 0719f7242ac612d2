"""Norms: layer_norm, rms_norm (centring, square and rsqrt Rescale, the normalising product
by Shapley) and the 2-norm (square and sqrt Rescale)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp

from reference_jax.rescale import average

Array = jax.Array


def _norm_axes(normalized_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    k = len(tuple(normalized_shape))
    if k == 0 or k > ndim:
        raise AssertionError(
            f"normalized_shape {tuple(normalized_shape)} must name 1 to {ndim} trailing dims"
        )
    return tuple(range(-k, 0))


def _check_trailing(name: str, value: Array, normalized_shape, x: Array):
    if value is not None:
        chex.assert_shape(
            value, tuple(normalized_shape),
            custom_message=f"{name} must have the normalized_shape {tuple(normalized_shape)}, "
            f"got {tuple(jnp.shape(value))}",
        )
        if tuple(x.shape[-len(tuple(normalized_shape)):]) != tuple(normalized_shape):
            raise AssertionError(
                f"the input's trailing dims {tuple(x.shape)} must equal normalized_shape "
                f"{tuple(normalized_shape)}"
            )


def _affine(y0, weight, bias):
    y = y0 if weight is None else y0 * weight
    return y if bias is None else y + bias


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    axes = _norm_axes(normalized_shape, x.ndim)
    xc = x - jnp.mean(x, axis=axes, keepdims=True)
    v = jnp.mean(xc * xc, axis=axes, keepdims=True)
    return _affine(xc * jax.lax.rsqrt(v + eps), weight, bias)


def _scaled_product_backward(m_y0, xc_a, xc_r, v_a, v_r, eps, axes):
    """``y0 = xc · s``, ``s = rsqrt(v + eps)``, ``v = mean(xc²)``, backwards to ``xc``:
    product Shapley (``s`` broadcast: its multiplier summed over ``axes``), rsqrt and
    square Rescale (``R_sq = xc_a + xc_r``), mean (``1/n``)."""
    n = math.prod(xc_a.shape[i] for i in axes)
    s_a, s_r = jax.lax.rsqrt(v_a + eps), jax.lax.rsqrt(v_r + eps)
    m_xc = m_y0 * average(s_a, s_r)
    m_s = jnp.sum(m_y0 * average(xc_a, xc_r), axis=axes, keepdims=True)
    q_a, q_r = jnp.sqrt(v_a + eps), jnp.sqrt(v_r + eps)
    m_v = m_s * (-1.0 / (q_a * q_r * (q_a + q_r)))
    return m_xc + (m_v / n) * (xc_a + xc_r)


def _layer_norm_rule(m, actual, reference, normalized_shape, weight=None, bias=None, eps=1e-5):
    """mean and centring (linear), then :func:`_scaled_product_backward`, affine constants
    ``m_y0 = m·weight``; the centring's VJP is ``m_xc − mean(m_xc)``."""
    (x_a,), (x_r,) = actual, reference
    axes = _norm_axes(normalized_shape, x_a.ndim)
    _check_trailing("weight", weight, normalized_shape, x_a)
    _check_trailing("bias", bias, normalized_shape, x_a)
    xc_a = x_a - jnp.mean(x_a, axis=axes, keepdims=True)
    xc_r = x_r - jnp.mean(x_r, axis=axes, keepdims=True)
    v_a = jnp.mean(xc_a * xc_a, axis=axes, keepdims=True)
    v_r = jnp.mean(xc_r * xc_r, axis=axes, keepdims=True)
    m_y0 = m if weight is None else m * weight
    m_xc = _scaled_product_backward(m_y0, xc_a, xc_r, v_a, v_r, eps, axes)
    return (m_xc - jnp.mean(m_xc, axis=axes, keepdims=True),)


def _rms_eps(eps):
    # torch's default (eps=None): machine eps of the input dtype; the oracle is float64,
    # so a float32 twin must pass eps=torch.finfo(torch.float32).eps explicitly.
    return float(jnp.finfo(jnp.float64).eps) if eps is None else eps


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    axes = _norm_axes(normalized_shape, x.ndim)
    v = jnp.mean(x * x, axis=axes, keepdims=True)
    return _affine(x * jax.lax.rsqrt(v + _rms_eps(eps)), weight, None)


def _rms_norm_rule(m, actual, reference, normalized_shape, weight=None, eps=None):
    (x_a,), (x_r,) = actual, reference
    axes = _norm_axes(normalized_shape, x_a.ndim)
    _check_trailing("weight", weight, normalized_shape, x_a)
    v_a = jnp.mean(x_a * x_a, axis=axes, keepdims=True)
    v_r = jnp.mean(x_r * x_r, axis=axes, keepdims=True)
    m_y0 = m if weight is None else m * weight
    return (_scaled_product_backward(m_y0, x_a, x_r, v_a, v_r, _rms_eps(eps), axes),)


def _dims(dim) -> tuple[int, ...] | None:
    if dim is None:
        return None
    return tuple(dim) if isinstance(dim, Sequence) else (dim,)


def _vector_norm(x, dim=None, keepdim=False):
    return jnp.sqrt(jnp.sum(x * x, axis=_dims(dim), keepdims=keepdim))


def _vector_norm_rule(m, actual, reference, dim=None, keepdim=False):
    """``sqrt(Σ_dim x²)``: ``m_x = m · R_sqrt(Q_a, Q_r) · (x_a + x_r)`` with
    ``R_sqrt = 1/(√Q_a + √Q_r)``."""
    (x_a,), (x_r,) = actual, reference
    axes = _dims(dim)
    axes_all = tuple(range(x_a.ndim)) if axes is None else axes
    n_a = jnp.sqrt(jnp.sum(x_a * x_a, axis=axes_all, keepdims=True))
    n_r = jnp.sqrt(jnp.sum(x_r * x_r, axis=axes_all, keepdims=True))
    m = m if keepdim else jnp.expand_dims(m, axes_all)
    return (m / (n_a + n_r) * (x_a + x_r),)


def _all_axes(dim, ndim: int) -> tuple[int, ...]:
    axes = _dims(dim)
    return tuple(range(ndim)) if axes is None else axes


def _var(x, dim=None, correction=1, keepdim=False):
    return jnp.var(x, axis=_dims(dim), ddof=correction, keepdims=keepdim)


def _centred_square_backward(m, x_a, x_r, axes, correction):
    """``v = Σ (x − mean x)² / (n − correction)`` over ``axes``, backwards to ``x``: the square's
    Rescale factor ``xc_a + xc_r``, then the centring's VJP ``g − mean(g)``."""
    n = math.prod(x_a.shape[i] for i in axes)
    xc_a = x_a - jnp.mean(x_a, axis=axes, keepdims=True)
    xc_r = x_r - jnp.mean(x_r, axis=axes, keepdims=True)
    g = m * (xc_a + xc_r) / (n - correction)
    return g - jnp.mean(g, axis=axes, keepdims=True)


def _var_rule(m, actual, reference, dim=None, correction=1, keepdim=False):
    """centring (linear), square (Rescale ``xc_a + xc_r``), the scaled sum (linear)."""
    (x_a,), (x_r,) = actual, reference
    axes = _all_axes(dim, x_a.ndim)
    m = m if keepdim else jnp.expand_dims(m, axes)
    return (_centred_square_backward(m, x_a, x_r, axes, correction),)


def _std(x, dim=None, correction=1, keepdim=False):
    return jnp.std(x, axis=_dims(dim), ddof=correction, keepdims=keepdim)


def _std_rule(m, actual, reference, dim=None, correction=1, keepdim=False):
    """``sqrt(var)``: sqrt Rescale ``m_v = m/(√v_a + √v_r)`` (0 where both variances are 0, Δy = 0
    there), then the var rule."""
    (x_a,), (x_r,) = actual, reference
    axes = _all_axes(dim, x_a.ndim)
    m = m if keepdim else jnp.expand_dims(m, axes)
    s_a = jnp.std(x_a, axis=axes, ddof=correction, keepdims=True)
    total = s_a + jnp.std(x_r, axis=axes, ddof=correction, keepdims=True)
    m_v = jnp.where(total > 0, m / jnp.where(total > 0, total, 1.0), 0.0)
    return (_centred_square_backward(m_v, x_a, x_r, axes, correction),)
