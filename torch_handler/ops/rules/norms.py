"""Norms composed from their parts: centring (linear), square, rsqrt / sqrt (Rescale), the
normalising product (Shapley), a constant affine."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _f64, _pair_dims, _unsqueeze_dims
from torch_handler.ops.rules._compiled import scratch, x_m_out
from torch_handler.ops.rules.unary import _rescale_rsqrt, _rescale_sqrt
from torch_handler.recurrent import cpu_kernels


def layer_norm(
    m: Tensor, actual, reference, *, normalized_shape, weight=None, bias=None, eps: float = 1e-5
) -> Multipliers:
    """y = layer_norm(x) over the last len(normalized_shape) dims, composed as
    mu = mean(x), xc = x − mu, v = mean(xc²), s = rsqrt(v + eps), y0 = xc · s,
    y = y0 · weight + bias (weight, bias constants):
    m_y0 = m · weight; m_s = Σ m_y0 · mean(xc); m_v = m_s · R_rsqrt(v_a + eps, v_r + eps);
    m_xc = m_y0 · mean(s) + (m_v / n) · (xc_a + xc_r) (square Rescale); m_x = m_xc − mean(m_xc).

    actual = (x_a,): (N, *s); weight, bias: normalized_shape or None; m (2, N, *s) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _normalized_dims(normalized_shape)
    compiled = _compiled_norm(m, x_a, x_r, weight, eps, len(dims), centre=True)
    if compiled is not None:
        return (compiled,)
    x_a64, x_r64 = _f64(x_a), _f64(x_r)
    xc_a = x_a64 - x_a64.mean(dims, keepdim=True)
    xc_r = x_r64 - x_r64.mean(dims, keepdim=True)
    m_xc = _rms_scaling(_f64(m), xc_a, xc_r, weight, eps, dims)
    return ((m_xc - m_xc.mean(dims, keepdim=True)).to(x_a.dtype),)


def _normalized_dims(normalized_shape) -> tuple[int, ...]:
    """The trailing dims a norm's ``normalized_shape`` (an int or a sequence) covers."""
    count = 1 if isinstance(normalized_shape, int) else len(tuple(normalized_shape))
    return tuple(range(-count, 0))


def _rms_scaling(m64: Tensor, u_a: Tensor, u_r: Tensor, weight, eps: float, dims: tuple[int, ...]) -> Tensor:
    """Multiplier of u in y = u · rsqrt(mean(u²) + eps) · weight over ``dims`` (float64): the
    part layer_norm (u the centred x) and rms_norm (u = x) share.
    m_y0 = m · weight; m_s = Σ m_y0 · mean(u); m_v = m_s · R_rsqrt(v_a, v_r) with v = mean(u²) + eps;
    m_u = m_y0 · mean(s) + (m_v / n) · (u_a + u_r) (square Rescale), n the elements over dims."""
    n = math.prod(u_a.shape[d] for d in dims)
    v_a = (u_a * u_a).mean(dims, keepdim=True) + eps
    v_r = (u_r * u_r).mean(dims, keepdim=True) + eps
    m_y0 = m64 if weight is None else m64 * _f64(weight)
    m_s = (m_y0 * ((u_a + u_r) * 0.5)).sum(dims, keepdim=True)
    m_v = m_s * _rescale_rsqrt(v_a, v_r)
    return m_y0 * ((torch.rsqrt(v_a) + torch.rsqrt(v_r)) * 0.5) + (m_v / n) * (u_a + u_r)


def rms_norm(m: Tensor, actual, reference, *, normalized_shape, weight=None, eps=None) -> Multipliers:
    """y = rms_norm(x) over the last len(normalized_shape) dims, composed as v = mean(x²),
    s = rsqrt(v + eps), y0 = x · s, y = y0 · weight:
    m_y0 = m · weight; m_s = Σ m_y0 · mean(x); m_v = m_s · R_rsqrt(v_a + eps, v_r + eps);
    m_x = m_y0 · mean(s) + (m_v / n) · (x_a + x_r).
    eps None means torch's default, finfo(x.dtype).eps of the operand's own dtype.

    actual = (x_a,): (N, *s); weight: normalized_shape or None; m (2, N, *s) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    if eps is None:
        eps = torch.finfo(x_a.dtype).eps
    dims = _normalized_dims(normalized_shape)
    compiled = _compiled_norm(m, x_a, x_r, weight, eps, len(dims), centre=False)
    if compiled is not None:
        return (compiled,)
    return (_rms_scaling(_f64(m), _f64(x_a), _f64(x_r), weight, eps, dims).to(x_a.dtype),)


def _compiled_norm(m: Tensor, x_a: Tensor, x_r: Tensor, weight, eps: float, count: int, centre: bool) -> Tensor | None:
    """layer_norm's (``centre``) or rms_norm's rule over the last ``count`` dims in one call of
    the compiled CPU library (``norm_rule_f64`` in ``torch_handler/recurrent/cpu_kernels.c``,
    float64 throughout), in ``x_a``'s dtype; None where it does not serve (not on the CPU, the
    library not loaded yet, ``LSTM_DEEPSHAP_FUSED=0``, an empty operand).

    Why: as torch ops the rule is some thirty float64 passes over (2, N, *s), each a fresh
    allocation, which cost the attention model's layer norm 1.6-2 ms of a 20 ms step (32 pairs,
    24 × 32 per pair); the kernel keeps a row in the cache. Same formulas, sums in another order:
    the two agree to rounding (``tests/test_norm_kernel.py``).
    """
    library = cpu_kernels.serving(x_a.device)
    n = math.prod(x_a.shape[x_a.ndim - count:])
    if library is None or x_a.numel() == 0 or n == 0:
        return None
    N = x_a.shape[0]
    R = x_a.numel() // (N * n)  # rows per pair

    def rows(t: Tensor) -> Tensor:
        return t.reshape(N, R, 1, n)  # a view unless the rows' dims do not merge

    ops, out, keep = x_m_out(rows(x_a), rows(x_r), rows(m[0]), rows(m[1]), (N, R, 1, n))
    w = None if weight is None else _f64(weight).reshape(n).contiguous()
    threads = torch.get_num_threads()
    work = scratch(threads * library.norm_work_f64(n))
    # Every tensor whose address the kernel gets is held by a name until it returns (keep, w, work).
    library.norm_rule_f64(threads, N * R, R, n, int(centre), float(eps), ops,
                          None if w is None else w.data_ptr(), work.data_ptr())
    return out.view(m.shape).to(x_a.dtype)


def vector_norm(m: Tensor, actual, reference, *, dim=None, keepdim: bool = False, ord=2) -> Multipliers:
    """y = ‖x‖₂ along dim = sqrt(Σ_dim square(x)):
    m_x = m / (√S_a + √S_r) · (x_a + x_r), S = Σ_dim x² (sqrt and square Rescale).

    actual = (x_a,): (N, *s); dim negative int / tuple, or None for every axis of a pair;
    m (2, N, *s_out) -> (m_x (2, N, *s),). Only ord = 2.
    """
    if ord != 2:
        raise ValueError(f"vector_norm rule supports ord=2 only, got ord={ord!r}")
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    x_a64, x_r64 = _f64(x_a), _f64(x_r)
    m64 = _f64(m) if keepdim else _unsqueeze_dims(_f64(m), dims)
    S_a = (x_a64 * x_a64).sum(dims, keepdim=True)
    S_r = (x_r64 * x_r64).sum(dims, keepdim=True)
    return ((m64 * _rescale_sqrt(S_a, S_r) * (x_a64 + x_r64)).to(x_a.dtype),)


def _centred_square_backward(m64: Tensor, x_a64: Tensor, x_r64: Tensor, dims: tuple[int, ...], correction) -> Tensor:
    """``v = Σ_dim (x − mean_dim x)² / (n − correction)`` backwards to ``x``: the square's Rescale
    factor ``xc_a + xc_r``, then the centring's VJP ``g − mean_dim g`` (both linear steps exact).
    m64 (2, N, *s) with the reduced dims kept; returns (2, N, *s) float64."""
    n = math.prod(x_a64.shape[d] for d in dims)
    xc_a = x_a64 - x_a64.mean(dims, keepdim=True)
    xc_r = x_r64 - x_r64.mean(dims, keepdim=True)
    g = m64 * (xc_a + xc_r) / (n - correction)
    return g - g.mean(dims, keepdim=True)


def _variance_dims(x: Tensor, dim, correction) -> tuple[tuple[int, ...], float]:
    dims = _pair_dims(dim, x.ndim)
    n = math.prod(x.shape[d] for d in dims)
    correction = 1 if correction is None else correction
    if n - correction <= 0:
        raise ValueError(f"var/std over {n} elements with correction={correction}: the divisor n - correction "
                         "is not positive (torch returns inf or nan there)")
    return dims, correction


def var(m: Tensor, actual, reference, *, dim=None, correction=1, keepdim: bool = False) -> Multipliers:
    """y = Σ_dim (x − mean_dim x)² / (n − correction) (torch.var): centring (linear), square
    (Rescale, ``R = xc_a + xc_r``), sum (linear): m_x = g − mean_dim(g), g = m·(xc_a + xc_r)/(n − c).

    actual = (x_a,): (N, *s); dim negative int / tuple, or None for every axis of a pair;
    m (2, N, *s_out) -> (m_x (2, N, *s),).
    """
    (x_a,), (x_r,) = actual, reference
    dims, correction = _variance_dims(x_a, dim, correction)
    m64 = _f64(m) if keepdim else _unsqueeze_dims(_f64(m), dims)
    return (_centred_square_backward(m64, _f64(x_a), _f64(x_r), dims, correction).to(x_a.dtype),)


def std(m: Tensor, actual, reference, *, dim=None, correction=1, keepdim: bool = False) -> Multipliers:
    """y = sqrt(var(x)) (torch.std): sqrt Rescale ``m_v = m / (√v_a + √v_r)``, then the var rule.
    Where both halves have zero variance (a constant slice), Δy = 0 and m_v is set to 0 (the
    derivative is undefined there; torch's gradient is NaN)."""
    (x_a,), (x_r,) = actual, reference
    dims, correction = _variance_dims(x_a, dim, correction)
    x_a64, x_r64 = _f64(x_a), _f64(x_r)
    s_a = x_a64.var(dims, correction=correction, keepdim=True).sqrt()
    s_r = x_r64.var(dims, correction=correction, keepdim=True).sqrt()
    m64 = _f64(m) if keepdim else _unsqueeze_dims(_f64(m), dims)
    total = s_a + s_r
    m_v = torch.where(total > 0, m64 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(m64))
    return (_centred_square_backward(m_v, x_a64, x_r64, dims, correction).to(x_a.dtype),)
