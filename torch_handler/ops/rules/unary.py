"""Unary elementwise ops ``y = f(x)``: Rescale, ``m_x = m · R_f(x_a, x_r)``, each factor in a form that
keeps full relative accuracy as ``x_a − x_r → 0``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from torch_handler.ops.rules._common import (
    Multipliers,
    _expm1_ratio,
    _f64,
    _lo_hi,
    _log1p_ratio,
    _mean,
    _safe,
    _scaled,
    _where_zero,
)
from torch_handler.ops.rules._compiled import x_m_out
from torch_handler.recurrent import cpu_kernels
from torch_handler.recurrent.rules import rescale_sigmoid, rescale_tanh


def _rescale_piecewise_linear(a, r, breakpoints, slopes, derivative):
    """R_f of a continuous piecewise-linear f with the given (sorted) breakpoints (floats or
    tensors broadcastable to a) and len(breakpoints) + 1 slopes.

    Δf = Σ_j slope_j · |[lo, hi] ∩ segment_j|, each length a difference of clamped values (exact
    by Sterbenz's lemma near the breakpoints), then divided by d; ``derivative(x)`` at d = 0.
    """
    lo, hi, d = _lo_hi(a, r)
    bounds = [None, *breakpoints, None]
    delta_f = torch.zeros_like(d)
    for j, slope in enumerate(slopes):
        if isinstance(slope, (int, float)) and slope == 0:
            continue
        left, right = bounds[j], bounds[j + 1]
        if left is None and right is None:
            length = d
        else:
            length = torch.clamp(hi, min=left, max=right) - torch.clamp(lo, min=left, max=right)
        delta_f = delta_f + slope * length
    return _where_zero(d, derivative(a), delta_f / _safe(d))


def _rescale_relu(a, r):
    """R = 1 (both > 0), 0 (both ≤ 0), Δrelu/Δx across 0; derivative 1[x > 0] (torch's)."""
    return _rescale_piecewise_linear(a, r, [0.0], [0.0, 1.0], lambda x: (x > 0).to(x.dtype))


def _rescale_leaky_relu(a, r, negative_slope=0.01):
    s = float(negative_slope)
    return _rescale_piecewise_linear(
        a, r, [0.0], [s, 1.0], lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, s))
    )


def _rescale_abs(a, r):
    """R = sign (both on one side of 0), Δ|x|/Δx across 0; derivative sign(x), 0 at 0 (torch's)."""
    return _rescale_piecewise_linear(a, r, [0.0], [-1.0, 1.0], torch.sign)


def _rescale_relu6(a, r):
    """relu6 = min(max(x, 0), 6): slopes 0, 1, 0; derivative 1[0 < x < 6] (torch's hardtanh)."""
    return _rescale_piecewise_linear(a, r, [0.0, 6.0], [0.0, 1.0, 0.0], lambda x: ((x > 0) & (x < 6)).to(x.dtype))


def _rescale_clamp(a, r, min=None, max=None):
    """clamp(x, min, max) (either bound may be None or a tensor); derivative 1[min ≤ x ≤ max]
    (torch's clamp backward)."""
    if min is not None and max is not None:
        breakpoints, slopes = [min, max], [0.0, 1.0, 0.0]
    elif min is not None:
        breakpoints, slopes = [min], [0.0, 1.0]
    elif max is not None:
        breakpoints, slopes = [max], [1.0, 0.0]
    else:
        breakpoints, slopes = [], [1.0]

    def derivative(x):
        inside = torch.ones_like(x, dtype=torch.bool)
        if min is not None:
            inside = inside & (x >= min)
        if max is not None:
            inside = inside & (x <= max)
        return inside.to(x.dtype)

    return _rescale_piecewise_linear(a, r, breakpoints, slopes, derivative)


def _rescale_exp(a, r, e_a=None, e_r=None):
    """R_exp = e^hi · (−expm1(−d))/d with d = |a − r|: one formula for every d, without
    cancellation (expm1), overflow (−expm1(−d) ∈ [0, 1)) or 0·∞ where e^lo underflows (the
    factor multiplies e^hi), and so without a select between two branches (a torch.where costs
    more on the CPU than this whole formula). d is clamped to the smallest normal number, where
    −expm1(−d)/d is exactly 1, so d = 0 gives e^x without a special case; a pair both at −∞
    (masked attention scores) and a pair with one side at −∞ give 0. ``e_a``, ``e_r``: exp(a),
    exp(r) when the caller already has them."""
    if e_a is None:
        e_a, e_r = torch.exp(a), torch.exp(r)
    e_hi = torch.maximum(e_a, e_r)
    neg_d = torch.nan_to_num_((a - r).abs_(), nan=0.0).clamp_min_(torch.finfo(a.dtype).tiny).neg_()
    return torch.expm1(neg_d).div_(neg_d).mul_(e_hi)


def _rescale_log(a, r):
    """R_log = log1p(d/lo)/d = (1/lo) · [log1p(x)/x] with x = d/lo (for x ≤ 1; the quotient
    log(hi/lo)/d above). Derivative 1/x at d = 0."""
    lo, hi, d = _lo_hi(a, r)
    x = d / lo
    closed = _log1p_ratio(x) / lo
    direct = (torch.log(hi) - torch.log(lo)) / _safe(d)
    return torch.where(x > 1, direct, closed)


def _rescale_sqrt(a, r):
    """R_sqrt = 1 / (√a + √r)."""
    return 1.0 / (torch.sqrt(a) + torch.sqrt(r))


def _rescale_rsqrt(a, r):
    """R_rsqrt = −1 / (√a √r (√a + √r))."""
    sa, sr = torch.sqrt(a), torch.sqrt(r)
    return -1.0 / (sa * sr * (sa + sr))


def _rescale_reciprocal(a, r):
    """R_reciprocal = −1 / (a r), evaluated as −(1/a)(1/r) (no overflow of a·r)."""
    return -(1.0 / a) * (1.0 / r)


def _rescale_square(a, r):
    """R_square = a + r."""
    return a + r


def _rescale_sigmoid(a, r):
    """R_σ: closed form σ(hi) σ(−lo) · (−expm1(−d)/d) (see rules.rescale_sigmoid)."""
    return rescale_sigmoid(a, r)


def _rescale_tanh(a, r):
    """R_tanh = 4 R_σ(2a, 2r)."""
    return rescale_tanh(a, r)


def _rescale_silu(a, r):
    """silu = x · σ(x), a product of two functions of x: Δ(xσ) = Δx · mean(σ) + mean(x) · Δσ, so
    R = mean(σ(x)) + mean(x) · R_σ(a, r), exact for every d."""
    return _mean(torch.sigmoid(a), torch.sigmoid(r)) + _mean(a, r) * rescale_sigmoid(a, r)


_SQRT_HALF = math.sqrt(0.5)


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _rescale_normal_cdf(a, r):
    """R_Φ of the standard normal CDF Φ.

    Where d·(1 + |mid|) < 1e-2 (mid = (a + r)/2), the midpoint series of the difference quotient,
    φ(mid) [1 + (mid² − 1) d²/24 + (mid⁴ − 6 mid² + 3) d⁴/1920] (truncation < 1e-17 relative);
    above, the quotient of the smaller tail (upper tail Q = erfc(x/√2)/2 for mid > 0), whose
    cancellation then costs at most ~1e-14 relative.
    """
    lo, hi, d = _lo_hi(a, r)
    mid = (a + r) * 0.5
    phi = torch.exp(-0.5 * mid * mid) * _INV_SQRT_2PI
    m2 = mid * mid
    series = phi * (1.0 + (m2 - 1.0) * d * d / 24.0 + (m2 * m2 - 6.0 * m2 + 3.0) * d**4 / 1920.0)
    upper = (torch.special.erfc(lo * _SQRT_HALF) - torch.special.erfc(hi * _SQRT_HALF)) * 0.5
    lower = (torch.special.erfc(-hi * _SQRT_HALF) - torch.special.erfc(-lo * _SQRT_HALF)) * 0.5
    quotient = torch.where(mid > 0, upper, lower) / _safe(d)
    return torch.where(d * (1.0 + mid.abs()) < 1e-2, series, quotient)


_GELU_TANH_K = 2.0 * math.sqrt(2.0 / math.pi)  # tanh form: x·σ(K (x + C x³))


_GELU_TANH_C = 0.044715


def _rescale_gelu(a, r, approximate="none"):
    """gelu = x · Φ(x) ("none") or x · σ(u(x)), u = K (x + 0.044715 x³), K = 2√(2/π) ("tanh",
    since ½(1 + tanh(z)) = σ(2z)). Product of two functions of x, as for silu:
    R = mean(Φ) + mean(x) · R_Φ, or mean(σ(u)) + mean(x) · R_σ(u_a, u_r) · R_u with the exact
    R_u = K (1 + 0.044715 (a² + a r + r²))."""
    if approximate == "none":
        cdf = lambda x: 0.5 * torch.special.erfc(-x * _SQRT_HALF)  # noqa: E731
        return _mean(cdf(a), cdf(r)) + _mean(a, r) * _rescale_normal_cdf(a, r)
    if approximate == "tanh":
        u = lambda x: _GELU_TANH_K * (x + _GELU_TANH_C * x * x * x)  # noqa: E731
        u_a, u_r = u(a), u(r)
        r_u = _GELU_TANH_K * (1.0 + _GELU_TANH_C * (a * a + a * r + r * r))
        return _mean(torch.sigmoid(u_a), torch.sigmoid(u_r)) + _mean(a, r) * rescale_sigmoid(u_a, u_r) * r_u
    raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")


def _rescale_elu(a, r, alpha=1.0):
    """elu = x (x > 0), α·expm1(x) (x ≤ 0). Both > 0: 1; both ≤ 0: α · R_exp(a, r); across 0
    the plain quotient (d ≥ |a|, |r| there: no cancellation). Derivative 1 or α e^x (torch)."""
    alpha = float(alpha)
    lo, hi, d = _lo_hi(a, r)
    f = lambda x: torch.where(x > 0, x, alpha * torch.expm1(x))  # noqa: E731
    across = (f(hi) - f(lo)) / _safe(d)
    negative = alpha * _rescale_exp(a, r)
    rescale = torch.where(lo > 0, torch.ones_like(d), torch.where(hi <= 0, negative, across))
    return torch.where(d == 0, torch.where(a > 0, 1.0, alpha * torch.exp(a)), rescale)


def _softplus_unit(z: Tensor) -> Tensor:
    """log(1 + e^z) without overflow."""
    return torch.clamp_min(z, 0) + torch.log1p(torch.exp(-z.abs()))


def _softplus_difference(z_lo: Tensor, z_hi: Tensor) -> Tensor:
    """sp(z_hi) − sp(z_lo) for z_hi ≥ z_lo, sp(z) = log(1 + e^z): log1p(σ(z_lo) · expm1(D)),
    D = z_hi − z_lo (no cancellation), the plain difference for D > 1."""
    D = z_hi - z_lo
    closed = torch.log1p(torch.sigmoid(z_lo) * torch.expm1(torch.clamp_max(D, 1.0)))
    return torch.where(D > 1, _softplus_unit(z_hi) - _softplus_unit(z_lo), closed)


def _rescale_softplus(a, r, beta=1.0, threshold=20.0):
    """torch's softplus: f(x) = log(1 + e^{βx})/β where βx ≤ threshold, x above (with its jump
    of −log1p(e^{−threshold})/β at the switch).

    Both smooth: R = Δsp/D with D = β d (the 1/β cancels), evaluated as
    σ(z_lo) · [log1p(y)/y] · [expm1(D)/D], y = σ(z_lo) expm1(D), for D ≤ 1. Both linear: 1.
    Across the switch: Δf = (hi − t/β) − log1p(e^{−t})/β + (sp(t) − sp(β lo))/β, t = threshold.
    Derivative at d = 0: σ(βx), or 1 above the threshold (torch's).
    """
    beta, t = float(beta), float(threshold)
    lo, hi, d = _lo_hi(a, r)
    z_lo, z_hi = beta * lo, beta * hi
    D = z_hi - z_lo
    y = torch.sigmoid(z_lo) * torch.expm1(torch.clamp_max(D, 1.0))
    small = torch.sigmoid(z_lo) * _log1p_ratio(y) * _expm1_ratio(D)
    smooth = torch.where(D > 1, _softplus_difference(z_lo, z_hi) / _safe(D), small)
    t_tensor = torch.full_like(z_lo, t)
    across = (
        (hi - t / beta)
        - math.log1p(math.exp(-t)) / beta
        + _softplus_difference(torch.minimum(z_lo, t_tensor), t_tensor) / beta
    ) / _safe(d)
    linear_hi = z_hi > t
    linear_lo = z_lo > t
    rescale = torch.where(linear_lo, torch.ones_like(d), torch.where(linear_hi, across, smooth))
    derivative = torch.where(beta * a > t, 1.0, torch.sigmoid(beta * a))
    return torch.where(d == 0, derivative, rescale)


def _rescale_power(a, r, p):
    """R of x ↦ x^p (p a float or a tensor broadcastable to a).

    Both > 0 and hi ≤ 2 lo: hi^p − lo^p = lo^p expm1(p log1p(x)), x = d/lo, so
    R = p lo^{p−1} · [expm1(pL)/(pL)] · [log1p(x)/x], L = log1p(x) (no cancellation).
    Both < 0 with integer p: (−1)^{p+1} times the same on |a|, |r|. Otherwise the plain
    quotient (no harmful cancellation there). Derivative p x^{p−1} at d = 0; 0 for p = 0.
    """
    p = torch.as_tensor(p, dtype=a.dtype, device=a.device)

    def positive(lo, hi, d):
        x = d / lo
        L = torch.log1p(x)
        return p * lo ** (p - 1) * _expm1_ratio(p * L) * _log1p_ratio(x)

    lo, hi, d = _lo_hi(a, r)
    direct = (hi**p - lo**p) / _safe(d)
    both_positive = (lo > 0) & (d <= lo)
    # For both negative: |hi| ≤ |lo|, so |hi| is the smaller magnitude.
    integer = p == torch.round(p)
    odd = torch.remainder(p, 2) == 1
    both_negative = (hi < 0) & integer & (d <= hi.abs())
    neg_sign = torch.where(odd, 1.0, -1.0)
    safe_lo = torch.where(lo > 0, lo, torch.ones_like(lo))
    safe_abs_hi = torch.where(hi < 0, hi.abs(), torch.ones_like(hi))
    rescale = torch.where(
        both_positive,
        positive(safe_lo, hi, d),
        torch.where(both_negative, neg_sign * positive(safe_abs_hi, lo.abs(), d), direct),
    )
    rescale = torch.where(d == 0, p * a ** (p - 1), rescale)
    return torch.where(p == 0, torch.zeros_like(rescale), rescale)


def _unary(rescale: Callable, name: str, formula: str) -> Callable:
    def rule(m: Tensor, actual, reference, **params) -> Multipliers:
        (x_a,), (x_r,) = actual, reference
        return (_scaled(m, rescale(_f64(x_a), _f64(x_r), **params), x_a),)

    rule.__name__ = name
    rule.__doc__ = (
        f"Rescale rule of {formula}: m_x = m · (f(x_a) − f(x_r)) / (x_a − x_r).\n\n"
        f"actual = (x_a,), reference = (x_r,): (N, *s); m (2, N, *s) -> (m_x (2, N, *s),) in x's "
        f"dtype (coefficients in float64).\n\nFactor: {(rescale.__doc__ or '').strip()}"
    )
    return rule


relu = _unary(_rescale_relu, "relu", "relu(x) = max(x, 0)")
leaky_relu = _unary(_rescale_leaky_relu, "leaky_relu", "leaky_relu(x; negative_slope=0.01)")
relu6 = _unary(_rescale_relu6, "relu6", "relu6(x) = min(max(x, 0), 6)")
elu = _unary(_rescale_elu, "elu", "elu(x; alpha=1.0)")
_gelu_ops = _unary(_rescale_gelu, "gelu", 'gelu(x; approximate="none"|"tanh")')


def gelu(m: Tensor, actual, reference, approximate="none") -> Multipliers:
    compiled = _compiled_gelu(m, actual[0], reference[0]) if approximate == "none" else None
    return (compiled,) if compiled is not None else _gelu_ops(m, actual, reference, approximate=approximate)


gelu.__doc__ = _gelu_ops.__doc__ + (
    "\n\nOn the CPU the exact form runs as one call of the compiled library (_compiled_gelu).")


def _compiled_gelu(m: Tensor, x_a: Tensor, x_r: Tensor) -> Tensor | None:
    """gelu's rule (``approximate="none"``) in one call of the compiled CPU library
    (``gelu_rule_f64`` in ``torch_handler/recurrent/cpu_kernels.c``, float64), in ``x_a``'s
    dtype; None where it does not serve (not on the CPU, the library not loaded yet,
    ``LSTM_DEEPSHAP_FUSED=0``, an empty operand, halves of different shapes).

    Why: as torch ops the rule is some thirty passes (six erfc among them), each a dispatch and
    a fresh allocation, which cost the attention model's GELU 0.6-0.7 ms of a 14 ms step for
    2,048 numbers per half. Same formulas, libm's erfc: the two agree to rounding
    (``tests/test_gelu_kernel.py``).
    """
    library = cpu_kernels.serving(x_a.device)
    if library is None or x_a.numel() == 0 or x_a.shape != x_r.shape or m.shape[1:] != x_a.shape:
        return None
    n = x_a.numel()
    flat = [t.reshape(-1).contiguous() for t in (x_a, x_r, m[0], m[1])]  # views where contiguous
    ops, out, keep = x_m_out(*flat, (n,))
    # Every tensor whose address the kernel gets is held by a name until it returns (keep).
    library.gelu_rule_f64(torch.get_num_threads(), n, ops)
    return out.view(m.shape).to(x_a.dtype)


silu = _unary(_rescale_silu, "silu", "silu(x) = x·σ(x)")
softplus = _unary(_rescale_softplus, "softplus", "softplus(x; beta=1.0, threshold=20.0)")
sigmoid = _unary(_rescale_sigmoid, "sigmoid", "sigmoid(x)")
tanh = _unary(_rescale_tanh, "tanh", "tanh(x)")
exp = _unary(_rescale_exp, "exp", "exp(x)")
log = _unary(_rescale_log, "log", "log(x)")
sqrt = _unary(_rescale_sqrt, "sqrt", "sqrt(x)")
rsqrt = _unary(_rescale_rsqrt, "rsqrt", "rsqrt(x) = x^(-1/2)")
reciprocal = _unary(_rescale_reciprocal, "reciprocal", "reciprocal(x) = 1/x")
square = _unary(_rescale_square, "square", "square(x) = x²")
absolute = _unary(_rescale_abs, "abs", "abs(x) = |x|")
clamp = _unary(_rescale_clamp, "clamp", "clamp(x; min=None, max=None)")
pow_scalar = _unary(
    lambda a, r, exponent: _rescale_power(a, r, float(exponent)), "pow_scalar", "x ** exponent (a float)"
)
