"""DeepLIFT / DeepSHAP rules for the torch ops that models put around recurrent layers.

One table, :data:`OP_RULES` (op name -> rule), serves every caller. Each rule has the signature

    rule(m, actual, reference, **params) -> tuple[multiplier | None, ...]   (one per operand)

* ``actual`` / ``reference``: tuples of the op's tensor operands for ``N`` (input, reference)
  pairs, pair axis first: operand ``k`` has shape ``(N, *s_k)``. An operand that does not depend
  on the explained input is the same tensor in both.
* Elementwise ops (unary and binary): the operands are already broadcast to the output's shape
  (the caller reduces multipliers back over broadcast dimensions).
* ``m``: the output multiplier for both halves of the doubled batch, ``(2, N, *s_out)``; half 0
  belongs to the actual rows, half 1 to the reference rows, and both get the same rule.
* Returns one multiplier per operand, ``(2, N, *s_k)``, in the operand's dtype.
* Every ``dim`` parameter is a negative int (counted from the last axis), so it names the same
  axis in the ``(N, ...)`` and ``(2, N, ...)`` frames.
* Rules are linear in ``m``: the coefficients depend on ``(actual, reference)`` only.
* float32 (and other non-float64) operands: coefficients are computed in float64 and the
  multipliers returned in the operand's dtype, which keeps summation-to-delta within 1e-5.

Exactness, for every op and per half: ``Σ_k Σ m_k (actual_k − reference_k) = Σ m (f(actual) −
f(reference))`` up to rounding. At ``actual == reference`` the multiplier is the derivative there
(torch's convention at kinks: relu/relu6 0 at their corners, clamp 1 at its bounds, maximum and
minimum ½ on ties).

Notation: ``Δu = u_a − u_r``, ``mean(u) = (u_a + u_r) / 2``, ``lo = min(u_a, u_r)``,
``hi = max(u_a, u_r)``, ``d = hi − lo ≥ 0``. ``R_f(a, r) = (f(a) − f(r)) / (a − r)`` is the Rescale
factor of a unary ``f``. Every Rescale factor below is evaluated in a form that keeps full
relative accuracy as ``d → 0`` (closed forms, or a series below a threshold), so no factor falls
back to a plain gradient at a tolerance.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable

import torch
from torch import Tensor

from .rules import rescale_sigmoid, rescale_tanh

__all__ = ["OP_RULES", "rule_for"]

Multipliers = tuple  # tuple[Tensor | None, ...]

# --------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------


def _f64(t: Tensor) -> Tensor:
    """float64 copy of a floating tensor (coefficients are always computed in float64)."""
    return t if t.dtype == torch.float64 else t.to(torch.float64)


def _mean(a: Tensor, r: Tensor) -> Tensor:
    """Shapley mean ``(a + r) / 2`` (float64)."""
    return (_f64(a) + _f64(r)) * 0.5


def _native_mean(a: Tensor, r: Tensor) -> Tensor:
    """``(a + r) / 2`` in the operands' dtype: the sum is rounded once and halving is exact, so
    this is the correctly rounded mean, the same value as the float64 mean rounded back."""
    return (a + r) * 0.5


def _scaled(m: Tensor, coefficient: Tensor, like: Tensor) -> Tensor:
    """``m * coefficient`` in float64, returned in ``like``'s dtype.

    m (2, N, *s); coefficient (N, *s) (or broadcastable to it): broadcasts over both halves.
    """
    return (_f64(m) * coefficient).to(like.dtype)


def _where_zero(d: Tensor, value: Tensor | float, other: Tensor) -> Tensor:
    return torch.where(d == 0, value, other)


def _safe(d: Tensor) -> Tensor:
    """``d`` with zeros replaced by 1, so a quotient never produces 0/0 (those entries are
    overwritten by the derivative)."""
    return torch.where(d == 0, torch.ones_like(d), d)


def _expm1_ratio(x: Tensor) -> Tensor:
    """``expm1(x) / x``, 1 at x = 0; accurate for every x (expm1 has no cancellation)."""
    s = _safe(x)
    return _where_zero(x, 1.0, torch.expm1(s) / s)


def _log1p_ratio(x: Tensor) -> Tensor:
    """``log1p(x) / x``, 1 at x = 0; accurate for every x > −1."""
    s = _safe(x)
    return _where_zero(x, 1.0, torch.log1p(s) / s)


def _lo_hi(a: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    lo = torch.minimum(a, r)
    hi = torch.maximum(a, r)
    return lo, hi, hi - lo


def _pair_dims(dim, ndim_pair: int) -> tuple[int, ...]:
    """Normalise a ``dim`` parameter (negative int, tuple of them, or None = every axis after the
    pair axis) for operands of ``ndim_pair`` dimensions including the pair axis."""
    if dim is None or dim == ():
        return tuple(range(-(ndim_pair - 1), 0))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    for d in dims:
        if not -(ndim_pair - 1) <= d < 0:
            raise ValueError(
                f"op rules take negative dims counted from the last axis (so they mean the same "
                f"axis with and without the leading pair axis); got dim={dim!r} for operands "
                f"with {ndim_pair - 1} dims per pair. Pass dim - ndim instead."
            )
    return tuple(sorted(set(dims)))


def _unsqueeze_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Re-insert reduced axes: ``dims`` are negative and refer to the tensor after insertion."""
    full = t.ndim + len(dims)
    for p in sorted(full + d for d in dims):
        t = t.unsqueeze(p)
    return t


def _reduce_to(mult: Tensor, shape: torch.Size) -> Tensor:
    """Sum a (2, N, *s_out) multiplier over the axes that ``shape`` = (N, *s_k) broadcast
    (torch broadcasting of the per-pair shapes, right-aligned) and return (2, N, *s_k)."""
    per_pair = tuple(shape[1:])
    lead = mult.ndim - 2 - len(per_pair)
    if lead > 0:
        mult = mult.sum(dim=tuple(range(2, 2 + lead)))
    dims = [2 + i for i, size in enumerate(per_pair) if size == 1 and mult.shape[2 + i] != 1]
    if dims:
        mult = mult.sum(dim=dims, keepdim=True)
    return mult.reshape((2,) + tuple(shape))


def _pad_after_pair(t: Tensor, ndim: int) -> Tensor:
    """(N, *s) -> (N, 1, ..., 1, *s) with ``ndim`` dims: per-pair batch broadcasting of matmul
    then lines up with the batched call's."""
    extra = ndim - t.ndim
    return t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:]) if extra > 0 else t


# --------------------------------------------------------------------------------------
# Rescale factors R_f(a, r) of unary functions (float64 in, float64 out, shape of a)
# --------------------------------------------------------------------------------------


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
    """R_exp = e^lo · expm1(d)/d for d ≤ 1 (no cancellation), (e^hi − e^lo)/d above (no 0·∞
    where e^lo underflows). d is clamped to the smallest normal number, where expm1(d)/d is
    exactly 1, so d = 0 gives e^x without a special case; a pair both at −∞ (masked attention
    scores) gives 0. ``e_a``, ``e_r``: exp(a), exp(r) when the caller already has them."""
    if e_a is None:
        e_a, e_r = torch.exp(a), torch.exp(r)
    e_lo, e_hi = torch.minimum(e_a, e_r), torch.maximum(e_a, e_r)
    d = torch.nan_to_num_((a - r).abs_(), nan=0.0).clamp_min_(torch.finfo(a.dtype).tiny)
    closed = torch.expm1(d).div_(d).mul_(e_lo)
    direct = (e_hi - e_lo).div_(d)
    return torch.where(d > 1, direct, closed)


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


def _rescale_exponential_base(a, r, base):
    """R of v ↦ base^v (base fixed, > 0): base^lo · log(base) · expm1(d log base)/(d log base)
    for d·|log base| ≤ 1, the plain quotient otherwise. Derivative base^v log(base); 0 where
    base = 0 and v ≥ 0 (torch's pow backward)."""
    lo, hi, d = _lo_hi(a, r)
    log_base = torch.log(base)
    closed = base**lo * log_base * _expm1_ratio(d * log_base)
    direct = (base**hi - base**lo) / _safe(d)
    rescale = torch.where((base > 0) & (d * log_base.abs() <= 1), closed, direct)
    derivative = torch.where((base == 0) & (a >= 0), 0.0, base**a * log_base)
    return torch.where(d == 0, derivative, rescale)


def _rescale_atan2_y(a, r, x):
    """R of y ↦ atan2(y, x), x fixed: Δθ = atan2(x Δy, x² + y_a y_r) (angle between the two
    points, no cancellation) unless the pair crosses the branch cut, then the plain difference.
    Derivative x / (x² + y²)."""
    dy = a - r
    short = torch.atan2(x * dy, x * x + a * r)
    plain = torch.atan2(a, x) - torch.atan2(r, x)
    angle = torch.where((plain - short).abs() < math.pi, short, plain)
    return torch.where(dy == 0, x / (x * x + a * a), angle / _safe(dy))


def _rescale_atan2_x(a, r, y):
    """R of x ↦ atan2(y, x), y fixed: Δθ = atan2(−y Δx, x_a x_r + y²) unless the branch cut is
    crossed. Derivative −y / (x² + y²)."""
    dx = a - r
    short = torch.atan2(-y * dx, a * r + y * y)
    plain = torch.atan2(y, a) - torch.atan2(y, r)
    angle = torch.where((plain - short).abs() < math.pi, short, plain)
    return torch.where(dx == 0, -y / (a * a + y * y), angle / _safe(dx))


def _rescale_maximum(a, r, other):
    """R of u ↦ max(u, other): piecewise linear with a corner at ``other``; ½ on a tie (torch)."""
    derivative = lambda x: torch.where(x > other, 1.0, torch.where(x == other, 0.5, 0.0))  # noqa: E731
    return _rescale_piecewise_linear(a, r, [other], [0.0, 1.0], derivative)


def _rescale_minimum(a, r, other):
    """R of u ↦ min(u, other); ½ on a tie (torch)."""
    derivative = lambda x: torch.where(x < other, 1.0, torch.where(x == other, 0.5, 0.0))  # noqa: E731
    return _rescale_piecewise_linear(a, r, [other], [1.0, 0.0], derivative)


# --------------------------------------------------------------------------------------
# Rule builders
# --------------------------------------------------------------------------------------


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


def _binary_shapley(rescale_u: Callable, rescale_v: Callable, name: str, formula: str) -> Callable:
    """Two-player Shapley rule of y = f(u, v): φ_u = ½[f(u_a,v_r) − f(u_r,v_r) + f(u_a,v_a) −
    f(u_r,v_a)], so m_u = m · ½[R_u(v_r) + R_u(v_a)] with R_u(v) the Rescale factor of
    u ↦ f(u, v) between u_a and u_r (its derivative where u_a = u_r); symmetric for v."""

    def rule(m: Tensor, actual, reference) -> Multipliers:
        (u_a, v_a), (u_r, v_r) = actual, reference
        ua, ur, va, vr = map(_f64, (u_a, u_r, v_a, v_r))
        k_u = (rescale_u(ua, ur, vr) + rescale_u(ua, ur, va)) * 0.5
        k_v = (rescale_v(va, vr, ur) + rescale_v(va, vr, ua)) * 0.5
        return _scaled(m, k_u, u_a), _scaled(m, k_v, v_a)

    rule.__name__ = name
    rule.__doc__ = (
        f"Two-player Shapley rule of {formula}: m_u = m · φ_u / (u_a − u_r) with\n"
        f"φ_u = ½[f(u_a,v_r) − f(u_r,v_r) + f(u_a,v_a) − f(u_r,v_a)] (limit ½[∂_u f(u,v_r) + "
        f"∂_u f(u,v_a)] where u_a = u_r); symmetric for v.\n\nactual = (u_a, v_a), reference = "
        f"(u_r, v_r): (N, *s) each, already broadcast; m (2, N, *s) -> (m_u, m_v), (2, N, *s)."
    )
    return rule


# --------------------------------------------------------------------------------------
# Binary elementwise with closed forms
# --------------------------------------------------------------------------------------


def mul(m: Tensor, actual, reference) -> Multipliers:
    """y = u · v, two-player Shapley: m_u = m · mean(v), m_v = m · mean(u).

    actual = (u_a, v_a), reference = (u_r, v_r): (N, *s) each, already broadcast;
    m (2, N, *s) -> (m_u, m_v), (2, N, *s) in the operands' dtypes.
    """
    (u_a, v_a), (u_r, v_r) = actual, reference
    return _scaled(m, _mean(v_a, v_r), u_a), _scaled(m, _mean(u_a, u_r), v_a)


def div(m: Tensor, actual, reference) -> Multipliers:
    """y = u / v, two-player Shapley: m_u = m · (1/v_a + 1/v_r)/2,
    m_v = −m · (u_a + u_r) / (2 v_a v_r).

    actual = (u_a, v_a), reference = (u_r, v_r): (N, *s), already broadcast; m (2, N, *s).
    """
    (u_a, v_a), (u_r, v_r) = actual, reference
    inv_a, inv_r = 1.0 / _f64(v_a), 1.0 / _f64(v_r)
    k_u = (inv_a + inv_r) * 0.5
    k_v = -_mean(u_a, u_r) * inv_a * inv_r
    return _scaled(m, k_u, u_a), _scaled(m, k_v, v_a)


# --------------------------------------------------------------------------------------
# Bilinear ops: each operand's multiplier is the vector-Jacobian product at the other
# operand's Shapley mean (exact: f(u_a,v_a) − f(u_r,v_r) = f(Δu, mean v) + f(mean u, Δv)).
# --------------------------------------------------------------------------------------


def _matmul_multipliers(m: Tensor, u_a, u_r, v_a, v_r, scale: float = 1.0) -> Multipliers:
    """m_u = scale · m @ mean(v)ᵀ, m_v = scale · mean(u)ᵀ @ m, reduced to each operand's shape.

    u (N, *bu, n, k), v (N, *bv, k, p) with per-pair torch.matmul batch broadcasting;
    m (2, N, *b, n, p). Means and products in the operands' dtype.
    """
    dtype = u_a.dtype
    ndim = max(u_a.ndim, v_a.ndim)
    mean_u = _pad_after_pair(_native_mean(u_a, u_r).to(dtype), ndim)
    mean_v = _pad_after_pair(_native_mean(v_a, v_r).to(dtype), ndim)
    m = m.to(dtype)
    if scale != 1.0:
        m = m * scale
    m_u = torch.matmul(m, mean_v.transpose(-1, -2))
    m_v = torch.matmul(mean_u.transpose(-1, -2), m)
    return _reduce_to(m_u, u_a.shape), _reduce_to(m_v, v_a.shape)


def matmul(m: Tensor, actual, reference) -> Multipliers:
    """y = u @ v (torch.matmul, per pair, with batch broadcasting; u and v at least 2-D per
    pair): m_u = m @ mean(v)ᵀ, m_v = mean(u)ᵀ @ m, summed over broadcast batch axes.

    actual = (u_a, v_a), reference = (u_r, v_r): u (N, *bu, n, k), v (N, *bv, k, p);
    m (2, N, *b, n, p) -> (m_u (2, N, *bu, n, k), m_v (2, N, *bv, k, p)).
    Means are correctly rounded in the operands' dtype (see _native_mean).
    """
    (u_a, v_a), (u_r, v_r) = actual, reference
    if u_a.ndim < 3 or v_a.ndim < 3:
        raise ValueError(
            "matmul rule: both operands must be at least 2-D per pair (shape (N, ..., n, k)); "
            f"got {tuple(u_a.shape)} and {tuple(v_a.shape)}. Unsqueeze vectors to matrices first."
        )
    return _matmul_multipliers(m, u_a, u_r, v_a, v_r)


def bmm(m: Tensor, actual, reference) -> Multipliers:
    """y = bmm(u, v) per pair: u (N, b, n, k), v (N, b, k, p), m (2, N, b, n, p);
    m_u = m @ mean(v)ᵀ, m_v = mean(u)ᵀ @ m."""
    return matmul(m, actual, reference)


def mm(m: Tensor, actual, reference) -> Multipliers:
    """y = mm(u, v) per pair: u (N, n, k), v (N, k, p), m (2, N, n, p);
    m_u = m @ mean(v)ᵀ, m_v = mean(u)ᵀ @ m."""
    return matmul(m, actual, reference)


def baddbmm(m: Tensor, actual, reference, *, beta=1.0, alpha=1.0) -> Multipliers:
    """y = β c + α (u @ v) per pair: m_c = β m (summed to c's broadcast shape),
    m_u = α m @ mean(v)ᵀ, m_v = α mean(u)ᵀ @ m.

    actual = (c_a, u_a, v_a): c (N, *sc) broadcastable to (b, n, p), u (N, b, n, k),
    v (N, b, k, p); m (2, N, b, n, p).
    """
    (c_a, u_a, v_a), (_, u_r, v_r) = actual, reference
    m_u, m_v = _matmul_multipliers(m, u_a, u_r, v_a, v_r, scale=float(alpha))
    m_c = _reduce_to(m.to(c_a.dtype) * beta, c_a.shape)
    return m_c, m_u, m_v


def linear(m: Tensor, actual, reference) -> Multipliers:
    """y = x @ wᵀ + b per pair (F.linear): m_x = m @ mean(w), m_w = Σ_* mᵀ mean(x),
    m_b = Σ_* m.

    actual = (x_a, w_a[, b_a]): x (N, *, in), w (N, out, in), b (N, out) (b may be absent or
    None); m (2, N, *, out) -> (m_x, m_w[, m_b]) (None for an absent b).
    """
    x_a, w_a = actual[0], actual[1]
    x_r, w_r = reference[0], reference[1]
    b_a = actual[2] if len(actual) > 2 else None
    dtype = x_a.dtype
    m_ = m.to(dtype)
    mean_w = _native_mean(w_a, w_r).to(dtype)
    mean_x = _native_mean(x_a, x_r).to(dtype)
    m_x = torch.einsum("hn...o,noi->hn...i", m_, mean_w)
    m_w = torch.einsum("hn...o,n...i->hnoi", m_, mean_x)
    result = (m_x, m_w.to(w_a.dtype))
    if len(actual) > 2:
        m_b = None if b_a is None else torch.einsum("hn...o->hno", m_).to(b_a.dtype)
        result = result + (m_b,)
    return result


def _explicit_equation(equation: str) -> tuple[list[str], str]:
    """Split an einsum equation (no pair axis) into input terms and an explicit output term
    (torch's implicit output: the letters that appear once, sorted, after any ellipsis)."""
    equation = equation.replace(" ", "")
    if "->" in equation:
        inputs, output = equation.split("->")
        return inputs.split(","), output
    inputs = equation.split(",")
    letters = [c for term in inputs for c in term.replace("...", "")]
    once = sorted(c for c in set(letters) if letters.count(c) == 1)
    ellipsis = "..." if any("..." in term for term in inputs) else ""
    return inputs, ellipsis + "".join(once)


def einsum(m: Tensor, actual, reference, *, equation: str) -> Multipliers:
    """y = einsum(equation, u, v) per pair (equation WITHOUT the pair axis, e.g. "tk,sk->ts"):
    m_u = VJP of u ↦ einsum(u, mean(v)), m_v = VJP of v ↦ einsum(mean(u), v), evaluated with
    torch.autograd on the doubled batch (so repeated letters, ellipses and broadcasting follow
    torch's own einsum backward).

    actual = (u_a, v_a): (N, *su), (N, *sv); m (2, N, *s_out) -> (m_u, m_v).
    """
    (u_a, v_a), (u_r, v_r) = actual, reference
    terms, output = _explicit_equation(equation)
    if len(terms) != 2:
        raise ValueError(f"einsum rule takes two operands, the equation {equation!r} has {len(terms)}")
    pair = next(c for c in string.ascii_letters if c not in equation)
    paired = f"{pair}{terms[0]},{pair}{terms[1]}->{pair}{output}"
    n = u_a.shape[0]
    dtype = u_a.dtype

    def doubled(t: Tensor) -> Tensor:
        return t.to(dtype).unsqueeze(0).expand(2, *t.shape).reshape(2 * n, *t.shape[1:])

    mean_u, mean_v = doubled(_native_mean(u_a, u_r)), doubled(_native_mean(v_a, v_r))
    with torch.enable_grad():
        u_var = torch.zeros_like(mean_u, requires_grad=True)
        v_var = torch.zeros_like(mean_v, requires_grad=True)
        y = torch.einsum(paired, u_var, mean_v) + torch.einsum(paired, mean_u, v_var)
        m_u, m_v = torch.autograd.grad(y, (u_var, v_var), m.to(dtype).reshape(y.shape))
    return m_u.reshape((2,) + u_a.shape), m_v.reshape((2,) + v_a.shape).to(v_a.dtype)


# --------------------------------------------------------------------------------------
# Composites (exactly the composition of the rules above)
# --------------------------------------------------------------------------------------


def _shift(x_a: Tensor, x_r: Tensor, dims) -> Tensor:
    """c = max over both halves along ``dims`` (keepdim): common to the pair, so it cancels."""
    c = torch.maximum(x_a.amax(dim=dims, keepdim=True), x_r.amax(dim=dims, keepdim=True))
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))


def _exp_sums(x_a: Tensor, x_r: Tensor, dims):
    """Shifted logits z = x − c (c = max over both halves along ``dims``), e = exp(z) and
    S = Σ_dims e, for each half (float64)."""
    c = _shift(x_a, x_r, dims)
    z_a, z_r = x_a - c, x_r - c
    e_a, e_r = torch.exp(z_a), torch.exp(z_r)
    return (z_a, z_r), (e_a, e_r), (e_a.sum(dims, keepdim=True), e_r.sum(dims, keepdim=True))


def _log_softmax_input_multiplier(m: Tensor, z, e, S, dims) -> Tensor:
    """float64 core of the log_softmax rule, from ``_exp_sums``' values:
    m_S = −Σ_dims m · R_log(S_a, S_r), m_x = m + m_S · R_exp(z_a, z_r)."""
    m_S = -m.sum(dims, keepdim=True) * _rescale_log(*S)
    return m + m_S * _rescale_exp(*z, *e)


def _softmax_input_multiplier(m: Tensor, x_a: Tensor, x_r: Tensor, dims) -> Tensor:
    """float64 core of the softmax rule, softmax = exp ∘ log_softmax: m (2, N, *s) -> m_x (2, N, *s).

    Why not e · reciprocal(Σ e): that composition is exact too, but its multipliers grow like
    e^L when the two halves' logits differ in level by L (a reference shifted by a constant
    gets attributions of size e^L that cancel, although softmax did not change). Through
    log_softmax every coefficient stays bounded by the probabilities, and a uniform shift of
    the logits gets zero attributions, as softmax's invariance says it should.
    """
    z, e, S = _exp_sums(x_a, x_r, dims)
    u_a, u_r = z[0] - torch.log(S[0]), z[1] - torch.log(S[1])
    m_u = m * _rescale_exp(u_a, u_r, e[0] / S[0], e[1] / S[1])
    return _log_softmax_input_multiplier(m_u, z, e, S, dims)


def softmax(m: Tensor, actual, reference, *, dim: int) -> Multipliers:
    """y = softmax(x, dim) as exp(u) with u = log_softmax(x, dim) (the log_softmax rule below):
    m_u = m · R_exp(u_a, u_r), then m_x = m_u + m_S · R_exp(x_a − c, x_r − c) with
    m_S = −Σ_dim m_u · R_log(S_a, S_r), S = Σ_dim exp(x − c), c = max over both halves along dim.

    actual = (x_a,): (N, *s); dim negative; m (2, N, *s) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    return (_softmax_input_multiplier(_f64(m), _f64(x_a), _f64(x_r), dims).to(x_a.dtype),)


def log_softmax(m: Tensor, actual, reference, *, dim: int) -> Multipliers:
    """y = (x − c) − log(S), S = Σ_dim exp(x − c): m_S = −Σ_dim m · R_log(S_a, S_r),
    m_x = m + m_S · R_exp(x_a − c, x_r − c).

    actual = (x_a,): (N, *s); dim negative; m (2, N, *s) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    z, e, S = _exp_sums(_f64(x_a), _f64(x_r), dims)
    return (_log_softmax_input_multiplier(_f64(m), z, e, S, dims).to(x_a.dtype),)


def logsumexp(m: Tensor, actual, reference, *, dim, keepdim: bool = False) -> Multipliers:
    """y = c + log(S), S = Σ_dim exp(x − c) (c common to the pair, its path dropped):
    m_x = m · R_log(S_a, S_r) · R_exp(x_a − c, x_r − c).

    actual = (x_a,): (N, *s); dim negative (int or tuple); m (2, N, *s_out) -> (m_x (2, N, *s),).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    m64 = _f64(m) if keepdim else _unsqueeze_dims(_f64(m), dims)
    z, e, S = _exp_sums(_f64(x_a), _f64(x_r), dims)
    return ((m64 * _rescale_log(*S) * _rescale_exp(*z, *e)).to(x_a.dtype),)


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
    return (_rms_scaling(_f64(m), _f64(x_a), _f64(x_r), weight, eps, dims).to(x_a.dtype),)


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


def glu(m: Tensor, actual, reference, *, dim: int = -1) -> Multipliers:
    """y = a · sigmoid(b), (a, b) the halves of x along dim: m_a = m · mean(σ(b)),
    m_b = m · mean(a) · R_σ(b_a, b_r); m_x = cat(m_a, m_b) along dim.

    actual = (x_a,): (N, *s) (even size along dim); m (2, N, *s with half along dim) -> (m_x,).
    """
    (x_a,), (x_r,) = actual, reference
    (d,) = _pair_dims(dim, x_a.ndim)
    a_a, b_a = _f64(x_a).chunk(2, dim=d)
    a_r, b_r = _f64(x_r).chunk(2, dim=d)
    m64 = _f64(m)
    m_first = m64 * _mean(torch.sigmoid(b_a), torch.sigmoid(b_r))
    m_second = m64 * _mean(a_a, a_r) * rescale_sigmoid(b_a, b_r)
    return (torch.cat((m_first, m_second), dim=d).to(x_a.dtype),)


def amax(m: Tensor, actual, reference, *, dim, keepdim: bool = False) -> Multipliers:
    """y = amax(x, dim) (also max(x, dim).values), exact routing between the two maxima.

    j* = argmax of actual, k* = argmax of reference along dim (first index on ties),
    dy = y_a − y_r. If j* = k*: m_{j*} = m. Else half of dy goes through each route:
    m_{j*} = m · (dy/2) / dx_{j*}, m_{k*} = m · (dy/2) / dx_{k*}; a route whose dx is exactly 0
    gives its half to the other. All other entries 0. A tuple of dims is flattened into one.

    actual = (x_a,): (N, *s); dim negative; m (2, N, *s_out) -> (m_x (2, N, *s),).
    """
    (x_a,), (x_r,) = actual, reference
    dims = _pair_dims(dim, x_a.ndim)
    if len(dims) > 1:
        return _amax_over_several_dims(m, x_a, x_r, dims, keepdim)
    (d,) = dims
    x_a64, x_r64 = _f64(x_a), _f64(x_r)
    j = x_a64.argmax(dim=d, keepdim=True)
    k = x_r64.argmax(dim=d, keepdim=True)
    dx = x_a64 - x_r64
    dy = x_a64.gather(d, j) - x_r64.gather(d, k)
    dx_j, dx_k = dx.gather(d, j), dx.gather(d, k)
    same = j == k
    half = dy * 0.5
    c_j = torch.where(dx_j == 0, 0.0, torch.where(dx_k == 0, dy, half) / _safe(dx_j))
    c_k = torch.where(dx_k == 0, 0.0, torch.where(dx_j == 0, dy, half) / _safe(dx_k))
    c_j = torch.where(same, 1.0, c_j)
    c_k = torch.where(same, 0.0, c_k)
    m64 = _f64(m) if keepdim else m.to(torch.float64).unsqueeze(d)
    out = torch.zeros((2,) + tuple(x_a.shape), dtype=torch.float64, device=m.device)
    index_shape = (2,) + tuple(j.shape)
    out.scatter_add_(d, j.expand(index_shape), m64 * c_j)
    out.scatter_add_(d, k.expand(index_shape), m64 * c_k)
    return (out.to(x_a.dtype),)


def _amax_over_several_dims(m, x_a, x_r, dims, keepdim):
    """amax over several axes: move them last, flatten them into one, route, undo."""
    ndim = x_a.ndim
    pos = [ndim + d for d in dims]
    moved_shape = [s for i, s in enumerate(x_a.shape) if i not in pos] + [x_a.shape[p] for p in pos]
    kept = ndim - len(pos)

    def flat(t: Tensor) -> Tensor:
        return t.movedim(pos, list(range(kept, ndim))).reshape(*moved_shape[:kept], -1)

    m_kept = _f64(m) if not keepdim else _f64(m).squeeze(tuple(p + 1 for p in pos))
    (m_flat,) = amax(m_kept, (flat(x_a),), (flat(x_r),), dim=-1)
    m_moved = m_flat.reshape(2, *moved_shape)
    back = m_moved.movedim(list(range(1 + ndim - len(pos), 1 + ndim)), [p + 1 for p in pos])
    return (back,)


def scaled_dot_product_attention(
    m: Tensor, actual, reference, *, attn_mask=None, is_causal: bool = False, scale=None, dropout_p=0.0
) -> Multipliers:
    """y = softmax(S) @ v with S = (q @ kᵀ) · scale + mask (scale = 1/√E if None; a bool mask
    is −∞ where False, is_causal masks the upper triangle), composed of the bilinear rule
    (m_P = m @ mean(v)ᵀ, m_v = mean(P)ᵀ @ m), the softmax rule on S (dim −1) and the bilinear
    rule again (m_q = scale · m_S @ mean(k), m_k = scale · m_Sᵀ @ mean(q)).

    actual = (q_a, k_a, v_a): q (N, *b, L, E), k (N, *b, S, E), v (N, *b, S, Ev) (batch axes
    broadcast per pair); attn_mask constant, broadcastable to (*b, L, S);
    m (2, N, *b, L, Ev) -> (m_q, m_k, m_v). Computed in float64.
    """
    if dropout_p:
        raise ValueError(
            "scaled_dot_product_attention rule: dropout_p must be 0 while explaining (put the model in eval() mode)"
        )
    (q_a, k_a, v_a), (q_r, k_r, v_r) = actual, reference
    q_a64, k_a64, v_a64, q_r64, k_r64, v_r64 = map(_f64, (q_a, k_a, v_a, q_r, k_r, v_r))
    if scale is None:
        scale = 1.0 / math.sqrt(q_a.shape[-1])
    L, S = q_a.shape[-2], k_a.shape[-2]
    additive = torch.zeros((L, S), dtype=torch.float64, device=q_a.device)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q_a.device).tril()
        additive = additive.masked_fill(~allowed, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            additive = additive + torch.zeros_like(attn_mask, dtype=torch.float64).masked_fill(~attn_mask, -math.inf)
        else:
            additive = additive + _f64(attn_mask)

    def scores(q, k):
        ndim = max(q.ndim, k.ndim)
        return torch.matmul(_pad_after_pair(q, ndim), _pad_after_pair(k, ndim).transpose(-1, -2)) * scale + additive

    S_a, S_r = scores(q_a64, k_a64), scores(q_r64, k_r64)
    P_a, P_r = torch.softmax(S_a, -1), torch.softmax(S_r, -1)
    m64 = _f64(m)
    m_P, m_v = _matmul_multipliers(m64, P_a, P_r, v_a64, v_r64)
    m_S = _softmax_input_multiplier(m_P, S_a, S_r, (-1,))
    m_q, m_kt = _matmul_multipliers(m_S, q_a64, q_r64, k_a64.transpose(-1, -2), k_r64.transpose(-1, -2), scale=scale)
    return (
        _reduce_to(m_q, q_a.shape).to(q_a.dtype),
        _reduce_to(m_kt.transpose(-1, -2), k_a.shape).to(k_a.dtype),
        _reduce_to(m_v, v_a.shape).to(v_a.dtype),
    )


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------

OP_RULES: dict[str, Callable] = {
    "relu": _unary(_rescale_relu, "relu", "relu(x) = max(x, 0)"),
    "leaky_relu": _unary(_rescale_leaky_relu, "leaky_relu", "leaky_relu(x; negative_slope=0.01)"),
    "relu6": _unary(_rescale_relu6, "relu6", "relu6(x) = min(max(x, 0), 6)"),
    "elu": _unary(_rescale_elu, "elu", "elu(x; alpha=1.0)"),
    "gelu": _unary(_rescale_gelu, "gelu", 'gelu(x; approximate="none"|"tanh")'),
    "silu": _unary(_rescale_silu, "silu", "silu(x) = x·σ(x)"),
    "softplus": _unary(_rescale_softplus, "softplus", "softplus(x; beta=1.0, threshold=20.0)"),
    "sigmoid": _unary(_rescale_sigmoid, "sigmoid", "sigmoid(x)"),
    "tanh": _unary(_rescale_tanh, "tanh", "tanh(x)"),
    "exp": _unary(_rescale_exp, "exp", "exp(x)"),
    "log": _unary(_rescale_log, "log", "log(x)"),
    "sqrt": _unary(_rescale_sqrt, "sqrt", "sqrt(x)"),
    "rsqrt": _unary(_rescale_rsqrt, "rsqrt", "rsqrt(x) = x^(-1/2)"),
    "reciprocal": _unary(_rescale_reciprocal, "reciprocal", "reciprocal(x) = 1/x"),
    "square": _unary(_rescale_square, "square", "square(x) = x²"),
    "clamp": _unary(_rescale_clamp, "clamp", "clamp(x; min=None, max=None)"),
    "pow_scalar": _unary(
        lambda a, r, exponent: _rescale_power(a, r, float(exponent)), "pow_scalar", "x ** exponent (a float)"
    ),
    "mul": mul,
    "div": div,
    "maximum": _binary_shapley(_rescale_maximum, _rescale_maximum, "maximum", "maximum(u, v)"),
    "minimum": _binary_shapley(_rescale_minimum, _rescale_minimum, "minimum", "minimum(u, v)"),
    "pow": _binary_shapley(
        lambda a, r, v: _rescale_power(a, r, v), lambda a, r, u: _rescale_exponential_base(a, r, u), "pow", "u ** v"
    ),
    "atan2": _binary_shapley(_rescale_atan2_y, _rescale_atan2_x, "atan2", "atan2(u, v)"),
    "matmul": matmul,
    "bmm": bmm,
    "mm": mm,
    "einsum": einsum,
    "baddbmm": baddbmm,
    "linear": linear,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "logsumexp": logsumexp,
    "layer_norm": layer_norm,
    "rms_norm": rms_norm,
    "vector_norm": vector_norm,
    "glu": glu,
    "amax": amax,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}


def rule_for(name: str) -> Callable:
    """The rule registered under ``name``; a clear error naming the supported ops otherwise."""
    try:
        return OP_RULES[name]
    except KeyError:
        raise KeyError(f"no DeepLIFT rule for op {name!r}; rules exist for: {', '.join(sorted(OP_RULES))}") from None
