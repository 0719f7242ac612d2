"""The softmax family: log_softmax = (x − c) − log Σ exp(x − c) by exp and log Rescale (c common
to the pair), logsumexp = c + log Σ exp(x − c), softmax = exp(log_softmax(x))."""

from __future__ import annotations

import torch
from torch import Tensor

from torch_handler.ops.rules._common import Multipliers, _f64, _pair_dims, _unsqueeze_dims
from torch_handler.ops.rules._compiled import scratch, x_m_out
from torch_handler.ops.rules.unary import _rescale_exp, _rescale_log
from torch_handler.recurrent import cpu_kernels


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


def _softmax_input_multiplier(m: Tensor, x_a: Tensor, x_r: Tensor, dims, sums=None) -> Tensor:
    """float64 core of the softmax rule, softmax = exp ∘ log_softmax: m (2, N, *s) -> m_x (2, N, *s).

    Why not e · reciprocal(Σ e): that composition is exact too, but its multipliers grow like
    e^L when the two halves' logits differ in level by L (a reference shifted by a constant
    gets attributions of size e^L that cancel, although softmax did not change). Through
    log_softmax every coefficient stays bounded by the probabilities, and a uniform shift of
    the logits gets zero attributions, as softmax's invariance says it should.

    ``sums``: ``_exp_sums(x_a, x_r, dims)`` when the caller already has it.
    """
    z, e, S = _exp_sums(x_a, x_r, dims) if sums is None else sums
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
    compiled = _compiled_softmax(m, x_a, x_r, dims[0]) if len(dims) == 1 else None
    if compiled is not None:
        return (compiled,)
    return (_softmax_input_multiplier(_f64(m), _f64(x_a), _f64(x_r), dims).to(x_a.dtype),)


def _compiled_softmax(m: Tensor, x_a: Tensor, x_r: Tensor, dim: int) -> Tensor | None:
    """The softmax rule in one call of the compiled CPU library (``softmax_rule_f64``: the same
    formulas in float64, a row at a time, the Rescale factors of exp from the exponentials it
    already has), in ``x_a``'s dtype, the operands read in place; or None where it does not
    serve (see ``cpu_kernels.serving``; an empty tensor).

    Why: as torch ops the rule is some twenty float64 passes over the logits, each a fresh
    allocation; attention scores of a few hundred pairs make them MBs each.
    """
    library = cpu_kernels.serving(x_a.device)
    if library is None or x_a.numel() == 0:
        return None
    moved = x_a.movedim(dim, -1).shape
    N, S = moved[0], moved[-1]
    R = x_a.numel() // (N * S)  # rows per pair

    def rows(t: Tensor) -> Tensor:
        return t.movedim(dim, -1).reshape(N, R, 1, S)  # a view unless the rows' dims do not merge

    ops, out, keep = x_m_out(rows(x_a), rows(x_r), rows(m[0]), rows(m[1]), (N, R, 1, S))
    threads = torch.get_num_threads()
    work = scratch(threads * library.softmax_work_f64(S))
    # Every tensor whose address the kernel gets is held by a name until it returns (keep, work).
    library.softmax_rule_f64(threads, N * R, R, S, ops, work.data_ptr())
    return out.view(2, *moved).movedim(-1, dim).to(x_a.dtype)


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
