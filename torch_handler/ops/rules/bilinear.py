"""Bilinear ops of two varying operands (matmul, bmm, mm, baddbmm, linear with a varying weight,
einsum): each operand's multiplier is the vector–Jacobian product at the other operand's mean."""

from __future__ import annotations

import string

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _native_mean, _pad_after_pair, _reduce_to


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
    # Both halves side by side as one (n, 2p) right operand: torch.matmul would otherwise
    # broadcast mean(u)ᵀ over the half axis as a copy (half the time at 256 pairs of 24 x 24).
    n, p = m.shape[-2:]
    m_halves = m.movedim(0, -2).reshape(*m.shape[1:-1], 2 * p)
    m_v = torch.matmul(mean_u.transpose(-1, -2), m_halves)
    m_v = m_v.reshape(*m_v.shape[:-1], 2, p).movedim(-2, 0)
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
