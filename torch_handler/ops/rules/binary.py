"""Binary elementwise ops ``y = f(u, v)`` of two varying operands: the two-player Shapley rule,
``m_u = m · mean over v ∈ {v_r, v_a} of (f(u_a, v) − f(u_r, v))/Δu``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _expm1_ratio, _f64, _lo_hi, _mean, _safe, _scaled
from torch_handler.ops.rules.unary import _rescale_piecewise_linear, _rescale_power


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


maximum = _binary_shapley(_rescale_maximum, _rescale_maximum, "maximum", "maximum(u, v)")
minimum = _binary_shapley(_rescale_minimum, _rescale_minimum, "minimum", "minimum(u, v)")
power = _binary_shapley(
    lambda a, r, v: _rescale_power(a, r, v), lambda a, r, u: _rescale_exponential_base(a, r, u), "pow", "u ** v"
)
atan2 = _binary_shapley(_rescale_atan2_y, _rescale_atan2_x, "atan2", "atan2(u, v)")
